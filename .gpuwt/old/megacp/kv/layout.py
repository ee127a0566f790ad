"""Pure slot math of the CP-sharded KV cache (DESIGN §2).

Notation: ``W = cp_world_size = pcp·dcp``, ``R = cp_rank``, ``I = interleave_size``, ``B = block_size``.

The scheduler hands out *virtual blocks* of ``B·W`` tokens; each of the ``W`` CP ranks stores its share of a virtual
block in its own physical block with the same id. Inside a virtual block, tokens are dealt round-robin to the ranks in
runs of ``I`` consecutive tokens::

    W=2, I=1, B=4:  position  0 1 2 3 4 5 6 7 | 8 9 ...
                    rank      0 1 0 1 0 1 0 1 | 0 1
                    local idx 0 0 1 1 2 2 3 3 | 4 4

A rank's tokens, in increasing position, fill its blocks densely: the *local index* (rank of the token among the
rank's own tokens) is ``(p // (B·W))·B + (off // (W·I))·I + off % I`` with ``off = p % (B·W)``, and the physical
slot replaces the virtual block number ``p // (B·W)`` by its block id. So "local order" (the order a rank stores and
gathers its tokens in) is increasing position order.

Every function here is vectorised over tensors and has no side effects; ``BlockTable`` and the attention layer wire
them to real block ids. They trust their layout arguments: ``validate_kv_layout`` checks a layout once, where it is
made (``BlockTable``, ``ParallelConfig``), not at every call of a step.
"""

from __future__ import annotations

import torch
from torch import LongTensor, Tensor

from megacp.config import validate_kv_interleave


def validate_kv_layout(block_size: int | None, cp_world_size: int = 1, cp_rank: int | None = None,
                       interleave_size: int = 1) -> None:
    """Raise one actionable ``ValueError`` for a bad block size / CP size / CP rank / interleave combination
    (``block_size=None`` or ``cp_rank=None``: not checked); the interleave rule is ``config.validate_kv_interleave``."""
    if cp_world_size < 1:
        raise ValueError(
            f"cp_world_size={cp_world_size} must be >= 1 (it is prefill_context_parallel_size * "
            f"decode_context_parallel_size; use 1 for no context parallelism)"
        )
    if cp_rank is not None and not 0 <= cp_rank < cp_world_size:
        raise ValueError(f"cp_rank={cp_rank} must be in [0, {cp_world_size}) for cp_world_size={cp_world_size}")
    validate_kv_interleave(interleave_size, block_size)


def cp_owner_rank(positions: Tensor, cp_world_size: int, interleave_size: int = 1) -> LongTensor:
    """CP rank that stores each position's K/V.

    positions: [T] int (absolute token positions, >= 0) -> [T] long in [0, W).
    The block size does not matter: a virtual block holds a whole number (``B/I``) of ``W·I`` rounds.
    """
    positions = torch.as_tensor(positions).long()
    return (positions // interleave_size) % cp_world_size


def cp_local_index(positions: Tensor, block_size: int, cp_world_size: int, interleave_size: int = 1) -> LongTensor:
    """Index of each position inside its owner rank's local sequence (0, 1, 2, ... in position order).

    positions: [T] int -> [T] long. Equal to the local slot under the identity block table (block id k for
    virtual block k); meaningful on the owner rank only.
    """
    positions = torch.as_tensor(positions).long()
    virtual = block_size * cp_world_size
    off = positions % virtual
    return (positions // virtual) * block_size + (off // (cp_world_size * interleave_size)) * interleave_size + (
        off % interleave_size
    )


def cp_local_slot(
    positions: Tensor, block_ids: Tensor, block_size: int, cp_world_size: int, interleave_size: int = 1
) -> LongTensor:
    """Physical slot (``block_id·B + offset``) of each position in its owner rank's paged cache (DESIGN §2).

    positions: [T] int; block_ids: [T] int, the virtual block id holding each position, i.e.
    ``block_table_row[p // (B·W)]`` -> [T] long. Whether this rank owns the token is not considered here
    (see ``cp_owner_rank``; ``BlockTable.compute_slot_mapping`` combines both).
    """
    positions = torch.as_tensor(positions).long()
    block_ids = torch.as_tensor(block_ids, device=positions.device).long()
    off = positions % (block_size * cp_world_size)
    return block_ids * block_size + (off // (cp_world_size * interleave_size)) * interleave_size + off % interleave_size


def local_slots(block_ids_row: Tensor, local_indices: Tensor, block_size: int) -> LongTensor:
    """Slots of a request's local indices: ``row[j // B]·B + j % B`` (a rank's tokens fill its blocks densely).

    block_ids_row: [num_blocks] int (the request's block ids), local_indices: [N] int -> [N] long.
    """
    j = torch.as_tensor(local_indices).long()
    return torch.as_tensor(block_ids_row).long()[j // block_size] * block_size + j % block_size


def cp_local_seq_lens(seq_lens: Tensor, cp_world_size: int, cp_rank: int, interleave_size: int = 1) -> LongTensor:
    """Number of each sequence's tokens stored on ``cp_rank`` (DESIGN §2 formula).

    seq_lens: [N] int -> [N] long. ``base = (L // I // W)·I`` tokens from the full rounds of ``W·I`` tokens, plus
    this rank's part ``clamp(L − base·W − R·I, 0, I)`` of the last, partial round. Sums to ``L`` over ranks.
    """
    seq_lens = torch.as_tensor(seq_lens).long()
    # Checked on the host only: on a device the check would cost a sync in every step.
    if seq_lens.device.type == "cpu" and seq_lens.numel() and int(seq_lens.min()) < 0:
        raise ValueError(f"seq_lens must be >= 0, got {int(seq_lens.min())}")
    base = (seq_lens // interleave_size // cp_world_size) * interleave_size
    return base + torch.clamp(seq_lens - base * cp_world_size - cp_rank * interleave_size, 0, interleave_size)


def cp_local_positions(
    seq_len: int, cp_world_size: int, cp_rank: int, interleave_size: int = 1, device: torch.device | str | None = None
) -> LongTensor:
    """Absolute positions of the tokens of a length-``seq_len`` sequence that ``cp_rank`` stores, in local order.

    -> [cp_local_seq_len] long, increasing. Entry ``j`` is the position of local index ``j``, so a local K/V shard
    read in local order (at ``local_slots(row, arange(n), B)``, as the context attention does) lines up with them
    (e.g. to build a causal mask of new queries against the cached local context). The inverse of
    ``cp_local_index`` on this rank's tokens; the block size cancels out, since local indices run densely through
    each block.
    """
    if seq_len < 0:
        raise ValueError(f"seq_len={seq_len} must be >= 0")
    local_len = int(cp_local_seq_lens(torch.tensor([seq_len]), cp_world_size, cp_rank, interleave_size)[0])
    j = torch.arange(local_len, device=device)
    # Local index j lies in round j // I (each round of W·I tokens gives this rank I of them), at offset j % I.
    return (j // interleave_size) * (cp_world_size * interleave_size) + cp_rank * interleave_size + j % interleave_size


def kv_capacity_tokens(num_blocks: int, block_size: int, cp_world_size: int = 1) -> int:
    """Tokens a CP group's caches hold with ``num_blocks`` physical blocks per rank: ``num_blocks·B·W``.

    Each rank stores ``num_blocks·B`` token slots, and every token lives on exactly one of the ``W`` ranks, so the
    group holds ``W`` times the tokens of one unsharded cache of the same per-rank memory.
    """
    if num_blocks < 0 or block_size < 1 or cp_world_size < 1:
        raise ValueError(
            f"kv_capacity_tokens needs num_blocks >= 0, block_size >= 1, cp_world_size >= 1 "
            f"(got {num_blocks}, {block_size}, {cp_world_size})"
        )
    return num_blocks * block_size * cp_world_size
