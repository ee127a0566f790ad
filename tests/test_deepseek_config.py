"""DeepSeek-V2/V3 ``config.json`` parsing (transformers v5 and v4 layouts) and the MLA layout rule (no processes).

The v5 configs are what transformers 5.24's ``save_pretrained`` writes (``rope_parameters``, no ``scoring_func`` /
``topk_method`` for V3); the v4 ones are shaped like the published DeepSeek-V3 / V2-Lite ``config.json``
(``rope_scaling`` with ``"type": "yarn"``, ``rope_theta``, ``scoring_func``, ``topk_method``, ``moe_layer_freq``, ...).
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import pytest

from megacp.config import ParallelConfig, model_layouts, validate_model_parallel
from megacp.models.config import load_model_config, model_config_from_dict
from tests.deepseek_tiny import save_tiny_deepseek, tiny_deepseek_config

TP, DCP = "tensor_model_parallel_size", "decode_context_parallel_size"

# Shaped like deepseek-ai/DeepSeek-V3's config.json (sizes shrunk).
V3_V4_LAYOUT = dict(
    model_type="deepseek_v3", vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, n_shared_experts=1, n_routed_experts=8,
    routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=12,
    qk_nope_head_dim=16, topk_method="noaux_tc", n_group=4, topk_group=2, num_experts_per_tok=2, moe_layer_freq=1,
    first_k_dense_replace=1, norm_topk_prob=True, scoring_func="sigmoid", aux_loss_alpha=0.001, seq_aux=True,
    hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000,
    rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 1.0, "mscale_all_dim": 0.8,
                  "original_max_position_embeddings": 64, "type": "yarn"},
    num_nextn_predict_layers=1, ep_size=1, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
)
# Shaped like deepseek-ai/DeepSeek-V2-Lite's: no q-LoRA, greedy routing, no n_group.
V2_LITE_V4_LAYOUT = dict(
    model_type="deepseek_v2", vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
    num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8, n_shared_experts=2, n_routed_experts=8,
    routed_scaling_factor=1.0, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16,
    qk_nope_head_dim=16, topk_method="greedy", n_group=1, topk_group=1, num_experts_per_tok=3, moe_layer_freq=1,
    first_k_dense_replace=1, norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True,
    max_position_embeddings=256, rope_theta=10000, bos_token_id=1, eos_token_id=2,
    rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 0.707, "mscale_all_dim": 0.707,
                  "original_max_position_embeddings": 64, "type": "yarn"},
)


@pytest.fixture(scope="module")
def saved_dirs():
    with tempfile.TemporaryDirectory() as root:
        yield {v: save_tiny_deepseek(os.path.join(root, f"v{v}"), v) for v in (2, 3)}


@pytest.mark.parametrize("version", [2, 3])
def test_saved_v5_config_fields(saved_dirs, version):
    """What save_pretrained wrote, parsed: every MLA / MoE field equals the transformers config's value."""
    with open(os.path.join(saved_dirs[version], "config.json")) as f:
        raw = json.load(f)
    assert "rope_parameters" in raw and "rope_scaling" not in raw and "scoring_func" not in raw
    hf = tiny_deepseek_config(version)
    c = load_model_config(saved_dirs[version])
    assert c.is_mla and (c.kv_lora_rank, c.q_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (
        hf.kv_lora_rank, hf.q_lora_rank, hf.qk_nope_head_dim, hf.qk_rope_head_dim, hf.v_head_dim)
    assert c.qk_head_dim == hf.qk_head_dim and c.head_dim == hf.qk_rope_head_dim and c.rope_interleave
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (8, 2, 24)
    assert c.moe_layers == [i for i in range(hf.num_hidden_layers) if i >= hf.first_k_dense_replace] == [1, 2]
    assert c.dense_intermediate_size == 96 and c.is_moe
    assert (c.n_shared_experts, c.shared_expert_intermediate_size, c.shared_expert_gate) == (
        hf.n_shared_experts, hf.n_shared_experts * 24, False)
    assert (c.n_group, c.topk_group, c.routed_scaling_factor) == (4, 2, hf.routed_scaling_factor)
    expected = ("softmax", "group_limited_greedy", False) if version == 2 else ("sigmoid", "noaux_tc", True)
    assert (c.scoring_func, c.topk_method, c.norm_topk_prob) == expected
    assert c.router_has_bias == (version == 3)
    assert c.rope_scaling["rope_type"] == "yarn" and c.rope_scaling["mscale_all_dim"] == 0.8


def test_v4_and_v5_layouts_give_the_same_config():
    """A published-style v4 config.json and what transformers makes of it (its v5 to_dict) parse the same."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    for raw, cls in ((V3_V4_LAYOUT, DeepseekV3Config), (V2_LITE_V4_LAYOUT, DeepseekV2Config)):
        v4 = model_config_from_dict(dict(raw))
        v5 = model_config_from_dict(cls(**{k: v for k, v in raw.items() if k != "model_type"}).to_dict())
        strip = lambda c: {k: v for k, v in vars(c).items() if k != "hf_config"}  # noqa: E731
        assert strip(v4) == strip(v5), raw["model_type"]
    lite = model_config_from_dict(dict(V2_LITE_V4_LAYOUT))
    assert lite.q_lora_rank is None and lite.topk_method == "greedy" and (lite.n_group, lite.topk_group) == (1, 1)
    assert lite.rope_scaling["factor"] == 4 and lite.rope_scaling["original_max_position_embeddings"] == 64


def test_moe_layer_rules():
    every_other = model_config_from_dict(dict(V3_V4_LAYOUT, num_hidden_layers=6, moe_layer_freq=2))
    assert every_other.moe_layers == [2, 4]  # DeepSeek's rule: i >= first_k_dense_replace and i % freq == 0
    dense = model_config_from_dict(dict(V3_V4_LAYOUT, n_routed_experts=None))
    assert dense.moe_layers == [] and not dense.is_moe and dense.is_mla
    all_dense = model_config_from_dict(dict(V3_V4_LAYOUT, first_k_dense_replace=4))
    assert all_dense.moe_layers == []
    no_interleave = model_config_from_dict(dict(V3_V4_LAYOUT, rope_interleave=False))
    assert not no_interleave.rope_interleave
    # V2 always interleaves (transformers rotates V2's pairs as complex numbers, whatever the config says).
    assert model_config_from_dict(dict(V2_LITE_V4_LAYOUT, rope_interleave=False)).rope_interleave
    # ... in float32, rounding once; V3 rotates in the activations' dtype (rope_float32 picks the MLA layers' form)
    assert model_config_from_dict(V2_LITE_V4_LAYOUT).rope_float32 and not model_config_from_dict(V3_V4_LAYOUT).rope_float32
    # factor null: transformers derives it as max_position_embeddings / original_max_position_embeddings.
    derived = model_config_from_dict(dict(V3_V4_LAYOUT, rope_scaling=dict(V3_V4_LAYOUT["rope_scaling"], factor=None)))
    assert derived.rope_scaling["factor"] == 256 / 64
    # original_max_position_embeddings missing: transformers falls back to max_position_embeddings.
    no_orig = {k: v for k, v in V3_V4_LAYOUT["rope_scaling"].items() if k != "original_max_position_embeddings"}
    assert model_config_from_dict(dict(V3_V4_LAYOUT, rope_scaling=no_orig)).rope_scaling[
        "original_max_position_embeddings"] == 256


def test_v2_norm_topk_prob_follows_transformers_with_a_warning():
    with pytest.warns(UserWarning, match="norm_topk_prob=true for deepseek_v2.*does not renormalise"):
        c = model_config_from_dict(dict(V2_LITE_V4_LAYOUT, norm_topk_prob=True))
    assert c.norm_topk_prob is False


BAD_CONFIGS = [
    (dict(kv_lora_rank=0), "'kv_lora_rank' is 0.*multi-head latent attention"),
    (dict(kv_lora_rank=None), "'kv_lora_rank' is None"),
    (dict(topk_method="group_limited_greedy"), "field 'topk_method' is 'group_limited_greedy'; deepseek_v3 supports"),
    (dict(topk_method="sparsemixer"), "field 'topk_method' is 'sparsemixer'"),
    (dict(scoring_func="softmax"), "field 'scoring_func' is 'softmax', but deepseek_v3 routes with 'sigmoid'"),
    (dict(n_group=3), r"field 'n_group' \(3\) must divide n_routed_experts \(8\)"),
    (dict(n_group=8, topk_group=2), "scores a group by its top-2 experts.*field 'n_group'"),
    (dict(topk_group=5), r"field 'topk_group' \(5\) must be at most n_group \(4\)"),
    (dict(num_experts_per_tok=5, topk_group=2), r"field 'num_experts_per_tok' \(5\) exceeds"),
    (dict(qk_rope_head_dim=7), "field 'qk_rope_head_dim' must be even"),
    (dict(v_head_dim=0), "field 'v_head_dim' must be an integer >= 1"),
    (dict(routed_scaling_factor="2.5"), "field 'routed_scaling_factor' must be a finite number"),
    (dict(rope_scaling={"type": "yarn", "original_max_position_embeddings": 64}), "field 'rope_scaling.factor' is "
     "required for rope_type 'yarn'"),
    (dict(rope_scaling={"type": "yarn", "factor": 4, "mscale": "one"}), "field 'rope_scaling.mscale' must be a "
     "finite number"),
    (dict(rope_scaling={"type": "yarn", "factor": 4, "beta_fast": -1}), "field 'rope_scaling.beta_fast' must be"),
    (dict(rope_scaling=None, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}),
     "field 'rope_parameters.factor' is required"),
    (dict(rope_scaling={"type": "longrope", "factor": 4}), "unsupported rope_type 'longrope'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS)
def test_bad_configs_name_the_field(overrides, message):
    with pytest.raises(ValueError) as info:
        model_config_from_dict(dict(V3_V4_LAYOUT, **overrides), source="/ckpt/config.json")
    text = str(info.value)
    assert text.startswith("/ckpt/config.json (model_type 'deepseek_v3'): ") and "\n" not in text
    assert re.search(message, text), text


def test_v2_router_errors():
    with pytest.raises(ValueError, match="'topk_method' is 'noaux_tc'; deepseek_v2 supports: greedy, "
                                         "group_limited_greedy"):
        model_config_from_dict(dict(V2_LITE_V4_LAYOUT, topk_method="noaux_tc"))
    # transformers' V2 default n_group is None
    with pytest.raises(ValueError, match="field 'n_group' is required for topk_method 'group_limited_greedy'"):
        model_config_from_dict({k: v for k, v in V2_LITE_V4_LAYOUT.items() if k != "n_group"} |
                               {"topk_method": "group_limited_greedy"})


# ------------------------------------------------------------------------------------------- MLA layout rule
def _mla_reference(num_heads: int, intermediate: int | None, tp: int, dcp: int) -> bool:
    """DESIGN §3b written out: tp divides the heads and the dense MLP, dcp divides tp; KV heads add nothing."""
    return num_heads % tp == 0 and (intermediate is None or intermediate % tp == 0) and tp % dcp == 0


@pytest.mark.parametrize("num_heads,intermediate", [(8, 96), (128, 18432), (16, None), (12, 18), (6, 40)])
def test_mla_layout_rule_exhaustive(num_heads, intermediate):
    layouts = [(t, d) for t in range(1, num_heads + 1) for d in range(1, t + 1) if _mla_reference(
        num_heads, intermediate, t, d)]
    assert model_layouts(num_heads, num_heads, intermediate, mla=True) == layouts
    for tp in range(1, 2 * num_heads + 1):
        for dcp in range(1, tp + 1):
            if _mla_reference(num_heads, intermediate, tp, dcp):
                validate_model_parallel(num_heads, num_heads, tp, dcp, intermediate, mla=True)
                continue
            with pytest.raises(ValueError) as info:
                validate_model_parallel(num_heads, num_heads, tp, dcp, intermediate, mla=True)
            msg = str(info.value)
            assert msg.startswith(f"{TP}={tp} with {DCP}={dcp} does not fit a multi-head latent attention model")
            legal_tp = [int(v) for v in re.search(rf"legal {TP} values: ([0-9, ]+),", msg).group(1).split(", ")]
            assert legal_tp == sorted({t for t, _ in layouts})
            m = re.search(rf"legal {DCP} values for {TP}=(\d+): ([0-9, ]+)\)", msg)
            proposed = [(int(m.group(1)), int(d)) for d in m.group(2).split(", ")]
            proposed += [(int(t), int(d)) for t, d in re.findall(rf"e\.g\. {TP}=(\d+) {DCP}=(\d+)", msg)]
            assert proposed and all(p in layouts for p in proposed), msg


def test_mla_rule_replaces_the_gqa_rule_only_for_mla():
    # 8 heads, 8 "KV heads" (transformers' MLA num_key_value_heads): GQA would refuse dcp > 1, MLA allows dcp = tp.
    validate_model_parallel(8, 8, 4, 4, 96, mla=True)
    with pytest.raises(ValueError, match=f"{DCP}=4 is not allowed"):
        validate_model_parallel(8, 8, 4, 4, 96)
    ParallelConfig(4, decode_context_parallel_size=4).check_model(8, 8, 96, is_moe=True, mla=True)
    with pytest.raises(ValueError, match="dense MLP intermediate size 90 .* is not divisible by 4"):
        ParallelConfig(4, decode_context_parallel_size=2).check_model(8, 8, 90, is_moe=True, mla=True)
    with pytest.raises(ValueError, match="data_parallel_size=2 is not supported for MoE"):
        ParallelConfig(2, data_parallel_size=2).check_model(8, 8, 96, is_moe=True, mla=True)
