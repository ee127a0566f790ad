"""DeepSeek-V2/V3 end to end: megacp's engine against ``transformers`` on tiny random checkpoints.

The checkpoints (``tests/deepseek_tiny.py``, saved with ``save_pretrained``): V3 with q-LoRA, interleaved rope pairs,
YaRN with ``mscale != mscale_all_dim``, ``v_head_dim != qk_nope_head_dim``; V2 with a plain ``q_proj``; both with a
dense first layer and DeepSeek MoE after it (V3: sigmoid router with a nonzero ``e_score_correction_bias``,
``n_group > 1``; V2: softmax ``group_limited_greedy``). Greedy output ids must equal transformers' greedy
``generate`` and the last prompt position's logits be within 1e-4 (float32), for (tp, pcp, dcp) in (1,1,1),
(2,1,2), (4,1,4), (1,2,1), (2,2,2) and (2,2,1) with expert parallelism, with interleave 1 and 2, and with chunked
prefill (``max_num_batched_tokens`` 8 cuts the longer prompts into chunks that attend to their cached context).
Negative control: the V3 checkpoint with a wrong ``mscale_all_dim`` must miss transformers' logits. One
``torchrun examples/infer_llama.py`` run checks the CLI and its ``--json-out`` kv block (capacity ×pcp·dcp).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.dist_pool import model_parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_LENS = (5, 13, 22)
MAX_NEW = 6
LOGITS_TOL = 1e-4
# (tp, pcp, dcp, interleave, ep) per pool size; each runs both checkpoints.
RUNS = {
    1: [(1, 1, 1, 1, False)],
    2: [(2, 1, 2, 2, False), (1, 2, 1, 1, False)],
    4: [(4, 1, 4, 1, False), (2, 2, 2, 2, False), (2, 2, 1, 1, True)],
}
CHECKPOINTS = {"v3": dict(version=3), "v2": dict(version=2, q_lora_rank=None)}


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(2024)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, dict]:
    """Each checkpoint's path, transformers' greedy ids and last-prompt-position logits."""
    from tests.deepseek_tiny import load_tiny_reference, save_tiny_deepseek
    from tests.hf_models import greedy_reference

    out = {}
    for name, kwargs in CHECKPOINTS.items():
        path = save_tiny_deepseek(str(tmp_path_factory.mktemp(name)), **kwargs)
        hf = load_tiny_reference(path)
        with torch.no_grad():
            logits = [hf(torch.tensor([p])).logits[0, -1].float() for p in _prompts()]
        out[name] = {"path": path, "ids": greedy_reference(path, _prompts(), MAX_NEW), "logits": logits}
    return out


def _generate(path: str, prompts: list[list[int]]) -> dict:
    """load_model → LLMEngine.generate (greedy, chunked prefill) on the current parallel state."""
    from megacp.engine import LLMEngine
    from megacp.models import load_model
    from megacp.sampling import SamplingParams

    model = load_model(path, torch.float32, "cpu")
    engine = LLMEngine(model, num_kv_blocks=16, block_size=4, max_num_batched_tokens=8)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True),
                           return_prompt_logits=True)
    return {"ids": [o.output_ids for o in outs], "logits": [o.prompt_logits for o in outs],
            "capacity": engine.stats.kv_capacity_tokens, "graphs_off": engine.graphs_off_reason}


def _runs_task(runs: list[tuple], paths: dict[str, str], prompts: list[list[int]]) -> list[dict]:
    results = []
    for tp, pcp, dcp, interleave, ep in runs:
        with model_parallel(tensor_model_parallel_size=tp, prefill_context_parallel_size=pcp,
                            decode_context_parallel_size=dcp, cp_kv_cache_interleave_size=interleave,
                            enable_expert_parallel=ep):
            for name, path in paths.items():
                results.append({"run": (tp, pcp, dcp, interleave, ep), "checkpoint": name,
                                **_generate(path, prompts)})
    return results


def _check(per_rank: list[list[dict]], checkpoints: dict) -> None:
    for j, r0 in enumerate(per_rank[0]):
        tp, pcp, dcp, interleave, ep = r0["run"]
        what = f"{r0['checkpoint']} tp={tp} pcp={pcp} dcp={dcp} interleave={interleave} ep={ep}"
        ref = checkpoints[r0["checkpoint"]]
        for rank, results in enumerate(per_rank):
            r = results[j]
            assert r["ids"] == ref["ids"], f"{what} rank {rank}: greedy ids {r['ids']} != transformers' {ref['ids']}"
            err = max((a - b).abs().max().item() for a, b in zip(r["logits"], ref["logits"]))
            assert err <= LOGITS_TOL, f"{what} rank {rank}: last-position logits off by {err:.3g}"
            assert r["capacity"] == 16 * 4 * pcp * dcp, f"{what}: KV capacity {r['capacity']}"


def _paths(checkpoints: dict) -> dict[str, str]:
    return {name: c["path"] for name, c in checkpoints.items()}


def _one_rank_task(paths: dict[str, str], wrong: str, prompts: list[list[int]]) -> tuple[list[dict], list]:
    results = _runs_task(RUNS[1], paths, prompts)
    with model_parallel():
        return results, _generate(wrong, prompts)["logits"]


def test_one_rank_matches_transformers_and_wrong_mscale_does_not(dist_pool_1, checkpoints, tmp_path):
    from tests.deepseek_tiny import copy_with_config

    with open(os.path.join(checkpoints["v3"]["path"], "config.json")) as f:
        rope = json.load(f)["rope_parameters"]
    wrong = copy_with_config(checkpoints["v3"]["path"], str(tmp_path / "wrong"),
                             rope_parameters=dict(rope, mscale_all_dim=1.0))
    [(results, control)] = dist_pool_1.run(_one_rank_task, _paths(checkpoints), wrong, _prompts())
    _check([results], checkpoints)
    err = max((a - b).abs().max().item() for a, b in zip(control, checkpoints["v3"]["logits"]))
    assert err > 100 * LOGITS_TOL, f"a wrong mscale_all_dim still matched transformers' logits ({err:.3g})"


def test_two_ranks_match_transformers(dist_pool_2, checkpoints):
    _check(dist_pool_2.run(_runs_task, RUNS[2], _paths(checkpoints), _prompts(), timeout=300), checkpoints)


def test_four_ranks_match_transformers(dist_pool_4, checkpoints):
    _check(dist_pool_4.run(_runs_task, RUNS[4], _paths(checkpoints), _prompts(), timeout=300), checkpoints)


def test_torchrun_dcp_equals_tp(checkpoints, tmp_path):
    """The example CLI with -tp 2 -dcp 2 -pcp 2 on the V3 checkpoint: ids, and the kv block of --json-out."""
    out = tmp_path / "out.json"
    argv = ["--model", checkpoints["v3"]["path"], "-tp", "2", "-dcp", "2", "-pcp", "2", "--block-size", "4",
            "--num-kv-blocks", "16", "--temperature", "0", "--max-new-tokens", str(MAX_NEW), "--ignore-eos",
            "--dtype", "float32", "--device", "cpu", "--json-out", str(out)]
    for ids in _prompts():
        argv += ["--prompt-ids", ",".join(map(str, ids))]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
           os.path.join(REPO, "examples", "infer_llama.py"), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr}"
    with open(out) as f:
        result = json.load(f)
    assert [o["output_ids"] for o in result["outputs"]] == checkpoints["v3"]["ids"]
    kv = result["kv"]
    assert (kv["cp_world_size"], kv["slots_per_rank"], kv["capacity_tokens"]) == (4, 16 * 4, 16 * 4 * 4), kv
