"""CP-aware block table: virtual block ids per request, and token -> local cache slot (DESIGN §2).

Every CP rank keeps the same table (the scheduler's virtual block ids); what differs per rank is which tokens it
owns. ``compute_slot_mapping`` turns (request, position) pairs into this rank's physical slots, ``-1`` where another
CP rank stores the token, ready for ``PagedKVCache.write``.

The table lives on the host (every write, lookup and check) and on ``device`` (for kernels): ``commit`` copies the
rows changed since the last commit, once per step, so building a step never reads the device back (a read-back is a
full stream synchronisation on CUDA) and never allocates.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import LongTensor, Tensor

from megacp.buffers import CpuGpuBuffer
from megacp.kv.layout import cp_local_slot, cp_owner_rank, validate_kv_layout


class BlockTable:
    """Virtual block ids of up to ``max_num_reqs`` requests, plus this CP rank's slot math.

    ``table``: [max_num_reqs, max_num_blocks_per_req] long; entries past a row's length are 0 (a valid block id,
    so kernels that read a whole row never index out of range; the host keeps how many entries are real).
    One virtual block covers ``block_size·cp_world_size`` token positions.
    """

    def __init__(
        self,
        block_size: int,
        max_num_reqs: int,
        max_num_blocks_per_req: int,
        cp_world_size: int = 1,
        cp_rank: int = 0,
        interleave_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        validate_kv_layout(block_size, cp_world_size, cp_rank, interleave_size)
        if max_num_reqs < 1:
            raise ValueError(f"max_num_reqs={max_num_reqs} must be >= 1 (the number of requests run at once)")
        if max_num_blocks_per_req < 1:
            raise ValueError(f"max_num_blocks_per_req={max_num_blocks_per_req} must be >= 1")
        self.block_size = block_size
        self.max_num_reqs = max_num_reqs
        self.max_num_blocks_per_req = max_num_blocks_per_req
        self.cp_world_size = cp_world_size
        self.cp_rank = cp_rank
        self.interleave_size = interleave_size
        self.device = torch.device(device)
        # One persistent host/device pair (pinned on CUDA): row writes go to the host copy, ``commit`` publishes the
        # rows changed since the last commit with one copy. Lookups and checks read the host copy only.
        self._buf = CpuGpuBuffer(max_num_reqs, max_num_blocks_per_req, dtype=torch.long, device=self.device)
        self._num_blocks = torch.zeros(max_num_reqs, dtype=torch.long)  # real entries per row (host)
        self._dirty: tuple[int, int] | None = None  # [lo, hi) rows changed since the last commit

    @property
    def table(self) -> LongTensor:
        """The device table [max_num_reqs, max_num_blocks_per_req] long, as of the last ``commit``."""
        return self._buf.gpu

    @property
    def _table_host(self) -> LongTensor:
        return self._buf.cpu

    def commit(self) -> None:
        """Copy the rows changed since the last commit to the device (one non-blocking copy; none if unchanged).

        The metadata builder calls it once per step, before the step's kernels read ``table``.
        """
        if self._dirty is not None:
            self._buf.to_device(self._dirty[1], start=self._dirty[0])
            self._dirty = None

    @property
    def tokens_per_block(self) -> int:
        """Token positions covered by one virtual block: ``block_size·cp_world_size``."""
        return self.block_size * self.cp_world_size

    def _check_req(self, req_index: int) -> None:
        if not 0 <= req_index < self.max_num_reqs:
            raise ValueError(f"req_index={req_index} out of range [0, {self.max_num_reqs}) (max_num_reqs)")

    def _write(self, req_index: int, start: int, block_ids: Sequence[int] | Tensor) -> None:
        ids = torch.as_tensor(block_ids, dtype=torch.long).reshape(-1)
        end = start + ids.numel()
        if end > self.max_num_blocks_per_req:
            raise ValueError(
                f"request row {req_index} would hold {end} blocks but max_num_blocks_per_req="
                f"{self.max_num_blocks_per_req}; raise it or use a larger block_size"
            )
        ids = ids.cpu()  # host-side input is the norm; a device tensor is read back once, here
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError(f"block ids for request row {req_index} must be >= 0, got {ids.tolist()}")
        host = self._buf.host()  # waits until the last commit's copy has read the host rows
        host[req_index, start:end] = ids
        host[req_index, end:] = 0
        self._num_blocks[req_index] = end
        lo, hi = self._dirty if self._dirty is not None else (req_index, req_index + 1)
        self._dirty = (min(lo, req_index), max(hi, req_index + 1))

    def set_row(self, req_index: int, block_ids: Sequence[int] | Tensor) -> None:
        """Make ``block_ids`` (virtual block ids, in sequence order) the whole row of request ``req_index``."""
        self._check_req(req_index)
        self._write(req_index, 0, block_ids)

    def append_row(self, req_index: int, block_ids: Sequence[int] | Tensor) -> None:
        """Append ``block_ids`` to the row of request ``req_index`` (the sequence grew past its blocks)."""
        self._check_req(req_index)
        self._write(req_index, int(self._num_blocks[req_index]), block_ids)

    def append_blocks(self, req_indices: LongTensor, block_ids: Sequence[int] | Tensor) -> None:
        """Append one block to each of these distinct rows (a decode step's rows crossing into a new block), with
        tensor ops: req_indices [k] long (host), block_ids [k] (virtual block ids, in the rows' order)."""
        rows = torch.as_tensor(req_indices, dtype=torch.long).reshape(-1)
        ids = torch.as_tensor(block_ids, dtype=torch.long).reshape(-1)
        if rows.numel() == 0:
            return
        if ids.shape != rows.shape or int(ids.min()) < 0:
            raise ValueError(f"append_blocks: one block id >= 0 per row, got {ids.tolist()} for rows {rows.tolist()}")
        end = self._num_blocks[rows]
        if int(end.max()) >= self.max_num_blocks_per_req:
            raise ValueError(f"a request row would hold more than max_num_blocks_per_req={self.max_num_blocks_per_req}"
                             f" blocks; raise it or use a larger block_size")
        self._buf.host()[rows, end] = ids  # waits until the last commit's copy has read the host rows
        self._num_blocks[rows] = end + 1
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if self._dirty is not None:
            lo, hi = min(lo, self._dirty[0]), max(hi, self._dirty[1])
        self._dirty = (lo, hi)

    def clear_row(self, req_index: int) -> None:
        """Forget the blocks of request ``req_index`` (the allocator frees them separately)."""
        self._check_req(req_index)
        self._write(req_index, 0, [])

    def row_host(self, req_index: int) -> LongTensor:
        """The real block ids of one request, from the host copy: [num_blocks] long on the CPU (no device read)."""
        self._check_req(req_index)
        return self._table_host[req_index, : int(self._num_blocks[req_index])]

    def num_blocks_host(self, req_indices: Tensor) -> LongTensor:
        """Real block ids held by each of these rows: req_indices [N] long (host) -> [N] long (host)."""
        return self._num_blocks[req_indices]

    def compute_slot_mapping(self, req_indices: Tensor, positions: Tensor) -> LongTensor:
        """This rank's cache slot of each token; ``-1`` for tokens another CP rank stores.

        req_indices: [T] int (table row of each token), positions: [T] int (absolute position) -> [T] long on
        ``self.device``. Raises ``ValueError`` naming the request when a position lies past its row's blocks.
        """
        return self.slot_mapping_host(req_indices, positions).to(self.device, non_blocking=True)

    def slot_mapping_host(self, req_indices: Tensor, positions: Tensor) -> LongTensor:
        """``compute_slot_mapping`` computed and validated on the host copy: [T] long on the CPU."""
        req = torch.as_tensor(req_indices, dtype=torch.long).cpu().reshape(-1)
        pos = torch.as_tensor(positions, dtype=torch.long).cpu().reshape(-1)
        if req.shape != pos.shape:
            raise ValueError(f"req_indices {tuple(req.shape)} and positions {tuple(pos.shape)} must have equal length")
        if req.numel() == 0:
            return torch.empty(0, dtype=torch.long)
        if int(req.min()) < 0 or int(req.max()) >= self.max_num_reqs:
            raise ValueError(f"req_indices must be in [0, {self.max_num_reqs}), got {req.unique().tolist()}")
        if int(pos.min()) < 0:
            raise ValueError(f"positions must be >= 0, got min {int(pos.min())}")
        vblock = pos // self.tokens_per_block
        bad = vblock >= self._num_blocks[req]
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            r, p = int(req[i]), int(pos[i])
            raise ValueError(
                f"request row {r}: position {p} needs virtual block {p // self.tokens_per_block} but the row has "
                f"{int(self._num_blocks[r])} blocks of {self.tokens_per_block} tokens; allocate blocks for it first "
                f"(blocks_needed(num_tokens, block_size, cp_world_size))"
            )
        block_ids = self._table_host[req, vblock]
        slots = cp_local_slot(pos, block_ids, self.block_size, self.cp_world_size, self.interleave_size)
        owned = cp_owner_rank(pos, self.cp_world_size, self.interleave_size) == self.cp_rank
        return torch.where(owned, slots, torch.full_like(slots, -1))

