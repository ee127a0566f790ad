"""Paged MLA decode with LSE: latent queries against the paged latent cache (DESIGN.md §3b, absorbed decode).

MLA stores one latent row per token and layer, ``c_kv`` (``kv_lora_rank`` numbers) then ``k_pe``
(``qk_rope_head_dim``), shared by every head: the absorbed decode is a multi-query attention with one "KV head"
whose key is the whole row (576 numbers for DeepSeek) and whose value is its first ``v_head_dim`` (= kv_lora_rank)
columns. ``paged_mla_decode_with_lse`` is the op the MLA layer calls: on CUDA a Triton split-KV kernel, elsewhere
(CPU, other devices, dtypes the kernel does not take) the PyTorch reference ``paged_mla_decode_reference``.

Both read this rank's §2-local lengths from the device tensor and never read them back on the device paths (CUDA
graphs): the reference walks the block table's whole capacity, masked (on CPU it stops at the longest sequence,
which costs nothing there), and the kernel plans its launch by the capacity, each program finding its share of the
real length on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

_REF_CHUNK_TOKENS = 4096  # reference: latent rows gathered at once (bounds its float32 copy)


def paged_mla_decode_with_lse(
    q: Tensor,
    latent_cache: Tensor,
    block_table: Tensor,
    local_seq_lens: Tensor,
    scale: float,
    v_head_dim: int,
    out: Tensor | None = None,
    lse: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Absorbed MLA decode (one query per sequence, non-causal) over this rank's paged latent shard, with LSE.

    # q: [B, H, D] latent queries (q_nope·W_UK then q_pe), latent_cache: [N, block_size, D] (c_kv then k_pe),
    # block_table: int [B, M] (local block ids), local_seq_lens: int [B] on q's device (§2 local lengths, may be 0)
    # -> (out [B, H, v_head_dim] q.dtype, lse [B, H] float32 natural log)
    Scores are ``scale · q·row`` over the whole row; values are the row's first ``v_head_dim`` columns. A sequence
    of length 0 (an empty shard) gives out 0 and lse -inf. ``out`` [B, H, v_head_dim] (any float dtype, last dim
    contiguous) and ``lse`` [B, H] float32, given together and of any strides otherwise, receive the result in place
    (the two views of DCP's packed ``[out | lse]`` buffer) and are returned.
    """
    _check_args(q, latent_cache, block_table, local_seq_lens, v_head_dim, out, lse)
    res_out, res_lse = paged_mla_decode_reference(q, latent_cache, block_table, local_seq_lens, scale, v_head_dim)
    if out is None:
        return res_out, res_lse
    out.copy_(res_out)
    lse.copy_(res_lse)
    return out, lse


def paged_mla_decode_reference(
    q: Tensor, latent_cache: Tensor, block_table: Tensor, local_seq_lens: Tensor, scale: float, v_head_dim: int
) -> tuple[Tensor, Tensor]:
    """The PyTorch path of ``paged_mla_decode_with_lse`` (same contract, no ``out=``): float32 math (float64 for
    float64 inputs), an online softmax over chunks of the block table's columns, fixed shapes and no read-back of
    the lengths except on CPU (where it trims the walk to the longest sequence).

    # q [B, H, D], latent_cache [N, bs, D], block_table [B, M], local_seq_lens [B] -> (out [B, H, Dv], lse [B, H])
    """
    B, H, D = q.shape
    bs = latent_cache.shape[1]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lens = local_seq_lens.to(device=q.device, dtype=torch.long)
    rows = block_table.to(device=q.device, dtype=torch.long)
    if q.device.type == "cpu" and B > 0:
        rows = rows[:, : -(-int(lens.max()) // bs)]
    qf = q.to(acc_dtype)
    m = torch.full((B, H), float("-inf"), dtype=acc_dtype, device=q.device)
    l_sum = torch.zeros(B, H, dtype=acc_dtype, device=q.device)
    acc = torch.zeros(B, H, v_head_dim, dtype=acc_dtype, device=q.device)
    step = max(1, _REF_CHUNK_TOKENS // bs)
    for c0 in range(0, rows.shape[1], step):
        lat = latent_cache[rows[:, c0:c0 + step]].reshape(B, -1, D).to(acc_dtype)  # [B, T, D]
        pos = c0 * bs + torch.arange(lat.shape[1], device=q.device)
        valid = pos < lens.unsqueeze(1)  # [B, T]
        lat = lat.masked_fill(~valid.unsqueeze(-1), 0.0)  # slots past the length may hold anything, NaN included
        s = torch.einsum("bhd,btd->bht", qf, lat) * scale
        s = s.masked_fill(~valid.unsqueeze(1), float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, 0.0)
        p = torch.exp(s - m_safe.unsqueeze(-1))  # 0 where masked
        alpha = torch.exp(m - m_safe)  # 0 while m is -inf
        l_sum = l_sum * alpha + p.sum(-1)
        acc = acc * alpha.unsqueeze(-1) + torch.einsum("bht,btd->bhd", p, lat[..., :v_head_dim])
        m = m_new
    has = l_sum > 0
    out = acc / torch.where(has, l_sum, 1.0).unsqueeze(-1)
    lse = torch.where(has, m + torch.log(torch.where(has, l_sum, 1.0)), float("-inf"))
    return out.to(q.dtype), lse.to(torch.float32)


def _check_args(q: Tensor, latent_cache: Tensor, block_table: Tensor, local_seq_lens: Tensor, v_head_dim: int,
                out: Tensor | None, lse: Tensor | None) -> None:
    if q.dim() != 3 or latent_cache.dim() != 3 or q.shape[-1] != latent_cache.shape[-1]:
        raise ValueError(f"paged_mla_decode_with_lse: expected q [B, H, D] and latent_cache [N, block_size, D] with "
                         f"one D, got {tuple(q.shape)} and {tuple(latent_cache.shape)}")
    B, H, D = q.shape
    if not isinstance(v_head_dim, int) or not 0 < v_head_dim <= D:
        raise ValueError(f"paged_mla_decode_with_lse: v_head_dim={v_head_dim!r} must be an int in 1..D={D} "
                         f"(the latent's kv_lora_rank, e.g. 512)")
    if block_table.dim() != 2 or block_table.shape[0] != B or local_seq_lens.shape != (B,):
        raise ValueError(f"paged_mla_decode_with_lse: block_table {tuple(block_table.shape)} and local_seq_lens "
                         f"{tuple(local_seq_lens.shape)} need one row per query (B={B})")
    if out is None and lse is None:
        return
    if (out is None or lse is None or out.shape != (B, H, v_head_dim) or lse.shape != (B, H)
            or lse.dtype != torch.float32 or not out.is_floating_point() or out.stride(-1) != 1
            or out.device != q.device or lse.device != q.device):
        got_out = None if out is None else (tuple(out.shape), out.dtype)
        got_lse = None if lse is None else (tuple(lse.shape), lse.dtype)
        raise ValueError(f"paged_mla_decode_with_lse: out and lse go together on q's device, out [B, H, v_head_dim]"
                         f" = {[B, H, v_head_dim]} floating with a contiguous last dim and lse [B, H] float32; got "
                         f"out {got_out} and lse {got_lse}")


__all__ = ["paged_mla_decode_with_lse", "paged_mla_decode_reference"]
