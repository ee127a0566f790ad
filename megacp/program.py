"""Leaving a ``torchrun`` program: ``exit_after(main)`` runs ``main`` and exits with its code without finalizing
Python.

gloo's worker threads may still be releasing the last collectives' tensors after the process group is destroyed;
that takes the GIL, and once Python is finalizing, taking it ends the thread inside a noexcept destructor:
std::terminate, SIGABRT, "terminate called without an active exception" after a run that succeeded (CPU, gloo:
about 1 run in 4 of a 2-rank ``-pcp 2`` example on 2026-12-03; the 4-rank ``examples/own_model.py`` too). A program
whose ranks talk over gloo ends cleanly with ``if __name__ == "__main__": exit_after(main)``: its output is
flushed first, and ``atexit`` handlers do not run (close files and JSON in ``main``).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, NoReturn


def exit_after(main: Callable[[], Any]) -> NoReturn:
    """Run ``main()`` and leave with its exit code (an int it returns, or ``SystemExit``'s; ``None`` is 0, a message
    is printed to stderr and gives 1, as Python does) through ``os._exit`` after flushing stdout and stderr. Ctrl-C
    prints one line and exits 130; any other exception prints its traceback and exits 1."""
    try:
        result = main()
        code = result if isinstance(result, int) else 0
    except SystemExit as e:  # argparse's errors and a program's own exits: their line is out
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):  # sys.exit("message"): printed as Python does
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C (each torchrun rank gets it): one line, the shell's 128 + SIGINT
        print("interrupted (Ctrl-C)", file=sys.stderr)
        code = 130
    except BaseException:  # noqa: BLE001  (print it as Python would, then leave the same way)
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


__all__ = ["exit_after"]
