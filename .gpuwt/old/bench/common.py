"""Shared bits of the benchmarks: CUDA timing, environment record, JSON output."""

from __future__ import annotations

import datetime
import json
import statistics
import sys
from typing import Any, Callable

import torch


def time_ms(fn: Callable[[], Any], warmup: int = 2, reps: int = 10) -> float:
    """Median wall time of ``fn`` on the GPU in milliseconds (CUDA events around each call, after warm-up)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), best of 5: the card's practical limit."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / best


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    from megacp.ops import available_backends

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": available_backends("cuda") if torch.cuda.is_available() else [],
        "argv": sys.argv,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    try:  # version from the package metadata: importing TE itself is what backends_cuda guards
        from importlib.metadata import version

        info["transformer_engine"] = version("transformer_engine")
    except Exception:  # noqa: BLE001
        info["transformer_engine"] = None
    if torch.cuda.is_available():
        from megacp.ops.backends_cuda import te_unavailable_reason

        info["te_unavailable_reason"] = te_unavailable_reason()
    return info


def emit(result: dict[str, Any], path: str | None) -> None:
    """Print the result as JSON (and write it to ``path`` if given)."""
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (see bench/README.md)")
