"""Sampling parameters and the pure next-token sampler (greedy, temperature, top-p).

The sampler is deterministic given its ``torch.Generator``: the engine seeds one generator identically on every rank,
so every rank picks the same tokens from the same (TP-gathered, PCP-identical) logits. The engine still broadcasts the
chosen tokens from rank 0 afterwards, so even a one-ulp difference in logits between ranks can never make them diverge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import LongTensor, Tensor

from megacp.checks import check_bool, check_int, check_real
from megacp.ops.greedy import greedy_tokens


# What ``sample`` returns for a row whose logits hold NaN or inf (the engine stops that request with an error).
NONFINITE_TOKEN = -1
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` means greedy (argmax).

    Checked at construction (``ValueError`` naming the argument): ``max_new_tokens`` an integer >= 1,
    ``temperature`` a finite number >= 0, ``top_p`` a finite number in (0, 1], ``ignore_eos`` a bool, ``seed`` an
    integer ``torch.Generator.manual_seed`` accepts.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    ignore_eos: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("SamplingParams(max_new_tokens)", self.max_new_tokens, 1, hint="e.g. 16")
        check_real("SamplingParams(temperature)", self.temperature, 0.0, hint="0 = greedy, e.g. 0.8 to sample")
        check_real("SamplingParams(top_p)", self.top_p, 0.0, 1.0, min_inclusive=False,
                   hint="1 = no nucleus filtering, e.g. 0.9")
        check_bool("SamplingParams(ignore_eos)", self.ignore_eos)
        check_int("SamplingParams(seed)", self.seed, *SEED_RANGE)


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
    drawn with ``generator`` (which must live on ``logits.device``). A row with any NaN/inf logit gets
    ``NONFINITE_TOKEN`` instead of a token (greedy argmax of NaN would silently give id 0, and multinomial would
    raise on one rank only): computed on the device, so it costs no extra host sync.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample expects logits [N, V], got shape {tuple(logits.shape)}")
    if temperature == 0:
        return greedy_tokens(logits, NONFINITE_TOKEN)  # one kernel on CUDA: argmax and the finiteness flag
    finite = torch.isfinite(logits).all(dim=-1)  # [N]
    # Non-finite rows are replaced (their draw is discarded below) so multinomial never sees NaN; subtracting the row
    # max first keeps logits / temperature finite for tiny temperatures.
    safe = torch.where(finite[:, None], logits.float(), 0.0)
    safe = safe - safe.amax(dim=-1, keepdim=True)
    probs = top_p_filter(torch.softmax(safe / temperature, dim=-1), top_p)
    tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    return torch.where(finite, tokens, NONFINITE_TOKEN)
