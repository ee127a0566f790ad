"""RMSNorm (optionally fused with the residual add before it): one kernel on CUDA, the Hugging Face formula elsewhere.

Hugging Face Llama normalises in float32, casts back to the input dtype, then scales by the weight; that is the CPU
path (what the parity tests against ``transformers`` run). On CUDA the eager form is five kernels; torch's fused op is
one and measured fastest on an H200, faster than apex's ``FusedRMSNorm`` (docs/benchmarks.md, "RMSNorm on CUDA"), so
apex is not used. It scales in float32 before the cast: at most one rounding
step of the activations' dtype away from the HF order. At inference on CUDA the residual add and the norm run as one
Triton kernel in the HF order (``megacp.ops.rms_norm``): decode normalises single rows, where launches dominate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megacp.ops import rms_norm as rms_norm_ops
from megacp.weights import default_weight_loader, new_param

_fused_rms_norm = getattr(torch.nn.functional, "rms_norm", None)  # torch >= 2.4


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x ``[..., H]``, weight ``[H]`` → ``[..., H]`` in x's dtype (the PyTorch reference path)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    """forward: x ``[T, hidden]`` → ``[T, hidden]``. Replicated on every rank (no collectives); its input is the same
    on every TP rank, so its gradient is too (summed over PCP and DP only, ``DENSE_GRAD_GROUPS``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = new_param((hidden_size,), params_dtype)  # trainable; gradients summed like dense layers'
        with torch.no_grad():
            self.weight.fill_(1.0)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        default_weight_loader(param, loaded)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``; with ``residual``: ``s = x + residual``, returns ``(norm(s), s)`` (s is the next residual).

        # x, residual: [T, hidden] -> [T, hidden] (or a pair of them)
        On CUDA at inference one Triton kernel does the add and the norm (``megacp.ops.rms_norm``); elsewhere, and
        whenever gradients are needed, PyTorch ops with the same arithmetic.
        """
        if (x.dtype == self.weight.dtype and rms_norm_ops.available(x)
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            out, summed = rms_norm_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
            return out if residual is None else (out, summed)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if _fused_rms_norm is not None and x.is_cuda and x.dtype == self.weight.dtype:
            return _fused_rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)
