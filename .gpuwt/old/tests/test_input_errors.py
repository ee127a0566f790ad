"""Bad values, requests and files are rejected with one clear message, identically on every rank.

Unit tests (no processes) cover the value checks (``SamplingParams``, ``megacp.checks``, CLI flags at parse time),
the sampler's NaN/inf flag and every corrupt-file case of ``config.json``, the safetensors files, the shard index and
``tokenizer.json``. Multi-rank cases run in the shared gloo pools: a bad request then a good one on tp 2, pcp 2 and
tp 2·pcp 2 (the same ``ValueError`` on every rank, then transformers' tokens), NaN logits stopping only the request
they hit, and the example failing on every rank with the same message for NaN weights, corrupt shards, a cache too
big for memory and an unwritable ``--json-out``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import pytest
import torch

from tests import hf_models

VOCAB = hf_models.VOCAB_SIZE


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("kwargs,needle", [
    (dict(max_new_tokens=2.5), "SamplingParams(max_new_tokens) must be an integer >= 1, got 2.5"),
    (dict(max_new_tokens=0), "SamplingParams(max_new_tokens) must be an integer >= 1, got 0"),
    (dict(max_new_tokens=True), "SamplingParams(max_new_tokens) must be an integer"),
    (dict(temperature=math.nan), "SamplingParams(temperature) must be a finite number >= 0.0, got nan"),
    (dict(temperature=math.inf), "SamplingParams(temperature) must be a finite number >= 0.0, got inf"),
    (dict(temperature=-0.5), "SamplingParams(temperature)"),
    (dict(temperature="0.7"), "SamplingParams(temperature) must be a number"),
    (dict(top_p=0.0), "SamplingParams(top_p) must be a finite number in (0.0, 1.0]"),
    (dict(top_p=math.nan), "SamplingParams(top_p)"),
    (dict(ignore_eos=1), "SamplingParams(ignore_eos) must be True or False"),
    (dict(seed=2**70), "SamplingParams(seed) must be an integer in"),
    (dict(seed=1.0), "SamplingParams(seed) must be an integer"),
])
def test_sampling_params_reject_bad_values(kwargs, needle):
    from megacp.sampling import SamplingParams

    with pytest.raises(ValueError) as exc:
        SamplingParams(**kwargs)
    assert needle in str(exc.value)


def test_sampling_params_accept_edge_values():
    import numpy as np

    from megacp.sampling import SEED_RANGE, SamplingParams

    SamplingParams(max_new_tokens=np.int64(3), temperature=1, top_p=1.0, seed=SEED_RANGE[1])
    SamplingParams(seed=SEED_RANGE[0], temperature=1e-30)
    for seed in SEED_RANGE:  # the range really is what torch accepts
        torch.Generator().manual_seed(seed)


def test_sample_flags_nonfinite_rows_on_device():
    """A NaN/inf row gives NONFINITE_TOKEN (greedy argmax of NaN would silently be id 0, multinomial would raise);
    finite rows are untouched, and a tiny temperature does not overflow to NaN."""
    from megacp.sampling import NONFINITE_TOKEN, sample

    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    clean = logits.clone()
    logits[1, 3] = math.nan
    logits[2, 0] = math.inf
    logits[3, 5] = -math.inf
    greedy = sample(logits, 0.0, 1.0, None)
    assert greedy.tolist() == [int(clean[0].argmax()), NONFINITE_TOKEN, NONFINITE_TOKEN, NONFINITE_TOKEN]
    drawn = sample(logits, 0.8, 0.9, torch.Generator().manual_seed(1))
    assert drawn[1:].tolist() == [NONFINITE_TOKEN] * 3 and 0 <= int(drawn[0]) < 10
    assert sample(clean, 1e-30, 1.0, torch.Generator().manual_seed(0)).tolist() == clean.argmax(-1).tolist()


@pytest.mark.parametrize("prompts,needle", [
    ([[1, 2, VOCAB]], f"prompt_ids[0][2] = {VOCAB} is outside the model's vocabulary [0, {VOCAB})"),
    ([[5], [-1]], "prompt_ids[1][0] = -1 is outside the model's vocabulary"),
    ([[1, 2.0]], "prompt_ids[0][1] = 2.0 is not an integer token id"),
    ([[1, True]], "prompt_ids[0][1] = True is not an integer token id"),
    ([[1, "2"]], "prompt_ids[0][1] = '2' is not an integer token id"),
    ([[1], []], "prompt_ids[1] is empty"),
    ([1, 2, 3], "prompt_ids[0] must be a list of token ids, got int (wrap a single prompt: [ids])"),
    ("1,2,3", "prompt_ids must be a list of prompts"),
    ([list(range(3, 200))], "exceeds the model's max_position_embeddings 200"),
    ([[1] * 60], "60 tokens + 10 new tokens needs 9 KV blocks of 4x2 tokens, the cache has 4"),
])
def test_validate_requests(prompts, needle):
    from megacp.session import validate_requests

    with pytest.raises(ValueError) as exc:
        validate_requests(prompts, 10, vocab_size=VOCAB, max_model_len=200, num_kv_blocks=4, block_size=4,
                          cp_world_size=2)
    assert needle in str(exc.value)


def test_validate_requests_accepts_integer_kinds():
    import numpy as np

    from megacp.session import validate_requests

    got = validate_requests([np.array([1, 2]), torch.tensor([3, 4]), (5,)], 2, vocab_size=VOCAB, max_model_len=64,
                            num_kv_blocks=8, block_size=16, cp_world_size=1)
    assert got == [[1, 2], [3, 4], [5]] and all(type(t) is int for ids in got for t in ids)


def test_memory_check_names_gib_and_fix():
    from megacp.checks import GiB, check_memory, kv_cache_bytes

    # 2 (K, V) x 3 layers x 10 blocks x 16 tokens x 2 heads x 8 dims x 4 bytes + table 2 x 8 bytes x 4 x 5
    assert kv_cache_bytes(10, 16, 2, 8, 3, 4, max_num_seqs=4, max_blocks_per_seq=5) == 61440 + 320
    check_memory(1 << 20, "cpu", "a 1 MiB cache", "lower it")
    with pytest.raises(ValueError, match=r"the cache needs 1048576\.00 GiB per rank.*GiB of host RAM is available; "
                                         r"lower --num-kv-blocks"):
        check_memory(GiB << 20, "cpu", "the cache", "lower --num-kv-blocks")


def test_layout_messages():
    from megacp.kv import cp_local_seq_lens
    from megacp.parallel_state import rank_layout

    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        rank_layout(0)
    with pytest.raises(ValueError, match=r"seq_lens must be >= 0, got -5"):
        cp_local_seq_lens(torch.tensor([3, -5]), 2, 0)


# ----------------------------------------------------------------------------- files
def _llama_config() -> dict:
    with open(os.path.join(hf_models.model_dir("llama"), "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("content,needle", [
    (lambda c: json.dumps([c]), "must hold a JSON object of model settings, got a list"),
    (lambda c: json.dumps(c)[:60], "is not valid JSON ("),
    (lambda c: "", "is not valid JSON (Expecting value: line 1, column 1)"),
    (lambda c: json.dumps({**c, "num_attention_heads": 0, "head_dim": None}),
     "field 'num_attention_heads' must be an integer >= 1, got 0"),
    (lambda c: json.dumps({**c, "hidden_size": 60, "head_dim": None}),
     "field 'head_dim' is missing and hidden_size 60 is not a multiple of num_attention_heads 8"),
    (lambda c: json.dumps({**c, "hidden_size": "64"}), "field 'hidden_size' must be an integer >= 1, got '64'"),
    (lambda c: json.dumps({**c, "vocab_size": 2.5}), "field 'vocab_size' must be an integer >= 1, got 2.5"),
    (lambda c: json.dumps({**c, "num_key_value_heads": 0}), "field 'num_key_value_heads' must be an integer >= 1"),
    (lambda c: json.dumps({**c, "rope_theta": "1e4"}), "field 'rope_theta' must be a finite number > 0"),
    (lambda c: json.dumps({**c, "rope_scaling": "yes"}), "field 'rope_scaling' must be an object"),
    (lambda c: json.dumps({**c, "tie_word_embeddings": "false"}), "field 'tie_word_embeddings' must be true or false"),
    (lambda c: json.dumps({**c, "eos_token_id": "2"}), "field 'eos_token_id' must be a token id"),
    (lambda c: json.dumps({**c, "model_type": ["llama"]}), "unsupported model_type ['llama']"),
    (lambda c: json.dumps({k: v for k, v in c.items() if k != "vocab_size"}), "lacks the required field 'vocab_size'"),
])
def test_corrupt_config_json(tmp_path, content, needle):
    from megacp.models.config import load_model_config

    path = tmp_path / "config.json"
    path.write_text(content(_llama_config()))
    with pytest.raises(ValueError) as exc:
        load_model_config(str(tmp_path))
    assert str(path) in str(exc.value) and needle in str(exc.value), str(exc.value)


def test_config_json_binary_and_moe_fields(tmp_path):
    from megacp.models.config import load_model_config, model_config_from_dict

    (tmp_path / "config.json").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_model_config(str(tmp_path))
    qwen_moe = dict(model_type="qwen2_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                    decoder_sparse_step=0)
    with pytest.raises(ValueError, match="field 'decoder_sparse_step' must be an integer >= 1, got 0"):
        model_config_from_dict(qwen_moe)


def _corrupt_checkpoints(root: str) -> dict[str, str]:
    """Copies of the tiny llama checkpoints, each broken one way: {case: directory}."""
    from safetensors.torch import load_file, save_file

    single, sharded = hf_models.model_dir("llama"), hf_models.model_dir("llama_sharded")
    cases = {}

    def copy(name: str, src: str) -> str:
        cases[name] = shutil.copytree(src, os.path.join(root, name))
        return cases[name]

    weights = os.path.join(copy("empty", single), "model.safetensors")
    open(weights, "wb").close()
    weights = os.path.join(copy("truncated", single), "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    open(os.path.join(copy("random", single), "model.safetensors"), "wb").write(os.urandom(4096))
    weights = os.path.join(copy("nan", single), "model.safetensors")
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = math.nan
    save_file(tensors, weights, metadata={"format": "pt"})
    index_path = os.path.join(copy("wrong_shard", sharded), "model.safetensors.index.json")
    index = json.load(open(index_path))
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in sorted(index["weight_map"].items()) if f == shards[0])
    index["weight_map"][name] = shards[-1]
    json.dump(index, open(index_path, "w"))
    index_path = os.path.join(copy("bad_index", sharded), "model.safetensors.index.json")
    open(index_path, "w").write('{"weight_map": ["model.safetensors"]}')
    return cases


def _load_errors_task(cases: dict[str, str]) -> dict[str, str]:
    from megacp.models import load_model
    from tests.dist_pool import model_parallel

    errors = {}
    with model_parallel(tensor_model_parallel_size=2):
        for case, path in sorted(cases.items()):
            try:
                load_model(path, torch.float32, "cpu")
                errors[case] = "loaded"
            except ValueError as e:
                errors[case] = str(e)
        load_model(cases["nan"], torch.float32, "cpu", check_finite=False)  # the opt-out loads it
    return errors


def test_corrupt_checkpoints_name_the_file(dist_pool_2):
    """Each corrupt checkpoint gives one ValueError naming the file (and tensor), the same on both TP ranks, even
    when only one rank reads the bad part (the NaN sits in rows of one TP shard)."""
    root = tempfile.mkdtemp(prefix="megacp-corrupt-")
    try:
        cases = _corrupt_checkpoints(root)
        per_rank = dist_pool_2.run(_load_errors_task, cases)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert per_rank[0] == per_rank[1], "ranks disagree"
    errors = per_rank[0]
    for case in ("empty", "truncated", "random"):
        assert f"{case}/model.safetensors is not a readable safetensors file" in errors[case], errors[case]
    assert "nan/model.safetensors holds NaN/inf values" in errors["nan"]
    assert "model.layers.1.mlp.down_proj.weight" in errors["nan"] and "check_finite=False" in errors["nan"]
    assert "wrong_shard/model.safetensors.index.json maps tensor" in errors["wrong_shard"]
    assert "but that file does not contain it" in errors["wrong_shard"]
    assert "bad_index/model.safetensors.index.json must hold" in errors["bad_index"]
    assert all(e.startswith((root, "model.layers.1.mlp.down_proj.weight in ")) for e in errors.values())


def test_corrupt_tokenizer_names_the_file(tmp_path):
    from examples.infer_llama import Tokenizer

    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nonsense"')
    with pytest.raises(ValueError, match=r"tokenizer.json is not a readable tokenizer .*--prompt-ids"):
        Tokenizer(str(tmp_path))


def test_json_out_checked_before_loading(tmp_path):
    from examples.infer_llama import _check_json_out

    _check_json_out(str(tmp_path / "new" / "dir" / "out.json"))  # created later, nothing left behind now
    assert not (tmp_path / "new").exists()
    _check_json_out(str(tmp_path / "out.json"))
    assert not (tmp_path / "out.json").exists()
    with pytest.raises(ValueError, match="is a directory"):
        _check_json_out(str(tmp_path))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="file is not a directory"):
        _check_json_out(str(tmp_path / "file" / "out.json"))


# ----------------------------------------------------------------------------- multi-rank
def _bad_then_good_task(model_dir: str, sizes: dict, prompts: list[list[int]], max_new: int):
    """Bad requests each raise the same ValueError on every rank; the engine then serves a good request."""
    from megacp import parallel_state as ps
    from megacp.engine import LLMEngine
    from megacp.models import load_model
    from megacp.sampling import SamplingParams
    from tests.dist_pool import model_parallel

    bad_requests = [
        ([[1, 2, VOCAB]], SamplingParams(max_new_tokens=max_new)),
        ([[-3, 4]], SamplingParams(max_new_tokens=max_new)),
        ([[1, 2.5]], SamplingParams(max_new_tokens=max_new)),
        ([[1], []], SamplingParams(max_new_tokens=max_new)),
        ([list(range(3, 60))], SamplingParams(max_new_tokens=10_000)),
        ([[1, 2]], {"max_new_tokens": 3}),
    ]
    messages = []
    with model_parallel(**sizes):
        model = load_model(model_dir, torch.float32, torch.device("cpu"))
        engine = LLMEngine(model, num_kv_blocks=8, block_size=16)
        for ids, sampling in bad_requests:
            try:
                engine.generate(ids, sampling)
                messages.append("accepted")
            except ValueError as e:
                messages.append(str(e))
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new, ignore_eos=True))
        free = engine.session.allocator.num_free
        for bad_arg in (dict(num_kv_blocks=0), dict(max_num_seqs=0), dict(block_size=2.0)):
            try:
                LLMEngine(model, **{"num_kv_blocks": 8, **bad_arg})
                messages.append("accepted")
            except ValueError as e:
                messages.append(str(e))
    # Without the model-parallel state the engine refuses clearly instead of failing in the block table.
    try:
        engine.generate(prompts, SamplingParams(max_new_tokens=1))
        messages.append("accepted")
    except RuntimeError as e:
        messages.append(str(e))
    assert not ps.model_parallel_is_initialized()
    return messages, [o.output_ids for o in outs], free


@pytest.mark.parametrize("sizes", [
    dict(tensor_model_parallel_size=2, data_parallel_size=2),
    dict(prefill_context_parallel_size=2, data_parallel_size=2),
    dict(tensor_model_parallel_size=2, prefill_context_parallel_size=2, decode_context_parallel_size=2),
])
def test_bad_request_then_good_request(dist_pool_4, sizes):
    max_new = 6
    prompts = [[5, 17, 230, 41, 9, 77, 3], [200, 3, 3, 19]]
    per_rank = dist_pool_4.run(_bad_then_good_task, hf_models.model_dir("llama"), sizes, prompts, max_new)
    messages, outputs, free = per_rank[0]
    assert all(r == per_rank[0] for r in per_rank), "ranks disagree on the verdicts or the tokens"
    assert "accepted" not in messages
    assert f"prompt_ids[0][2] = {VOCAB} is outside the model's vocabulary" in messages[0]
    assert "prompt_ids[0][0] = -3 is outside" in messages[1]
    assert "prompt_ids[0][1] = 2.5 is not an integer token id" in messages[2]
    assert "prompt_ids[1] is empty" in messages[3]
    assert "max_position_embeddings" in messages[4]
    assert "generate(sampling) must be a megacp.sampling.SamplingParams, got dict" in messages[5]
    assert "LLMEngine(num_kv_blocks) must be an integer >= 1, got 0" in messages[6]
    assert "LLMEngine(max_num_seqs) must be an integer >= 1, got 0" in messages[7]
    assert "LLMEngine(block_size) must be an integer >= 1, got 2.0" in messages[8]
    assert "model-parallel state this engine was built on has been destroyed" in messages[9]
    assert outputs == hf_models.greedy_reference(hf_models.model_dir("llama"), prompts, max_new)
    assert free == 8


def _nonfinite_logits_task(poisoned_token: int, prompts: list[list[int]], max_new: int, sizes: dict,
                           device: str = "cpu", dtype: torch.dtype = torch.float32):
    """NaN in one embedding row (on the TP rank that holds it): only the request that feeds that token stops."""
    import warnings

    from megacp.engine import LLMEngine
    from megacp.models import load_model
    from megacp.sampling import SamplingParams
    from tests.dist_pool import model_parallel

    with model_parallel(**sizes):
        model = load_model(None, dtype, torch.device(device))
        engine = LLMEngine(model, num_kv_blocks=8, block_size=4)
        sampling = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
        clean = engine.generate(prompts[1:], sampling)
        emb = model.embed_tokens
        if emb.vocab_start <= poisoned_token < emb.vocab_start + emb.weight.shape[0]:
            with torch.no_grad():
                emb.weight[poisoned_token - emb.vocab_start, 0] = math.nan
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs = engine.generate(prompts, sampling)
        # The stopped request's cache blocks (holding NaN K/V) are reused by the next requests (lowest block ids
        # first): no NaN may leak from stale slots.
        again = engine.generate(prompts[1:], sampling)
        return ([(o.output_ids, o.finish_reason, o.error is not None and o.error.split(";")[0]) for o in outs],
                [c.output_ids for c in clean], [str(w.message).split(";")[0] for w in caught],
                [o.output_ids for o in again], engine.session.allocator.num_free)


NAN_PROMPTS = [[10, 11, 200, 12], [20, 21, 22], [30, 31]]  # token 200 gets a NaN embedding


def _check_nonfinite_run(per_rank: list) -> None:
    outs, clean, warned, again, free = per_rank[0]
    assert all(r[:4] == per_rank[0][:4] for r in per_rank), "ranks disagree"
    assert again == clean
    expected_error = ("request 0: the model produced NaN/inf logits at step 0 (after 0 generated tokens), so the "
                      "request was stopped")
    assert outs[0] == ([], "error", expected_error)
    assert [o[0] for o in outs[1:]] == clean and [o[1] for o in outs[1:]] == ["length", "length"]
    assert warned == [expected_error]
    assert free == 8


def test_nonfinite_logits_stop_the_request_on_every_rank(dist_pool_4):
    sizes = dict(tensor_model_parallel_size=2, prefill_context_parallel_size=2, decode_context_parallel_size=2)
    _check_nonfinite_run(dist_pool_4.run(_nonfinite_logits_task, 200, NAN_PROMPTS, 5, sizes))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nonfinite_logits_on_gpu(dist_pool_1):
    """The CUDA kernels (fused prefill, Triton paged decode) in bfloat16: the same stop, and no NaN leaking from
    the stopped request's stale cache slots into the requests that reuse its blocks."""
    _check_nonfinite_run(dist_pool_1.run(_nonfinite_logits_task, 200, NAN_PROMPTS, 5, {}, "cuda", torch.bfloat16))


def test_collective_error_names_group_peer_and_timeout():
    from datetime import timedelta

    from megacp.parallel_state import collective_error

    gloo = RuntimeError("[/x/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:4242: Connection reset by peer. "
                        "This is typically caused by a remote worker hanging")
    msg = str(collective_error("pcp", [2, 6], 6, "broadcast", timedelta(seconds=30), gloo))
    assert msg.startswith("broadcast on the pcp group (ranks [2, 6]) failed on rank 6: peer rank 2 died or did not "
                          "join within 30 s (Read error [127.0.0.1]:4242: Connection reset by peer);")
    assert "--dist-timeout" in msg and "initialize_model_parallel(timeout=...)" in msg
    msg = str(collective_error("tp", [0, 1, 2, 3], 1, "all_reduce", None, RuntimeError("Timed out waiting 5000ms")))
    assert "one of the peer ranks [0, 2, 3] died or did not join within the default timeout (Timed out" in msg
