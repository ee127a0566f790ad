"""DeepSeek routing and MoE block without processes, against transformers' DeepseekV2/V3 routers and MoE blocks.

The routers are compared per token as sets of (expert, weight) pairs (both sides pick with ``sorted=False``). The
inputs are checked to be tie-free where the choice is made (the topk_group-th vs next group score, the k-th vs
next expert), so equality is not luck; negative controls: an unbiased V3 router, a router without the group limit
and V2's group score with V3's rule each choose differently on the same tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from megacp.moe import DeepseekMoE, MoEParallelConfig, RouterSpec, deepseek_route, group_limited_mask
from tests.deepseek_tiny import MOE_HIDDEN as H
from tests.deepseek_tiny import MOE_INTERMEDIATE as I
from tests.deepseek_tiny import hf_moe_block, moe_block_config, per_expert_state, router_spec

N = 96
V3_CASES = [  # (num_experts, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
    (16, 4, 4, 2, True, 2.5),
    (16, 3, 8, 3, False, 1.0),
    (12, 2, 3, 1, True, 1.7),
    (8, 2, 1, 1, True, 2.5),  # one group: plain top-k of the biased choice
]
# (num_experts, top_k, topk_method, n_group, topk_group, routed_scaling_factor). V2's limit (groups scored by their
# best expert) can only change the choice when topk_group < top_k: the top-k experts' groups are the best by max.
V2_CASES = [
    (16, 4, "group_limited_greedy", 4, 2, 16.0),
    (12, 3, "group_limited_greedy", 6, 2, 1.0),
    (16, 6, "greedy", None, None, 1.0),
]


def _v3_config(e, k, g, tg, norm, scale):
    return moe_block_config(3, n_routed_experts=e, num_experts_per_tok=k, n_group=g, topk_group=tg,
                            norm_topk_prob=norm, routed_scaling_factor=scale)


def _v2_config(e, k, method, g, tg, scale):
    return moe_block_config(2, n_routed_experts=e, num_experts_per_tok=k, topk_method=method, n_group=g,
                            topk_group=tg, routed_scaling_factor=scale)


def _spec(config) -> RouterSpec:
    return router_spec(config)


def _pairs(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, (ids ascending, their weights): order-free comparison."""
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), weights.gather(1, order)


def _margin(values: torch.Tensor, k: int) -> float:
    """Smallest gap between the k-th and (k+1)-th largest value of a row (how far the choice is from a tie)."""
    top = values.detach().topk(min(k + 1, values.shape[-1]), dim=-1).values
    return float((top[:, k - 1] - top[:, k]).min()) if k < values.shape[-1] else float("inf")


@pytest.mark.parametrize("case", V3_CASES)
def test_v3_router_equals_transformers(case):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    e, k, g, tg, norm, scale = case
    torch.manual_seed(e * 100 + k)
    router = DeepseekV3TopkRouter(_v3_config(*case))
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(N, H)
    _, w_ref, ids_ref = router(x)
    logits = F.linear(x, router.weight)
    spec = _spec(_v3_config(*case))
    assert (spec.scoring_func, spec.topk_method, spec.n_group) == ("sigmoid", "noaux_tc", g)
    w, ids = deepseek_route(logits, spec, router.e_score_correction_bias)
    choice = logits.sigmoid() + router.e_score_correction_bias
    group_scores = choice.view(N, g, e // g).topk(2, dim=-1)[0].sum(-1)
    assert _margin(group_scores, tg) > 1e-6  # tie-free group selection
    masked = choice.masked_fill(~group_limited_mask(choice, g, tg, top2_sum=True), float("-inf"))
    assert _margin(masked, k) > 1e-6  # tie-free expert selection
    (a, wa), (b, wb) = _pairs(w, ids), _pairs(w_ref, ids_ref)
    assert torch.equal(a, b)
    torch.testing.assert_close(wa, wb, rtol=1e-6, atol=0)
    assert w.dtype == torch.float32 and ids.dtype == torch.long
    # Negative controls: the bias really moves the choice, and the weights do not include it.
    _, ids_unbiased = deepseek_route(logits, RouterSpec(e, k, "sigmoid", "noaux_tc", g, tg, norm, scale),
                                     torch.zeros(e))
    assert not torch.equal(_pairs(w, ids_unbiased)[0], a)
    biased_weights = deepseek_route(logits + 0, spec, router.e_score_correction_bias)[0]
    assert torch.equal(biased_weights, w)
    if g > 1:  # without the group limit the choice differs for some tokens
        _, ids_free = deepseek_route(logits, RouterSpec(e, k, "sigmoid", "noaux_tc", 1, 1, norm, scale),
                                     router.e_score_correction_bias)
        assert not torch.equal(_pairs(w, ids_free)[0], a)


@pytest.mark.parametrize("case", V2_CASES)
def test_v2_router_equals_transformers(case):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    e, k, method, g, tg, scale = case
    torch.manual_seed(e * 10 + k)
    router = DeepseekV2TopkRouter(_v2_config(*case))
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
    x = torch.randn(N, H)
    _, w_ref, ids_ref = router(x)
    logits = F.linear(x, router.weight)
    spec = _spec(_v2_config(*case))
    assert (spec.scoring_func, spec.topk_method, spec.norm_topk_prob) == ("softmax", method, False)
    w, ids = deepseek_route(logits, spec)
    scores = logits.softmax(-1)
    if method == "greedy":
        assert _margin(scores, k) > 1e-7
    else:
        assert _margin(scores.view(N, g, e // g).max(-1).values, tg) > 1e-7
    (a, wa), (b, wb) = _pairs(w, ids), _pairs(w_ref, ids_ref)
    assert torch.equal(a, b)
    torch.testing.assert_close(wa, wb, rtol=1e-6, atol=0)
    if method != "greedy":  # negative controls: no group limit, and V3's top-2-sum group score
        free = deepseek_route(logits, RouterSpec(e, k, "softmax", "greedy", routed_scaling_factor=scale))[1]
        assert not torch.equal(_pairs(w, free)[0], a)
        top2 = scores.masked_fill(~group_limited_mask(scores, g, tg, top2_sum=True), 0.0).topk(k, dim=-1)[1]
        assert not torch.equal(_pairs(w, top2)[0], a)


def test_route_rejects_bias_mismatch_and_bad_specs():
    with pytest.raises(ValueError, match="needs e_score_correction_bias"):
        deepseek_route(torch.randn(3, 8), RouterSpec(8, 2, "sigmoid", "noaux_tc", 2, 1))
    with pytest.raises(ValueError, match="takes no e_score_correction_bias"):
        deepseek_route(torch.randn(3, 8), RouterSpec(8, 2), torch.zeros(8))
    for kwargs, msg in ((dict(scoring_func="relu"), "scoring_func"), (dict(topk_method="aux"), "topk_method"),
                        (dict(topk_method="noaux_tc", n_group=3), "n_group=3 must divide"),
                        (dict(topk_method="noaux_tc", n_group=8), "groups of >= 2"),
                        (dict(topk_method="group_limited_greedy", n_group=4, topk_group=5), "topk_group=5")):
        with pytest.raises(ValueError, match=msg):
            RouterSpec(8, 2, **kwargs)


# ------------------------------------------------------------------------------------------- the block
def make_layer(config, cfg=None, placement="linear", params_dtype=None) -> DeepseekMoE:
    return DeepseekMoE(H, I, _spec(config), config.n_shared_experts * I, cfg, placement, params_dtype)


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_single_rank_block_equals_transformers(version, layout):
    block, config = hf_moe_block(version, seed=version)
    layer = make_layer(config)
    state = per_expert_state(block) if layout == "per_expert" else block.state_dict()
    assert sorted(state) == sorted(layer.checkpoint_names(layout == "fused"))
    for name, t in state.items():
        assert layer.load_weight(name, t)
    x = torch.randn(N, H)
    with torch.no_grad():
        ref = block(x[None])[0]
        out = layer(x)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    if version == 3:  # negative control: the same block with an unbiased router gives another output
        with torch.no_grad():
            layer.e_score_correction_bias.zero_()
            assert (layer(x) - ref).abs().max() > 1e-2


def test_router_stays_float32_in_a_bf16_block():
    block, config = hf_moe_block(3, seed=5)
    layer = make_layer(config, params_dtype=torch.bfloat16)
    for name, t in block.state_dict().items():
        layer.load_weight(name, t)
    assert layer.router_weight.dtype == torch.float32 and layer.e_score_correction_bias.dtype == torch.float32
    assert layer.w13.dtype == torch.bfloat16 and layer.shared_w13.dtype == torch.bfloat16
    assert torch.equal(layer.router_weight, block.gate.weight)  # not rounded through bf16
    cast = make_layer(config)
    for name, t in block.state_dict().items():
        cast.load_weight(name, t)
    cast.to(torch.bfloat16)  # a model cast after loading keeps its router too
    assert cast.w13.dtype == torch.bfloat16 and cast.router_weight.dtype == torch.float32
    assert torch.equal(cast.router_weight, block.gate.weight) and cast.router_weight.requires_grad
    assert torch.equal(cast.e_score_correction_bias, block.gate.e_score_correction_bias)
    assert dict(cast.named_parameters())["router_weight"] is cast.router_weight
    x = torch.randn(N, H).bfloat16()
    # The choice on bf16 tokens is transformers' float32 router's on the same (exactly representable) values.
    _, w_ref, ids_ref = block.gate(x.float())
    w, ids = layer.select_experts(layer.router_logits(x))
    assert torch.equal(_pairs(w, ids)[0], _pairs(w_ref, ids_ref)[0])
    torch.testing.assert_close(_pairs(w, ids)[1], _pairs(w_ref, ids_ref)[1], rtol=1e-6, atol=0)
    # transformers loading a bf16 checkpoint keeps gate.weight / e_score_correction_bias in float32, the rest bf16.
    block_bf16 = copy.deepcopy(block).bfloat16()
    block_bf16.gate.float().load_state_dict(block.gate.state_dict())  # the float32 values, not bf16-rounded
    with torch.no_grad():
        out = layer(x)
        ref = block_bf16(x[None])[0]
    assert out.dtype == torch.bfloat16 and ref.dtype == torch.bfloat16
    # Both round in bf16 (transformers accumulates the experts in bf16, megacp in float32): a few bf16 ulps.
    scale = ref.float().abs().max()
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=0.02 * float(scale))


def _rank_configs():
    out = []
    for tp, pcp in [(2, 1), (1, 2), (2, 2)]:
        world = tp * pcp
        for use_ep, placement in [(False, "linear"), (True, "linear"), (True, "round_robin")]:
            cfgs = [MoEParallelConfig.make(tp, pcp, 1, use_ep, tp_rank=r % tp, pcp_rank=r // tp, dp_rank=0)
                    for r in range(world)]
            out.append((f"tp{tp}-pcp{pcp}-ep{int(use_ep)}-{placement}", cfgs, placement))
    return out


@pytest.mark.parametrize("version", [2, 3])
def test_rank_shares_sum_to_the_block(tmp_path, version):
    """Every rank's partial sum (lazy safetensors slices, TP-sharded or expert-parallel, shared experts split over
    the flattened group) adds up to transformers' block output."""
    block, config = hf_moe_block(version, seed=10 + version)
    path = tmp_path / "moe.safetensors"
    save_file({k: v.contiguous() for k, v in per_expert_state(block).items()}, str(path))
    x = torch.randn(N, H)
    with torch.no_grad():
        ref = block(x[None])[0]
    with safe_open(str(path), framework="pt") as f:
        for label, cfgs, placement in _rank_configs():
            total = torch.zeros_like(ref)
            for cfg in cfgs:
                layer = make_layer(config, cfg, placement)
                loaded = [layer.load_weight(name, f.get_slice(name)) for name in f.keys()]
                if cfg.use_ep:
                    assert sum(loaded) == len(loaded) - (16 - layer.num_local_experts) * 3, label
                with torch.no_grad():
                    total += layer.partial_forward(x, layer.router_logits(x))
            torch.testing.assert_close(total, ref, rtol=0, atol=1e-5, msg=label)


def test_checkpoint_schema_and_errors():
    _, config = hf_moe_block(3, seed=0)
    layer = make_layer(config)
    names = layer.checkpoint_names()
    assert "gate.e_score_correction_bias" in names and "shared_experts.down_proj.weight" in names
    assert not any(n.startswith("shared_expert_gate") or n.startswith("shared_expert.") for n in names)
    assert layer.checkpoint_shape("gate.e_score_correction_bias") == (16,)
    assert layer.checkpoint_shape("shared_experts.gate_proj.weight") == (2 * I, H)
    with pytest.raises(ValueError, match="unknown MoE weight 'shared_expert_gate.weight'"):
        layer.load_weight("shared_expert_gate.weight", torch.zeros(1, H))
    with pytest.raises(ValueError, match=r"expects \[16\]"):
        layer.load_weight("gate.e_score_correction_bias", torch.zeros(8))
    _, v2 = hf_moe_block(2, seed=0)
    assert "gate.e_score_correction_bias" not in make_layer(v2).checkpoint_names()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_block_on_cuda_routes_like_transformers_float32_router():
    """On the GPU: a bf16 DeepseekMoE (float32 router) picks the experts transformers' float32 router picks on the
    same tokens, and its output is transformers' bf16 block's within bf16 rounding."""
    block, config = hf_moe_block(3, seed=21)
    layer = make_layer(config, params_dtype=torch.bfloat16)
    for name, t in block.state_dict().items():
        layer.load_weight(name, t)
    layer.cuda()
    assert layer.router_weight.dtype == torch.float32 and layer.w13.dtype == torch.bfloat16
    x = torch.randn(4 * N, H).bfloat16()
    _, w_ref, ids_ref = block.gate(x.float())
    with torch.no_grad():
        w, ids = layer.select_experts(layer.router_logits(x.cuda()))
        out = layer(x.cuda())
    # GPU and CPU float32 matmuls round differently: compare the rows whose choice is not within 1e-5 of a tie.
    logits = F.linear(x.float(), block.gate.weight)
    choice = logits.sigmoid() + block.gate.e_score_correction_bias
    masked = choice.masked_fill(~group_limited_mask(choice, 4, 2, top2_sum=True), float("-inf"))
    top = masked.topk(5, dim=-1).values
    groups = choice.view(-1, 4, 4).topk(2, dim=-1)[0].sum(-1).topk(3, dim=-1).values
    clear = ((top[:, 3] - top[:, 4]) > 1e-5) & ((groups[:, 1] - groups[:, 2]) > 1e-5)
    assert clear.float().mean() > 0.9
    (a, wa), (b, wb) = _pairs(w.cpu(), ids.cpu()), _pairs(w_ref, ids_ref)
    assert torch.equal(a[clear], b[clear])
    torch.testing.assert_close(wa[clear], wb[clear], rtol=1e-5, atol=0)
    block_bf16 = copy.deepcopy(block).bfloat16()
    block_bf16.gate.float().load_state_dict(block.gate.state_dict())
    with torch.no_grad():
        ref = block_bf16.cuda()(x.cuda()[None])[0]
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=0.02 * float(ref.float().abs().max()))
