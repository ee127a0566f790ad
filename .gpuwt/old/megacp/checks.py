"""Checks of user-supplied values: scalar arguments and generation requests. Pure, no collectives.

Every function raises ``ValueError`` with one message naming the argument (or, from the CLI, the flag) and what a
valid value looks like. Being pure, they give the same verdict on every rank from the same inputs, so a bad value or
request is rejected everywhere before any collective and the ranks never fall out of step.

- ``check_int`` / ``check_real`` / ``check_bool``: one scalar (type, finiteness, range); ``name`` is the Python
  argument (``"SamplingParams(max_new_tokens)"``) or the CLI flag (``"--max-new-tokens"``).
- ``validate_prompt_ids``: token ids are integers in ``[0, vocab_size)`` (``megacp.session.validate_requests``, what
  ``LLMEngine.generate`` calls first, adds that every prompt fits the model and the KV cache).
- ``kv_cache_bytes`` / ``check_memory``: a KV cache's size against the device's memory.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Sequence


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None, hint: str = "") -> int:
    """``value`` as an ``int`` if it is an integer (not a bool, not 2.5) in ``[minimum, maximum]``; else ValueError.

    ``name`` starts the message; ``""`` gives a bare "must be ..." (what argparse prefixes with the flag).
    """
    name = f"{name} " if name else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}must be an integer{_range(minimum, maximum)}, got {value!r}{_hint(hint)}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name}must be an integer{_range(minimum, maximum)}, got {value}{_hint(hint)}")
    return value


def check_real(name: str, value: Any, minimum: float | None = None, maximum: float | None = None,
               min_inclusive: bool = True, hint: str = "") -> float:
    """``value`` as a finite ``float`` in the given range (``min_inclusive=False``: strictly above ``minimum``).

    NaN and ±inf are always rejected (``nan < 0`` is False, so a plain range test would let NaN through).
    """
    name = f"{name} " if name else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}must be a number{_range(minimum, maximum, min_inclusive)}, got {value!r}{_hint(hint)}")
    value = float(value)
    too_low = minimum is not None and (value < minimum if min_inclusive else value <= minimum)
    if not math.isfinite(value) or too_low or (maximum is not None and value > maximum):
        raise ValueError(
            f"{name}must be a finite number{_range(minimum, maximum, min_inclusive)}, got {value!r}{_hint(hint)}"
        )
    return value


def check_bool(name: str, value: Any) -> bool:
    name = f"{name} " if name else ""
    if not isinstance(value, bool):
        raise ValueError(f"{name}must be True or False, got {value!r}")
    return value


def _range(minimum: float | None, maximum: float | None, min_inclusive: bool = True) -> str:
    low = "" if minimum is None else f"{'>=' if min_inclusive else '>'} {minimum}"
    if maximum is None:
        return f" {low}" if low else ""
    if minimum is None:
        return f" <= {maximum}"
    return f" in {'[' if min_inclusive else '('}{minimum}, {maximum}]"


def _hint(hint: str) -> str:
    return f" ({hint})" if hint else ""


# ------------------------------------------------------------------------------------------------ requests
def validate_prompt_ids(prompt_ids: Any, vocab_size: int, name: str = "prompt_ids") -> list[list[int]]:
    """``prompt_ids`` (a sequence of sequences of token ids) as ``list[list[int]]``; ValueError naming the first bad
    entry (``prompt_ids[1][3]``): not a list of lists, an empty prompt, a non-integer id or one outside the vocabulary.

    Integers of any kind (``int``, NumPy/0-d torch integers) are accepted; bools, floats and strings are not.
    """
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
        raise ValueError(f"{name} must be a list of prompts, each a list of token ids, got {type(prompt_ids).__name__}")
    prompts = []
    for i, ids in enumerate(prompt_ids):
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__") or not hasattr(ids, "__iter__"):
            raise ValueError(
                f"{name}[{i}] must be a list of token ids, got {type(ids).__name__} (wrap a single prompt: [ids])"
            )
        if len(ids) == 0:
            raise ValueError(f"{name}[{i}] is empty; every prompt needs at least one token")
        out = []
        for j, t in enumerate(ids):
            if isinstance(t, (bool, float, str, bytes)):
                raise ValueError(f"{name}[{i}][{j}] = {t!r} is not an integer token id")
            try:
                tok = operator.index(t)
            except TypeError:
                raise ValueError(f"{name}[{i}][{j}] = {t!r} is not an integer token id") from None
            if not 0 <= tok < vocab_size:
                raise ValueError(
                    f"{name}[{i}][{j}] = {tok} is outside the model's vocabulary [0, {vocab_size}); "
                    f"token ids must come from the model's tokenizer"
                )
            out.append(tok)
        prompts.append(out)
    return prompts


# ------------------------------------------------------------------------------------------------ memory
GiB = 1 << 30


def kv_cache_bytes(num_kv_blocks: int, block_size: int, num_local_kv_heads: int, head_dim: int, num_layers: int,
                   itemsize: int, max_num_seqs: int = 0, max_blocks_per_seq: int = 0, num_tensors: int = 2) -> int:
    """Bytes one rank allocates for its paged caches (all layers: K and V, or with ``num_tensors=1`` MLA's latent
    rows of width ``head_dim``) plus its block table (device and host copies, int64)."""
    cache = num_tensors * num_layers * num_kv_blocks * block_size * num_local_kv_heads * head_dim * itemsize
    return cache + 2 * 8 * max_num_seqs * max_blocks_per_seq


def _local_ranks() -> int:
    import os

    try:
        return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def available_memory(device: Any) -> tuple[int, int, str] | None:
    """``(bytes available, ranks sharing them, where)`` for a new allocation on ``device``; None if unknown.

    CUDA: the device's free memory (``torch.cuda.mem_get_info``), for this rank alone. CPU: ``MemAvailable`` of
    ``/proc/meminfo``, shared by the ``LOCAL_WORLD_SIZE`` ranks torchrun started on this host.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), 1, f"is free on {device}"
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, _local_ranks(), "of host RAM is available"
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(need_bytes: int, device: Any, what: str, fix: str) -> None:
    """ValueError if ``need_bytes`` per rank cannot fit in what ``available_memory(device)`` reports (skipped when
    unknown); the message gives the GiB needed and available, and ``fix`` (the arguments or flags to lower)."""
    avail = available_memory(device)
    if avail is None:
        return
    free, ranks, where = avail
    if need_bytes * ranks <= free:
        return
    per_host = f" x {ranks} ranks on this host = {need_bytes * ranks / GiB:.2f} GiB" if ranks > 1 else ""
    raise ValueError(
        f"{what} needs {need_bytes / GiB:.2f} GiB per rank{per_host}, but only {free / GiB:.2f} GiB {where}; {fix}"
    )
