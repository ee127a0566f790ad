"""The MoE combine: each token's weighted sum of its experts' output rows, in one pass over the rows.

The grouped expert computation (``megacp.moe.layer.expert_forward_grouped``) leaves one output row per (token,
expert) pair, sorted by expert. A token's result is ``Σ_j w[t, j] · y[pos[t, j]]`` over its ``k`` pairs. As
PyTorch ops that is five passes over a float32 ``[N·k, H]`` tensor (cast, weight, mask, unsort, sum): ~1 ms per
layer of an 8k-token DeepSeek-V2-Lite prefill on an H200 (profile of 2026-12-03b, estimated from its kernels).
Here ONE kernel reads each pair's row once in the activations' dtype and writes the token's row:

    out[t, :] = Σ_{j = 0..k-1} (valid(t, j) ? w[t, j] · float32(y[pos[t, j], :]) : 0)      accumulated in float32
    valid(t, j) = pos[t, j] >= 0           (-1: a pair of another rank's expert; its row is never read)

The sum runs in the fixed order ``j = 0, 1, …, k-1`` from ``+0.0``, each product rounded to float32 before its add
(FMA contraction off): deterministic, so a CUDA-graph replay equals the eager call bit for bit, and bitwise a
loop over ``j`` in that order. ``combine_rows`` is the PyTorch form of the same contract (what the CPU runs); its
float32 sum over ``k`` is in torch's reduction order (on CUDA several partial sums, combined), so the two agree to
float32 rounding of that sum, and after the cast to bf16 almost always bit for bit.

Inference only, CUDA only (``available``; Triton's interpreter runs the kernel on CPU tensors when called directly):
a fixed grid from the shapes and no host reads, so a CUDA graph captures it.
"""

from __future__ import annotations

import torch
from torch import Tensor

# ``available(y)``: whether ``combine_rows_fused`` may run on the expert rows ``y`` (Triton, CUDA, no gradient wanted)
from megacp.ops.decode_fused import EXACT, available, tl, triton


def combine_rows(y: Tensor, pos: Tensor, weights: Tensor, out_dtype: torch.dtype) -> Tensor:
    """The weighted combine in PyTorch ops (see the module docstring for the contract).

    # y: [M, H] expert output rows (rows no valid pos points at may hold anything, NaN included),
    # pos: [N, k] long (row of y of each pair, -1: not local), weights: [N, k] float32 -> [N, H] in out_dtype
    """
    valid = (pos >= 0)[..., None]
    rows = y[pos.clamp(min=0)].float()  # [N, k, H]; an invalid pair reads row 0, masked out by the where below
    return torch.where(valid, rows * weights[..., None].float(), 0.0).sum(dim=1).to(out_dtype)


def combine_rows_fused(y: Tensor, pos: Tensor, weights: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``combine_rows`` as one Triton kernel, the sum in the fixed order j = 0..k-1 (same arguments and result).

    # y: [M, H] (rows contiguous), pos: [N, k] int, weights: [N, k] float32 -> [N, H] in out_dtype
    """
    n, k = pos.shape
    h = y.shape[1]
    if y.stride(1) != 1:
        raise ValueError(f"combine_rows_fused: y {tuple(y.shape)} must have contiguous rows")
    out = torch.empty(n, h, dtype=out_dtype, device=y.device)
    if n == 0 or h == 0:
        return out
    pos, weights = pos.contiguous(), weights.float().contiguous()
    block = min(1024, triton.next_power_of_2(h))
    _combine_kernel[(n, triton.cdiv(h, block))](
        # EXACT: FMA contraction would fuse `acc + w·y` into one rounding; the contract rounds the product first
        y, pos, weights, out, y.stride(0), out.stride(0), h, K=k, BLOCK=block, **EXACT,
    )
    return out


if triton is not None:

    @triton.jit
    def _combine_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, stride_y, stride_o, H, K: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            p = tl.load(pos_ptr + t * K + j).to(tl.int64)
            w = tl.load(w_ptr + t * K + j)
            valid = (cols * 0 + p) >= 0  # [BLOCK]: the pair's flag on every column
            # a non-local pair's row is never read (its load is masked off) and adds exactly 0
            row = tl.load(y_ptr + tl.maximum(p, 0) * stride_y + cols, mask=mask & valid, other=0.0)
            acc += tl.where(valid, w * row.to(tl.float32), 0.0)
        tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


__all__ = ["available", "combine_rows", "combine_rows_fused"]
