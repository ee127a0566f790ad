"""Rotary position embeddings (neox style, as Hugging Face Llama) with optional Llama-3 / linear scaling.

Pure functions for the math (``compute_inv_freq``, ``rotary_tables``, ``apply_rotary_tables``) plus a small module
that applies them at each token's absolute position, so PCP-split or padded token sets need no special handling.

Every layer rotates at the same positions, so the model builds the tables once per forward (``RotaryEmbedding.tables``)
and each layer only applies them (``apply_rotary_tables``): a decode step is launch-bound, and recomputing cos/sin
in every layer cost 5–9 small kernels per layer (cos, sin, their casts). The tables carry ``sin`` with the first half negated so that
HF's ``rotate_half(x)·sin == swap_halves(x)·sin_signed`` exactly (a sign flip is exact), one ``neg`` kernel less per call.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

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


class RotaryTables(NamedTuple):
    """cos/sin of one step's positions, ready to apply: both ``[T, 1, D]`` in the activations' dtype."""

    cos: torch.Tensor
    sin_signed: torch.Tensor  # (-sin, sin) halves: multiplies swap_halves(x), see the module docstring


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> RotaryTables:
    """positions ``[T]`` → tables for ``apply_rotary_tables`` (computed in float32, then cast to ``dtype`` as HF does)."""
    freqs = positions.float()[:, None] * inv_freq.to(device=positions.device, dtype=torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D], the two halves repeated (neox layout)
    cos, sin = emb.cos(), emb.sin()
    half = sin.shape[-1] // 2
    sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    return RotaryTables(cos.to(dtype).unsqueeze(1), sin_signed.to(dtype).unsqueeze(1))


def apply_rotary_tables(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """x ``[T, H, D]`` → ``[T, H, D]``; bitwise equal to HF's ``x·cos + rotate_half(x)·sin`` at the same positions."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * tables.cos.to(x.dtype) + torch.cat((x2, x1), dim=-1) * tables.sin_signed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """forward(positions ``[T]``, q ``[T, Hq, D]``, k ``[T, Hk, D]``) → rotated (q, k).

    A model rotating many layers at the same positions calls ``tables`` once and ``apply_rotary_tables`` per layer.
    """

    def __init__(self, head_dim: int, rope_theta: float = 10000.0, rope_scaling: Mapping[str, Any] | None = None):
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        # A plain attribute, not a buffer: ``model.to(bfloat16)`` must not round the frequencies.
        self.inv_freq = compute_inv_freq(head_dim, rope_theta, rope_scaling)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryTables:
        """positions ``[T]`` → cos/sin tables ``[T, 1, D]`` in ``dtype`` (the dtype of the q/k they will rotate)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        return rotary_tables(positions, self.inv_freq, dtype)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self.tables(positions, q.dtype)
        return apply_rotary_tables(q, tables), apply_rotary_tables(k, tables)
