"""Triton LSE merges of N partial attention states (``merge.merge_attn_states_n``'s math, fused).

``merge_partials`` is one kernel; two decode paths merge partials in it: the paged decode kernels' split-KV partials
(``paged_decode``, ``paged_mla_decode``) and the CP ranks' gathered partials of a decode step
(``merge.cp_merge_gathered``). ``merge_splits_on_arrival`` is the same merge inside a split-KV kernel: the last of a
tile's split programs to finish merges them all (the fused merge of both paged decode kernels, no second launch). In PyTorch ops the CP merge is about fifteen
small kernels per layer (max, exp, sums, divisions, casts); inside a CUDA-graph decode step each costs a few
microseconds of launch gap, which is most of what DCP added to a step on two H200s (docs/benchmarks.md). Here it is
one launch: one program per (row, head) walks the partials in chunks.

Partials may live in any strided layout (the last dim contiguous), so a slice of a gathered ``[W, B, H, D + 1]``
buffer is read in place. Empty partials (``lse = -inf``) weigh 0 and are not read; a row whose partials are all
empty gives out 0 and lse -inf, as the PyTorch merge does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megacp.ops.decode_fused import pdl_options, tl, triton

if triton is not None:
    from megacp.ops.decode_fused import last_to_arrive, wait_for_previous_kernel

_CHUNK = 16  # partials loaded at once
MAX_INTO = 4  # partials merge_into takes in one launch


def merge_partials(part: Tensor, part_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """Merge ``S`` partial states into ``out`` and ``lse`` (written in place).

    # part: [S, B, H, D] float32, part_lse: [S, B, H] float32 (any strides; part's last dim contiguous)
    # -> out: [B, H, D] (any float dtype, last dim contiguous), lse: [B, H] float32
    Needs Triton (``paged_decode.available(device)``); the caller falls back to ``merge_attn_states_n``.
    """
    S, B, H, D = part.shape
    if part_lse.shape != (S, B, H) or out.shape != (B, H, D) or lse.shape != (B, H):
        raise ValueError(f"merge_partials: part {tuple(part.shape)}, part_lse {tuple(part_lse.shape)}, out "
                         f"{tuple(out.shape)} and lse {tuple(lse.shape)} must be [S,B,H,D], [S,B,H], [B,H,D], [B,H]")
    if part.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("merge_partials: part's and out's last dim must be contiguous")
    if B == 0 or H == 0:
        return
    pdl = pdl_options(out)
    _merge_kernel[(B, H)](
        part, part_lse, out, lse, S,
        part.stride(0), part.stride(1), part.stride(2),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        HEAD_DIM=D, D_PAD=max(16, triton.next_power_of_2(D)), CHUNK=_CHUNK, GDC=bool(pdl),
        num_warps=4, **pdl,
    )


def merge_into(outs: list[Tensor], lses: list[Tensor], out: Tensor, lse: Tensor) -> None:
    """Merge 2..``MAX_INTO`` partial states held in separate tensors into ``out`` and ``lse`` (written in place).

    # outs[i]: [R, H, D] (any float dtype, any row/head strides, last dim contiguous), lses[i]: [R, H] float32
    # (any strides) -> out: [R, H, D] (last dim contiguous), lse: [R, H] float32
    ``merge.merge_attn_states_into``'s math in one kernel (float32 weights ``exp(l_i − max)``, the weighted sum
    divided once, cast once); empty partials (lse -inf) weigh 0 and are not read, rows with none give out 0 and lse
    -inf. Needs Triton and CUDA tensors (or the interpreter); no autograd.
    """
    n = len(outs)
    if not 2 <= n <= MAX_INTO or len(lses) != n:
        raise ValueError(f"merge_into: takes 2..{MAX_INTO} partials with as many LSEs ({n}, {len(lses)})")
    R, H, D = out.shape
    for o, s in zip(outs, lses):
        if o.shape != (R, H, D) or s.shape != (R, H) or o.stride(-1) != 1:
            raise ValueError(f"merge_into: partial {tuple(o.shape)} / lse {tuple(s.shape)} must be [{R}, {H}, {D}] "
                             f"(last dim contiguous) / [{R}, {H}]")
    if R == 0:
        return
    outs = list(outs) + [outs[0]] * (MAX_INTO - n)  # unused slots: never read (the kernel's N)
    lses = list(lses) + [lses[0]] * (MAX_INTO - n)
    block_h = min(16, triton.next_power_of_2(H))
    pdl = pdl_options(out)
    _merge_into_kernel[(R, triton.cdiv(H, block_h))](
        *outs, *lses, out, lse,
        *[x for o in outs for x in (o.stride(0), o.stride(1))], *[x for s in lses for x in (s.stride(0), s.stride(1))],
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), H,
        N=n, HEAD_DIM=D, D_PAD=max(16, triton.next_power_of_2(D)), BLOCK_H=block_h, GDC=bool(pdl), **pdl,
    )


if triton is not None:

    @triton.jit
    def _slot_lse(l_ptr, row, heads, sl_r, sl_h, h_ok, USED: tl.constexpr):
        """A partial's LSE [BLOCK_H]; -inf for an unused slot (then it weighs 0 and its rows are never read)."""
        if USED:
            ls = tl.load(l_ptr + row * sl_r + heads * sl_h, mask=h_ok, other=float("-inf"))
        else:
            ls = tl.full(heads.shape, float("-inf"), tl.float32)
        return ls

    @triton.jit
    def _weighted(o_ptr, ls, m_safe, row, heads, d, h_ok, d_ok, so_r, so_h):
        """A partial's weight ``exp(l − m)`` [BLOCK_H] and weighted rows [BLOCK_H, D_PAD] (empty ones not read)."""
        o = tl.load(o_ptr + row * so_r + heads[:, None] * so_h + d[None, :],
                    mask=(h_ok & (ls > float("-inf")))[:, None] & d_ok[None, :], other=0.0)
        w = tl.exp(ls - m_safe)
        return w, o.to(tl.float32) * w[:, None]

    @triton.jit
    def _merge_into_kernel(
        o0_ptr, o1_ptr, o2_ptr, o3_ptr, l0_ptr, l1_ptr, l2_ptr, l3_ptr, out_ptr, lse_ptr,
        so0_r, so0_h, so1_r, so1_h, so2_r, so2_h, so3_r, so3_h,
        sl0_r, sl0_h, sl1_r, sl1_h, sl2_r, sl2_h, sl3_r, sl3_h,
        sout_r, sout_h, slse_r, slse_h, H,
        N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_H: tl.constexpr, GDC: tl.constexpr,
    ):
        if GDC:  # launched with PDL (decode_fused.pdl_options)
            wait_for_previous_kernel()
        row = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, D_PAD)
        h_ok = heads < H
        d_ok = d < HEAD_DIM
        l0 = _slot_lse(l0_ptr, row, heads, sl0_r, sl0_h, h_ok, True)
        l1 = _slot_lse(l1_ptr, row, heads, sl1_r, sl1_h, h_ok, True)
        l2 = _slot_lse(l2_ptr, row, heads, sl2_r, sl2_h, h_ok, N > 2)
        l3 = _slot_lse(l3_ptr, row, heads, sl3_r, sl3_h, h_ok, N > 3)
        m = tl.maximum(tl.maximum(l0, l1), tl.maximum(l2, l3))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w0, a0 = _weighted(o0_ptr, l0, m_safe, row, heads, d, h_ok, d_ok, so0_r, so0_h)
        w1, a1 = _weighted(o1_ptr, l1, m_safe, row, heads, d, h_ok, d_ok, so1_r, so1_h)
        w2, a2 = _weighted(o2_ptr, l2, m_safe, row, heads, d, h_ok, d_ok, so2_r, so2_h)
        w3, a3 = _weighted(o3_ptr, l3, m_safe, row, heads, d, h_ok, d_ok, so3_r, so3_h)
        tot = w0 + w1 + w2 + w3  # unused slots add exact zeros
        acc = a0 + a1 + a2 + a3
        has = tot > 0
        tot_safe = tl.where(has, tot, 1.0)
        tl.store(out_ptr + row * sout_r + heads[:, None] * sout_h + d[None, :],
                 (acc / tot_safe[:, None]).to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + row * slse_r + heads * slse_h, tl.where(has, m_safe + tl.log(tot_safe), float("-inf")),
                 mask=h_ok)

    @triton.jit
    def _merge_kernel(
        part_ptr, part_lse_ptr, out_ptr, lse_ptr, num_parts,
        stride_ps, stride_pb, stride_ph,
        stride_ls, stride_lb, stride_lh,
        stride_ob, stride_oh, stride_fb, stride_fh,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CHUNK: tl.constexpr, GDC: tl.constexpr,
    ):
        if GDC:  # launched with PDL (decode_fused.pdl_options)
            wait_for_previous_kernel()
        b = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, D_PAD)
        d_ok = d < HEAD_DIM
        lse_row = part_lse_ptr + b * stride_lb + h * stride_lh
        part_row = part_ptr + b * stride_pb + h * stride_ph
        # Pass 1: the largest partial LSE (-inf if every partial is empty).
        m = tl.full([CHUNK], float("-inf"), tl.float32)
        for s0 in range(0, num_parts, CHUNK):
            s = s0 + tl.arange(0, CHUNK)
            m = tl.maximum(m, tl.load(lse_row + s * stride_ls, mask=s < num_parts, other=float("-inf")))
        m_all = tl.max(m, 0)
        m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
        # Pass 2: weights exp(lse_s - m), weighted sum of the partial outputs (empty ones weigh 0 and are not read).
        total = tl.zeros([CHUNK], tl.float32)
        acc = tl.zeros([CHUNK, D_PAD], tl.float32)
        for s0 in range(0, num_parts, CHUNK):
            s = s0 + tl.arange(0, CHUNK)
            ls = tl.load(lse_row + s * stride_ls, mask=s < num_parts, other=float("-inf"))
            w = tl.exp(ls - m_safe)
            live = ls > float("-inf")
            o = tl.load(part_row + s[:, None] * stride_ps + d[None, :], mask=live[:, None] & d_ok[None, :], other=0.0)
            total += w
            acc += o * w[:, None]
        tot = tl.sum(total, 0)
        res = tl.sum(acc, 0) / tl.where(tot > 0, tot, 1.0)
        merged_lse = tl.where(tot > 0, m_safe + tl.log(tl.where(tot > 0, tot, 1.0)), float("-inf"))
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, res.to(out_ptr.dtype.element_ty), mask=d_ok)
        tl.store(lse_ptr + b * stride_fb + h * stride_fh, merged_lse)

    @triton.jit
    def merge_splits_on_arrival(
        counter, num_splits, part_lse_rows, stride_ls, part_rows, stride_ps, rows_ok, cols_ok, out_rows, lse_rows,
        ROWS: tl.constexpr, COLS: tl.constexpr,
    ):
        """Called by every split program of one tile (after it stored its partial): the last to arrive merges the
        ``num_splits`` partials of the tile's rows by LSE into the final output and resets ``counter``.

        # counter: the tile's int32 arrival counter (0 before the launch, 0 again after it)
        # part_lse_rows: [ROWS] pointers to split 0's partial LSE (split s at + s * stride_ls)
        # part_rows: [ROWS, COLS] pointers to split 0's float32 partial output (split s at + s * stride_ps)
        # rows_ok: [ROWS], cols_ok: [COLS] masks -> out_rows [ROWS, COLS], lse_rows [ROWS] pointers, written
        Empty partials (lse -inf) weigh 0 and are not read; rows with none give out 0 and lse -inf
        (``decode_fused.last_to_arrive`` says who is last).
        """
        if last_to_arrive(counter, num_splits):
            m = tl.full([ROWS], float("-inf"), tl.float32)
            for s_i in range(0, num_splits):
                m = tl.maximum(m, tl.load(part_lse_rows + s_i * stride_ls, mask=rows_ok, other=float("-inf"),
                                          cache_modifier=".cg"))
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            total = tl.zeros([ROWS], tl.float32)
            merged = tl.zeros([ROWS, COLS], tl.float32)
            for s_i in range(0, num_splits):
                ls = tl.load(part_lse_rows + s_i * stride_ls, mask=rows_ok, other=float("-inf"), cache_modifier=".cg")
                w = tl.exp(ls - m_safe)
                live = ls > float("-inf")
                part = tl.load(part_rows + s_i * stride_ps, mask=(rows_ok & live)[:, None] & cols_ok[None, :],
                               other=0.0, cache_modifier=".cg")
                total += w
                merged += part * w[:, None]
            has_any = total > 0
            tot_safe = tl.where(has_any, total, 1.0)
            tl.store(out_rows, (merged / tot_safe[:, None]).to(out_rows.dtype.element_ty),
                     mask=rows_ok[:, None] & cols_ok[None, :])
            tl.store(lse_rows, tl.where(has_any, m_safe + tl.log(tot_safe), float("-inf")), mask=rows_ok)
            tl.atomic_xchg(counter, 0)  # ready for the next launch (or graph replay)


__all__ = ["MAX_INTO", "merge_into", "merge_partials"]
