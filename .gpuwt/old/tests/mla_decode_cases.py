"""Shared cases for the paged MLA decode op (CPU tests, the Triton interpreter checks, the GPU tests).

``sharded_case`` lays whole sequences' latent rows out over ``W`` CP ranks with the real §2 machinery
(``BlockTable.compute_slot_mapping``, ``cp_local_seq_lens``), so a rank's shard, block table and local lengths are
what a DCP decode step sees; ``dense_reference`` is the attention of the unsharded sequences in float64, the
oracle the per-rank results are merged and compared against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megacp.kv import BlockTable, cp_local_seq_lens


def sharded_case(seq_lens: list[int], heads: int, kv_lora_rank: int, rope: int, block_size: int, world: int,
                 interleave: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0, spare_blocks: int = 1,
                 poison: bool = True) -> dict:
    """Latent queries/rows of ``len(seq_lens)`` sequences and every CP rank's paged shard of them.

    Returns ``q [B, H, D]`` and ``rows`` (list of ``[L_b, D]``, both in ``dtype``) and ``ranks``: per rank a dict of
    ``cache [N, block_size, D]``, ``block_table int32 [B, M]``, ``lens int32 [B]`` on ``device``. Blocks are handed
    out in a shuffled order; the block table has ``spare_blocks`` unused columns (capacity beyond the longest
    sequence, as a CUDA graph sees); with ``poison`` every unwritten slot holds NaN, so reading past a length shows.
    """
    g = torch.Generator().manual_seed(seed)
    D = kv_lora_rank + rope
    B = len(seq_lens)
    virt = block_size * world
    blocks_per_seq = [-(-n // virt) for n in seq_lens]
    M = max(blocks_per_seq, default=0) + spare_blocks
    num_blocks = sum(blocks_per_seq) + 1
    ids = torch.randperm(num_blocks, generator=g).tolist()
    q = (torch.randn(B, heads, D, generator=g) * 0.5).to(dtype)
    rows = [torch.randn(n, D, generator=g).to(dtype) for n in seq_lens]
    ranks = []
    for r in range(world):
        table = BlockTable(block_size, B, M, cp_world_size=world, cp_rank=r, interleave_size=interleave)
        fill = float("nan") if poison else 0.0
        cache = torch.full((num_blocks, block_size, D), fill, dtype=dtype)
        start = 0
        for b, n in enumerate(seq_lens):
            table.set_row(b, ids[start:start + blocks_per_seq[b]])
            start += blocks_per_seq[b]
            if n:
                slots = table.compute_slot_mapping(torch.full((n,), b), torch.arange(n))
                mine = slots >= 0
                cache.view(-1, D)[slots[mine]] = rows[b][mine]
        bt = table.table.to(torch.int32)
        lens = cp_local_seq_lens(torch.tensor(seq_lens), world, r, interleave).to(torch.int32)
        ranks.append({"cache": cache.to(device), "block_table": bt.to(device), "lens": lens.to(device)})
    return {"q": q.to(device), "rows": rows, "ranks": ranks, "v_head_dim": kv_lora_rank}


def dense_reference(q: Tensor, rows: list[Tensor], scale: float, v_head_dim: int) -> tuple[Tensor, Tensor]:
    """Float64 attention of each query row against its whole (unsharded) sequence.

    # q [B, H, D], rows: B × [L_b, D] -> (out [B, H, v_head_dim] float64, lse [B, H] float64; 0 / -inf if L_b = 0)
    """
    B, H, _ = q.shape
    out = torch.zeros(B, H, v_head_dim, dtype=torch.float64)
    lse = torch.full((B, H), float("-inf"), dtype=torch.float64)
    for b, lat in enumerate(rows):
        if lat.shape[0] == 0:
            continue
        lat = lat.double().cpu()
        s = q[b].double().cpu() @ lat.T * scale  # [H, L]
        lse[b] = torch.logsumexp(s, -1)
        out[b] = torch.softmax(s, -1) @ lat[:, :v_head_dim]
    return out, lse


def merge_ranks(outs: list[Tensor], lses: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The LSE merge of the ranks' partials in float64 (``o = Σ exp(l_i − L)·o_i``), on the CPU."""
    from megacp.ops import merge_attn_states_n

    return merge_attn_states_n(torch.stack([o.double().cpu() for o in outs]),
                               torch.stack([lse.double().cpu() for lse in lses]))


def bf16_reference(q: Tensor, rows: list[Tensor], scale: float, v_head_dim: int) -> Tensor:
    """Attention computed the way a bf16 kernel rounds (flash-attention's "bf16 reference" for its 2× error rule):
    scores from a bf16 matrix product, softmax in float32, probabilities and the output rounded to bf16.

    # q [B, H, D] bf16 on any device, rows: B × [L_b, D] -> out [B, H, v_head_dim] bf16 (0 where L_b = 0)
    """
    B, H, _ = q.shape
    out = torch.zeros(B, H, v_head_dim, dtype=q.dtype, device=q.device)
    for b, lat in enumerate(rows):
        if lat.shape[0] == 0:
            continue
        lat = lat.to(device=q.device, dtype=q.dtype)
        p = torch.softmax((q[b] @ lat.T).float() * scale, -1).to(q.dtype)  # [H, L]
        out[b] = p @ lat[:, :v_head_dim]
    return out
