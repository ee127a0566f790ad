"""The CP attention matrix on one GPU (scripts/gpu_cp_matrix.py under torchrun, 8 gloo ranks on cuda:0).

Skipped without CUDA. The script checks the numbers (float32 within the CPU test's tolerance, bfloat16 within twice
single-device SDPA's error); here we check that it ran every case, passed, and that bfloat16 really went through the
fused kernels and the Triton paged decode rather than the torch fallback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_cp_matrix.py")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cp_attention_matrix_on_one_gpu(tmp_path):
    out = tmp_path / "gpu_cp_matrix.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "8", SCRIPT, "--device", "cuda",
           "--json-out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    summary = json.loads(out.read_text())
    assert summary["cases"] == 10 * 3 * 2 and summary["failed"] == 0
    bf16 = [r for r in summary["rows"] if r["dtype"] == "bfloat16"]
    assert all(r["kernels"].get("torch fallback", 0) == 0 for r in bf16), "bfloat16 fell back to the torch reference"
    assert sum(r["kernels"].get(k, 0) for r in bf16 for k in ("cudnn", "flash", "te")) > 0
    if summary["env"]["triton_paged_decode"]:
        assert all(r["kernels"].get("triton paged decode", 0) > 0 for r in bf16)
