"""The public entry points: ``megacp`` and ``megacp.layers`` export what a model of your own needs, and ``import
megacp`` stays cheap (nothing heavy until an export is used)."""

from __future__ import annotations

import subprocess
import sys


def test_import_megacp_loads_nothing_heavy():
    code = ("import sys, megacp; heavy = [m for m in ('torch', 'transformers', 'safetensors', 'megacp.engine') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_export_resolves():
    import megacp
    import megacp.layers
    from megacp import parallel_state

    for name in megacp.__all__:
        assert getattr(megacp, name) is not None, name
    for name in megacp.layers.__all__ + ["MoELayer"]:
        assert getattr(megacp.layers, name) is not None, name
    assert megacp.parallel_state is parallel_state and megacp.allreduce_grads is parallel_state.allreduce_grads
    assert megacp.KVSession is __import__("megacp.kv", fromlist=["KVSession"]).KVSession
    assert megacp.layers.MoELayer is __import__("megacp.moe", fromlist=["MoELayer"]).MoELayer
    assert {"KVSession", "LLMEngine", "load_model", "SamplingParams", "AttentionMetadata"} <= set(dir(megacp))
