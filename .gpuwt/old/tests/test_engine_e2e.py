"""End to end: megacp's engine and ``examples/infer_llama.py`` against ``transformers`` on tiny random checkpoints.

Greedy output ids must equal transformers' greedy ``generate`` (fp32) for 3 prompts of different lengths, for every
(tp, pcp, dcp) layout of the acceptance matrix, with KV interleave 1 and 16, and with a token budget small enough to
force chunked prefill (long prompts prefilled over their own cached context while other requests decode). Last prompt
position logits must be within 1e-4 of transformers'.

Most runs call ``examples.infer_llama.main`` inside the shared 4-rank gloo pool (layouts with fewer ranks fill the
pool with data parallelism, i.e. several replicas each serving some of the prompts); two runs go through a real
``torchrun`` subprocess and check the ``--json-out`` file.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests import hf_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW = 20
PROMPT_LENS = (7, 29, 53)
POOL = 4


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(3, hf_models.VOCAB_SIZE, (n,), generator=g).tolist() for n in PROMPT_LENS]


@functools.cache
def _reference(kind: str) -> list[list[int]]:
    return hf_models.greedy_reference(hf_models.model_dir(kind), _prompts(), MAX_NEW)


def _argv(kind: str | None, tp: int, pcp: int, dcp: int, interleave: int = 1, batched: int = 512,
          extra: tuple[str, ...] = (), world: int = POOL) -> list[str]:
    dp = world // (tp * pcp)
    argv = ["-tp", str(tp), "-pcp", str(pcp), "-dcp", str(dcp), "-dp", str(dp),
            "--cp-kv-cache-interleave-size", str(interleave), "--block-size", "16",
            "--max-num-batched-tokens", str(batched), "--max-new-tokens", str(MAX_NEW),
            "--dtype", "float32", "--device", "cpu", "--temperature", "0", "--ignore-eos", *extra]
    if kind is not None:
        argv += ["--model", hf_models.model_dir(kind)]
        for ids in _prompts():
            argv += ["--prompt-ids", ",".join(map(str, ids))]
    return argv


# ----------------------------------------------------------------------------- tasks run on every pool rank
def _main_task(argv: list[str]):
    from examples.infer_llama import main

    return main(argv)


def _engine_task(model_dir: str, sizes: dict, prompts: list[list[int]], max_new: int, batched: int,
                 eos_token_id: int | None):
    """Run the engine directly; return (output ids, finish reasons, prompt logits) on every rank."""
    from megacp.engine import LLMEngine
    from megacp.models import load_model
    from megacp.sampling import SamplingParams
    from tests.dist_pool import model_parallel

    with model_parallel(**sizes):
        model = load_model(model_dir, torch.float32, torch.device("cpu"))
        if eos_token_id is not None:
            model.config.eos_token_ids = [eos_token_id]
        engine = LLMEngine(model, num_kv_blocks=8, block_size=16, max_num_batched_tokens=batched)
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new, ignore_eos=eos_token_id is None),
                               return_prompt_logits=True)
        return [o.output_ids for o in outs], [o.finish_reason for o in outs], [o.prompt_logits for o in outs]


# ----------------------------------------------------------------------------- the acceptance matrix
LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (4, 1, 4), (2, 2, 2)]


@pytest.mark.parametrize("interleave,batched", [(1, 512), (16, 512), (1, 8), (16, 8)])
@pytest.mark.parametrize("tp,pcp,dcp", LAYOUTS)
def test_greedy_matches_transformers(request, tp, pcp, dcp, interleave, batched):
    """Every layout x interleave 1/16 x whole-prompt/chunked prefill (8 tokens per step) gives transformers' ids.

    dp = 1 (a pool of exactly tp·pcp ranks), so the three prompts always run as one packed batch."""
    world = tp * pcp
    pool = request.getfixturevalue(f"dist_pool_{world}")
    result = pool.run(_main_task, _argv("llama", tp, pcp, dcp, interleave=interleave, batched=batched, world=world))[0]
    assert [o["output_ids"] for o in result["outputs"]] == _reference("llama")
    assert [o["prompt_ids"] for o in result["outputs"]] == _prompts()
    assert result["config"] == {**result["config"], "tp": tp, "pcp": pcp, "dcp": dcp, "dp": 1}
    if batched < max(PROMPT_LENS):
        assert result["timings"]["num_steps"] > MAX_NEW  # the long prompts really took several steps


def _failing_step_task():
    """A step that raises mid-generation frees every KV block and row; the engine then runs a new batch."""
    from megacp.engine import LLMEngine
    from megacp.models import load_model
    from megacp.sampling import SamplingParams
    from tests.dist_pool import model_parallel

    with model_parallel():
        model = load_model(None, torch.float32, torch.device("cpu"))
        engine = LLMEngine(model, num_kv_blocks=6, block_size=4)
        run_step, calls = engine._run_step, [0]

        def boom(*args, **kwargs):  # the 4th step raises, as a bad input or a dead peer would
            calls[0] += 1
            if calls[0] == 4:
                raise RuntimeError("injected failure")
            return run_step(*args, **kwargs)

        engine._run_step = boom
        try:
            engine.generate([[1, 2, 3], [4, 5, 6, 7, 8]], SamplingParams(max_new_tokens=6, ignore_eos=True))
        except RuntimeError as e:
            assert "injected failure" in str(e)
        else:
            raise AssertionError("the injected failure did not propagate")
        free_after_failure = engine.session.allocator.num_free
        engine._run_step = run_step
        outs = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, ignore_eos=True))
        return free_after_failure, engine.session.allocator.num_free, len(outs[0].output_ids)


def test_failed_step_frees_kv_blocks(dist_pool_1):
    free_after_failure, free_at_end, n = dist_pool_1.run(_failing_step_task)[0]
    assert (free_after_failure, free_at_end, n) == (6, 6, 4)


def test_data_parallel_replicas_match_transformers(dist_pool_4):
    """dp = 4 replicas deal the prompts round-robin; rank 0 gathers them back in order."""
    result = dist_pool_4.run(_main_task, _argv("llama", 1, 1, 1))[0]
    assert [o["output_ids"] for o in result["outputs"]] == _reference("llama")
    assert result["config"]["dp"] == 4


@pytest.mark.parametrize("extra,steps", [(("--num-kv-blocks", "2"), 2 * MAX_NEW), (("--max-num-seqs", "1"), 3 * MAX_NEW)])
def test_requests_wait_for_blocks_and_rows(dist_pool_4, extra, steps):
    """pcp 4: virtual blocks of 16·4 tokens, so the requests need 1, 1 and 2 blocks (27, 49, 73 tokens). With 2 blocks
    the third waits until the first two finish; with one request at a time all three run one after another."""
    result = dist_pool_4.run(_main_task, _argv("llama", 1, 4, 1, extra=extra))[0]
    assert [o["output_ids"] for o in result["outputs"]] == _reference("llama")
    assert result["timings"]["num_steps"] == steps
    if "--num-kv-blocks" in extra:
        assert max(result["kv"]["peak_tokens_stored_per_rank"]) <= 2 * 16


@pytest.mark.parametrize("kind,tp,pcp,dcp,batched", [("mistral", 2, 2, 1, 512), ("qwen2", 2, 1, 1, 16),
                                                     ("qwen2", 1, 4, 1, 512), ("llama_sharded", 2, 2, 2, 16)])
def test_other_architectures(dist_pool_4, kind, tp, pcp, dcp, batched):
    result = dist_pool_4.run(_main_task, _argv(kind, tp, pcp, dcp, batched=batched))[0]
    assert [o["output_ids"] for o in result["outputs"]] == _reference(kind)


@pytest.mark.parametrize("sizes,batched", [
    (dict(tensor_model_parallel_size=2, prefill_context_parallel_size=2, decode_context_parallel_size=2), 512),
    (dict(prefill_context_parallel_size=4, cp_kv_cache_interleave_size=16), 16),
])
def test_prompt_logits_and_eos(dist_pool_4, sizes, batched):
    """Last-prompt logits vs transformers (1e-4), identical outputs on every rank, and stopping at EOS."""
    prompts, ref = _prompts(), _reference("llama")
    # An EOS id that the reference first produces at step k >= 3 of prompt 0: generation must stop right there.
    k = next(i for i in range(3, MAX_NEW) if ref[0][i] not in ref[0][:i])
    eos = ref[0][k]
    per_rank = dist_pool_4.run(_engine_task, hf_models.model_dir("llama"), sizes, prompts, MAX_NEW, batched, eos)
    ids, reasons, logits = per_rank[0]
    assert all(r[0] == ids and r[1] == reasons for r in per_rank), "ranks disagree on the generated tokens"
    assert ids == [hf_models.truncate_at_eos(r, {eos}) for r in ref]
    assert ids[0] == ref[0][: k + 1] and reasons[0] == "eos"
    assert reasons == ["eos" if eos in ids[i] else "length" for i in range(3)]
    expected = hf_models.last_logits_reference(hf_models.model_dir("llama"), prompts)
    for rank_result in per_rank:
        for got, want in zip(rank_result[2], expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_builtin_model_parallel_equals_serial(dist_pool_4):
    """The README command's model (no --model): tp 2 · pcp 2 · dcp 2 generates what one rank does, as text too."""
    base = ["--prompt", "Hello, megacp", "--prompt", "context parallel", "--max-new-tokens", "12",
            "--dtype", "float32", "--device", "cpu"]
    serial = dist_pool_4.run(_main_task, [*base, "-dp", "4"])[0]
    parallel = dist_pool_4.run(_main_task, [*base, "-tp", "2", "-pcp", "2", "-dcp", "2"])[0]
    assert [o["output_ids"] for o in parallel["outputs"]] == [o["output_ids"] for o in serial["outputs"]]
    assert parallel["outputs"][0]["prompt_ids"] == list(b"Hello, megacp")
    out = parallel["outputs"][0]
    assert out["text"] == bytes(t for t in out["output_ids"] if t < 256).decode("utf-8", errors="replace")
    kv = parallel["kv"]
    # tp 2 = dcp 2, so all 4 ranks form one CP group: each stores about a quarter of every sequence (the last
    # sampled token is never cached), and together they store all of it.
    total = sum(len(o["prompt_ids"]) + len(o["output_ids"]) - 1 for o in parallel["outputs"])
    assert kv["capacity_tokens"] == kv["slots_per_rank"] * 4
    assert sum(kv["peak_tokens_stored_per_rank"]) == total
    assert max(kv["peak_tokens_stored_per_rank"]) <= total // 4 + 16


# ----------------------------------------------------------------------------- real torchrun runs
def _torchrun_json(tmp_path, nproc: int, argv: list[str]) -> dict:
    out = tmp_path / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.join(REPO, "examples", "infer_llama.py"), *argv, "--json-out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr}"
    with open(out) as f:
        return json.load(f)


def test_torchrun_2_2_2_sharded_checkpoint(tmp_path):
    argv = [a for a in _argv("llama_sharded", 2, 2, 2, interleave=16) if a != "--ignore-eos"]
    argv[argv.index("-dp") + 1] = "1"
    result = _torchrun_json(tmp_path, 4, argv)
    ref = _reference("llama_sharded")
    eos = {hf_models.EOS_TOKEN_ID}
    assert [o["output_ids"] for o in result["outputs"]] == [hf_models.truncate_at_eos(r, eos) for r in ref]
    assert set(result) >= {"outputs", "timings", "kv"}
    assert len(result["kv"]["peak_tokens_stored_per_rank"]) == 4


def test_torchrun_1_2_1_text_prompts_with_tokenizer(tmp_path):
    model = tmp_path / "qwen2_with_tokenizer"
    shutil.copytree(hf_models.model_dir("qwen2"), model)
    tokenizer = hf_models.save_word_tokenizer(str(model))
    texts = ["the quick brown fox", "jumps over the lazy dog " * 5]
    argv = ["--model", str(model), "-pcp", "2", "--max-new-tokens", str(MAX_NEW), "--dtype", "float32",
            "--max-num-batched-tokens", "16", "--ignore-eos"]
    for t in texts:
        argv += ["--prompt", t]
    result = _torchrun_json(tmp_path, 2, argv)
    prompts = [tokenizer.encode(t).ids for t in texts]
    ref = hf_models.greedy_reference(hf_models.model_dir("qwen2"), prompts, MAX_NEW)
    assert [o["prompt_ids"] for o in result["outputs"]] == prompts
    assert [o["output_ids"] for o in result["outputs"]] == ref
    assert [o["text"] for o in result["outputs"]] == [tokenizer.decode(r) for r in ref]


# ----------------------------------------------------------------------------- the sampler (pure)
def test_top_p_keeps_the_smallest_nucleus():
    from megacp.sampling import top_p_filter

    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    # Sorted: 0.5, 0.25, 0.15, 0.1. Mass before each: 0, 0.5, 0.75, 0.9 -> top_p 0.7 keeps the first two.
    expected = torch.tensor([[0.0, 0.5, 0.0, 0.25]]) / 0.75
    torch.testing.assert_close(top_p_filter(probs, 0.7), expected)
    torch.testing.assert_close(top_p_filter(probs, 0.01), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))


def test_sampling_is_seeded_and_follows_temperature():
    from megacp.sampling import sample

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    assert sample(logits[:1], 0.0, 1.0, None).tolist() == [0]
    a = sample(logits, 1.0, 1.0, torch.Generator().manual_seed(7))
    b = sample(logits, 1.0, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=4).float() / a.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.03, rtol=0)
    nucleus = sample(logits, 1.0, 0.5, torch.Generator().manual_seed(7))
    assert set(nucleus.tolist()) == {0}  # p(0) = 0.64 >= 0.5: the nucleus is the top token alone
