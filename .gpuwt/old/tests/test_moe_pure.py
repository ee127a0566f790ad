"""MoE without processes: parallel config, expert placement, and the layer against transformers' MoE blocks."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megacp.moe import MoELayer, MoEParallelConfig, determine_expert_map
from megacp.moe.config import EXPERT_PLACEMENTS

SIZES = range(1, 5)


# ------------------------------------------------------------------------------------------- MoEParallelConfig
@pytest.mark.parametrize("use_ep", [False, True])
def test_parallel_config_every_layout_and_rank(use_ep):
    for tp, pcp, dp in itertools.product(SIZES, SIZES, SIZES):
        world = tp * pcp * dp
        # Reference: ranks laid out as arange(world).reshape(dp, pcp, tp), TP innermost (DESIGN §1).
        layout = torch.arange(world).reshape(dp, pcp, tp)
        seen = set()
        for d, p, t in itertools.product(range(dp), range(pcp), range(tp)):
            cfg = MoEParallelConfig.make(tp, pcp, dp, use_ep, tp_rank=t, pcp_rank=p, dp_rank=d)
            global_rank = int(layout[d, p, t])
            assert (cfg.pcp_size, cfg.pcp_rank, cfg.dp_size, cfg.dp_rank, cfg.use_ep) == (pcp, p, dp, d, use_ep)
            if use_ep:
                assert (cfg.tp_size, cfg.tp_rank, cfg.ep_size, cfg.ep_rank) == (1, 0, world, global_rank)
            else:
                assert (cfg.tp_size, cfg.tp_rank, cfg.ep_size, cfg.ep_rank) == (world, global_rank, 1, 0)
            assert (cfg.flat_size, cfg.flat_rank) == (world, global_rank)
            assert (cfg.attn_tp_size, cfg.attn_tp_rank) == (tp, t)
            assert (cfg.expert_tp_size, cfg.expert_tp_rank) == (cfg.tp_size, cfg.tp_rank)
            seen.add(global_rank)
        assert seen == set(range(world))


def test_parallel_config_rejects_bad_ranks():
    with pytest.raises(ValueError, match="pcp_rank"):
        MoEParallelConfig.make(2, 2, 1, False, tp_rank=0, pcp_rank=2, dp_rank=0)
    with pytest.raises(ValueError, match="tp_size"):
        MoEParallelConfig.make(0, 1, 1, False)
    # Size-1 dimensions need no parallel_state.
    assert MoEParallelConfig.make(1, 1, 1, True).ep_size == 1


# ------------------------------------------------------------------------------------------- determine_expert_map
@pytest.mark.parametrize("placement", EXPERT_PLACEMENTS)
@pytest.mark.parametrize("num_experts", [4, 8, 9, 16, 17])
@pytest.mark.parametrize("ep", [1, 2, 4])
def test_expert_map(placement, num_experts, ep):
    owner = [None] * num_experts
    counts = []
    for r in range(ep):
        num_local, emap = determine_expert_map(ep, r, num_experts, placement)
        if ep == 1:
            assert emap is None and num_local == num_experts
            return
        assert emap.dtype == torch.long and emap.shape == (num_experts,)
        local = [g for g in range(num_experts) if emap[g] >= 0]
        assert len(local) == num_local
        assert [int(emap[g]) for g in local] == list(range(num_local))  # local indices 0..n-1 in global order
        assert all(int(emap[g]) == -1 for g in range(num_experts) if g not in local)
        for g in local:
            assert owner[g] is None, f"expert {g} on two ranks"
            owner[g] = r
        counts.append(num_local)
        if placement == "linear":
            assert local == list(range(local[0], local[0] + num_local))
        else:
            assert local == list(range(r, num_experts, ep))
    assert None not in owner
    assert max(counts) - min(counts) <= 1
    # base = E // ep, and the first E % ep ranks get one more.
    assert counts == [num_experts // ep + (r < num_experts % ep) for r in range(ep)]
    if placement == "linear":
        assert owner == sorted(owner)


def test_expert_map_rejects_unknown_placement():
    with pytest.raises(ValueError, match="round_robin"):
        determine_expert_map(2, 0, 8, "striped")


# ------------------------------------------------------------------------------------------- layer vs transformers
H, E, I, S, TOP_K = 16, 8, 24, 20, 2


def _mixtral_block(seed):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=TOP_K)
    block = MixtralSparseMoeBlock(cfg).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block


def _qwen_block(seed, norm_topk_prob):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I, shared_expert_intermediate_size=S, num_experts=E,
                         num_experts_per_tok=TOP_K, norm_topk_prob=norm_topk_prob)
    block = Qwen2MoeSparseMoeBlock(cfg).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block


def _per_expert_state(block, mixtral: bool) -> dict[str, torch.Tensor]:
    """The block's weights in the per-expert layout published checkpoints use (Mixtral: w1/w3/w2)."""
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    state = {}
    for name, t in block.state_dict().items():
        if name == "experts.gate_up_proj":
            for e in range(t.shape[0]):
                state[f"experts.{e}.{names[0]}.weight"] = t[e, :I].clone()
                state[f"experts.{e}.{names[1]}.weight"] = t[e, I:].clone()
        elif name == "experts.down_proj":
            for e in range(t.shape[0]):
                state[f"experts.{e}.{names[2]}.weight"] = t[e].clone()
        else:
            state[name] = t.clone()
    return state


def _layer(block, shared: bool, renormalize: bool, cfg=None, placement="linear") -> MoELayer:
    return MoELayer(H, I, E, TOP_K, renormalize, S if shared else None, cfg, placement)


def _reference(block, x):
    with torch.no_grad():
        return block(x[None]).reshape(x.shape)


@pytest.mark.parametrize("kind", ["mixtral", "qwen_norm", "qwen_nonorm"])
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_single_rank_layer_matches_transformers(kind, layout):
    mixtral = kind == "mixtral"
    block = _mixtral_block(0) if mixtral else _qwen_block(1, norm_topk_prob=kind == "qwen_norm")
    layer = _layer(block, shared=not mixtral, renormalize=kind != "qwen_nonorm")
    state = _per_expert_state(block, mixtral) if layout == "per_expert" else block.state_dict()
    for name, t in state.items():
        assert layer.load_weight(name, t)
    x = torch.randn(11, H)
    ref = _reference(block, x)
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert ref.abs().max() > 0.1  # the comparison is not trivially zero


def _rank_configs():
    """(label, [config per flat rank], placement) for a few flattened groups, with and without EP."""
    out = []
    for tp, pcp, dp in [(1, 2, 1), (2, 2, 1), (1, 3, 1), (2, 1, 2)]:
        world = tp * pcp * dp
        for use_ep, placement in [(False, "linear"), (True, "linear"), (True, "round_robin")]:
            cfgs = [MoEParallelConfig.make(tp, pcp, dp, use_ep, tp_rank=r % tp, pcp_rank=(r // tp) % pcp,
                                           dp_rank=r // (tp * pcp)) for r in range(world)]
            out.append((f"tp{tp}-pcp{pcp}-dp{dp}-ep{int(use_ep)}-{placement}", cfgs, placement))
    return out


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_rank_shares_sum_to_the_full_layer(tmp_path, layout):
    """Every rank's partial sum, loaded from lazy safetensors slices, adds up to transformers' output."""
    block = _qwen_block(2, norm_topk_prob=True)
    state = _per_expert_state(block, mixtral=False) if layout == "per_expert" else block.state_dict()
    path = tmp_path / "moe.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    x = torch.randn(13, H)
    ref = _reference(block, x)
    logits = x @ block.gate.weight.T
    full_bytes = E * 3 * I * H * 4
    with safe_open(str(path), framework="pt") as f:
        for label, cfgs, placement in _rank_configs():
            total = torch.zeros_like(ref)
            expert_bytes = []
            for cfg in cfgs:
                layer = _layer(block, shared=True, renormalize=True, cfg=cfg, placement=placement)
                loaded = [layer.load_weight(name, f.get_slice(name)) for name in f.keys()]
                with torch.no_grad():
                    total += layer.partial_forward(x, logits)
                expert_bytes.append(sum(p.numel() * p.element_size() for p in (layer.w13, layer.w2)))
                if cfg.use_ep and layout == "per_expert":
                    assert sum(loaded) == len(loaded) - (E - layer.num_local_experts) * 3, label
            torch.testing.assert_close(total, ref, rtol=0, atol=1e-5, msg=label)
            # Each rank holds 1/N of the expert parameters (±1 expert under EP, exactly without EP here).
            n = len(cfgs)
            assert sum(expert_bytes) == full_bytes, label
            slack = 3 * I * H * 4 if cfgs[0].use_ep else 0
            assert all(abs(b - full_bytes / n) <= slack for b in expert_bytes), (label, expert_bytes)


def test_load_weight_rejects_bad_names_and_shapes():
    layer = MoELayer(H, I, E, TOP_K, True)
    with pytest.raises(ValueError, match="unknown MoE weight"):
        layer.load_weight("experts.0.fc1.weight", torch.zeros(I, H))
    with pytest.raises(ValueError, match="no shared expert"):
        layer.load_weight("shared_expert_gate.weight", torch.zeros(1, H))
    with pytest.raises(ValueError, match=r"expects \[24, 16\]"):
        layer.load_weight("experts.0.gate_proj.weight", torch.zeros(H, I))
    with pytest.raises(ValueError, match="top_k"):
        MoELayer(H, I, E, E + 1, True)
