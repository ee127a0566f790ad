"""Sampling parameters and the pure next-token sampler (greedy, temperature, top-p).

The sampler is deterministic given its ``torch.Generator``: the engine seeds one generator identically on every rank,
so every rank picks the same tokens from the same (TP-gathered, PCP-identical) logits. The engine still broadcasts the
chosen tokens from rank 0 afterwards, so even a one-ulp difference in logits between ranks can never make them diverge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import LongTensor, Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` means greedy (argmax)."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    ignore_eos: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens={self.max_new_tokens} must be >= 1 (e.g. 16)")
        if self.temperature < 0:
            raise ValueError(f"--temperature={self.temperature} must be >= 0 (0 = greedy, e.g. 0.8 to sample)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p={self.top_p} must be in (0, 1] (1 = no nucleus filtering, e.g. 0.9)")


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches ``top_p``, then renormalise.

    probs: [N, V] (rows sum to 1) -> [N, V]. The most likely token is always kept.
    """
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Mass strictly before each token: a token is kept while the mass before it is below top_p.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> LongTensor:
    """Next token per row. logits: [N, V] -> [N] long.

    ``temperature == 0``: argmax (ties go to the lowest id). Otherwise softmax(logits / temperature), top-p filtered,
    drawn with ``generator`` (which must live on ``logits.device``).
    """
    if logits.dim() != 2:
        raise ValueError(f"sample expects logits [N, V], got shape {tuple(logits.shape)}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
