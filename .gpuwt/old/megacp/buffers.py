"""Persistent host↔device buffers: how step data crosses over without allocating or synchronising.

A step's metadata, the block table and the sampled ids are small integer tensors that the host writes and the device
reads (or the reverse). Allocating them per step costs a pinned allocation (slow, and a sync on some drivers) plus a
copy per tensor; a copy from pageable memory synchronises the stream. So each lives in a ``CpuGpuBuffer``: a host
tensor (pinned on CUDA) and a device tensor of the same shape, preallocated at the engine's maxima, with one
non-blocking copy per step. Fixed device addresses are also what lets a CUDA graph replay read this step's values.

**The one rule.** A non-blocking copy reads the pinned host memory when the stream gets to it, not when it is
enqueued, so the host must not overwrite the buffer before that copy ran. ``CpuGpuBuffer`` records an event after
each copy and ``host()`` waits for it before handing the host tensor out for writing: free when the step's read-back
has already synchronised (the engine's usual case), correct when it has not (a chunked-prefill step that samples
nothing). On the CPU host and device tensors are the same tensor and nothing is copied.
"""

from __future__ import annotations

import torch
from torch import Tensor


class CpuGpuBuffer:
    """A preallocated host tensor and its device twin: ``host()`` to write, ``to_device(n)`` to publish rows.

    # shape: [N, ...] (rows along dim 0), any dtype; device "cpu" makes host and device the same tensor
    """

    def __init__(self, *shape: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.on_cpu = self.device.type == "cpu"
        pin = self.device.type == "cuda"
        self._host = torch.zeros(*shape, dtype=dtype, pin_memory=pin)
        self.gpu = self._host if self.on_cpu else torch.zeros(*shape, dtype=dtype, device=self.device)
        self._copied: torch.cuda.Event | None = None

    @property
    def cpu(self) -> Tensor:
        """The host tensor, for reading (no wait)."""
        return self._host

    def host(self) -> Tensor:
        """The host tensor, safe to overwrite: waits until the previous ``to_device`` copy has read it."""
        if self._copied is not None:
            if not self._copied.query():  # usually done already: the step's read-back synchronised
                self._copied.synchronize()
            self._copied = None
        return self._host

    def to_device(self, rows: int | None = None, start: int = 0) -> Tensor:
        """Copy rows ``[start, rows)`` (``rows`` None: to the end) to the device, non-blocking.

        Returns the device view of rows ``[0, rows)``.
        """
        n = self._host.shape[0] if rows is None else rows
        if self.on_cpu or n <= start:
            return self.gpu[:n]
        self.gpu[start:n].copy_(self._host[start:n], non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        return self.gpu[:n]

    def to_host(self, device_values: Tensor) -> Tensor:
        """Copy ``device_values`` [n, ...] into the host tensor's first rows, blocking until they are there.

        The one read-back of a step (the sampled ids): a copy into pinned memory plus an event wait, instead of
        ``.tolist()`` on a device tensor (a pageable copy and a full synchronisation).
        """
        n = device_values.shape[0]
        host = self.host()[:n]
        if self.on_cpu:
            host.copy_(device_values)
            return host
        host.copy_(device_values, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        return host


class StagingArena:
    """A growable flat int32 ``CpuGpuBuffer`` that packs one step's integer tensors for ONE copy.

    ``add(name, values)`` appends an int32 or int64 host tensor (int64 segments are 8-byte aligned and viewed back
    as int64); ``publish()`` copies the used prefix once and returns ``{name: device view in its shape}``. Used for
    the metadata of prefill steps, whose size varies with the schedule; decode metadata lives in a fixed buffer
    (``AttentionMetadataBuilder``'s, ``megacp.layers.metadata_builder``) so that CUDA graphs see fixed addresses.
    """

    def __init__(self, device: torch.device | str, capacity: int = 1 << 14) -> None:
        self.device = torch.device(device)
        self._buf = CpuGpuBuffer(capacity, dtype=torch.int32, device=self.device)
        self._segments: list[tuple[str, int, int, torch.dtype, torch.Size]] = []
        self._pending: list[Tensor] = []
        self._used = 0

    def add(self, name: str, values: Tensor) -> None:
        if values.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"StagingArena.add({name!r}): int32 or int64 tensors only, got {values.dtype}")
        words = values.numel() * (2 if values.dtype == torch.int64 else 1)
        start = self._used + (self._used % 2 if values.dtype == torch.int64 else 0)  # int64 needs 8-byte alignment
        self._segments.append((name, start, words, values.dtype, values.shape))
        self._pending.append(values)
        self._used = start + words

    def publish(self) -> dict[str, Tensor]:
        """One host→device copy of everything added since the last ``publish``; device views by name."""
        if self._used > self._buf.gpu.shape[0]:  # grow (rare: a larger prefill step than any before)
            self._buf = CpuGpuBuffer(max(self._used, 2 * self._buf.gpu.shape[0]), dtype=torch.int32,
                                     device=self.device)
        host = self._buf.host()
        for (name, start, words, dtype, shape), values in zip(self._segments, self._pending):
            host[start : start + words].view(dtype).copy_(values.reshape(-1))
        dev = self._buf.to_device(self._used)
        out = {name: dev[start : start + words].view(dtype).view(shape)
               for name, start, words, dtype, shape in self._segments}
        self._segments, self._pending, self._used = [], [], 0
        return out
