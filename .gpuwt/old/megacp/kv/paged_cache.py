"""One layer's paged K/V cache on one rank (DESIGN §2).

Physical layout ``[num_blocks, block_size, num_kv_heads, head_dim]``; slot ``s`` is ``(s // block_size,
s % block_size)``. Under CP the rank holds only its share of each sequence, densely in local order (see
``megacp.kv.layout``): local index ``j`` of a request is at slot ``layout.local_slots(row, j, block_size)``.

Two ways to write, one store: ``write_rows`` takes the rows to store and their slots, precomputed and checked on the
host (``write_plan``, called by the metadata builders), and never synchronises: that is what the attention layers
use every step. ``write`` takes a full slot mapping (``-1`` = skip) for convenience: it copies the mapping to the host
(one read-back when it lives on a device), plans and range-checks it there with ``write_plan``, then calls
``write_rows``. ``write_rows`` range-checks its slots on CPU (free: there is no device to wait for) and, with
``MEGACP_DEBUG_CHECKS=1`` (``config.debug_checks``, read once), on CUDA too (a sync each; host-side, no collective, so
ranks need not agree on it); without it an out-of-range slot on CUDA trips a device assert.
"""

from __future__ import annotations

import torch
from torch import LongTensor, Tensor

from megacp.config import debug_checks


def write_plan(slot_mapping: Tensor) -> tuple[LongTensor | None, LongTensor]:
    """The rows of a host slot mapping to store (``-1`` = skip) and their slots, for ``PagedKVCache.write_rows``.

    # slot_mapping: [T] long on the CPU -> (rows [N] long, or None when every row is stored; slots [N] long, all >= 0)
    """
    keep = slot_mapping >= 0
    if bool(keep.all()):
        return None, slot_mapping
    rows = torch.nonzero(keep).flatten()
    return rows, slot_mapping[rows]


def check_slots(slots: Tensor, num_blocks: int, block_size: int) -> None:
    """ValueError unless every slot is one of ``num_blocks·block_size`` cache slots or the null slot after them."""
    limit = num_blocks * block_size + 1  # the null slot is valid
    if slots.numel() and not bool(((slots >= 0) & (slots < limit)).all()):
        bad = int(slots[(slots < 0) | (slots >= limit)][0])
        raise ValueError(
            f"slot {bad} is outside this cache's {num_blocks * block_size} slots "
            f"({num_blocks} blocks of {block_size}); the block table and cache disagree on num_blocks"
        )


class PagedKVCache:
    """K and V block pools of one attention layer: ``.k``, ``.v`` [num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if value < 1:
                raise ValueError(f"PagedKVCache {name}={value} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.debug_checks = debug_checks()
        # One block more than asked for, at the end: the "null block". Decode rows this rank does not store (and
        # the padding rows of a CUDA-graph batch) write their K/V to its first slot, ``null_slot``, so a decode
        # write is one fixed-shape copy of every row. ``k``/``v`` are views without it.
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        self._k_all = torch.zeros(shape, dtype=dtype, device=device)
        self._v_all = torch.zeros(shape, dtype=dtype, device=device)
        self.k = self._k_all[:num_blocks]
        self.v = self._v_all[:num_blocks]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def null_slot(self) -> int:
        """A slot outside the real blocks that ``write_rows`` accepts and nothing ever reads (see ``__init__``)."""
        return self.num_blocks * self.block_size

    @property
    def storage(self) -> tuple[Tensor, Tensor]:
        """K and V ``[num_blocks + 1, block_size, Hkv, D]`` with the null block: what a kernel writing flat slots
        (``null_slot`` included) takes, e.g. ``megacp.ops.decode_fused.rope_and_cache_write``."""
        return self._k_all, self._v_all

    @property
    def num_tokens_capacity(self) -> int:
        """Token slots on this rank: ``num_blocks·block_size``. The CP group as a whole holds ``W`` times as many
        tokens (``kv_capacity_tokens``), since each token is stored on one rank only."""
        return self.num_blocks * self.block_size

    def write(self, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
        """Store tokens at their slots; tokens with slot ``-1`` (owned by another CP rank, or padding) are skipped.

        k, v: [T, Hkv, D]; slot_mapping: [T] int (from ``BlockTable.compute_slot_mapping``).
        """
        self._check_kv(k, v)
        slots = torch.as_tensor(slot_mapping, dtype=torch.long).cpu().reshape(-1)
        if slots.numel() != k.shape[0]:
            raise ValueError(f"slot_mapping has {slots.numel()} entries for {k.shape[0]} tokens")
        rows, slots = write_plan(slots)
        self.check_slots(slots)  # on the host: free
        self.write_rows(k, v, None if rows is None else rows.to(self.device), slots.to(self.device))

    def write_rows(self, k: Tensor, v: Tensor, rows: Tensor | None, slots: Tensor) -> None:
        """Store ``k[rows]``, ``v[rows]`` at ``slots`` without reading anything back from the device.

        k, v: [T, Hkv, D]; rows: [N] long indices into T (``None``: all T rows, in order); slots: [N] long, every
        one a valid slot of this cache or ``null_slot`` (the caller computed them on the host, e.g. the step's
        attention metadata).
        """
        self._check_kv(k, v)
        k, v = k.detach(), v.detach()
        if rows is not None:
            k, v = k.index_select(0, rows), v.index_select(0, rows)
        if k.shape[0] != slots.shape[0]:
            raise ValueError(f"write_rows: {k.shape[0]} rows for {slots.shape[0]} slots; pass one slot per row")
        if slots.device.type == "cpu" or self.debug_checks:
            self.check_slots(slots)
        self._store(k, v, slots)

    def _store(self, k: Tensor, v: Tensor, slots: Tensor) -> None:
        flat_k = self._k_all.view(-1, self.num_kv_heads, self.head_dim)
        flat_v = self._v_all.view(-1, self.num_kv_heads, self.head_dim)
        flat_k.index_copy_(0, slots, k.to(self.dtype))
        flat_v.index_copy_(0, slots, v.to(self.dtype))

    def check_slots(self, slots: Tensor) -> None:
        """ValueError unless every slot is one of this cache's (or the null slot); reads ``slots`` on the host."""
        check_slots(slots, self.num_blocks, self.block_size)

    def _check_kv(self, k: Tensor, v: Tensor) -> None:
        expected = (self.num_kv_heads, self.head_dim)
        if k.shape != v.shape or k.dim() != 3 or tuple(k.shape[1:]) != expected:
            raise ValueError(
                f"PagedKVCache.write wants k, v of shape [T, {self.num_kv_heads}, {self.head_dim}], "
                f"got {tuple(k.shape)} and {tuple(v.shape)}"
            )
