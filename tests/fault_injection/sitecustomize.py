"""Test-only fault injection for the example's ranks (tests/test_example_errors.py puts this folder on PYTHONPATH).

``MEGACP_TEST_KILL_RANK=r MEGACP_TEST_KILL_AT_STEP=s`` make world rank ``r`` exit abruptly (``os._exit(9)``) before
its engine's step ``s``, or stop itself (SIGSTOP) with ``MEGACP_TEST_KILL_HOW=stop``. Python imports
``sitecustomize`` at start-up, so the example and the library carry no test hook: this wraps ``LLMEngine._run_step``.
``MEGACP_TEST_ANNOUNCE_STEP=s`` makes every rank print ``[rank r] at step s`` before that step (a test then knows the
generation is running). ``MEGACP_TEST_BLOCK_IMPORTS=numpy,tokenizers`` makes those packages fail to import, as in a
minimal install (``pip install torch && pip install .``) that lacks them.
"""

import importlib.abc
import os
import signal
import sys


class _Blocked(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (MEGACP_TEST_BLOCK_IMPORTS)", name=fullname)
        return None


_blocked = {n for n in os.environ.get("MEGACP_TEST_BLOCK_IMPORTS", "").split(",") if n}
if _blocked:
    sys.meta_path.insert(0, _Blocked(_blocked))

_announce = os.environ.get("MEGACP_TEST_ANNOUNCE_STEP")
if _announce is not None and os.environ.get("RANK") is not None:  # a rank, not the launcher
    from megacp.engine import LLMEngine

    _step_of = LLMEngine._run_step
    _seen = [0]

    def _announcing_step(self, *args, **kwargs):
        if _seen[0] == int(_announce):
            # one write with its newline: a signal handler's line (SIGTERM tests) must not land between the two
            # writes print() makes (seen once: "[rank 1] at step 3[rank 1] interrupted ...")
            sys.stderr.flush()
            os.write(2, f"[rank {os.environ.get('RANK')}] at step {_announce}\n".encode())
        _seen[0] += 1
        return _step_of(self, *args, **kwargs)

    LLMEngine._run_step = _announcing_step

_rank, _step = os.environ.get("MEGACP_TEST_KILL_RANK"), os.environ.get("MEGACP_TEST_KILL_AT_STEP")
if _rank is not None and _step is not None and os.environ.get("RANK") == _rank:
    from megacp.engine import LLMEngine

    _original = LLMEngine._run_step
    _calls = [0]

    def _run_step(self, *args, **kwargs):
        if _calls[0] == int(_step):
            stop = os.environ.get("MEGACP_TEST_KILL_HOW", "exit") == "stop"
            how = "stopping (SIGSTOP)" if stop else "exiting abruptly"
            print(f"[rank {_rank}] MEGACP_TEST_KILL_AT_STEP={_step}: {how}", file=sys.stderr, flush=True)
            if stop:
                os.kill(os.getpid(), signal.SIGSTOP)
            else:
                os._exit(9)
        _calls[0] += 1
        return _original(self, *args, **kwargs)

    LLMEngine._run_step = _run_step
