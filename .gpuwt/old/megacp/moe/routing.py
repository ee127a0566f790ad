"""DeepSeek's expert choice (pure functions, float32): DeepSeek-V2's softmax router and DeepSeek-V3's biased sigmoid
router, with group-limited top-k. The Mixtral/Qwen2-MoE softmax top-k is ``megacp.moe.layer.route``.

    scores  = softmax(logits) (V2)  |  sigmoid(logits) (V3)                      [N, E]
    choice  = scores                |  scores + e_score_correction_bias           (the bias moves the choice only)
    groups  (group_limited_greedy / noaux_tc): the E experts form n_group equal groups; a group's score is its best
            expert's (V2) or the sum of its two best (V3); only the topk_group best groups stay eligible
    ids     = top-k of choice among the eligible experts
    weights = scores[ids] (unbiased), / their sum when norm_topk_prob, × routed_scaling_factor

Exactly transformers' ``DeepseekV2TopkRouter`` / ``DeepseekV3TopkRouter`` (``tests/test_deepseek_moe.py``). The
ids come in no particular order (transformers' ``sorted=False``); the MoE output does not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class RouterSpec:
    """How one DeepSeek MoE layer picks experts (the ModelConfig fields of the same names)."""

    num_experts: int
    top_k: int
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"RouterSpec: scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"RouterSpec: topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"RouterSpec: top_k must be in 1..{self.num_experts}, got {self.top_k}")
        if self.grouped:
            per_group = self.num_experts // self.n_group if self.n_group >= 1 else 0
            if self.n_group < 1 or self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"RouterSpec: n_group={self.n_group} must divide the {self.num_experts} experts "
                                 f"and 1 <= topk_group={self.topk_group} <= n_group")
            if self.top_k > self.topk_group * per_group or (self.topk_method == "noaux_tc" and per_group < 2):
                raise ValueError(f"RouterSpec: top_k={self.top_k} needs at least that many experts in the "
                                 f"topk_group={self.topk_group} groups of {per_group} (noaux_tc: groups of >= 2)")

    @property
    def grouped(self) -> bool:
        return self.topk_method != "greedy"

    @property
    def biased(self) -> bool:
        """noaux_tc: the choice adds ``e_score_correction_bias``."""
        return self.topk_method == "noaux_tc"

    @staticmethod
    def from_config(config: Any) -> "RouterSpec":
        """From a ``megacp.models.config.ModelConfig`` of a DeepSeek model."""
        return RouterSpec(config.num_experts, config.num_experts_per_tok, config.scoring_func, config.topk_method,
                          config.n_group, config.topk_group, config.norm_topk_prob, config.routed_scaling_factor)


def group_limited_mask(choice: torch.Tensor, n_group: int, topk_group: int, top2_sum: bool) -> torch.Tensor:
    """choice [N, E] -> bool [N, E]: experts of the ``topk_group`` best of ``n_group`` equal groups. A group scores
    its best expert (``top2_sum=False``, DeepSeek-V2) or the sum of its two best (DeepSeek-V3)."""
    n, e = choice.shape
    grouped = choice.view(n, n_group, e // n_group)
    group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1) if top2_sum else grouped.max(dim=-1).values  # [N, G]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    return group_mask.unsqueeze(-1).expand(n, n_group, e // n_group).reshape(n, e)


def deepseek_route(
    router_logits: torch.Tensor, spec: RouterSpec, e_score_correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [N, E] (float32) -> (weights float32 [N, k], expert ids long [N, k]); see the module docstring.

    ``e_score_correction_bias`` [E] float32 is required by (and only used with) ``topk_method="noaux_tc"``.
    """
    if spec.biased != (e_score_correction_bias is not None):
        raise ValueError(f"deepseek_route: topk_method {spec.topk_method!r} "
                         f"{'needs' if spec.biased else 'takes no'} e_score_correction_bias")
    logits = router_logits.float()
    scores = logits.softmax(dim=-1) if spec.scoring_func == "softmax" else logits.sigmoid()
    choice = scores + e_score_correction_bias.float() if spec.biased else scores
    if spec.grouped:
        eligible = group_limited_mask(choice, spec.n_group, spec.topk_group, top2_sum=spec.biased)
        # V2 zeroes the other experts' (positive) softmax scores, V3 drops them from its biased choice.
        choice = choice.masked_fill(~eligible, float("-inf") if spec.biased else 0.0)
    weights, ids = torch.topk(choice, k=spec.top_k, dim=-1, sorted=False)
    if spec.biased:
        weights = scores.gather(1, ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * spec.routed_scaling_factor, ids
