"""Reference helpers shared by tests: independent, slow, obviously-correct versions of what the library does fast."""

from __future__ import annotations

import torch
from torch import Tensor

from megacp.kv.layout import local_slots


def gather_local_shard(cache, block_ids_row, local_len: int) -> tuple[Tensor, Tensor]:
    """One request's local K/V shard of a ``PagedKVCache`` in local order: (k, v) ``[local_len, Hkv, D]``.

    Entry ``j`` is the token at ``cp_local_positions(...)[j]`` (a rank's tokens fill its blocks densely).
    """
    row = torch.as_tensor(block_ids_row, dtype=torch.long).reshape(-1)
    if local_len < 0 or local_len > row.numel() * cache.block_size:
        raise ValueError(f"local_len={local_len} does not fit {row.numel()} blocks of {cache.block_size} slots")
    slots = local_slots(row, torch.arange(local_len), cache.block_size).to(cache.device)
    flat_k = cache.k.reshape(-1, cache.num_kv_heads, cache.head_dim)
    flat_v = cache.v.reshape(-1, cache.num_kv_heads, cache.head_dim)
    return flat_k.index_select(0, slots), flat_v.index_select(0, slots)
