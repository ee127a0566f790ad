"""Bad configurations and a dying worker under real ``torchrun``: non-zero exit, a clear message, never a hang.

Each scenario is one ``torchrun --nproc-per-node 2`` subprocess (the cost is the process start-up, so there are few
of them). A scenario passes when the job exits non-zero well within its subprocess timeout and, for configuration
errors, every rank printed the same one-line message naming the flag to change.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests import hf_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "infer_llama.py")
TIMEOUT_S = 180  # generous for a loaded 2-core box; a hang would hit it, a healthy failure takes seconds


def _torchrun(nproc: int, args: list[str], env_extra: dict[str, str] | None = None,
              timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", EXAMPLE,
           "--dist-timeout", "30", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _assert_error_on_every_rank(proc: subprocess.CompletedProcess, nproc: int, *needles: str) -> str:
    assert proc.returncode != 0, f"expected failure, got exit 0\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = [line for line in proc.stderr.splitlines() if "] error: " in line]
    ranks = sorted({line.split("]")[0].split("rank ")[-1] for line in lines})
    assert ranks == [str(r) for r in range(nproc)], f"not every rank reported the error:\n{proc.stderr}"
    message = lines[0].split("] error: ", 1)[1]
    assert all(line.split("] error: ", 1)[1] == message for line in lines), "ranks disagree on the message"
    for needle in needles:
        assert needle in message, f"{needle!r} not in the error message: {message}"
    return message


def test_world_size_mismatch():
    proc = _torchrun(2, ["-tp", "1", "-pcp", "1", "--prompt-ids", "1,2,3", "--max-new-tokens", "2"])
    msg = _assert_error_on_every_rank(proc, 2, "--nproc-per-node", "-tp", "-pcp")
    assert "dp·pcp·tp = 1·1·1 = 1" in msg


def test_illegal_dcp_for_kv_heads():
    # mistral: 8 heads, 2 KV heads; tp 2 gives every TP rank its own KV head, so no DCP group can share one.
    proc = _torchrun(2, ["--model", hf_models.model_dir("mistral"), "-tp", "2", "-dcp", "2", "--prompt-ids", "1,2,3"])
    msg = _assert_error_on_every_rank(proc, 2, "--decode-context-parallel-size", "legal -dcp values")
    assert "-dcp values for -tp 2: 1" in msg


def test_prompt_longer_than_cache():
    prompt = ",".join(str(5 + i % 200) for i in range(70))
    proc = _torchrun(2, ["-pcp", "2", "--block-size", "4", "--num-kv-blocks", "4", "--prompt-ids", prompt,
                         "--max-new-tokens", "8"])
    msg = _assert_error_on_every_rank(proc, 2, "--num-kv-blocks", "--max-new-tokens")
    # 70 + 8 tokens in virtual blocks of 4·2 tokens: 10 blocks needed, 4 there.
    assert "needs 10 KV blocks" in msg and "the cache has 4" in msg


def test_prompt_longer_than_max_positions():
    prompt = ",".join(str(5 + i % 200) for i in range(hf_models.MAX_POSITIONS))
    proc = _torchrun(2, ["--model", hf_models.model_dir("llama"), "-pcp", "2", "--prompt-ids", prompt])
    _assert_error_on_every_rank(proc, 2, "max_position_embeddings", "--max-new-tokens")


def test_missing_checkpoint_file(tmp_path):
    broken = tmp_path / "sharded"
    shutil.copytree(hf_models.model_dir("llama_sharded"), broken)
    with open(broken / "model.safetensors.index.json") as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(broken / shard)
    proc = _torchrun(2, ["--model", str(broken), "-tp", "2", "--prompt-ids", "1,2,3"])
    _assert_error_on_every_rank(proc, 2, "--model", shard)


def test_unsupported_model_type(tmp_path):
    broken = tmp_path / "gpt2ish"
    shutil.copytree(hf_models.model_dir("llama"), broken)
    with open(broken / "config.json") as f:
        cfg = json.load(f)
    cfg["model_type"] = "gpt2"
    with open(broken / "config.json", "w") as f:
        json.dump(cfg, f)
    proc = _torchrun(2, ["--model", str(broken), "-pcp", "2", "--prompt-ids", "1,2,3"])
    _assert_error_on_every_rank(proc, 2, "--model", "gpt2", "llama")


def test_worker_killed_mid_generation():
    proc = _torchrun(
        2,
        ["-pcp", "2", "-dcp", "1", "--prompt", "a prompt long enough for a few steps", "--max-new-tokens", "16"],
        env_extra={"MEGACP_TEST_KILL_RANK": "1", "MEGACP_TEST_KILL_AT_STEP": "3"},
        timeout=30 + 60,  # --dist-timeout 30 plus start-up: a rank left waiting in a collective would exceed it
    )
    assert proc.returncode != 0
    assert "MEGACP_TEST_KILL_AT_STEP=3: exiting abruptly" in proc.stderr


@pytest.mark.parametrize("flag,value,needle", [("--max-new-tokens", "0", "--max-new-tokens"),
                                               ("--cp-kv-cache-interleave-size", "3", "--block-size"),
                                               ("--top-p", "0", "--top-p")])
def test_flag_errors_in_process(flag, value, needle, capfd, monkeypatch):
    """Pure flag checks run before any process group exists, so ``main`` fails in-process with exit code 2."""
    from examples.infer_llama import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["--prompt-ids", "1,2,3", flag, value])
    assert exc.value.code == 2
    err = capfd.readouterr().err
    assert "[rank 0] error: " in err and needle in err


def test_moe_models_refuse_data_parallel():
    """MoE layers gather tokens over every rank each step, so independently scheduled DP replicas would hang."""
    from types import SimpleNamespace

    from megacp.engine import check_data_parallel

    with pytest.raises(ValueError, match="--data-parallel-size/-dp 2 is not supported for MoE models"):
        check_data_parallel(SimpleNamespace(is_moe=True), 2)
    check_data_parallel(SimpleNamespace(is_moe=True), 1)
    check_data_parallel(SimpleNamespace(is_moe=False), 4)
