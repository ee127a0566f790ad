"""Small all-gathers through PyTorch symmetric memory: the latency path for decode's collectives on NVLink.

A decode step moves a few KiB per collective, so a collective costs its latency, not its bandwidth. Measured on two
H200s inside CUDA graphs (``scripts/symm_mem_probe.py``, docs/benchmarks.md): NCCL's ``all_gather`` of 4–256 KiB takes
15–20 µs a call, a one-shot read of every peer's symmetric buffer 7–11 µs; DCP decode makes two such gathers per
layer (the queries, the packed partials).

How: per ``(numel, dtype)`` every rank owns a symmetric buffer ``[W, n]`` whose rows stay zero except its own. A
gather copies ``x`` into that row and ``torch.ops.symm_mem.one_shot_all_reduce`` sums all peers' buffers over
NVLink into a fresh tensor: a sum of zero-padded rows is their concatenation, bit for bit (``x + 0 = x`` for every
float, ``-inf`` and NaN included). The op waits for every peer before it reads and again after, so the next call may
overwrite the row.

Every decision here is the same on all ranks of the group: buffers are made on the first gather of a size (all
ranks make the same calls in the same order), only outside CUDA-graph capture, and whether each rank could make
one is agreed by a MIN all-reduce; on any failure the path turns off for the group, everywhere, and NCCL is used.
``MEGACP_SYMM_MEM=0`` turns it off (read once, by ``initialize_model_parallel``, and agreed over the ranks).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

ENV = "MEGACP_SYMM_MEM"
MAX_BYTES = 256 * 1024  # per rank's input: above this NCCL's bandwidth path wins or ties (the probe)
_DTYPES = (torch.float32, torch.bfloat16)  # what one_shot_all_reduce sums
_ALIGN = 16  # bytes: rows start on a 16-byte boundary (the op's vector loads)


def enabled_by_env() -> bool:
    """``MEGACP_SYMM_MEM`` is not ``0``. Read when model parallelism is initialised (``initialize_model_parallel``
    agrees on it over the world, so every rank takes the same path), not per gather."""
    return os.environ.get(ENV, "1") != "0"


def applies(backend: str | None, x: torch.Tensor, world_size: int, enabled: bool | None = None) -> bool:
    """Whether a gather of ``x`` over an NCCL group of ``world_size`` ranks may take this path (the same answer on
    every rank: it depends on the group, the shape and ``enabled``, the group's agreed switch; None reads
    ``enabled_by_env()``)."""
    if enabled is None:
        enabled = enabled_by_env()
    return (enabled and backend == "nccl" and x.is_cuda and x.dtype in _DTYPES and 1 < world_size <= 8
            and 0 < x.numel() * x.element_size() <= MAX_BYTES)


class SymmetricGather:
    """The symmetric buffers of one group. ``agree(ok)`` is the group's MIN all-reduce of a flag (True if every
    rank's ``ok`` is)."""

    def __init__(self, group_name: str, world_size: int, rank_in_group: int, agree: Callable[[bool], bool]) -> None:
        self.group_name, self.world_size, self.rank_in_group = group_name, world_size, rank_in_group
        self._agree = agree
        self._buffers: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        self.enabled = True
        self.num_gathers = 0  # gathers this path served (tests check it was taken)

    def gather(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's contiguous ``x`` stacked in group order, ``[W·n0, *x.shape[1:]]`` like
        ``all_gather_into_tensor``; None when this path cannot serve it (then the caller uses NCCL)."""
        row = self._row_buffer(x)
        if row is None:
            return None
        n = x.numel()
        row[self.rank_in_group, :n].copy_(x.reshape(-1))
        summed = torch.ops.symm_mem.one_shot_all_reduce(row.view(-1), "sum", self.group_name)
        self.num_gathers += 1
        rows = summed.view(self.world_size, -1)
        rows = rows if rows.shape[1] == n else rows[:, :n].contiguous()
        return rows.view(self.world_size * x.shape[0], *x.shape[1:])

    def _row_buffer(self, x: torch.Tensor) -> torch.Tensor | None:
        key = (x.numel(), x.dtype, x.device)
        buf = self._buffers.get(key)
        if buf is not None or not self.enabled:
            return buf
        if x.is_cuda and torch.cuda.is_current_stream_capturing():  # rendezvous is a host collective: not in a capture
            return None
        per = _ALIGN // x.element_size()
        width = -(-x.numel() // per) * per
        buf, made = None, False
        try:
            import torch.distributed._symmetric_memory as symm_mem

            buf = symm_mem.empty(self.world_size * width, dtype=x.dtype, device=x.device)
            buf.zero_()
            made = hasattr(torch.ops.symm_mem, "one_shot_all_reduce")
        except Exception:  # noqa: BLE001  (no symmetric memory here: NCCL for this group, on every rank)
            made = False
        if not self._agree(made):
            self.enabled = False
            return None
        try:
            symm_mem.rendezvous(buf, self.group_name)
            ok = True
        except Exception:  # noqa: BLE001
            ok = False
        if not self._agree(ok):
            self.enabled = False
            return None
        self._buffers[key] = buf.view(self.world_size, width)
        return self._buffers[key]

    def release(self) -> None:
        """Drop the buffers (before the group is destroyed)."""
        self._buffers.clear()
        self.enabled = False
