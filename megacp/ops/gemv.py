"""Decode-shaped matmuls (``M ≤ 64`` rows): a Triton GEMV, opt-in per projection (``$MEGACP_DECODE_GEMV``).

A batch-1 decode step on one GPU reads every weight once; cuBLAS runs its GEMV-shaped kernels near the copy
bandwidth but adds a split-K reduce kernel to the o and down projections. This kernel is a plain split-K-free GEMV:
one program per ``BLOCK_N`` output columns walks all of K, float32 accumulation, one rounding.

Measured on an H200 (docs/benchmarks.md, 2026-12-04): alone, in graphs of back-to-back calls, it beats cuBLAS on
Llama-3-8B's o projection (11.9 vs 13.9 µs at M = 1), is within ~4% either way on qkv and down, and loses on
gate-up (61.0 vs 55.2–56.6 µs). Inside the 32-layer decode step it saved nothing measurable (cuBLAS's kernels run
faster there than alone), so no projection uses it by default (``DEFAULT_ROLES`` is empty); ``bench/gemv.py`` and
``bench/decode_step_profile.py --variants`` keep measuring it. (Launching it with programmatic dependent launch
made the step slower, and prefetching its weights into L2 before that launch's wait never paid: both were
measured and removed.)

Inference only (``applies``: CUDA, no gradient, half dtypes, no bias, ``M ≤ MAX_ROWS``). Its sums run in another
order than cuBLAS's, so results differ from ``F.linear`` by bf16 rounding (both within it of a float32 reference).
Which projections use it is the model's choice when its layers are built (``roles()``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from megacp.ops.decode_fused import EXACT, tl, triton

ENV_ROLES = "MEGACP_DECODE_GEMV"
ROLES = ("qkv", "o", "gate_up", "down")  # a Llama-family layer's projections
DEFAULT_ROLES: tuple[str, ...] = ()  # none measured faster inside the decode step (see the module docstring)
MAX_ROWS = 64  # beyond this the matmul is no longer weight-bound: cuBLAS's tiles win


def roles() -> frozenset[str]:
    """The projections whose decode-shaped calls take this kernel: ``$MEGACP_DECODE_GEMV`` as a comma list of
    ``ROLES`` ("all", "none"/"0"), else ``DEFAULT_ROLES`` (none). Read when a model's layers are built, never per
    step; an unknown name raises ``ValueError`` naming the valid ones."""
    raw = os.environ.get(ENV_ROLES)
    if raw is None:
        return frozenset(DEFAULT_ROLES)
    names = {r.strip() for r in raw.split(",") if r.strip()}
    if names & {"none", "0", "off"}:
        return frozenset()
    if "all" in names:
        return frozenset(ROLES)
    unknown = names - set(ROLES)
    if unknown:
        raise ValueError(f"{ENV_ROLES}={raw!r}: unknown projection(s) {sorted(unknown)}; use a comma list of "
                         f"{', '.join(ROLES)}, or 'all' or 'none'")
    return frozenset(names)


def applies(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether ``linear`` takes ``x @ weight.T``: Triton, CUDA, 2-D ``x`` with ``1 ≤ M ≤ MAX_ROWS`` rows in
    weight's half dtype, contiguous rows, no bias, no gradient."""
    if triton is None or not x.is_cuda or bias is not None or x.dim() != 2:
        return False
    if not 1 <= x.shape[0] <= MAX_ROWS or x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if x.stride(1) != 1 or not weight.is_contiguous():
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


@dataclass(frozen=True)
class GemvConfig:
    """A launch of the kernel: output columns per program, K per loop step, Triton's warps and stages."""

    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4


def choose_config(m: int, n: int, k: int) -> GemvConfig:
    """The launch for an ``[m, k] @ [k, n]`` call (``bench/gemv.py``'s sweep on an H200: 32 x 256 tiles win for
    every Llama-3-8B projection at ``m ≤ 16``; larger row tiles want shorter K steps)."""
    if m > 16:
        return GemvConfig(block_n=64, block_k=128)
    return GemvConfig()


def linear(x: Tensor, weight: Tensor, config: GemvConfig | None = None) -> Tensor:
    """``x @ weight.T`` by the Triton GEMV.

    # x: [M, K], weight: [N, K] -> [M, N] in x's dtype
    ``applies(x, weight)`` must hold; ``config`` overrides ``choose_config`` (benchmarks).
    """
    M = x.shape[0]
    N, K = weight.shape
    if x.shape[1] != K:
        raise ValueError(f"gemv.linear: x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    cfg = config or choose_config(M, N, K)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    _gemv_kernel[(triton.cdiv(N, cfg.block_n),)](
        x, weight, y, M, N, K, x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **EXACT,
    )
    return y


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # program n-tile: y[:, tile] = x @ w[tile, :]^T, float32 accumulation over all of K
        rm = tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_w
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_rows = x_ptr + rm[:, None] * stride_x
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w))
        tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


__all__ = ["DEFAULT_ROLES", "ENV_ROLES", "GemvConfig", "MAX_ROWS", "ROLES", "applies", "choose_config", "linear",
           "roles"]
