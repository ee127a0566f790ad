"""Paged, context-parallel KV cache: slot math, block table, allocator, caches (GQA K/V and MLA latent rows,
DESIGN §2), and ``KVSession``, which owns them for a set of requests and builds each step's metadata."""

from megacp.kv.allocator import BlockAllocator, KVCacheFullError, blocks_needed
from megacp.kv.block_table import BlockTable
from megacp.kv.layout import (
    cp_local_index,
    cp_local_positions,
    cp_local_seq_lens,
    cp_local_slot,
    cp_owner_rank,
    kv_capacity_tokens,
    validate_kv_layout,
)
from megacp.kv.latent_cache import LatentPagedCache
from megacp.kv.paged_cache import PagedKVCache

__all__ = [
    "BlockAllocator",
    "BlockTable",
    "KVCacheFullError",
    "KVSession",
    "LatentPagedCache",
    "PagedKVCache",
    "blocks_needed",
    "cp_local_index",
    "cp_local_positions",
    "cp_local_seq_lens",
    "cp_local_slot",
    "cp_owner_rank",
    "kv_capacity_tokens",
    "validate_kv_layout",
]


def __getattr__(name: str):
    # KVSession builds step metadata (megacp.layers), which itself imports megacp.kv: imported on first use, so the
    # two packages do not import each other while initialising.
    if name == "KVSession":
        from megacp.kv.session import KVSession

        return KVSession
    raise AttributeError(f"module 'megacp.kv' has no attribute {name!r}")
