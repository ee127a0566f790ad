"""examples/train_cp.py under real ``torchrun`` (the command the docs give): the tiny Llama fine-tuned for 3 steps on
a 1024-token sequence split over 2 PCP ranks has, at every step, the loss and the gradients of the same steps run
unsharded on one process (plain PyTorch on the Hugging Face tensors) within 1e-4 relative, its loss falls, and the
gradients without ``allreduce_grads`` differ (the negative control the script itself checks).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_cp_pcp2_matches_one_rank():
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           os.path.join(REPO, "examples", "train_cp.py"), "-pcp", "2"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    steps = re.findall(r"^step (\d): loss (\S+) \(one rank: (\S+)\), max relative gradient difference (\S+)$",
                       proc.stdout, re.M)
    assert [int(s[0]) for s in steps] == [0, 1, 2], proc.stdout
    losses = [float(s[1]) for s in steps]
    for _, loss, ref, err in steps:
        assert abs(float(loss) - float(ref)) <= 1e-5 * float(ref) and float(err) <= 1e-4, proc.stdout
    assert losses[2] < losses[1] < losses[0], losses
    (control,) = re.findall(r"without allreduce_grads, step 0's gradients would differ by (\S+)", proc.stdout)
    assert float(control) > 1e-2, proc.stdout
