"""megacp.config: every validation error fires, names its Python argument and proposes a valid alternative."""

from __future__ import annotations

import re

import pytest

from megacp.config import (
    ParallelConfig,
    model_layouts,
    validate_dcp,
    validate_kv_interleave,
    validate_model_parallel,
    validate_moe_data_parallel,
    validate_sizes,
    validate_world_size,
)

TP, PCP, DCP, DP = ("tensor_model_parallel_size", "prefill_context_parallel_size", "decode_context_parallel_size",
                    "data_parallel_size")


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def _legal_values(msg: str, label: str) -> list[int]:
    """Parse "legal ... values ...: 1, 2, 4" after ``label`` in a message."""
    m = re.search(re.escape(label) + r"[^:]*: ([0-9, ]+)", msg)
    assert m, f"no '{label}' list in: {msg}"
    return [int(v) for v in m.group(1).replace(" ", "").strip(",").split(",")]


# ------------------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(tp=0), TP),
        (dict(pcp=-1), PCP),
        (dict(dcp=0), DCP),
        (dict(dp=0), DP),
        (dict(tp=1.5), TP),
        (dict(tp=True), TP),
    ],
)
def test_sizes_must_be_positive_integers(kwargs, name):
    msg = _error(validate_sizes, **kwargs)
    assert msg.startswith(f"{name} must be an integer >= 1")
    assert f"use {name}=1" in msg  # the alternative
    validate_sizes(**{k: 1 for k in kwargs})


# ------------------------------------------------------------------------------------------------ world size
def test_world_size_mismatch_example_from_the_brief():
    msg = _error(validate_world_size, 6, tp=2, pcp=2, dp=1)
    assert msg.startswith("world_size=6 but dp·pcp·tp = 1·2·2 = 4")
    assert "launch with world_size=4" in msg  # relaunch alternative
    assert f"use {TP}=3" in msg  # 1·2·3 = 6 keeps pcp 2
    assert f"use {PCP}=3" in msg  # 1·3·2 = 6 keeps tp 2


def test_world_size_alternatives_are_valid():
    for world, tp, pcp, dp in [(6, 2, 2, 1), (8, 3, 1, 1), (4, 1, 1, 2), (12, 4, 2, 1), (5, 2, 2, 1)]:
        msg = _error(validate_world_size, world, tp=tp, pcp=pcp, dp=dp)
        for new_tp in re.findall(rf"use {TP}=(\d+)", msg):
            validate_world_size(world, tp=int(new_tp), pcp=pcp, dp=dp)
        for new_pcp in re.findall(rf"use {PCP}=(\d+)", msg):
            validate_world_size(world, tp=tp, pcp=int(new_pcp), dp=dp)
        (n,) = re.findall(r"launch with world_size=(\d+)", msg)
        validate_world_size(int(n), tp=tp, pcp=pcp, dp=dp)
    validate_world_size(8, tp=2, pcp=2, dp=2)


# ------------------------------------------------------------------------------------------------ tp % dcp
@pytest.mark.parametrize("tp,dcp", [(4, 3), (2, 4), (6, 4)])
def test_dcp_must_divide_tp(tp, dcp):
    msg = _error(validate_dcp, tp, dcp)
    assert msg.startswith(f"{DCP}={dcp} must divide {TP}={tp}")
    legal = _legal_values(msg, f"legal {DCP} values")
    assert legal == [d for d in range(1, tp + 1) if tp % d == 0]
    for d in legal:
        validate_dcp(tp, d)


# ------------------------------------------------------------------------------------------------ interleave
@pytest.mark.parametrize("interleave,block_size", [(32, 16), (3, 16), (0, 16), (5, 8)])
def test_interleave_vs_block_size(interleave, block_size):
    msg = _error(validate_kv_interleave, interleave, block_size)
    assert "cp_kv_cache_interleave_size" in msg
    legal = _legal_values(msg, "legal values")
    assert legal == [d for d in range(1, block_size + 1) if block_size % d == 0]
    for i in legal:
        validate_kv_interleave(i, block_size)
    if interleave >= 1:
        assert f"cp_kv_cache_interleave_size={interleave} must divide block_size={block_size}" in msg


def test_interleave_and_block_size_basics():
    assert "block_size must be an integer >= 1, got 0; e.g. block_size=16" in _error(validate_kv_interleave, 1, 0)
    assert "cp_kv_cache_interleave_size must be" in _error(validate_kv_interleave, 0)
    validate_kv_interleave(64)  # no block size known yet: only >= 1 is checked
    validate_kv_interleave(16, 16)
    validate_kv_interleave(1, 1)


# ------------------------------------------------------------------------------------------------ heads vs tp / dcp
def _gqa_reference(num_heads: int, num_kv_heads: int, tp: int, dcp: int) -> bool:
    """DESIGN §3 GQA rule, written out independently of megacp.config."""
    if num_heads % tp:
        return False
    if tp > num_kv_heads:
        return tp % num_kv_heads == 0 and (tp // num_kv_heads) % dcp == 0
    return num_kv_heads % tp == 0 and dcp == 1


@pytest.mark.parametrize("num_heads,num_kv_heads", [(32, 8), (8, 8), (28, 4), (12, 2), (16, 1), (6, 3)])
def test_model_parallel_rule_exhaustive(num_heads, num_kv_heads):
    for tp in range(1, 2 * num_heads + 1):
        for dcp in [d for d in range(1, tp + 1) if tp % d == 0]:
            ok = _gqa_reference(num_heads, num_kv_heads, tp, dcp)
            if ok:
                validate_model_parallel(num_heads, num_kv_heads, tp, dcp)
                continue
            msg = _error(validate_model_parallel, num_heads, num_kv_heads, tp, dcp)
            if _gqa_reference(num_heads, num_kv_heads, tp, 1):  # tp fine, dcp is the problem
                assert msg.startswith(f"{DCP}={dcp} is not allowed"), msg
                legal = _legal_values(msg, f"legal {DCP} values")
                assert legal == [d for d in range(1, tp + 1) if tp % d == 0 and _gqa_reference(num_heads, num_kv_heads, tp, d)]
                assert legal and all(_gqa_reference(num_heads, num_kv_heads, tp, d) for d in legal)
                for t in re.findall(rf"keep {DCP}=\d+ with {TP}=(\d+)", msg):
                    assert _gqa_reference(num_heads, num_kv_heads, int(t), dcp), msg
            else:
                assert msg.startswith(f"{TP}={tp} does not fit"), msg
                legal = _legal_values(msg, f"legal {TP} values")
                assert legal == [t for t in range(1, num_heads + 1) if _gqa_reference(num_heads, num_kv_heads, t, 1)]


def test_model_parallel_examples():
    msg = _error(validate_model_parallel, 32, 8, tp=16, dcp=4)  # each KV head on 2 ranks: dcp 4 cannot share one
    assert f"legal {DCP} values for {TP}=16: 1, 2" in msg and f"keep {DCP}=4 with {TP}=32" in msg
    msg = _error(validate_model_parallel, 32, 8, tp=4, dcp=2)  # tp <= kv heads: no room for dcp
    assert f"legal {DCP} values for {TP}=4: 1" in msg
    msg = _error(validate_model_parallel, 32, 8, tp=3)
    assert f"legal {TP} values: 1, 2, 4, 8, 16, 32" in msg
    assert "num_key_value_heads" in _error(validate_model_parallel, 32, 6, tp=2)
    validate_model_parallel(32, 8, tp=16, dcp=2)
    validate_model_parallel(32, 8, tp=8, dcp=1)


def _layout_reference(num_heads: int, num_kv_heads: int, intermediate: int | None, tp: int, dcp: int) -> bool:
    """Every rule a layout must pass to load (GQA + the dense MLP split), independently of megacp.config."""
    return _gqa_reference(num_heads, num_kv_heads, tp, dcp) and (intermediate is None or intermediate % tp == 0)


def _suggestions(msg: str) -> list[tuple[int, int]]:
    """Every (tp, dcp) a message proposes, whatever sentence it is in."""
    found = []
    m = re.search(rf"legal {TP} values: ([0-9, ]+)", msg)  # the first one: dcp 1
    found += [(int(t), 1) for t in m.group(1).replace(" ", "").strip(",").split(",")] if m else []
    for d, ts in re.findall(rf"with {DCP}=(\d+), legal {TP} values: ([0-9, ]+)", msg):
        found += [(int(t), int(d)) for t in ts.replace(" ", "").strip(",").split(",")]
    found += [(int(t), int(d)) for d, t in re.findall(rf"keep {DCP}=(\d+) with {TP}=(\d+)", msg)]
    m = re.search(rf"legal {DCP} values for {TP}=(\d+): ([0-9, ]+)", msg)
    found += [(int(m.group(1)), int(d)) for d in m.group(2).replace(" ", "").strip(",").split(",")] if m else []
    found += [(int(t), int(d)) for t, d in re.findall(rf"\({TP}=(\d+), {DCP}=(\d+)\)", msg)]
    return found


@pytest.mark.parametrize("num_heads,num_kv_heads,intermediate", [
    (9, 3, 1536), (32, 8, 1000), (12, 2, 18), (16, 1, 24), (6, 3, None), (32, 8, 14336),
])
def test_layout_hint_proposes_only_layouts_that_load(num_heads, num_kv_heads, intermediate):
    """With the MLP size in play too, every tp/dcp a rejection proposes passes every rule, and the full list of
    layouts is exactly the reference's."""
    layouts = [(t, d) for t in range(1, num_heads + 1) for d in range(1, t + 1)
               if t % d == 0 and _layout_reference(num_heads, num_kv_heads, intermediate, t, d)]
    assert model_layouts(num_heads, num_kv_heads, intermediate) == layouts
    for tp in range(1, 2 * num_heads + 1):
        for dcp in [d for d in range(1, tp + 1) if tp % d == 0]:
            if _layout_reference(num_heads, num_kv_heads, intermediate, tp, dcp):
                validate_model_parallel(num_heads, num_kv_heads, tp, dcp, intermediate)
                continue
            msg = _error(validate_model_parallel, num_heads, num_kv_heads, tp, dcp, intermediate)
            proposed = _suggestions(msg)
            assert proposed, msg
            assert all(p in layouts for p in proposed), (proposed, msg)
            if "Layouts that load this model" in msg:
                listed = re.findall(rf"\({TP}=(\d+), {DCP}=(\d+)\)", msg.split("Layouts that load this model")[1])
                assert [(int(t), int(d)) for t, d in listed] == layouts, msg


def test_smollm2_tp9_dcp3_hint():
    """SmolLM2-135M: 9 heads, 3 KV heads, MLP 1536. DCP > 1 needs tp 9, which the MLP refuses: say so, list the
    layouts that load (tp 1 and 3, dcp 1) and point to pcp for sharding the KV cache."""
    msg = _error(ParallelConfig(9, decode_context_parallel_size=3).validate, 9, 9, 3, 1536)
    assert msg.startswith(f"{TP}=9 does not fit")
    assert "MLP intermediate size 1536 is not divisible by 9" in msg and f"legal {TP} values: 1, 3;" in msg
    assert f"no layout of this model allows {DCP}=3" in msg
    assert (f"(with any {PCP} and {DP}): ({TP}=1, {DCP}=1), ({TP}=3, {DCP}=1);" in msg
            and f"to shard the KV cache use {PCP}" in msg)
    assert f"({TP}=3, {DCP}=1)" in _error(validate_model_parallel, 9, 3, 3, 3, 1536)
    ParallelConfig(3, 2).validate(6, 9, 3, 1536)


def _construct_layouts(num_heads: int, num_kv_heads: int, intermediate: int) -> list[tuple[int, int]]:
    """On 4 ranks, every (tp, dcp) with tp | 4: does the model really build and load its (seeded) weights?"""
    from megacp.models.config import build_tiny_llama_config
    from megacp.models.llama import LlamaForCausalLM
    from megacp.models.loader import seeded_hf_weights
    from tests.dist_pool import model_parallel

    config = build_tiny_llama_config(hidden_size=32, intermediate_size=intermediate, num_hidden_layers=1,
                                     num_attention_heads=num_heads, num_key_value_heads=num_kv_heads)
    loads = []
    for tp in (1, 2, 4):
        for dcp in [d for d in (1, 2, 4) if tp % d == 0]:
            with model_parallel(tensor_model_parallel_size=tp, prefill_context_parallel_size=4 // tp,
                                decode_context_parallel_size=dcp):
                try:
                    model = LlamaForCausalLM(config)
                    loaders = model.hf_weight_loaders()
                    for name, tensor in seeded_hf_weights(model).items():
                        loaders[name](tensor)
                except ValueError:
                    continue
                loads.append((tp, dcp))
    return loads


@pytest.mark.parametrize("num_heads,num_kv_heads,intermediate", [(4, 2, 6), (4, 1, 12), (8, 2, 20)])
def test_model_layouts_are_what_the_layers_accept(dist_pool_4, num_heads, num_kv_heads, intermediate):
    """The rule is the layers' own: the layouts (with tp | 4) whose model builds and loads are model_layouts'."""
    built = dist_pool_4.run(_construct_layouts, num_heads, num_kv_heads, intermediate)
    expected = [(t, d) for t, d in model_layouts(num_heads, num_kv_heads, intermediate) if 4 % t == 0]
    assert built == [expected] * 4


# ------------------------------------------------------------------------------------------------ ParallelConfig
def test_parallel_config_is_validated_when_made():
    """Construction runs every check that needs nothing else; check_world_size / check_model the others."""
    cfg = ParallelConfig(2, 2, 2, cp_kv_cache_interleave_size=4, block_size=16)
    cfg.validate(world_size=4, num_heads=8, num_kv_heads=1)
    assert f"{TP} must be an integer >= 1" in _error(ParallelConfig, 0)
    assert f"legal {DCP} values for {TP}=4" in _error(ParallelConfig, 4, decode_context_parallel_size=3)
    assert "block_size=16" in _error(ParallelConfig, cp_kv_cache_interleave_size=3, block_size=16)
    assert "enable_expert_parallel must be True or False" in _error(ParallelConfig, enable_expert_parallel="yes")
    assert "launch with world_size=4" in _error(ParallelConfig(2, 2).check_world_size, 6)
    assert f"{DCP}=4 is not allowed" in _error(ParallelConfig(4, decode_context_parallel_size=4).check_model, 8, 2)
    assert f"{DP}=2 is not supported for MoE models" in _error(ParallelConfig(data_parallel_size=2).check_model, 8, 2,
                                                                    is_moe=True)
    ParallelConfig(data_parallel_size=2).check_model(8, 2, is_moe=False)
    ParallelConfig(2, 3).validate()  # world size and model unknown: nothing more to check


def test_moe_data_parallel_rule():
    msg = _error(validate_moe_data_parallel, True, 2)
    assert msg.startswith(f"{DP}=2 is not supported for MoE models") and f"use {DP}=1" in msg
    validate_moe_data_parallel(True, 1)
    validate_moe_data_parallel(False, 4)


def test_parallel_config_derived_values():
    cfg = ParallelConfig(4, 2, 2, 3, enable_expert_parallel=True, cp_kv_cache_interleave_size=8)
    assert (cfg.world_size, cfg.cp_world_size) == (24, 4)
    assert cfg.initialize_kwargs() == dict(
        tensor_model_parallel_size=4,
        prefill_context_parallel_size=2,
        decode_context_parallel_size=2,
        data_parallel_size=3,
        enable_expert_parallel=True,
        cp_kv_cache_interleave_size=8,
    )
    cfg.check_world_size(24)
