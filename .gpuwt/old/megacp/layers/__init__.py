"""The layers a model built on megacp needs, each working on this rank's share of the tokens and the weights.

Attention (``ContextParallelAttention``: PCP prefill split, DCP-sharded KV decode, prefill over cached context; and
``MLAAttention``, DeepSeek's multi-head latent attention over a latent cache, with its core ``LatentAttention``) takes
the step's ``AttentionMetadata`` (from ``megacp.KVSession.step`` or ``build_attention_metadata``); the Megatron-style
tensor-parallel linears, the vocabulary-parallel embedding / LM head, RMSNorm, rotary embeddings and the MoE layer
(``megacp.moe.MoELayer``). Each constructor takes ``parallel_context=`` (default: ``parallel_state``'s, one rank
before ``initialize_model_parallel``). docs/own_model.md shows a model of your own built from them.
"""

from megacp.layers.cp_attention import ContextParallelAttention
from megacp.layers.cp_metadata import AttentionMetadata
from megacp.layers.metadata_builder import AttentionMetadataBuilder, build_attention_metadata
from megacp.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from megacp.layers.latent_attention import LatentAttention
from megacp.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from megacp.layers.mla_attention import MLAAttention
from megacp.layers.norm import RMSNorm
from megacp.layers.pcp_split import pcp_split_positions
from megacp.layers.rotary import RotaryEmbedding, RotaryTables, apply_rotary_tables, compute_inv_freq, rotary_tables
from megacp.moe.layer import MoELayer

__all__ = [
    "AttentionMetadata",
    "AttentionMetadataBuilder",
    "ColumnParallelLinear",
    "ContextParallelAttention",
    "LatentAttention",
    "MLAAttention",
    "MergedColumnParallelLinear",
    "MoELayer",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "ReplicatedLinear",
    "RotaryEmbedding",
    "RotaryTables",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "apply_rotary_tables",
    "build_attention_metadata",
    "compute_inv_freq",
    "pcp_split_positions",
    "rotary_tables",
]

