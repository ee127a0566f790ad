"""DeepseekMoE over gloo process groups: forward and gradients against transformers' block on one process.

The reference is transformers' ``DeepseekV3MoE`` / ``DeepseekV2Moe`` run in the test process on every token, with
the gradients of ``sum(out · g)`` for a fixed random ``g``. Each rank loads the block's weights through its own
loaders (per-expert or fused layout), holds its PCP group's tokens (the groups hold different numbers), runs forward
and backward of the same loss on its rows, sums gradients with ``parallel_state.allreduce_grads`` and compares its
output rows, its input gradient rows and every parameter gradient (the reference gradients sharded by the same
loaders). Negative control: the router gradient before the reduction is not the whole one. One pool task runs every
layout: (tp 2), (pcp 2), (tp 2, EP) and (pcp 2, EP round-robin).
"""

from __future__ import annotations

import torch

from megacp.moe import DeepseekMoE, MoEParallelConfig
from tests.deepseek_tiny import MOE_HIDDEN as H
from tests.deepseek_tiny import MOE_INTERMEDIATE as I
from tests.deepseek_tiny import hf_moe_block, per_expert_state, router_spec
from tests.dist_pool import model_parallel

LAYOUTS = [  # (tp, pcp, use_ep, placement)
    (2, 1, False, "linear"),
    (1, 2, False, "linear"),
    (2, 1, True, "linear"),
    (1, 2, True, "round_robin"),
]
COUNTS = {1: [13], 2: [9, 4]}  # tokens of each PCP group (the same 13 in all)


def _reference(version: int, seed: int, layout: str) -> dict:
    block, config = hf_moe_block(version, seed)
    block.train()
    x = torch.randn(sum(COUNTS[2]), H, requires_grad=True)
    g = torch.randn(sum(COUNTS[2]), H)
    out = block(x[None])[0]
    (out * g).sum().backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    state = per_expert_state(block) if layout == "per_expert" else block.state_dict()
    return {"version": version, "spec": router_spec(config), "shared": config.n_shared_experts * I,
            "state": {k: v.detach().clone() for k, v in state.items()}, "grads": grads, "x": x.detach(), "g": g,
            "out": out.detach(), "x_grad": x.grad.clone()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _check(cases: list[dict]) -> list[dict]:
    """Worker task: every layout for every case; returns per check the errors this rank saw."""
    results = []
    for case in cases:
        for tp, pcp, use_ep, placement in LAYOUTS:
            with model_parallel(tensor_model_parallel_size=tp, prefill_context_parallel_size=pcp,
                                enable_expert_parallel=use_ep) as ps:
                cfg = MoEParallelConfig.make()
                layer = DeepseekMoE(H, I, case["spec"], case["shared"], cfg, placement)
                expected = DeepseekMoE(H, I, case["spec"], case["shared"], cfg, placement)
                for name, t in case["state"].items():
                    layer.load_weight(name, t)
                with torch.no_grad():  # the reference gradients, sharded by the same loaders (fused names)
                    for name, t in case["grads"].items():
                        expected.load_weight(name, t)
                counts = COUNTS[pcp]
                start = sum(counts[: ps.get_prefill_context_parallel_rank()])
                rows = slice(start, start + counts[ps.get_prefill_context_parallel_rank()])
                x = case["x"][rows].clone().requires_grad_(True)
                out = layer(x)
                (out * case["g"][rows]).sum().backward()
                router_before = layer.router_weight.grad.clone()
                ps.allreduce_grads(layer)
                grads = {n: _rel(p.grad, dict(expected.named_parameters())[n]) for n, p in layer.named_parameters()}
                results.append({
                    "label": f"v{case['version']} tp{tp} pcp{pcp} ep{int(use_ep)} {placement}",
                    "out": _rel(out.detach(), case["out"][rows]),
                    "x_grad": _rel(x.grad, case["x_grad"][rows]),
                    "grads": grads,
                    "router_before": _rel(router_before, expected.router_weight.detach()),
                    "router_dtype": str(layer.router_weight.dtype),
                })
    return results


def test_deepseek_moe_2_ranks(dist_pool_2):
    cases = [_reference(3, 0, "per_expert"), _reference(2, 1, "fused")]
    per_rank = dist_pool_2.run(_check, cases, timeout=300)
    assert len(per_rank[0]) == len(cases) * len(LAYOUTS)
    for checks in zip(*per_rank):
        for rank, c in enumerate(checks):
            label = (c["label"], rank)
            assert c["out"] < 1e-5 and c["x_grad"] < 1e-5, (label, c)
            assert set(c["grads"]) == {"router_weight", "w13", "w2", "shared_w13", "shared_w2"}, label
            assert all(err < 1e-5 for err in c["grads"].values()), (label, c["grads"])
            assert c["router_before"] > 1e-3, label  # negative control: one rank's router gradient is partial
            assert c["router_dtype"] == "torch.float32", label
