"""Bad configurations and a dying worker under real ``torchrun``: non-zero exit, a clear message, never a hang.

Configuration errors start the example as 2 ranks with torchrun's environment, each rank waited for on its own: a
scenario passes when every rank exits non-zero well within the timeout after printing the same one-line message
naming the flag to change. Real ``torchrun`` runs check the job as users launch it: a bad flag and a worker killed
mid-generation both end the whole job non-zero, no hang. A rank that dies or hangs (SIGSTOP) mid-generation leaves
the survivor a one-line error naming the group, the peer and ``--dist-timeout``. Flag values are checked at parse time
(in-process), and NaN weights, a cache too big for memory and an unwritable ``--json-out`` fail on both ranks of the
shared 2-rank gloo pool with the same message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from tests import hf_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "infer_llama.py")
TIMEOUT_S = 180  # generous for a loaded 2-core box; a hang would hit it, a healthy failure takes seconds


FAULT_INJECTION = os.path.join(REPO, "tests", "fault_injection")  # sitecustomize.py: MEGACP_TEST_KILL_* hooks


def _env(env_extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", **(env_extra or {}))
    if any(k.startswith("MEGACP_TEST_") for k in (env_extra or {})):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (FAULT_INJECTION, env.get("PYTHONPATH")) if p)
    return env


def _torchrun(nproc: int, args: list[str], env_extra: dict[str, str] | None = None,
              timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", EXAMPLE,
           "--dist-timeout", "30", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(env_extra), cwd=REPO)



def _free_port() -> int:
    """A port free now, for ranks this file launches itself with torchrun's environment (MASTER_PORT); another
    process may take it before rank 0 binds it, which would fail that test's rendezvous (rare)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def _launch_ranks(nproc: int, args: list[str], env_extra: dict[str, str] | None = None,
                  wait_for: list[int] | None = None) -> list[subprocess.CompletedProcess | None]:
    """Start the example as ``nproc`` ranks with torchrun's environment, each waited for on its own.

    torchrun stops the other workers as soon as one fails, so under load a slow rank can be killed before it prints
    its own message. Launching the ranks ourselves lets every rank run to its own exit, which is what "fails fast on
    every rank with one message" means. Only the ranks in ``wait_for`` (default: all) are waited for; the others
    (e.g. one stopped on purpose) are killed afterwards and reported as None.
    """
    port = _free_port()
    procs = []
    for rank in range(nproc):
        env = _env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                    "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    **(env_extra or {})})
        procs.append(subprocess.Popen([sys.executable, EXAMPLE, "--dist-timeout", "30", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results: list[subprocess.CompletedProcess | None] = [None] * nproc
    try:
        for rank, proc in enumerate(procs):
            if wait_for is None or rank in wait_for:
                out, err = proc.communicate(timeout=TIMEOUT_S)
                results[rank] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
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
    """The launcher users run: the job ends non-zero with the message (torchrun may stop the slower rank first),
    and torchrun's failure summary shows it (the ranks hand it over in torchrun's error file), not "To enable
    traceback see"."""
    proc = _torchrun(2, ["-tp", "2", "-dcp", "3", "--prompt-ids", "1,2,3"])
    assert proc.returncode != 0
    assert "] error: " in proc.stderr and "--decode-context-parallel-size" in proc.stderr
    root_cause = proc.stderr.split("Root Cause (first observed failure):", 1)[1]
    assert re.search(r"traceback : \[rank \d\] error: --decode-context-parallel-size/-dcp 3 must divide", root_cause), \
        proc.stderr
    assert "To enable traceback see" not in proc.stderr, proc.stderr


def test_plain_python_says_how_to_launch():
    """Without torchrun, the example and the README's Python API snippet say to start N processes with torchrun
    (before: "--nproc-per-node 1 ... launch with --nproc-per-node 2", and a bare world_size message)."""
    proc = subprocess.run([sys.executable, EXAMPLE, "-pcp", "2", "--prompt", "hi"], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=_env(), cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("[rank 0] error: this is one plain python process but dp·pcp·tp = 1·2·1 = 2 ")
    assert "start 2 processes with torchrun --nproc-per-node 2 " in proc.stderr and "infer_llama.py ..." in proc.stderr
    with open(os.path.join(REPO, "README.md")) as f:
        snippet = f.read().split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env, cwd=REPO)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("ValueError: this is one plain python process"), proc.stderr
    assert "start 4 processes with torchrun --nproc-per-node 4 your_script.py" in last


def test_minimal_install_runs_two_ranks(tmp_path):
    """What ``pip install torch && pip install .`` gives (no numpy, tokenizers, transformers or jinja2: their
    imports fail here, through tests/fault_injection) runs a checkpoint with a tokenizer.json on 2 ranks with
    --prompt-ids and gives transformers' greedy ids. Before: dist.all_gather_object needed numpy ("Numpy is not
    available") and the tokenizer.json was loaded even for --prompt-ids."""
    model = tmp_path / "llama_with_tokenizer"
    shutil.copytree(hf_models.model_dir("llama"), model)
    hf_models.save_word_tokenizer(str(model))
    out = tmp_path / "out.json"
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    ids_flags = [a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))]
    proc = _torchrun(2, ["--model", str(model), "-pcp", "2", "--max-new-tokens", "4", "--ignore-eos",
                         "--json-out", str(out), *ids_flags],
                     env_extra={"MEGACP_TEST_BLOCK_IMPORTS": "numpy,tokenizers,transformers,jinja2"})
    assert proc.returncode == 0, proc.stderr
    assert "Failed to initialize NumPy" in proc.stderr  # the launcher's torch import: numpy really was blocked
    result = json.loads(out.read_text())
    assert [o["output_ids"] for o in result["outputs"]] == hf_models.greedy_reference(str(model), prompts, 4)
    assert all(o["text"] is None for o in result["outputs"])  # no tokenizers package: ids only


def _wait_for(stream, needle: str) -> list[str]:
    """Lines of ``stream`` up to and including the first one containing ``needle``."""
    lines = []
    for line in stream:
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} never printed:\n{''.join(lines)}")


LONG_RUN = ["-pcp", "2", "--prompt", "a prompt", "--max-new-tokens", "2000", "--ignore-eos"]


def test_ctrl_c_under_torchrun_ends_every_rank_with_one_line(tmp_path):
    """SIGINT to torchrun mid-generation (it forwards it to the ranks): each rank prints one line, rank 0 writes
    the outputs so far to --json-out, no rank prints a traceback (the only one left is torchrun's own
    SignalException). Before: a KeyboardInterrupt traceback on every rank, no output."""
    out = tmp_path / "partial" / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", EXAMPLE, *LONG_RUN,
           "--json-out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=_env({"MEGACP_TEST_ANNOUNCE_STEP": "3"}))
    try:
        seen = _wait_for(proc.stderr, "[rank 0] at step 3")
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(seen) + rest
    for rank in (0, 1):
        lines = [line for line in err.splitlines() if line.startswith(f"[rank {rank}] interrupted")]
        assert len(lines) == 1 and re.match(rf"\[rank {rank}\] interrupted \(SIGINT\) at step \d+", lines[0]), err
    assert f"; partial results written to {out}" in err
    assert "KeyboardInterrupt" not in err and err.count("Traceback") <= 1 and "[rank0]:" not in err, err
    partial = json.loads(out.read_text())
    assert partial["interrupted"]["signal"] == "SIGINT" and partial["interrupted"]["step"] >= 3
    # async scheduling (the default) has step N+1 in flight while step N's ids are processed: the step in flight
    # when the signal lands is not in the partial outputs, so 2 ids by step 3
    assert 2 <= len(partial["outputs"][0]["output_ids"]) < 2000 and partial["outputs"][0]["finish_reason"] == ""


def test_sigterm_ends_every_rank_with_exit_143():
    """SIGTERM to both ranks mid-generation (what a scheduler sends): one line each, exit 143, no traceback."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = _env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "MEGACP_TEST_ANNOUNCE_STEP": "3"})
        procs.append(subprocess.Popen([sys.executable, EXAMPLE, *LONG_RUN], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        seen = _wait_for(procs[0].stderr, "[rank 0] at step 3")
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        results = [proc.communicate(timeout=TIMEOUT_S) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, (_, err)) in enumerate(zip(procs, results)):
        err = ("".join(seen) if rank == 0 else "") + err
        lines = [line for line in err.splitlines() if "interrupted" in line]
        assert proc.returncode == 143 and len(lines) == 1, f"rank {rank}: exit {proc.returncode}\n{err}"
        assert re.fullmatch(rf"\[rank {rank}\] interrupted \(SIGTERM\) at step \d+", lines[0]) and \
            "Traceback" not in err, err


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


@pytest.mark.parametrize("how,needle", [("exit", "died"), ("stop", "Timed out")])
def test_surviving_rank_names_group_peer_and_timeout(how, needle):
    """Rank 1 dies (or hangs, stopped) before step 3: rank 0 fails its next collective with one line naming the
    group, peer rank 1 and --dist-timeout, exits non-zero and leaves no process behind (the stopped rank is ours to
    kill: under torchrun the launcher does that)."""
    results = _launch_ranks(
        2, ["-pcp", "2", "--prompt", "a prompt long enough for a few steps", "--max-new-tokens", "8",
            "--dist-timeout", "8"],
        env_extra={"MEGACP_TEST_KILL_RANK": "1", "MEGACP_TEST_KILL_AT_STEP": "3", "MEGACP_TEST_KILL_HOW": how},
        wait_for=[0] if how == "stop" else None,
    )
    survivor = results[0]
    assert survivor.returncode == 1, survivor.stderr
    lines = [line for line in survivor.stderr.splitlines() if line.startswith("[rank 0] error: ")]
    assert len(lines) == 1, survivor.stderr
    # pcp 2 = cp 2: the failing collective is on the PCP or the CP group, both ranks [0, 1].
    assert re.search(r"\] error: \w+ on the p?cp group \(ranks \[0, 1\]\) failed on rank 0: peer rank 1 died or did "
                     r"not join within 8 s \(", lines[0]), lines[0]
    assert needle in lines[0] or how == "exit"
    assert "--dist-timeout" in lines[0] and "Traceback" not in survivor.stderr
    if how == "exit":
        assert results[1].returncode == 9 and "exiting abruptly" in results[1].stderr


def _main_exit_task(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` on a pool rank: (exit code, what it wrote to stderr)."""
    import tempfile

    from examples.infer_llama import main

    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            try:
                main(argv)
                code = 0
            except SystemExit as e:
                code = e.code
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        return code, f.read().decode()


def _errors_of(per_rank: list[tuple[int, str]], code: int) -> str:
    """Every rank exited with ``code`` after one ``[rank r] error:`` line, the same on every rank: that message."""
    messages = []
    for rank, (got, err) in enumerate(per_rank):
        lines = [line for line in err.splitlines() if line.startswith(f"[rank {rank}] error: ")]
        assert got == code and len(lines) == 1, f"rank {rank}: exit {got}, stderr:\n{err}"
        assert "Traceback" not in err, err
        messages.append(lines[0].split("] error: ", 1)[1])
    assert all(m == messages[0] for m in messages), f"ranks disagree: {messages}"
    return messages[0]


def test_nan_weights_refused_or_reported(dist_pool_2, tmp_path):
    """NaN in one TP shard of a weight: the load fails on every rank naming tensor and file; with
    --skip-finite-check the run ends with exit 1 on every rank, the NaN request marked in --json-out, never exit 0."""
    from safetensors.torch import load_file, save_file

    model = shutil.copytree(hf_models.model_dir("llama"), tmp_path / "nan")
    weights = load_file(model / "model.safetensors")
    weights["model.layers.0.self_attn.o_proj.weight"][:, 60] = float("nan")  # columns of TP rank 1 only
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    argv = ["--model", str(model), "-tp", "2", "--prompt-ids", "5,6,7", "--max-new-tokens", "3", "--dtype", "float32"]
    msg = _errors_of(dist_pool_2.run(_main_exit_task, argv), 2)
    assert "model.layers.0.self_attn.o_proj.weight" in msg and f"{model}/model.safetensors holds NaN/inf" in msg
    assert "--skip-finite-check" in msg
    out = tmp_path / "out.json"
    msg = _errors_of(dist_pool_2.run(_main_exit_task, [*argv, "--skip-finite-check", "--json-out", str(out)]), 1)
    assert msg.startswith("request 0: the model produced NaN/inf logits at step 0")
    result = json.loads(out.read_text())
    assert result["outputs"][0]["finish_reason"] == "error" and result["outputs"][0]["output_ids"] == []


def test_cache_memory_and_json_out_checked_before_loading(dist_pool_2, tmp_path):
    base = ["-pcp", "2", "--prompt-ids", "5,6,7", "--max-new-tokens", "3"]
    msg = _errors_of(dist_pool_2.run(_main_exit_task, [*base, "--num-kv-blocks", str(10**12)]), 2)
    assert "the KV cache (1000000000000 blocks x 16 tokens, 4 layers, float32) needs" in msg
    assert "GiB per rank" in msg and "--num-kv-blocks" in msg
    blocked = tmp_path / "file"
    blocked.write_text("")
    msg = _errors_of(dist_pool_2.run(_main_exit_task, [*base, "--json-out", str(blocked / "out.json")]), 2)
    assert msg == f"--json-out {blocked}/out.json: {blocked} is not a directory; choose another path"
    # /proc: permission bits say "writable" (to root too), yet nothing can be created there. Before: the check
    # passed and the write failed after generating, with a raw FileNotFoundError.
    msg = _errors_of(dist_pool_2.run(_main_exit_task, [*base, "--json-out", "/proc/nope/x.json"]), 2)
    assert msg.startswith("--json-out /proc/nope/x.json is not writable (") and "choose another path" in msg
    assert not os.path.exists("/proc/nope")


def test_worker_killed_mid_generation():
    proc = _torchrun(
        2,
        ["-pcp", "2", "-dcp", "1", "--prompt", "a prompt long enough for a few steps", "--max-new-tokens", "16"],
        env_extra={"MEGACP_TEST_KILL_RANK": "1", "MEGACP_TEST_KILL_AT_STEP": "3"},
        timeout=30 + 60,  # --dist-timeout 30 plus start-up: a rank left waiting in a collective would exceed it
    )
    assert proc.returncode != 0
    assert "MEGACP_TEST_KILL_AT_STEP=3: exiting abruptly" in proc.stderr


@pytest.mark.parametrize("flag,value,needle", [
    ("--max-new-tokens", "0", "argument --max-new-tokens: must be an integer >= 1, got 0"),
    ("--max-new-tokens", "2.5", "argument --max-new-tokens: must be an integer >= 1, got '2.5'"),
    ("--cp-kv-cache-interleave-size", "3", "--block-size"),
    ("--top-p", "0", "argument --top-p: must be a finite number in (0.0, 1.0], got 0.0"),
    ("--temperature", "nan", "argument --temperature: must be a finite number >= 0.0, got nan"),
    ("--temperature", "inf", "argument --temperature: must be a finite number >= 0.0, got inf"),
    ("--seed", str(2**70), "argument --seed: must be an integer in"),
    ("--dist-timeout", "0", "argument --dist-timeout: must be a finite number in (0.0, "),
    ("--dist-timeout", "-5", "argument --dist-timeout: must be a finite number"),
    ("--num-kv-blocks", "1e12", "argument --num-kv-blocks: must be an integer >= 1, got '1e12'"),
    ("--block-size", "0", "argument --block-size: must be an integer >= 1, got 0"),
    ("--max-num-seqs", "0", "argument --max-num-seqs: must be an integer >= 1, got 0"),
    ("-tp", "x", "argument --tensor-parallel-size/-tp: must be an integer >= 1, got 'x'"),
    ("--no-such-flag", "1", "unrecognized arguments: --no-such-flag 1"),
    ("--context-transfer", "ring", "argument --context-transfer: invalid choice: 'ring'"),
])
def test_flag_errors_in_process(flag, value, needle, capfd, monkeypatch):
    """Flag values are checked at parse time (NaN, inf, non-integers, out of range), before any process group
    exists, so ``main`` fails in-process with exit code 2 and one line naming the flag."""
    from examples.infer_llama import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["--prompt-ids", "1,2,3", flag, value])
    assert exc.value.code == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[rank 0] error: ")]
    assert len(lines) == 1 and needle in lines[0], err


def test_words_in_messages_stay_words(capfd, monkeypatch):
    """The CLI turns argument names into flags, not the words of a message: ``--device cuda`` without CUDA and
    ``--chat`` with the tiny model (before: "no CUDA --device is visible", "a --chat template")."""
    from examples.infer_llama import cli_message, main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        main(["--prompt", "hi", "--chat"])
    assert "[rank 0] error: --chat needs a --model directory with tokenizer.json and a chat template " \
           "(chat_template.jinja or tokenizer_config.json's chat_template); drop --chat otherwise" \
           in capfd.readouterr().err
    assert cli_message("--device cuda but no CUDA device is visible; use --device cpu") == \
        "--device cuda but no CUDA device is visible; use --device cpu"
    assert cli_message("seed=3 and the seed, dtype='float32' not dtype") == \
        "--seed 3 and the seed, --dtype 'float32' not dtype"
    if not torch_cuda_available():
        with pytest.raises(SystemExit):
            main(["--prompt", "hi", "--device", "cuda"])
        assert "error: --device cuda but no CUDA device is visible; use --device cpu" in capfd.readouterr().err


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def test_cli_names_its_flags_for_library_arguments():
    """Library errors name Python arguments; the CLI says the flag instead (first as --long/-short, then short),
    ``name=value`` as ``flag value``."""
    from examples.infer_llama import cli_message
    from megacp.config import validate_moe_data_parallel

    with pytest.raises(ValueError) as err:
        validate_moe_data_parallel(True, 2)
    assert str(err.value).startswith("data_parallel_size=2 is not supported for MoE models")
    msg = cli_message(str(err.value))
    assert msg.startswith("--data-parallel-size/-dp 2 is not supported for MoE models") and "use -dp 1 " in msg
    assert cli_message("world_size=6 but ...; launch with world_size=4, or use tensor_model_parallel_size=3") == \
        "--nproc-per-node 6 but ...; launch with --nproc-per-node 4, or use --tensor-parallel-size/-tp 3"
    assert cli_message("model_dir='/a b/c' is not a directory; raise num_kv_blocks to 5 (block_size=16)") == \
        "--model '/a b/c' is not a directory; raise --num-kv-blocks to 5 (--block-size 16)"


def test_bad_decode_gemv_switch_is_named_before_loading(capfd, monkeypatch):
    """``MEGACP_DECODE_GEMV`` with an unknown projection: exit 2 in ``validate`` (no process group, no model), one
    line naming the variable and the valid projections."""
    from examples.infer_llama import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("MEGACP_DECODE_GEMV", "o,mlp")
    with pytest.raises(SystemExit) as exc:
        main(["--prompt-ids", "1,2,3"])
    assert exc.value.code == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[rank 0] error: ")]
    assert len(lines) == 1 and "MEGACP_DECODE_GEMV='o,mlp': unknown projection(s) ['mlp']" in lines[0], err
    assert "qkv, o, gate_up, down" in lines[0] and "could not load" not in lines[0], err
