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
    from megacp.ops.decode_fused import wait_for_previous_kernel

_CHUNK = 16  # partials loaded at once


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


if triton is not None:

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
        Empty partials (lse -inf) weigh 0 and are not read; rows with none give out 0 and lse -inf. The barrier
        orders this program's stores before its arrival; acq_rel makes the others' visible to the last one.
        """
        tl.debug_barrier()
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == num_splits - 1:
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


__all__ = ["merge_partials"]
