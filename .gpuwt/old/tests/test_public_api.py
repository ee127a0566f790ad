"""The public entry points: ``megacp`` and ``megacp.layers`` export what a model of your own needs, imported once
and directly (no lazy re-export hooks: the imports run one way, so none is needed), and ``import megacp`` loads no
optional package (transformers, safetensors: the checkpoint loader reads them on use)."""

from __future__ import annotations

import subprocess
import sys


def test_import_megacp_binds_every_export_and_loads_no_optional_package():
    code = ("import sys, megacp, megacp.kv, megacp.layers; "
            "heavy = [m for m in ('transformers', 'safetensors') if m in sys.modules]; "
            "lazy = [m.__name__ for m in (megacp, megacp.kv, megacp.layers) if '__getattr__' in vars(m)]; "
            "unbound = [n for n in megacp.__all__ if n not in vars(megacp)]; print(heavy, lazy, unbound)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] [] []"


def test_every_export_resolves():
    import megacp
    import megacp.layers
    from megacp import parallel_state

    for name in megacp.__all__:
        assert getattr(megacp, name) is not None, name
    for name in megacp.layers.__all__:
        assert getattr(megacp.layers, name) is not None, name
    assert megacp.parallel_state is parallel_state and megacp.allreduce_grads is parallel_state.allreduce_grads
    assert megacp.KVSession is __import__("megacp.session", fromlist=["KVSession"]).KVSession
    assert megacp.layers.MoELayer is __import__("megacp.moe", fromlist=["MoELayer"]).MoELayer
    assert {"KVSession", "LLMEngine", "load_model", "SamplingParams", "AttentionMetadata"} <= set(dir(megacp))
