"""LlamaForCausalLM + loader vs transformers on tiny random checkpoints (tests/hf_models.py), and loader errors.

Prefill logits of each prompt's last position must match transformers' fp32 logits within 1e-4, unsharded (each
rank of a dp=2 pool is a world of its own for the model) and sharded (tp=2, pcp=2, tp=2·dcp=2, tp=2·pcp=2·dcp=2).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import warnings

import pytest
import torch

from megacp.models.config import build_tiny_llama_config, load_model_config, model_config_from_dict
from megacp.models.loader import checkpoint_files, load_model
from tests import hf_models

ATOL = 1e-4
PROMPTS = [[5, 17, 99, 3, 250, 7, 8, 300, 12, 41, 42, 43, 1], [9, 8, 7], [100 + i for i in range(37)]]
BLOCK_SIZE = 4


# ------------------------------------------------------------------------------------------------- config parsing
def _cfg(**overrides: object) -> dict:
    base = dict(
        model_type="llama",
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=2048,
    )
    base.update(overrides)
    return base


def test_config_defaults_and_rope_layouts() -> None:
    c = model_config_from_dict(_cfg(eos_token_id=[2, 7]))
    assert (c.num_key_value_heads, c.head_dim, c.rope_theta, c.rope_scaling) == (4, 16, 10000.0, None)
    assert c.eos_token_ids == [2, 7] and not c.qkv_bias and not c.tie_word_embeddings
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    # transformers v4 layout: rope_theta + rope_scaling (legacy "type" key)
    v4 = model_config_from_dict(_cfg(rope_theta=5e5, rope_scaling=dict(llama3, type="llama3"), eos_token_id=2))
    # transformers v5 layout: rope_parameters holds theta and scaling
    v5 = model_config_from_dict(_cfg(rope_parameters=dict(llama3, rope_type="llama3", rope_theta=5e5)))
    for c in (v4, v5):
        assert c.rope_theta == 5e5 and c.rope_scaling["rope_type"] == "llama3" and c.rope_scaling["factor"] == 8.0
    assert v4.eos_token_ids == [2]
    plain = model_config_from_dict(_cfg(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, head_dim=8))
    assert (plain.rope_theta, plain.rope_scaling, plain.head_dim) == (1e6, None, 8)
    # llama3 without original_max_position_embeddings falls back to max_position_embeddings (as transformers)
    no_orig = {k: v for k, v in llama3.items() if k != "original_max_position_embeddings"}
    c = model_config_from_dict(_cfg(rope_scaling=dict(no_orig, rope_type="llama3")))
    assert c.rope_scaling["original_max_position_embeddings"] == 2048


def test_config_architectures_and_errors() -> None:
    assert model_config_from_dict(_cfg(model_type="qwen2")).qkv_bias
    biased = model_config_from_dict(_cfg(attention_bias=True))
    assert biased.qkv_bias and biased.o_proj_bias
    assert model_config_from_dict(_cfg(tie_word_embeddings=True)).tie_word_embeddings
    with pytest.warns(UserWarning, match="sliding_window=4096"):
        model_config_from_dict(_cfg(model_type="mistral", sliding_window=4096))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_config_from_dict(_cfg(model_type="qwen2", sliding_window=4096, use_sliding_window=False))
    supported = "deepseek_v2, deepseek_v3, llama, mistral, mixtral, qwen2, qwen2_moe"
    with pytest.raises(ValueError, match=f"unsupported model_type 'gpt2'.*{supported}"):
        model_config_from_dict(_cfg(model_type="gpt2"))
    with pytest.raises(ValueError, match="lacks the required field 'intermediate_size'"):
        model_config_from_dict({k: v for k, v in _cfg().items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="unsupported rope_type 'dynamic'"):
        model_config_from_dict(_cfg(rope_scaling={"rope_type": "dynamic", "factor": 4.0}))
    tiny = build_tiny_llama_config()
    assert (tiny.vocab_size, tiny.num_key_value_heads) == (256, 1)


def test_loader_file_errors() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        missing = os.path.join(tmp, "nope")
        with pytest.raises(ValueError, match=f"model_dir='{missing}' is not a directory"):
            load_model(missing)
        with pytest.raises(ValueError, match=r"config.json not found"):
            load_model(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(_cfg(model_type="gpt2"), f)
        supported = "deepseek_v2, deepseek_v3, llama, mistral, mixtral, qwen2, qwen2_moe"
        with pytest.raises(ValueError, match=f"unsupported model_type 'gpt2'.*supports: {supported}"):
            load_model(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(_cfg(), f)
        with pytest.raises(ValueError, match="no weights in .*model.safetensors or model.safetensors.index.json"):
            load_model(tmp)
        # a sharded index naming a shard that is not there
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}, f)
        with pytest.raises(ValueError, match="shard file.*model-00001-of-00002.safetensors"):
            load_model(tmp)


def test_checkpoint_configs_parse() -> None:
    llama = load_model_config(hf_models.model_dir("llama"))
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.num_key_value_heads == 1
    qwen = load_model_config(hf_models.model_dir("qwen2"))
    assert qwen.qkv_bias and qwen.tie_word_embeddings
    sharded = checkpoint_files(hf_models.model_dir("llama_sharded"))
    (single_names,) = checkpoint_files(hf_models.model_dir("llama")).values()
    assert len(sharded) > 1  # really sharded
    assert sorted(n for names in sharded.values() for n in names) == sorted(single_names)


# ------------------------------------------------------------------------------------------------- prefill vs HF
def _prefill_logits(model, prompts: list[list[int]], use_cache: bool) -> torch.Tensor:
    """One batched prefill step of all prompts (fresh requests) → last-position logits [num_prompts, vocab]."""
    from megacp import parallel_state as ps
    from megacp.kv.block_table import BlockTable
    from megacp.kv.paged_cache import PagedKVCache
    from megacp.layers.metadata_builder import build_attention_metadata

    cp_world, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    per_block = BLOCK_SIZE * cp_world
    blocks = [-(-len(p) // per_block) for p in prompts]
    table = BlockTable(
        BLOCK_SIZE, len(prompts), max(blocks), cp_world, cp_rank, ps.get_cp_kv_cache_interleave_size()
    )
    next_block = 0
    for i, n in enumerate(blocks):
        table.set_row(i, list(range(next_block, next_block + n)))
        next_block += n
    meta = build_attention_metadata(list(range(len(prompts))), [0] * len(prompts), [len(p) for p in prompts], table)
    flat = torch.tensor([t for p in prompts for t in p])
    ids = flat[meta.token_index.clamp(min=0)]  # padding rows (-1) get any valid id
    caches = None
    if use_cache:
        c = model.config
        caches = [
            PagedKVCache(next_block, BLOCK_SIZE, model.num_local_kv_heads, c.head_dim)
            for _ in range(c.num_hidden_layers)
        ]
    with torch.no_grad():
        hidden = model(ids, meta, caches)
        return model.compute_logits(meta.select_logits_hidden(hidden))


def _check_prefill(sizes: dict, dirs: dict[str, str], refs: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Load each checkpoint ``{kind: dir}`` under ``sizes``; return the max |logits − transformers| per checkpoint."""
    from tests.dist_pool import model_parallel

    errors: dict[str, float] = {}
    with model_parallel(**sizes):
        for kind, path in dirs.items():
            model = load_model(path, torch.float32, "cpu")
            ref = torch.stack(refs[kind])
            for use_cache in (True, False):
                got = _prefill_logits(model, PROMPTS, use_cache)
                assert got.shape == ref.shape, (got.shape, ref.shape)
                errors[f"{kind}/cache={use_cache}"] = float((got - ref).abs().max())
    return errors


_BIASED_DIR: list[str] = []


def _biased_llama_dir() -> str:
    """A Llama with attention and MLP biases and tied embeddings; *every* tensor random (HF inits biases to 0,
    which would let a bias-loading bug pass)."""
    if not _BIASED_DIR:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(5)
        cfg = LlamaConfig(
            vocab_size=hf_models.VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            attention_bias=True, mlp_bias=True, tie_word_embeddings=True, rope_theta=500000.0,
        )
        model = LlamaForCausalLM(cfg).float().eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.15)
                elif "norm" in name:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.1)
        path = tempfile.mkdtemp(prefix="megacp-llama-bias-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        model.save_pretrained(path)
        _BIASED_DIR.append(path)
    return _BIASED_DIR[0]


def _model_dir(kind: str) -> str:
    return _biased_llama_dir() if kind == "llama_bias" else hf_models.model_dir(kind)


def _hf_dirs_and_refs(kinds: list[str]) -> dict[str, list[torch.Tensor]]:
    # The checkpoints are built in this (the pytest) process; workers only read them.
    return {k: hf_models.last_logits_reference(_model_dir(k), PROMPTS) for k in kinds}


def _assert_all_close(results: list[dict[str, float]]) -> None:
    for rank, errs in enumerate(results):
        bad = {k: v for k, v in errs.items() if not v <= ATOL}
        assert not bad, f"rank {rank}: max |logits - transformers| above {ATOL}: {bad}"
    assert len(results[0]) > 0


ALL_KINDS = ["llama", "llama_sharded", "mistral", "qwen2", "llama_bias"]


@pytest.fixture(scope="module")
def refs() -> dict[str, list[torch.Tensor]]:
    return _hf_dirs_and_refs(ALL_KINDS)


def _dirs(kinds: list[str] = ALL_KINDS) -> dict[str, str]:
    return {k: _model_dir(k) for k in kinds}


def test_prefill_unsharded_matches_transformers(dist_pool_2, refs) -> None:
    # dp=2: each rank is a tp=pcp=dcp=1 model of its own
    results = dist_pool_2.run(_check_prefill, {"data_parallel_size": 2}, _dirs(ALL_KINDS), refs)
    _assert_all_close(results)


def test_prefill_tp2_matches_transformers(dist_pool_2, refs) -> None:
    # llama: 1 KV head replicated on both ranks; mistral/qwen2: 2 KV heads split; qwen2: bias + tied embeddings;
    # llama_bias: q/k/v/o and MLP biases (row-parallel biases added once), tied embeddings
    sizes = {"tensor_model_parallel_size": 2}
    kinds = ["llama", "mistral", "qwen2", "llama_bias"]
    results = dist_pool_2.run(_check_prefill, sizes, _dirs(kinds), refs)
    _assert_all_close(results)


def test_prefill_pcp2_and_tp2_dcp2_match_transformers(dist_pool_2, refs) -> None:
    results = dist_pool_2.run(
        _check_prefill, {"prefill_context_parallel_size": 2}, _dirs(["llama_sharded", "qwen2"]), refs
    )
    _assert_all_close(results)
    sizes = {"tensor_model_parallel_size": 2, "decode_context_parallel_size": 2, "cp_kv_cache_interleave_size": 2}
    results = dist_pool_2.run(_check_prefill, sizes, _dirs(["llama"]), refs)
    _assert_all_close(results)


def test_prefill_tp2_pcp2_dcp2_matches_transformers(dist_pool_4, refs) -> None:
    sizes = {"tensor_model_parallel_size": 2, "prefill_context_parallel_size": 2, "decode_context_parallel_size": 2}
    results = dist_pool_4.run(_check_prefill, sizes, _dirs(["llama"]), refs)
    _assert_all_close(results)


# ------------------------------------------------------------------------------------------------- load errors (tp=2)
def _check_load_errors(dirs: dict[str, str], tmp: str) -> list[str]:
    from safetensors.torch import load_file, save_file

    from tests.dist_pool import model_parallel

    seen = []
    rank = torch.distributed.get_rank()
    with model_parallel(tensor_model_parallel_size=2, decode_context_parallel_size=2):
        # mistral has 2 KV heads: with tp=2 each rank holds its own, so dcp=2 is illegal (DESIGN §3 GQA)
        with pytest.raises(ValueError, match="decode_context_parallel_size=2 is not allowed"):
            load_model(dirs["mistral"])
        seen.append("dcp")
    with model_parallel(tensor_model_parallel_size=2):
        bad_heads = os.path.join(tmp, f"heads{rank}")
        shutil.copytree(dirs["mistral"], bad_heads)
        cfg = json.load(open(os.path.join(bad_heads, "config.json")))
        cfg.update(num_attention_heads=3, num_key_value_heads=1, head_dim=8)
        json.dump(cfg, open(os.path.join(bad_heads, "config.json"), "w"))
        with pytest.raises(ValueError, match="tensor_model_parallel_size=2 does not fit a model with 3 attention heads"):
            load_model(bad_heads)
        seen.append("heads")

        broken = os.path.join(tmp, f"broken{rank}")
        shutil.copytree(dirs["mistral"], broken)
        weights_path = os.path.join(broken, "model.safetensors")
        weights = load_file(weights_path)
        del weights["model.layers.1.mlp.up_proj.weight"]
        weights["model.layers.9.self_attn.q_proj.weight"] = torch.zeros(1)
        save_file(weights, weights_path)
        with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight.*"
                                             r"unexpected tensors: model\.layers\.9\.self_attn\.q_proj\.weight"):
            load_model(broken)
        seen.append("names")

        weights = load_file(os.path.join(dirs["mistral"], "model.safetensors"))
        weights["model.norm.weight"] = torch.ones(65)
        save_file(weights, weights_path)
        with pytest.raises(ValueError, match=r"model\.norm\.weight in .*shape \[65\].*expects \[64\]"):
            load_model(broken)
        seen.append("shape")
    return seen


def test_load_errors_tp2(dist_pool_2) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = dist_pool_2.run(_check_load_errors, _dirs(), tmp)
    assert results == [["dcp", "heads", "names", "shape"]] * 2


# ------------------------------------------------------------------------------------------------- weight schema
def _schema_mismatches(dirs: dict[str, str]) -> dict[str, list[str]]:
    """Under tp=2, the model's one weight schema (names + full shapes from ``hf_weight_loaders``) against the
    tensors transformers saved: every name and every full (unsharded) shape must agree."""
    from safetensors import safe_open

    from megacp.models.llama import LlamaForCausalLM
    from megacp.models.loader import canonical_name
    from megacp.moe import MoEParallelConfig
    from tests.dist_pool import model_parallel

    out = {}
    with model_parallel(tensor_model_parallel_size=2):
        for kind, path in dirs.items():
            config = load_model_config(path)
            model = LlamaForCausalLM(config, moe_parallel_config=MoEParallelConfig.make(use_ep=False) if config.is_moe else None)
            saved = {}
            for file, names in checkpoint_files(path).items():
                with safe_open(file, "pt") as f:
                    saved.update({canonical_name(n): tuple(f.get_slice(n).get_shape()) for n in names})
            if config.tie_word_embeddings:
                saved.pop("lm_head.weight", None)
            fused = any(n.endswith("experts.gate_up_proj") for n in saved)
            schema = {n: w.shape for n, w in model.hf_weight_loaders(fused_experts=fused).items()}
            if not fused:
                assert schema == model.hf_weight_shapes()
            out[kind] = sorted(f"{n}: {schema.get(n)} vs {saved.get(n)}" for n in set(schema) | set(saved)
                               if schema.get(n) != saved.get(n))
    return out


def test_weight_schema_matches_transformers_checkpoints(dist_pool_2) -> None:
    from tests import hf_moe_models

    dirs = {k: _model_dir(k) for k in ("llama_bias", "qwen2", "mistral")}
    dirs.update({k: hf_moe_models.model_dir(k) for k in ("mixtral", "qwen2_moe", "qwen2_moe_fused")})
    for per_rank in dist_pool_2.run(_schema_mismatches, dirs):
        assert per_rank == {k: [] for k in dirs}


# ------------------------------------------------------------------------------------------------- built-in model
def _builtin_summary() -> tuple[list[float], float, float, float]:
    """Seeded tiny Llama under tp=2: its logits must equal the unsharded model's (same seed, same weights)."""
    from tests.dist_pool import model_parallel

    with model_parallel(tensor_model_parallel_size=2):
        model = load_model(None, torch.float32, "cpu", seed=3)
        sharded = _prefill_logits(model, [[1, 2, 3, 4, 5]], use_cache=True)[0]
        bf16 = _prefill_logits(load_model(None, torch.bfloat16, "cpu", seed=3), [[1, 2, 3, 4, 5]], use_cache=True)[0]
    with model_parallel(data_parallel_size=2):
        model = load_model(None, torch.float32, "cpu", seed=3)
        full = _prefill_logits(model, [[1, 2, 3, 4, 5]], use_cache=True)[0]
        other_seed = _prefill_logits(load_model(None, seed=4), [[1, 2, 3, 4, 5]], use_cache=True)[0]
    return (
        full[:4].tolist(),
        float((sharded - full).abs().max()),
        float((other_seed - full).abs().max()),
        float((bf16 - full).abs().max()),
    )


def test_builtin_model_is_seeded_and_shards_consistently(dist_pool_2) -> None:
    results = dist_pool_2.run(_builtin_summary)
    assert results[0][0] == results[1][0]  # identical weights on every rank
    for _, tp_vs_full, seed_change, bf16_vs_fp32 in results:
        assert tp_vs_full <= 1e-5  # tp=2 shards of the seeded weights compute the unsharded model
        assert seed_change > 0.1  # and the seed really picks the weights
        assert bf16_vs_fp32 < 0.2  # --dtype bfloat16 runs end to end, within bf16 rounding (logits are O(1))
