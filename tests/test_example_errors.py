"""Bad configurations and a dying worker under real ``torchrun``: non-zero exit, a clear message, never a hang.

Configuration errors start the example as 2 ranks with torchrun's environment, each rank waited for on its own: a
scenario passes when every rank exits non-zero well within the timeout after printing the same one-line message
naming the flag to change. Real ``torchrun`` runs check the job as users launch it: a bad flag and a worker killed
mid-generation both end the whole job non-zero, no hang.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests import hf_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "infer_llama.py")
TIMEOUT_S = 180  # generous for a loaded 2-core box; a hang would hit it, a healthy failure takes seconds


def _env(env_extra: dict[str, str] | None = None) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", **(env_extra or {}))


def _torchrun(nproc: int, args: list[str], env_extra: dict[str, str] | None = None,
              timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", EXAMPLE,
           "--dist-timeout", "30", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(env_extra), cwd=REPO)


def _launch_ranks(nproc: int, args: list[str]) -> list[subprocess.CompletedProcess]:
    """Start the example as ``nproc`` ranks with torchrun's environment, each waited for on its own.

    torchrun stops the other workers as soon as one fails, so under load a slow rank can be killed before it prints
    its own message. Launching the ranks ourselves lets every rank run to its own exit, which is what "fails fast on
    every rank with one message" means.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(nproc):
        env = _env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                    "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        procs.append(subprocess.Popen([sys.executable, EXAMPLE, "--dist-timeout", "30", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for rank, proc in enumerate(procs):
            out, err = proc.communicate(timeout=TIMEOUT_S)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


def _assert_error_on_every_rank(nproc: int, args: list[str], *needles: str) -> str:
    """Every rank exits non-zero and prints the same one-line ``[rank r] error: ...`` naming ``needles``."""
    messages = []
    for rank, proc in enumerate(_launch_ranks(nproc, args)):
        assert proc.returncode != 0, f"rank {rank}: expected failure, got exit 0\nstderr:\n{proc.stderr}"
        lines = [line for line in proc.stderr.splitlines() if f"[rank {rank}] error: " in line]
        assert len(lines) == 1, f"rank {rank} should print exactly one error line:\n{proc.stderr}"
        messages.append(lines[0].split("] error: ", 1)[1])
    assert all(m == messages[0] for m in messages), f"ranks disagree on the message: {messages}"
    for needle in needles:
        assert needle in messages[0], f"{needle!r} not in the error message: {messages[0]}"
    return messages[0]


def test_world_size_mismatch():
    msg = _assert_error_on_every_rank(2, ["-tp", "1", "-pcp", "1", "--prompt-ids", "1,2,3", "--max-new-tokens", "2"],
                                      "--nproc-per-node", "-tp", "-pcp")
    assert "dp·pcp·tp = 1·1·1 = 1" in msg


def test_bad_config_under_torchrun_exits_non_zero():
    """The launcher users run: the job ends non-zero with the message (torchrun may stop the slower rank first)."""
    proc = _torchrun(2, ["-tp", "2", "-dcp", "3", "--prompt-ids", "1,2,3"])
    assert proc.returncode != 0
    assert "] error: " in proc.stderr and "--decode-context-parallel-size" in proc.stderr


def test_illegal_dcp_for_kv_heads():
    # mistral: 8 heads, 2 KV heads; tp 2 gives every TP rank its own KV head, so no DCP group can share one.
    msg = _assert_error_on_every_rank(
        2, ["--model", hf_models.model_dir("mistral"), "-tp", "2", "-dcp", "2", "--prompt-ids", "1,2,3"],
        "--decode-context-parallel-size", "legal -dcp values")
    assert "-dcp values for -tp 2: 1" in msg


def test_prompt_longer_than_cache():
    prompt = ",".join(str(5 + i % 200) for i in range(70))
    msg = _assert_error_on_every_rank(2, ["-pcp", "2", "--block-size", "4", "--num-kv-blocks", "4", "--prompt-ids",
                                          prompt, "--max-new-tokens", "8"], "--num-kv-blocks", "--max-new-tokens")
    # 70 + 8 tokens in virtual blocks of 4·2 tokens: 10 blocks needed, 4 there.
    assert "needs 10 KV blocks" in msg and "the cache has 4" in msg


def test_prompt_longer_than_max_positions():
    prompt = ",".join(str(5 + i % 200) for i in range(hf_models.MAX_POSITIONS))
    _assert_error_on_every_rank(2, ["--model", hf_models.model_dir("llama"), "-pcp", "2", "--prompt-ids", prompt],
                                "max_position_embeddings", "--max-new-tokens")


def test_missing_checkpoint_file(tmp_path):
    broken = tmp_path / "sharded"
    shutil.copytree(hf_models.model_dir("llama_sharded"), broken)
    with open(broken / "model.safetensors.index.json") as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(broken / shard)
    _assert_error_on_every_rank(2, ["--model", str(broken), "-tp", "2", "--prompt-ids", "1,2,3"], "--model", shard)


def test_unsupported_model_type(tmp_path):
    broken = tmp_path / "gpt2ish"
    shutil.copytree(hf_models.model_dir("llama"), broken)
    with open(broken / "config.json") as f:
        cfg = json.load(f)
    cfg["model_type"] = "gpt2"
    with open(broken / "config.json", "w") as f:
        json.dump(cfg, f)
    _assert_error_on_every_rank(2, ["--model", str(broken), "-pcp", "2", "--prompt-ids", "1,2,3"],
                                "--model", "gpt2", "llama")


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
