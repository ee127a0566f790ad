"""Rotary position embeddings (neox style, as Hugging Face Llama) with optional Llama-3 / linear scaling.

Pure functions for the math (``compute_inv_freq``, ``apply_rotary``) plus a small module that applies them at
each token's absolute position, so PCP-split or padded token sets need no special handling.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def compute_inv_freq(head_dim: int, rope_theta: float, rope_scaling: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (float32) for ``rope_theta`` and an HF ``rope_scaling`` dict.

    ``rope_scaling`` keys: ``rope_type`` (or legacy ``type``) in default / linear / llama3; linear uses ``factor``;
    llama3 uses ``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``.
    """
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = "default" if not rope_scaling else rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if rope_type == "llama3":
        factor = float(rope_scaling["factor"])
        low_freq_factor = float(rope_scaling["low_freq_factor"])
        high_freq_factor = float(rope_scaling["high_freq_factor"])
        old_context_len = float(rope_scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated smoothly.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(
        f"unsupported rope_type {rope_type!r} in the checkpoint's rope_scaling/rope_parameters; "
        f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions ``[T]`` → cos, sin ``[T, head_dim]`` (float32, the two halves repeated, neox layout)."""
    freqs = positions.float()[:, None] * inv_freq.to(device=positions.device, dtype=torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[T, H, D]``, cos/sin ``[T, D]`` → ``[T, H, D]`` in x's dtype (cos/sin cast to it first, as HF does)."""
    cos = cos.to(x.dtype).unsqueeze(1)
    sin = sin.to(x.dtype).unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """forward(positions ``[T]``, q ``[T, Hq, D]``, k ``[T, Hk, D]``) → rotated (q, k)."""

    def __init__(self, head_dim: int, rope_theta: float = 10000.0, rope_scaling: Mapping[str, Any] | None = None):
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        # A plain attribute, not a buffer: ``model.to(bfloat16)`` must not round the frequencies.
        self.inv_freq = compute_inv_freq(head_dim, rope_theta, rope_scaling)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        cos, sin = rotary_cos_sin(positions, self.inv_freq)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
