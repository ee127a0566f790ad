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

from dataclasses import dataclass

import torch
from torch import Tensor

from megacp.ops import paged_decode
from megacp.ops.decode_fused import pdl_options
from megacp.ops.merge_kernel import merge_partials
from megacp.ops.paged_decode import DecodePlan, triton

if triton is not None:
    import triton.language as tl

    from megacp.ops.decode_fused import wait_for_previous_kernel
    from megacp.ops.merge_kernel import merge_splits_on_arrival

_REF_CHUNK_TOKENS = 4096  # reference: latent rows gathered at once (bounds its float32 copy)
_LOG2E = 1.4426950408889634
_MAX_SPLITS = 128  # the merge kernel walks any number
_MIN_SPLIT_TOKENS = 256  # a split's float32 partial (H·v_head_dim·4 bytes, written and read) stays small next to
# the latent rows it reads (tokens·576·2 bytes): at 256 tokens and 16 heads about a tenth ...
_SHORT_SHARD_SPLITS, _MIN_SHORT_SPLIT_TOKENS = 32, 64  # ... except that up to 32 splits of >= 64 tokens may cut a
# short shard: there the launch, not the bandwidth, is the cost (H200: 1-2k-token shards at batch 1 and 16 ran
# 1.3-2x faster with 16-32 splits than with 4-8 of 256 tokens, docs/benchmarks.md)
_MAX_ID_TILES = 1024  # block ids a split program holds in registers (8 per thread at 4 warps)


@dataclass(frozen=True)
class MLADecodePlan(DecodePlan):
    """How the MLA split kernel is launched: ``DecodePlan``'s fields (``num_splits`` programs per sequence and head
    block, tiles of ``block_n`` tokens, ``num_warps``, ``num_stages``, ``fused_merge``) plus ``block_h``, the query
    heads one program takes (all of a sequence's heads when they fit: each latent row is then read once per
    split). ``num_stages`` defaults to 3: two latent tiles buffered, one in flight while the other is computed, in
    93 KB of shared memory, so two programs share a multiprocessor (4 stages: one program, slower)."""

    block_n: int = 32
    num_stages: int = 3
    block_h: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if (not isinstance(self.block_h, int) or isinstance(self.block_h, bool) or self.block_h < 16
                or self.block_h & (self.block_h - 1)):
            raise ValueError(f"MLADecodePlan(block_h={self.block_h!r}) is not valid: use a power of two from 16, "
                             f"e.g. 16")


def choose_mla_plan(batch: int, num_heads: int, max_tokens: int, num_sms: int = 132) -> MLADecodePlan:
    """The split-KV plan for ``batch`` sequences of ``num_heads`` latent query heads and at most ``max_tokens``
    local tokens (an upper bound such as the block table's capacity: no device read).

    Heads in blocks of 16 (4 warps) up to 16 heads, else of 32 (8 warps): ptxas fits those tiles (a [block_h, 512]
    float32 accumulator, a [block_n, 576] latent tile) in registers without spilling, block_h 64 spills. Tiles of
    32 rows, 3 stages; splits aim at two programs per multiprocessor (what the shared memory of that pipeline
    allows), each of at least ``_MIN_SPLIT_TOKENS`` tokens (short shards: up to ``_SHORT_SHARD_SPLITS`` splits of
    ``_MIN_SHORT_SPLIT_TOKENS``), at most ``_MAX_SPLITS``; the splits are merged by the merge kernel, never in
    the split kernel (``fused_merge`` stays a plan option: its last program walks the splits one by one, which measured
    5-35% slower than the merge kernel at every split count on the H200, docs/benchmarks.md). ``bench/decode_sweep.py --kind mla`` times this rule against every plan of a
    grid (docs/benchmarks.md: on the H200 it beat tiles of 16 or 64, 8 warps and 4 to 6 stages at batch 16 and 64).
    """
    block_h = 16 if num_heads <= 16 else 32
    head_blocks = -(-num_heads // block_h)
    want = max(1, round(2 * num_sms / max(1, batch * head_blocks)))
    by_size = max(-(-max_tokens // _MIN_SPLIT_TOKENS),
                  min(_SHORT_SHARD_SPLITS, -(-max_tokens // _MIN_SHORT_SPLIT_TOKENS)))
    splits = min(want, max(1, by_size), _MAX_SPLITS)
    return MLADecodePlan(num_splits=splits, block_h=block_h, num_warps=4 if block_h <= 16 else 8)


def kernel_supports(q: Tensor, latent_cache: Tensor, v_head_dim: int) -> bool:
    """Whether the Triton kernel takes these inputs on ``q``'s device: CUDA (or the CPU under
    ``TRITON_INTERPRET=1``), one dtype among float16, bfloat16 and float32 (float32 computed without tf32), value
    part up to 512 and rope part up to 128 columns, no gradients needed."""
    return (paged_decode.available(q.device) and latent_cache.dtype == q.dtype
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and v_head_dim <= 512 and q.shape[-1] - v_head_dim <= 128 and latent_cache.stride(-1) == 1
            and not (torch.is_grad_enabled() and q.requires_grad))


def paged_mla_decode_with_lse(
    q: Tensor,
    latent_cache: Tensor,
    block_table: Tensor,
    local_seq_lens: Tensor,
    scale: float,
    v_head_dim: int,
    out: Tensor | None = None,
    lse: Tensor | None = None,
    max_seq_len: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Absorbed MLA decode (one query per sequence, non-causal) over this rank's paged latent shard, with LSE.

    # q: [B, H, D] latent queries (q_nope·W_UK then q_pe), latent_cache: [N, block_size, D] (c_kv then k_pe),
    # block_table: int [B, M] (local block ids), local_seq_lens: int [B] on q's device (§2 local lengths, may be 0)
    # -> (out [B, H, v_head_dim] q.dtype, lse [B, H] float32 natural log)
    Scores are ``scale · q·row`` over the whole row; values are the row's first ``v_head_dim`` columns. A sequence
    of length 0 (an empty shard) gives out 0 and lse -inf. ``out`` [B, H, v_head_dim] (any float dtype, last dim
    contiguous) and ``lse`` [B, H] float32, given together and of any strides otherwise, receive the result in place
    (the two views of DCP's packed ``[out | lse]`` buffer) and are returned. On CUDA (``kernel_supports``) the
    Triton kernel runs (``paged_mla_decode_kernel``), elsewhere ``paged_mla_decode_reference``.
    ``max_seq_len``: the longest of ``local_seq_lens`` as a host int when the caller knows it (the step metadata's
    ``seq_lens_host``): the reference walks only that far without reading the lengths back (the kernel ignores it).
    """
    _check_args(q, latent_cache, block_table, local_seq_lens, v_head_dim, out, lse)
    if q.is_cuda and kernel_supports(q, latent_cache, v_head_dim):
        return paged_mla_decode_kernel(q, latent_cache, block_table, local_seq_lens, scale, v_head_dim,
                                       out=out, lse=lse)
    res_out, res_lse = paged_mla_decode_reference(q, latent_cache, block_table, local_seq_lens, scale, v_head_dim,
                                                  max_seq_len)
    if out is None:
        return res_out, res_lse
    out.copy_(res_out)
    lse.copy_(res_lse)
    return out, lse


def paged_mla_decode_reference(
    q: Tensor, latent_cache: Tensor, block_table: Tensor, local_seq_lens: Tensor, scale: float, v_head_dim: int,
    max_seq_len: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The PyTorch path of ``paged_mla_decode_with_lse`` (same contract, no ``out=``): float32 math (float64 for
    float64 inputs), an online softmax over chunks of the block table's columns, fixed shapes and no read-back of
    the lengths except on CPU (where it trims the walk to the longest sequence: ``max_seq_len`` when given, else
    read from ``local_seq_lens``).

    # q [B, H, D], latent_cache [N, bs, D], block_table [B, M], local_seq_lens [B] -> (out [B, H, Dv], lse [B, H])
    """
    B, H, D = q.shape
    bs = latent_cache.shape[1]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lens = local_seq_lens.to(device=q.device, dtype=torch.long)
    rows = block_table.to(device=q.device, dtype=torch.long)
    if max_seq_len is not None:
        rows = rows[:, : -(-max_seq_len // bs)]
    elif q.device.type == "cpu" and B > 0:
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


def paged_mla_decode_kernel(
    q: Tensor, latent_cache: Tensor, block_table: Tensor, local_seq_lens: Tensor, scale: float, v_head_dim: int,
    plan: MLADecodePlan | None = None, out: Tensor | None = None, lse: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The Triton path of ``paged_mla_decode_with_lse`` (same contract; ``kernel_supports`` must hold).

    # q [B, H, D], latent_cache [N, bs, D], block_table int [B, M], local_seq_lens int [B] -> (out [B, H, Dv], lse)
    One program per (head block, sequence, split): it loads its heads' latent queries once, walks its share of the
    sequence in tiles of ``block_n`` latent rows looked up through the block table, scores each tile against the
    whole row (the ``v_head_dim`` value columns and the rope columns as two matrix products, no padding to a power of
    two of D) and accumulates the value columns of the same tile, online softmax in base 2. Each tile is loaded once
    into shared memory for both products; where a tile lies in one block the split's block ids are read before the
    loop (``_id_tiles``) so that Triton's pipeliner keeps ``num_stages - 1`` tiles buffered. ``plan`` overrides
    ``choose_mla_plan`` (sized by the block table's capacity, so a CUDA graph and eager calls launch the same grid).
    """
    B, H, D = q.shape
    bs = latent_cache.shape[1]
    out = torch.empty(B, H, v_head_dim, dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty(B, H, dtype=torch.float32, device=q.device) if lse is None else lse
    if B == 0 or H == 0:
        return out, lse
    q = q.contiguous() if q.stride(-1) != 1 else q
    if plan is None:
        num_sms = paged_decode._num_sms(q.device.index if q.device.index is not None else torch.cuda.current_device()
                                        ) if q.is_cuda else 4
        plan = choose_mla_plan(B, H, block_table.shape[1] * bs, num_sms)
    splits, head_blocks = plan.num_splits, -(-H // plan.block_h)
    fused = plan.fused_merge and splits > 1
    if splits == 1:  # the split kernel writes the final output and LSE itself
        out_part, lse_part, stride_os, stride_ls = out, lse, 0, 0
    else:
        out_part = torch.empty(B, H, splits, v_head_dim, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
        stride_os, stride_ls = out_part.stride(2), lse_part.stride(2)
    lens = local_seq_lens.to(device=q.device)
    # fused merge: one arrival counter per (sequence, head block); else any device tensor (never touched)
    counters = paged_decode._arrival_counters(q.device, B * head_blocks) if fused else lens
    block_table = block_table.to(device=q.device)
    pe = D - v_head_dim
    pdl = pdl_options(q)
    _mla_split_kernel[(head_blocks, B, splits)](
        q, latent_cache, block_table, lens, out_part, lse_part,
        q.stride(0), q.stride(1), latent_cache.stride(0), latent_cache.stride(1), block_table.stride(0),
        out_part.stride(0), out_part.stride(1), stride_os, lse_part.stride(0), lse_part.stride(1), stride_ls,
        out, lse, counters, out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        H, float(scale) * _LOG2E, splits,
        FUSED_MERGE=fused, BLOCK_SIZE=bs, BLOCK_H=plan.block_h,
        DV=v_head_dim, DV_PAD=max(16, triton.next_power_of_2(v_head_dim)),
        DPE=pe, DPE_PAD=max(16, triton.next_power_of_2(max(pe, 1))), HAS_PE=pe > 0, BLOCK_N=plan.block_n,
        ID_TILES=_id_tiles(plan, bs, block_table.shape[1] * bs),
        # float32 caches (tests) must not silently drop to tf32 in the matrix units
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", GDC=bool(pdl),
        num_warps=plan.num_warps, num_stages=plan.num_stages, **pdl,
    )
    if splits > 1 and not fused:  # [B, H, S, Dv] partials, merged as [S, B, H, Dv] strided views
        merge_partials(out_part.permute(2, 0, 1, 3), lse_part.permute(2, 0, 1), out, lse)
    return out, lse


def _id_tiles(plan: MLADecodePlan, block_size: int, capacity: int) -> int:
    """How many block ids a split program reads up front (64, 256 or 1024, at least its tiles: the block table's
    ``capacity`` bounds every length; few sizes, few compiled variants), or 0: it looks each tile's ids up in its
    loop. Up front only where a tile lies in one block (``block_n`` divides ``block_size``)."""
    tiles = -(-(-(-capacity // plan.block_n)) // plan.num_splits)
    if block_size % plan.block_n or tiles > _MAX_ID_TILES:
        return 0
    n = 64
    while n < tiles:
        n *= 4
    return n


if triton is not None:

    @triton.jit
    def _mla_split_kernel(
        q_ptr, c_ptr, bt_ptr, lens_ptr, out_ptr, lse_ptr,
        stride_qb, stride_qh, stride_cn, stride_ct, stride_btb,
        stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
        fin_out_ptr, fin_lse_ptr, counter_ptr, stride_fb, stride_fh, stride_flb, stride_flh,
        num_heads, scale_log2, num_splits,
        FUSED_MERGE: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
        DV: tl.constexpr, DV_PAD: tl.constexpr, DPE: tl.constexpr, DPE_PAD: tl.constexpr, HAS_PE: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ID_TILES: tl.constexpr, GDC: tl.constexpr,
    ):
        if GDC:  # launched with PDL (decode_fused.pdl_options): the queries come from the previous kernel
            wait_for_previous_kernel()
        hb = tl.program_id(0)  # fastest-varying: a (sequence, split)'s head blocks run together and share L2
        b = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(lens_ptr + b).to(tl.int32)
        # this split's share of the real length: whole tiles, spread evenly (trailing splits may be empty)
        tokens_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits) * BLOCK_N
        start = split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, seq_len)

        h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = h < num_heads
        dv = tl.arange(0, DV_PAD)
        dv_ok = dv < DV
        q_row = q_ptr + b * stride_qb + h[:, None] * stride_qh
        q_nope = tl.load(q_row + dv[None, :], mask=h_ok[:, None] & dv_ok[None, :], other=0.0)
        if HAS_PE:
            dp = tl.arange(0, DPE_PAD)
            dp_ok = dp < DPE
            q_pe = tl.load(q_row + DV + dp[None, :], mask=h_ok[:, None] & dp_ok[None, :], other=0.0)

        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, DV_PAD], tl.float32)
        bt_row = bt_ptr + b * stride_btb
        if ID_TILES > 0:
            # This split's block ids, one per tile (a tile lies in one block), read once: the tile loop then holds no
            # load that its addresses depend on, so Triton's pipeliner keeps num_stages - 1 tiles in flight (with a
            # block-table load in the loop the chain takes the stages: one tile in flight up to num_stages 4).
            tile = tl.arange(0, ID_TILES)
            tile_ids = tl.load(bt_row + (start + tile * BLOCK_N) // BLOCK_SIZE, mask=start + tile * BLOCK_N < end,
                               other=0)
        # Every tile starts below ``end``, so it holds at least one real token and m_i is finite after it.
        for t0 in range(start, end, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            t_ok = t < end
            if ID_TILES > 0:
                blk = tl.sum(tl.where(tile == (t0 - start) // BLOCK_N, tile_ids, 0), 0).to(tl.int64)
            else:
                blk = tl.load(bt_row + t // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
            row = c_ptr + blk * stride_cn + (t % BLOCK_SIZE) * stride_ct  # [BLOCK_N] pointers to latent rows
            # the value columns: keys' first part and, unchanged, the values
            kv = tl.load(row[:, None] + dv[None, :], mask=t_ok[:, None] & dv_ok[None, :], other=0.0)
            s = tl.dot(q_nope, tl.trans(kv), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
            if HAS_PE:
                k_pe = tl.load(row[:, None] + DV + dp[None, :], mask=t_ok[:, None] & dp_ok[None, :], other=0.0)
                s += tl.dot(q_pe, tl.trans(k_pe), input_precision=DOT_PRECISION)
            s = tl.where(t_ok[None, :], s * scale_log2, float("-inf"))  # base-2 logits
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=DOT_PRECISION)
            m_i = m_new

        has = l_i > 0
        l_safe = tl.where(has, l_i, 1.0)
        res = acc / l_safe[:, None]
        res_lse = tl.where(has, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))
        o_mask = h_ok[:, None] & dv_ok[None, :]
        tl.store(out_ptr + b * stride_ob + h[:, None] * stride_oh + split * stride_os + dv[None, :],
                 res.to(out_ptr.dtype.element_ty), mask=o_mask)
        tl.store(lse_ptr + b * stride_lb + h * stride_lh + split * stride_ls, res_lse, mask=h_ok)

        if FUSED_MERGE:  # the last split program of this (sequence, head block) to arrive merges every split
            merge_splits_on_arrival(
                counter_ptr + b * tl.num_programs(0) + hb, num_splits,
                lse_ptr + b * stride_lb + h * stride_lh, stride_ls,
                out_ptr + b * stride_ob + h[:, None] * stride_oh + dv[None, :], stride_os, h_ok, dv_ok,
                fin_out_ptr + b * stride_fb + h[:, None] * stride_fh + dv[None, :],
                fin_lse_ptr + b * stride_flb + h * stride_flh, BLOCK_H, DV_PAD,
            )


__all__ = ["MLADecodePlan", "choose_mla_plan", "kernel_supports", "paged_mla_decode_with_lse",
           "paged_mla_decode_kernel", "paged_mla_decode_reference"]
