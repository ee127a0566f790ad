"""examples/own_model.py under real ``torchrun`` on CPU: a 2-layer GPT of its own (learned positions, LayerNorm, GELU
MLP) built on megacp's layers and a ``KVSession`` gives the logits of its unsharded plain-PyTorch reference within
1e-5 (fp32) for a prefill (every position), a decode, and a chunk over cached context mixed with a decode and a new
prompt, under pcp 2, tp 2·pcp 2 and tp 2·pcp 2·dcp 2 (interleave 2). A negative control shows the check can fail.
The pcp 2 and dcp 2 runs use ``--autograd``: the same steps with gradients on, each step's logits backpropagated
(decode at cp world > 1 once failed there: an in-place write into a packed buffer under autograd).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "own_model.py")
TIMEOUT_S = 300  # a loaded 2-core box; each run takes seconds
STEPS = ("prefill", "decode", "chunk over cached context + decode + new prompt")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=REPO)


def _errors(stdout: str) -> dict[str, float]:
    return {step: float(err) for step, err in re.findall(r"^(.*): max \|logits - reference\| = (\S+)$", stdout, re.M)}


@pytest.mark.parametrize("nproc,flags", [
    (2, ["-pcp", "2", "--autograd"]),
    (4, ["-tp", "2", "-pcp", "2"]),
    (4, ["-tp", "2", "-pcp", "2", "-dcp", "2", "--cp-kv-cache-interleave-size", "2", "--autograd"]),
], ids=["pcp2-autograd", "tp2-pcp2", "tp2-pcp2-dcp2-interleave2-autograd"])
def test_own_model_matches_reference_under_torchrun(nproc, flags):
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", EXAMPLE,
                 *flags])
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    errors = _errors(proc.stdout)
    assert set(errors) == set(STEPS), proc.stdout
    assert all(err <= 1e-5 for err in errors.values()), errors


def test_own_model_check_fails_when_it_should():
    """Negative control: with a tolerance below fp32 rounding the same script reports failure (exit 1)."""
    proc = _run([sys.executable, EXAMPLE, "--atol", "1e-12"])
    assert proc.returncode == 1 and "FAIL: logits differ from the reference" in proc.stderr, proc.stderr
    assert set(_errors(proc.stdout)) == set(STEPS)
