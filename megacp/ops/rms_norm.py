"""Fused residual-add + RMSNorm: one Triton kernel per call, for the decode step's many one-row norms.

A decode step normalises ``2·layers + 1`` rows of ``hidden`` values, each after a residual add. As two PyTorch ops
that is two launches per norm, and torch's fused ``rms_norm`` kernel takes ~6 µs for a single 4096-wide row on an
H200 (one block, latency-bound): ~0.4 ms of a 32-layer step's ~6 ms. This kernel does the add and the norm in one
program per row. Arithmetic follows Hugging Face Llama: the sum is rounded to the activations' dtype (it is the next
residual), normalised in float32, rounded back, then scaled by the weight in that dtype.

Inference only (no backward); ``available()`` is False without Triton or off CUDA, and callers use PyTorch ops then.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megacp.ops.decode_fused import pdl_options, tl, triton

if triton is not None:
    from megacp.ops.decode_fused import wait_for_previous_kernel

_MAX_HIDDEN = 32768  # one program holds a whole row


def available(x: Tensor) -> bool:
    """Whether ``fused_add_rms_norm`` can run on ``x`` [T, H]."""
    return (triton is not None and x.is_cuda and x.dim() == 2 and x.stride(-1) == 1
            and x.shape[-1] <= _MAX_HIDDEN)


def fused_add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``s = x + residual`` (or ``x``), returns ``(rms_norm(s) · weight, s)``.

    # x, residual: [T, H] (same dtype), weight: [H] -> (out [T, H], s [T, H]), both in x's dtype
    """
    T, H = x.shape
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else x
    if T == 0:
        return out, summed
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    block = triton.next_power_of_2(H)
    pdl = pdl_options(x)
    _add_rms_norm_kernel[(T,)](
        x, residual if residual is not None else x, weight, out, summed,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), summed.stride(0),
        H, float(eps), HAS_RESIDUAL=residual is not None, BLOCK=block, GDC=bool(pdl),
        num_warps=8 if block >= 4096 else 4, **pdl,
    )
    return out, summed


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr,
        stride_x, stride_r, stride_o, stride_s,
        H, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, GDC: tl.constexpr,
    ):
        if GDC:  # launched with PDL (decode_fused.pdl_options)
            wait_for_previous_kernel()
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
            s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # what a PyTorch add in x's dtype stores
            tl.store(sum_ptr + row * stride_s + cols, s, mask=mask)
        else:
            s = x
        sf = s.to(tl.float32)
        var = tl.sum(sf * sf, axis=0) / H
        y = (sf * tl.rsqrt(var + eps)).to(x.dtype)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        out = (y.to(tl.float32) * w.to(tl.float32)).to(x.dtype)
        tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


__all__ = ["available", "fused_add_rms_norm"]
