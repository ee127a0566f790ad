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


def rotate_half(x: Tensor) -> Tensor:
    """Hugging Face's ``rotate_half``: ``(-x2, x1)`` of the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """positions ``[T]`` → cos, sin ``[T, D]`` in float32 (the two halves repeated, neox layout), as HF builds them."""
    freqs = positions.float()[:, None] * inv_freq.to(device=positions.device, dtype=torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF's ``apply_rotary_pos_emb`` for one tensor: x ``[T, H, D]``, cos/sin ``[T, D]`` (cast to x's dtype first)."""
    cos = cos.to(x.dtype).unsqueeze(1)
    sin = sin.to(x.dtype).unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def attention_by_positions(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           q_positions: Tensor, k_positions: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Packed varlen attention masked by absolute positions, in float64: within each sequence a query at position
    ``qp`` sees the keys with ``kp <= qp`` (keys may be any subset of the sequence, e.g. one CP rank's shard).

    # q [Tq, Hq, D], k/v [Tk, Hk, D] -> (out [Tq, Hq, D] in q.dtype, lse [Tq, Hq] float32); no key: out 0, lse -inf
    """
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    lse = torch.full((q.shape[0], q.shape[1]), float("-inf"), dtype=torch.float64)
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        qs = q[q0:q1].double()
        ks = k[k0:k1].double().repeat_interleave(group, dim=1)
        vs = v[k0:k1].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        allowed = k_positions[k0:k1].unsqueeze(0) <= q_positions[q0:q1].unsqueeze(1)  # [lq, lk]
        scores = scores.masked_fill(~allowed.unsqueeze(0), float("-inf"))
        seq_lse = torch.logsumexp(scores, dim=-1)  # [H, lq]
        probs = torch.exp(scores - torch.where(torch.isfinite(seq_lse), seq_lse, 0.0).unsqueeze(-1))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, vs)
        lse[q0:q1] = seq_lse.transpose(0, 1)
    return out.to(q.dtype), lse.float()


def pcp_merge(out: Tensor, lse: Tensor, group) -> tuple[Tensor, Tensor]:
    """The PCP merge as two collectives (all-gather lse, all-reduce the rescaled output): what
    ``cp_merge_gathered`` replaces with one all-gather. # out [B, H, D], lse [B, H] -> same, identical on every rank"""
    from megacp.ops.merge import lse_merge_weights

    if group.world_size == 1:
        return out, lse.float()
    all_lse = group.all_gather(lse.float().unsqueeze(0).contiguous(), dim=0)  # [W, B, H]
    weights, merged_lse = lse_merge_weights(all_lse)
    scaled = weights[group.rank_in_group].unsqueeze(-1) * out.float()
    return group.all_reduce(scaled.contiguous()).to(out.dtype), merged_lse


def layout_context(pcp: int = 1, dcp: int = 1, pcp_rank: int = 0, dcp_rank: int = 0):
    """The ``ParallelContext`` (no communicators) of the rank with ``pcp_rank``/``dcp_rank`` in a layout of
    ``tp = dcp``: what a metadata builder of that rank plans with, without processes."""
    from megacp.config import ParallelConfig
    from megacp.parallel_state import ParallelContext

    config = ParallelConfig(tensor_model_parallel_size=dcp, prefill_context_parallel_size=pcp,
                            decode_context_parallel_size=dcp)
    return ParallelContext.from_layout(config, pcp_rank * dcp + dcp_rank)
