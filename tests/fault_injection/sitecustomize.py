"""Test-only fault injection for the example's ranks (tests/test_example_errors.py puts this folder on PYTHONPATH).

``MEGACP_TEST_KILL_RANK=r MEGACP_TEST_KILL_AT_STEP=s`` make world rank ``r`` exit abruptly (``os._exit(9)``) before
its engine's step ``s``, or stop itself (SIGSTOP) with ``MEGACP_TEST_KILL_HOW=stop``. Python imports
``sitecustomize`` at start-up, so the example and the library carry no test hook: this wraps ``LLMEngine._run_step``.
"""

import os
import signal
import sys

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
