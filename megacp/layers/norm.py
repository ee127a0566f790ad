"""RMSNorm: apex's fused CUDA kernel when apex imports and the input is on CUDA, else plain PyTorch.

Both follow Hugging Face Llama: normalise in float32, cast back to the input dtype, then scale by the weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megacp.layers.linear import default_weight_loader, new_param

try:  # optional; a broken apex build can raise anything at import time
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine as _apex_rms_norm
except Exception:
    _apex_rms_norm = None


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _apex_rms_norm is not None and x.is_cuda and x.dtype == self.weight.dtype:
            return _apex_rms_norm(x, self.weight, (self.hidden_size,), self.eps)
        return rms_norm(x, self.weight, self.eps)
