"""RoPE applied in place, one kernel: MLA's ``q_pe`` inside the query projection's output (and ``k_pe`` inside the
latent down-projection's), so the layer needs no ``cat`` of rotated and unrotated parts.

The eager form (``apply_rotary_tables``) is 5-6 kernels over ``[T, H, rope]`` (the de-interleave's ``cat``, two
``mul``, the halves' ``cat``, an ``add``) plus the ``cat`` of ``[q_nope | q_pe]`` over the whole ``[T, H, qk]``
query: for an 8k-token DeepSeek-V2-Lite prefill ~290 MB moved per layer where this kernel moves ~32 MB.

    rotate_(x, cos, sin_signed, interleave)   x: [T, H, D] (any strides, last dim contiguous), rotated in place

Exact against ``apply_rotary_tables``: the same operations with the same roundings (each product and the sum rounded
to x's dtype, as the eager ops store them; FMA contraction off). With float32 tables and a narrower ``x`` it equals
``apply_rotary_tables(x.float(), tables).to(x.dtype)`` instead (float32 math, one rounding: DeepSeek-V2's form).
With ``interleave`` the pairs ``(x_2i, x_2i+1)`` are read in de-interleaved (halves) order and the result is stored
in halves order, as the eager path returns it.
A program rotates one (token, head) row: it loads the row, waits for every thread of the program
(``debug_barrier``: the row is read and written by different threads), then stores it.

Inference only, CUDA only (``available``; Triton's interpreter runs it on CPU tensors when called directly); a
fixed grid from the shapes and no host reads, so a CUDA graph captures it.
"""

from __future__ import annotations

import torch
from torch import Tensor

# ``available``: whether ``rotate_`` may run on ``x`` (Triton, a CUDA tensor, no gradient wanted: it writes in place)
from megacp.ops.decode_fused import EXACT, available, tl, triton
if triton is not None:
    from megacp.ops.decode_fused import rotate_pairs


def rotate_(x: Tensor, cos: Tensor, sin_signed: Tensor, interleave: bool = False) -> Tensor:
    """Rotate ``x`` in place and return it; equals ``x.copy_(apply_rotary_tables(x, tables, interleave))``, or with
    float32 tables for a narrower ``x`` ``x.copy_(apply_rotary_tables(x.float(), tables, interleave))``.

    # x: [T, H, D] (last dim contiguous; a view into a wider tensor is fine), cos/sin_signed: [T, 1, D] in x's
    # dtype or float32 (the step's RotaryTables) -> x
    """
    T, H, D = x.shape
    if x.stride(2) != 1 or D % 2:
        raise ValueError(f"rotate_: x {tuple(x.shape)} must have an even, contiguous last dim")
    if cos.dtype not in (x.dtype, torch.float32) or sin_signed.dtype != cos.dtype:
        raise ValueError(f"rotate_: the tables ({cos.dtype}, {sin_signed.dtype}) must both be in x's dtype "
                         f"({x.dtype}) or float32")
    if T == 0 or H == 0:
        return x
    cos2, sin2 = cos.reshape(T, D), sin_signed.reshape(T, D)
    _rope_inplace_kernel[(T, H)](
        x, cos2, sin2, x.stride(0), x.stride(1), cos2.stride(0), sin2.stride(0),
        D=D, HALF=D // 2, D_PAD=triton.next_power_of_2(D), INTERLEAVE=interleave, ROUND_EACH=cos.dtype == x.dtype,
        num_warps=1, **EXACT,
    )
    return x


if triton is not None:

    @triton.jit
    def _rope_inplace_kernel(
        x_ptr, cos_ptr, sin_ptr, stride_t, stride_h, stride_cos, stride_sin,
        D: tl.constexpr, HALF: tl.constexpr, D_PAD: tl.constexpr, INTERLEAVE: tl.constexpr, ROUND_EACH: tl.constexpr,
    ):
        t = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, D_PAD)
        m = d < D
        partner = tl.where(d < HALF, d + HALF, d - HALF)  # swap_halves: (x2, x1)
        if INTERLEAVE:  # halves position p holds the pair element 2p (first half) or 2(p - HALF) + 1 (second)
            src = tl.where(d < HALF, 2 * d, 2 * (d - HALF) + 1)
            src_partner = tl.where(partner < HALF, 2 * partner, 2 * (partner - HALF) + 1)
        else:
            src = d
            src_partner = partner
        row = x_ptr + t.to(tl.int64) * stride_t + h * stride_h
        x = tl.load(row + src, mask=m, other=0.0)
        xs = tl.load(row + src_partner, mask=m, other=0.0)
        cos = tl.load(cos_ptr + t * stride_cos + d, mask=m, other=0.0)
        sin = tl.load(sin_ptr + t * stride_sin + d, mask=m, other=0.0)
        if ROUND_EACH:  # each product and the sum rounded to x's dtype (the eager ops)
            rot = rotate_pairs(x, xs, cos, sin)
        else:  # float32 tables: the same in float32, rounded once
            rot = (x.to(tl.float32) * cos + xs.to(tl.float32) * sin).to(x.dtype)
        tl.debug_barrier()  # every thread has read the row before any overwrites it
        tl.store(row + d, rot, mask=m)


__all__ = ["available", "rotate_"]
