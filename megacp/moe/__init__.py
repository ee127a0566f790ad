"""MoE: parallel config (PCP acts like DP for experts), expert placement, and the MoE layer (DESIGN §4)."""

from megacp.moe.config import EXPERT_PLACEMENTS, MoEParallelConfig, determine_expert_map, expert_counts
from megacp.moe.layer import MoELayer, expert_forward, route, shard_range, swiglu

__all__ = [
    "EXPERT_PLACEMENTS",
    "MoEParallelConfig",
    "MoELayer",
    "determine_expert_map",
    "expert_counts",
    "expert_forward",
    "route",
    "shard_range",
    "swiglu",
]
