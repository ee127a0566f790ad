"""The PCP split of a prompt's new tokens (DESIGN §3), as pure functions of (num_tokens, pcp_size, pcp_rank).

With ``pcp > 1`` a request's new tokens are padded to a multiple of ``2·pcp`` and cut into ``2·pcp`` chunks of ``c``
tokens; rank ``r`` holds chunk ``r`` (the "head") then chunk ``2·pcp−1−r`` (the "tail"), so every rank does the same
causal work ("DualChunkSwap"). With ``pcp == 1`` nothing is split or padded.
"""

from __future__ import annotations

import torch
from torch import LongTensor


def pcp_split_positions(num_tokens: int, pcp_size: int, pcp_rank: int) -> LongTensor:
    """This PCP rank's positions in the padded prompt: head chunk, then tail chunk (DESIGN §3).

    -> [2·c] long with ``c = ceil(num_tokens / (2·pcp))``; entries ``>= num_tokens`` are padding.
    Rank ``r`` takes chunk ``r`` and chunk ``2·pcp−1−r``, so causal work is balanced ("DualChunkSwap").
    With ``pcp_size == 1`` nothing is split or padded: ``arange(num_tokens)``.
    """
    if pcp_size < 1 or not 0 <= pcp_rank < pcp_size:
        raise ValueError(
            f"pcp_split_positions needs pcp_size >= 1 and 0 <= pcp_rank < pcp_size, got {pcp_size}, {pcp_rank} "
            "(pcp_size is prefill_context_parallel_size)"
        )
    if num_tokens < 0:
        raise ValueError(f"pcp_split_positions: num_tokens={num_tokens} must be >= 0")
    if pcp_size == 1:
        return torch.arange(num_tokens)
    c = pcp_chunk_size(num_tokens, pcp_size)
    head = torch.arange(pcp_rank * c, (pcp_rank + 1) * c)
    tail_chunk = 2 * pcp_size - 1 - pcp_rank
    tail = torch.arange(tail_chunk * c, (tail_chunk + 1) * c)
    return torch.cat([head, tail])


def pcp_chunk_size(num_tokens: int, pcp_size: int) -> int:
    """Tokens per chunk ``c`` of the head–tail split: ``ceil(num_tokens / (2·pcp))`` (all of them when pcp == 1)."""
    if pcp_size == 1:
        return num_tokens
    return -(-num_tokens // (2 * pcp_size))


def pcp_restore_index(num_tokens: int, pcp_size: int) -> LongTensor:
    """Sequence order from the PCP all-gather of one request's local rows.

    -> [num_tokens] long: entry ``p`` is the row of ``cat([rows of rank 0, rows of rank 1, ...])`` (each rank's rows
    in ``pcp_split_positions`` order) that holds position ``p``. Padding is dropped.
    """
    if pcp_size == 1:
        return torch.arange(num_tokens)
    # Position p is in chunk p // c: chunk k < pcp is rank k's head (its rows [0, c)), chunk k >= pcp is rank
    # 2·pcp−1−k's tail (its rows [c, 2c)). Closed form of argsort(cat of the ranks' positions), which costs a sort.
    c = pcp_chunk_size(num_tokens, pcp_size)
    p = torch.arange(num_tokens)
    chunk, within = p // c, p % c
    is_head = chunk < pcp_size
    rank = torch.where(is_head, chunk, 2 * pcp_size - 1 - chunk)
    return rank * (2 * c) + torch.where(is_head, within, c + within)
