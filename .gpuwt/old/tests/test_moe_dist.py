"""MoELayer over real gloo process groups: TP-sharded or expert-parallel experts over the flattened dp·pcp·tp group.

The reference is transformers' MoE block run in the test process on the full token set; the workers get its
weights, the tokens and the expected output. Every (dp, pcp) group holds a different number of tokens (one holds
none), the ranks of a TP group hold the same tokens, and each rank compares its own rows. One pool task per pool
size runs every layout in turn (init → check → destroy → next).
"""

from __future__ import annotations

import torch

from megacp.moe import MoELayer, MoEParallelConfig
from tests.dist_pool import model_parallel

H, E, I, S, TOP_K = 16, 9, 24, 20, 2  # 9 experts: uneven EP splits over 2, 4 and 8 ranks
MODES = [(False, "linear"), (True, "linear"), (True, "round_robin")]


def _token_counts(num_groups: int) -> list[int]:
    """Tokens held by each (dp, pcp) group: all different, the second group none (a rank may have no tokens)."""
    return [5 + 3 * g if g != 1 else 0 for g in range(num_groups)]


def _reference_case(kind: str, seed: int, num_groups: int) -> dict:
    """A transformers MoE block's weights (per-expert or fused layout), tokens, and its output on all of them."""
    torch.manual_seed(seed)
    if kind == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=TOP_K)
        block = MixtralSparseMoeBlock(cfg)
    else:
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        cfg = Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I, shared_expert_intermediate_size=S, num_experts=E,
                             num_experts_per_tok=TOP_K, norm_topk_prob=kind == "qwen_norm")
        block = Qwen2MoeSparseMoeBlock(cfg)
    block.eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    if kind == "mixtral":  # published Mixtral checkpoints: one tensor per expert, w1/w3/w2
        gate_up, down = state.pop("experts.gate_up_proj"), state.pop("experts.down_proj")
        for e in range(E):
            state[f"experts.{e}.w1.weight"] = gate_up[e, :I].clone()
            state[f"experts.{e}.w3.weight"] = gate_up[e, I:].clone()
            state[f"experts.{e}.w2.weight"] = down[e].clone()
    x = torch.randn(sum(_token_counts(num_groups)), H)
    with torch.no_grad():
        ref = block(x[None])[0]
    assert ref.abs().max() > 0.1
    return {"kind": kind, "state": state, "x": x, "ref": ref}


def _check_layouts(cases: list[tuple[tuple[int, int, int], dict]]) -> list[dict]:
    """Worker task: for each ((tp, pcp, dp), case) and every EP mode, the layer's rows vs the reference."""
    results = []
    for (tp, pcp, dp), case in cases:
        counts = _token_counts(pcp * dp)
        for use_ep, placement in MODES:
            with model_parallel(tensor_model_parallel_size=tp, prefill_context_parallel_size=pcp,
                                data_parallel_size=dp, enable_expert_parallel=use_ep) as ps:
                cfg = MoEParallelConfig.make()  # every default from parallel_state: EP from its one switch
                assert cfg == MoEParallelConfig.make(tp, pcp, dp, use_ep) and cfg.use_ep == use_ep
                shared = S if case["kind"] != "mixtral" else None
                layer = MoELayer(H, I, E, TOP_K, case["kind"] != "qwen_nonorm", shared, cfg, placement)
                for name, t in case["state"].items():
                    layer.load_weight(name, t)
                group = ps.get_data_parallel_rank() * pcp + ps.get_prefill_context_parallel_rank()
                start = sum(counts[:group])
                rows = slice(start, start + counts[group])
                with torch.no_grad():
                    out = layer(case["x"][rows])
                results.append({
                    "label": f"{case['kind']} tp{tp} pcp{pcp} dp{dp} ep{int(use_ep)} {placement}",
                    "err": (out - case["ref"][rows]).abs().max().item() if counts[group] else 0.0,
                    "shape_ok": out.shape == case["ref"][rows].shape,
                    "expert_bytes": sum(p.numel() * p.element_size() for p in (layer.w13, layer.w2)),
                    "use_ep": use_ep,
                })
    return results


def _assert_results(per_rank: list[list[dict]]) -> None:
    world = len(per_rank)
    full_bytes = E * 3 * I * H * 4
    one_expert = 3 * I * H * 4
    for checks in zip(*per_rank):
        label = checks[0]["label"]
        for r, c in enumerate(checks):
            assert c["shape_ok"], (label, r)
            assert c["err"] <= 1e-5, (label, r, c["err"])
        per_rank_bytes = [c["expert_bytes"] for c in checks]
        assert sum(per_rank_bytes) == full_bytes, (label, per_rank_bytes)
        slack = one_expert if checks[0]["use_ep"] else 0  # without EP, I=24 divides evenly over 2, 4 and 8 ranks
        assert all(abs(b - full_bytes / world) <= slack for b in per_rank_bytes), (label, per_rank_bytes)


def test_moe_layer_2_ranks(dist_pool_2):
    cases = [((1, 2, 1), _reference_case("qwen_norm", 0, 2)),
             ((2, 1, 1), _reference_case("mixtral", 1, 1)),
             ((1, 1, 2), _reference_case("qwen_nonorm", 2, 2))]
    _assert_results(dist_pool_2.run(_check_layouts, cases))


def test_moe_layer_4_ranks(dist_pool_4):
    cases = [((2, 2, 1), _reference_case("mixtral", 3, 2)),
             ((1, 4, 1), _reference_case("qwen_norm", 4, 4)),
             ((1, 2, 2), _reference_case("qwen_nonorm", 5, 4))]
    _assert_results(dist_pool_4.run(_check_layouts, cases))


def test_moe_layer_8_ranks(dist_pool_8):
    cases = [((2, 2, 2), _reference_case("qwen_norm", 6, 4))]
    _assert_results(dist_pool_8.run(_check_layouts, cases, timeout=300))
