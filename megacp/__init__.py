"""megacp: context parallelism (PCP prefill, DCP decode) for LLM inference.

The entry points, imported on first use (``import megacp`` itself loads nothing, not even torch)::

    megacp.parallel_state            # initialize_model_parallel(...), the groups, allreduce_grads
    megacp.initialize_model_parallel, megacp.destroy_model_parallel, megacp.allreduce_grads
    megacp.ParallelConfig            # the validated layout (tp, pcp, dcp, dp, interleave)
    megacp.KVSession                 # per-rank paged KV cache of a set of requests; step() -> AttentionMetadata
    megacp.AttentionMetadata, megacp.build_attention_metadata
    megacp.LLMEngine, megacp.SamplingParams, megacp.load_model

The layers a model is built from are in ``megacp.layers``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "parallel_state": ("megacp.parallel_state", None),
    "initialize_model_parallel": ("megacp.parallel_state", "initialize_model_parallel"),
    "destroy_model_parallel": ("megacp.parallel_state", "destroy_model_parallel"),
    "allreduce_grads": ("megacp.parallel_state", "allreduce_grads"),
    "ParallelConfig": ("megacp.config", "ParallelConfig"),
    "KVSession": ("megacp.kv.session", "KVSession"),
    "AttentionMetadata": ("megacp.layers.cp_metadata", "AttentionMetadata"),
    "build_attention_metadata": ("megacp.layers.metadata_builder", "build_attention_metadata"),
    "LLMEngine": ("megacp.engine", "LLMEngine"),
    "SamplingParams": ("megacp.sampling", "SamplingParams"),
    "load_model": ("megacp.models.loader", "load_model"),
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports on first use
    from megacp import parallel_state
    from megacp.config import ParallelConfig
    from megacp.engine import LLMEngine
    from megacp.kv.session import KVSession
    from megacp.layers.cp_metadata import AttentionMetadata
    from megacp.layers.metadata_builder import build_attention_metadata
    from megacp.models.loader import load_model
    from megacp.parallel_state import allreduce_grads, destroy_model_parallel, initialize_model_parallel
    from megacp.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megacp' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
