"""``megacp.program.exit_after``: a program's exit code, flushed output and no Python finalization (atexit handlers
do not run), for ``main`` returning a code, returning None, raising SystemExit and raising an error. Each case runs
in a subprocess, since the helper ends the process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = """
import atexit, sys
from megacp.program import exit_after
atexit.register(lambda: print("atexit ran", flush=True))
def main():
    print("out line", end="")            # unflushed: exit_after must flush it
    print("err line", file=sys.stderr, end="")
    {body}
exit_after(main)
"""


@pytest.mark.parametrize("body,code,tail", [
    ("return 3", 3, ""),
    ("return None", 0, ""),
    ("raise SystemExit(2)", 2, ""),
    ("raise SystemExit('usage: bad flag')", 1, "usage: bad flag"),
    ("raise RuntimeError('boom')", 1, "RuntimeError: boom"),
    ("raise KeyboardInterrupt", 130, "interrupted (Ctrl-C)"),
])
def test_exit_after(body, code, tail):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", PROGRAM.format(body=body)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == code, (run.stdout, run.stderr)
    assert run.stdout == "out line", run.stdout  # flushed, and atexit did not run
    assert run.stderr.startswith("err line"), run.stderr
    assert run.stderr.rstrip().endswith(tail)
