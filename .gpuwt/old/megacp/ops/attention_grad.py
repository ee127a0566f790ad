"""Backward of attention-with-LSE: a kernel's output *and* its log-sum-exp, both differentiable.

Fused kernels differentiate their output only: PyTorch's SDPA ops (cuDNN, FlashAttention, the CPU flash kernel)
declare their logsumexp output non-differentiable, and Transformer Engine's ``fused_attn_bwd`` takes only the
output's gradient. But context parallelism merges partial results by their LSE (megacp/ops/merge.py), and a merge
whose LSE carries no gradient silently drops terms. ``lse_differentiable_attention`` closes that gap for any kernel
that can run forward and backward:

    s_ij = scale·q_i·k_j,   lse_i = log Σ_j exp(s_ij),   ∂lse_i/∂s_ij = P_ij  (the softmax)

so an LSE gradient ``g_i`` adds ``g_i·P_ij`` to the score gradient, i.e.

    dq_i += scale·g_i·Σ_j P_ij k_j      — the output of the same attention with the keys as values: attn(q, k, k)
    dk_j += scale·Σ_i g_i·P_ij q_i      — the value gradient of that attention for output gradient g_i·q_i

Both are one more forward and backward of the same kernel (GQA included: the value gradient sums over a KV head's
query heads, as dk must), run only when the LSE gradient is there. Nothing here is approximate.

A kernel is an object with ``forward(q, k, v) -> (out, lse, saved)`` and ``backward(saved, d_out) -> (dq, dk, dv)``
(its own shapes: packed THD for TE, one sequence for cuDNN); ``AutogradCall`` makes one from any call whose output
torch can differentiate.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import Tensor


class AttentionKernel(Protocol):
    """One softmax attention (a single softmax per query row) that can run forward and backward."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Any]:
        """-> (out like q, lse float32 [rows, heads], whatever backward needs)."""

    def backward(self, saved: Any, d_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients of q, k, v for the output gradient ``d_out`` (the LSE held constant)."""


def needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd will differentiate through a call on ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class AutogradCall:
    """An ``AttentionKernel`` from ``call(q, k, v) -> (out, lse)`` whose ``out`` torch's autograd differentiates
    (PyTorch's SDPA ops); the forward records the graph on detached inputs, the backward replays it."""

    def __init__(self, call: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]) -> None:
        self.call = call

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Any]:
        with torch.enable_grad():
            leaves = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
            out, lse = self.call(*leaves)
        return out.detach(), lse.detach(), (leaves, out)

    def backward(self, saved: Any, d_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        leaves, out = saved
        grads = torch.autograd.grad(out, leaves, d_out.to(out.dtype), allow_unused=True)
        return tuple(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads))  # type: ignore[return-value]


class _LseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, kernel: AttentionKernel, scale: float):
        out, lse, saved = kernel.forward(q, k, v)
        ctx.kernel, ctx.scale, ctx.saved = kernel, scale, saved
        ctx.save_for_backward(q, k, v, lse)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: no extra work for it
        return out, lse

    @staticmethod
    def backward(ctx: Any, d_out: Tensor | None, d_lse: Tensor | None):
        q, k, v, lse = ctx.saved_tensors
        if d_out is not None:
            dq, dk, dv = ctx.kernel.backward(ctx.saved, d_out)
        else:
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if d_lse is not None:
            # Rows that see no key have lse = -inf and no score to differentiate: their coefficient is 0, and their
            # (kernel-defined) rows of attn(q, k, k) are dropped rather than multiplied.
            work = torch.promote_types(q.dtype, torch.float32)
            seen = torch.isfinite(lse)
            coef = torch.where(seen, d_lse.to(work) * ctx.scale, 0.0).unsqueeze(-1)  # [rows, heads, 1]
            pk, _, saved_k = ctx.kernel.forward(q, k, k)  # Σ_j P_ij k_j
            dq = (dq.to(work) + torch.where(seen.unsqueeze(-1), coef * pk.to(work), 0.0)).to(q.dtype)
            _, _, dk_lse = ctx.kernel.backward(saved_k, (coef * q.to(work)).to(q.dtype))  # Σ_i P_ij (coef_i q_i)
            dk = (dk.to(work) + dk_lse.to(work)).to(k.dtype)
        return dq, dk, dv, None, None


def lse_differentiable_attention(
    kernel: AttentionKernel, q: Tensor, k: Tensor, v: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """``kernel``'s (out, lse) with both differentiable w.r.t. q, k and v (see the module docstring).

    # q: [rows, Hq, D], k/v: [keys, Hk, D] in the kernel's layout -> (out like q, lse [rows, Hq] float32)
    """
    return _LseAttention.apply(q, k, v, kernel, float(scale))


SeqCall = Callable[[Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor]]


def differentiable(call: SeqCall) -> SeqCall:
    """``call(q, k, v, top_left_causal, scale) -> (out, lse)``, one softmax whose output torch differentiates (a
    cuDNN or CPU SDPA call), with its LSE made differentiable when gradients are needed (unchanged otherwise)."""

    def wrapped(q: Tensor, k: Tensor, v: Tensor, top_left_causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        if not needs_grad(q, k, v):
            return call(q, k, v, top_left_causal, scale)
        kernel = AutogradCall(lambda q_, k_, v_: call(q_, k_, v_, top_left_causal, scale))
        return lse_differentiable_attention(kernel, q, k, v, scale)

    return wrapped
