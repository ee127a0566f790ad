"""Attention kernels that return log-sum-exp, and the LSE merges used by context parallelism."""

from megacp.ops.attention import (
    ENV_BACKEND,
    AttentionBackend,
    attention_with_lse,
    available_backends,
    get_backend,
    paged_attention_with_lse,
    register_backend,
    select_backend,
)
from megacp.ops.varlen import bottom_right_causal_from_top_left, bottom_right_causal_mask, per_sequence, rows_with_keys
from megacp.ops import backends_cpu as _backends_cpu  # noqa: E402,F401  (registers "torch", "sdpa_cpu")
from megacp.ops import backends_cuda as _backends_cuda  # noqa: E402,F401  (registers "te", "cudnn", "flash")
from megacp.ops.merge import (
    cp_merge_gathered,
    cp_merge_packed,
    dcp_merge,
    lse_merge_weights,
    merge_attn_states,
    merge_attn_states_n,
)

__all__ = [
    "ENV_BACKEND",
    "AttentionBackend",
    "attention_with_lse",
    "available_backends",
    "get_backend",
    "bottom_right_causal_from_top_left",
    "bottom_right_causal_mask",
    "cp_merge_gathered",
    "cp_merge_packed",
    "dcp_merge",
    "lse_merge_weights",
    "merge_attn_states",
    "merge_attn_states_n",
    "paged_attention_with_lse",
    "per_sequence",
    "register_backend",
    "rows_with_keys",
    "select_backend",
]
