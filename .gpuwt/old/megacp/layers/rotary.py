"""Rotary position embeddings (neox halves or DeepSeek's interleaved pairs) with Llama-3 / linear / YaRN scaling.

Pure functions for the math (``compute_inv_freq``, ``rope_attention_factor``, ``yarn_mscale``, ``rotary_tables``,
``apply_rotary_tables``) plus a small module that applies them at each token's absolute position, so PCP-split or
padded token sets need no special handling.

Every layer rotates at the same positions, so the model builds the tables once per forward (``RotaryEmbedding.tables``)
and each layer only applies them (``apply_rotary_tables``): a decode step is launch-bound, and recomputing cos/sin
in every layer cost 5–9 small kernels per layer (cos, sin, their casts). The tables carry ``sin`` with the first half
negated so that HF's ``rotate_half(x)·sin == swap_halves(x)·sin_signed`` exactly (a sign flip is exact), one ``neg``
kernel less per call.

Pairing. Llama-family checkpoints rotate the pairs ``(x_i, x_{i+D/2})`` (neox halves). DeepSeek checkpoints
(``rope_interleave``: DeepSeek-V2 always, V3 by its config) rotate ``(x_{2i}, x_{2i+1})``: ``interleave=True``
de-interleaves first (evens then odds) and rotates as halves, which is exactly transformers' DeepSeek-V3
``apply_rotary_pos_emb_interleave`` (its output is in the halves order too). DeepSeek-V2's complex-number form
returns the same numbers with the pairs kept in place; attention only takes dot products of rotated q and k, so
the order is free as long as q and k share it (evens then odds could also be folded into a projection's output
rows at load time instead of permuting every step).

YaRN (``rope_type "yarn"``) changes two things: the inverse frequencies (a ramp between interpolated and original
frequencies, ``beta_fast``/``beta_slow`` rotations at ``original_max_position_embeddings``) and the magnitude of
cos/sin (``rope_attention_factor``: ``attention_factor``, else ``mscale``/``mscale_all_dim``, else
``yarn_mscale(factor)``), as transformers' ``_compute_yarn_parameters``. DeepSeek's attention also multiplies its
softmax scale by ``yarn_mscale(factor, mscale_all_dim)²`` (``megacp.models.config.ModelConfig.attention_scale``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_type_of(rope_scaling: Mapping[str, Any] | None) -> str:
    """``rope_type`` (or the legacy ``type``) of an HF rope dict; ``"default"`` for None/empty."""
    return "default" if not rope_scaling else rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1·mscale·ln(factor) + 1`` (1 when ``factor <= 1``): DeepSeek's
    ``yarn_get_mscale``."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(head_dim: int, rope_theta: float, s: Mapping[str, Any]) -> torch.Tensor:
    """YaRN frequencies: the ``[low, high]`` dimension band (from ``beta_fast``/``beta_slow`` rotations over
    ``original_max_position_embeddings``) ramps from original (extrapolated) to ``1/factor`` (interpolated).
    Same operations as transformers, so the result is bitwise theirs."""
    pos_freqs = rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    factor = float(s["factor"])
    original = float(s["original_max_position_embeddings"])
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def correction_dim(num_rotations: float) -> float:
        return head_dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(rope_theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency (short wavelengths), 0: interpolate
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def compute_inv_freq(head_dim: int, rope_theta: float, rope_scaling: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (float32) for ``rope_theta`` and an HF ``rope_scaling`` dict.

    ``rope_scaling`` keys: ``rope_type`` (or legacy ``type``) in default / linear / llama3 / yarn; linear uses
    ``factor``; llama3 uses ``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``;
    yarn uses ``factor``, ``original_max_position_embeddings``, optional ``beta_fast`` (32), ``beta_slow`` (1),
    ``truncate`` (true). ``head_dim`` is the rotated dimension (DeepSeek: ``qk_rope_head_dim``).
    """
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = rope_type_of(rope_scaling)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, rope_theta, rope_scaling)
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


def rope_attention_factor(rope_scaling: Mapping[str, Any] | None) -> float:
    """The factor transformers multiplies cos and sin by (its ``attention_scaling``): 1 except for YaRN, where it is
    ``attention_factor`` when given, else ``yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)`` when
    both are set and nonzero, else ``yarn_mscale(factor)`` (so DeepSeek's ``mscale == mscale_all_dim`` gives 1)."""
    if rope_type_of(rope_scaling) != "yarn":
        return 1.0
    if rope_scaling.get("attention_factor") is not None:
        return float(rope_scaling["attention_factor"])
    factor = float(rope_scaling["factor"])
    mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all_dim)))
    return yarn_mscale(factor)


class RotaryTables(NamedTuple):
    """cos/sin of one step's positions, ready to apply: both ``[T, 1, D]`` in the activations' dtype."""

    cos: torch.Tensor
    sin_signed: torch.Tensor  # (-sin, sin) halves: multiplies swap_halves(x), see the module docstring


def rotary_tables(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, attention_factor: float = 1.0
) -> RotaryTables:
    """positions ``[T]`` → tables for ``apply_rotary_tables``: computed in float32, scaled by ``attention_factor``
    (``rope_attention_factor``), then cast to ``dtype``, in transformers' order of operations."""
    freqs = positions.float()[:, None] * inv_freq.to(device=positions.device, dtype=torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D], the two halves repeated (neox layout)
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    half = sin.shape[-1] // 2
    sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    return RotaryTables(cos.to(dtype).unsqueeze(1), sin_signed.to(dtype).unsqueeze(1))


def apply_rotary_tables(x: torch.Tensor, tables: RotaryTables, interleave: bool = False) -> torch.Tensor:
    """x ``[T, H, D]`` → ``[T, H, D]``; bitwise equal to HF's ``x·cos + rotate_half(x)·sin`` at the same positions.

    ``interleave``: ``x`` holds interleaved pairs (DeepSeek's ``rope_interleave``); the result is in halves order,
    bitwise transformers' ``apply_rotary_pos_emb_interleave`` (see the module docstring).
    """
    if interleave:
        x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * tables.cos.to(x.dtype) + torch.cat((x2, x1), dim=-1) * tables.sin_signed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """forward(positions ``[T]``, q ``[T, Hq, D]``, k ``[T, Hk, D]``) → rotated (q, k).

    A model rotating many layers at the same positions calls ``tables`` once and ``apply_rotary_tables`` per layer
    (passing ``self.interleave``). The tables include YaRN's cos/sin factor (``rope_attention_factor``).
    """

    def __init__(
        self,
        head_dim: int,
        rope_theta: float = 10000.0,
        rope_scaling: Mapping[str, Any] | None = None,
        interleave: bool = False,
    ):
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim, self.interleave = head_dim, interleave
        # A plain attribute, not a buffer: ``model.to(bfloat16)`` must not round the frequencies.
        self.inv_freq = compute_inv_freq(head_dim, rope_theta, rope_scaling)
        self.attention_factor = rope_attention_factor(rope_scaling)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryTables:
        """positions ``[T]`` → cos/sin tables ``[T, 1, D]`` in ``dtype`` (the dtype of the q/k they will rotate)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        return rotary_tables(positions, self.inv_freq, dtype, self.attention_factor)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self.tables(positions, q.dtype)
        return apply_rotary_tables(q, tables, self.interleave), apply_rotary_tables(k, tables, self.interleave)
