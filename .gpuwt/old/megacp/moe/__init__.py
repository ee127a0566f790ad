"""MoE: parallel config (PCP acts like DP for experts), expert placement, the MoE layer (DESIGN §4) and DeepSeek's
router and MoE block (DESIGN §3b)."""

from megacp.moe.config import EXPERT_PLACEMENTS, MoEParallelConfig, determine_expert_map, expert_counts
from megacp.moe.deepseek import DeepseekMoE
from megacp.moe.layer import MoELayer, expert_forward, route, shard_range, swiglu
from megacp.moe.routing import RouterSpec, deepseek_route, group_limited_mask

__all__ = [
    "DeepseekMoE",
    "EXPERT_PLACEMENTS",
    "MoEParallelConfig",
    "MoELayer",
    "RouterSpec",
    "deepseek_route",
    "determine_expert_map",
    "expert_counts",
    "expert_forward",
    "group_limited_mask",
    "route",
    "shard_range",
    "swiglu",
]
