"""The host plan of the "cudnn" backend's nested-prefix decomposition (``backends_cuda._cudnn_pieces``).

aten's cuDNN SDPA op masks causally top-left and has no bottom-right varlen form, so a causal chunk with fewer queries
than keys runs as an unmasked prefix call plus a square causal call, merged by LSE. PCP's head and tail chunks read
nested prefixes of one gathered K/V: ``nested_prefix_plan`` finds the fewest such calls for a packed batch (pure host
arithmetic on the offsets, tested without a GPU) and ``diagonal_blocks`` batches the square parts' K/V as a view.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class PiecesPlan(NamedTuple):
    """The cuDNN calls of a causal nested-prefix batch (``nested_prefix_plan``), as host ranges."""

    prefix: list[tuple[int, int, int, int]]  # (q0, q1, k0, k1): query rows [q0, q1) attend keys [k0, k1), unmasked
    squares: list[tuple[int, int, list[int]]]  # (b0, b1, offsets): sequences b0..b1-1 of one lq, square at offsets
    parts: list[list[int]]  # per sequence: the prefix pieces its rows take part in


def nested_prefix_plan(cu_q: list[int], keys: list[tuple[int, int]]) -> PiecesPlan | None:
    """Bottom-right causal attention of a packed batch as few top-left cuDNN calls, or None where it does not apply
    or saves no call over the per-sequence path (one whole prompt keeps its single call as it was).

    ``keys``: each sequence's key rows ``[start, stop)``. Sequence b has lq_b queries and an unmasked prefix
    P_b = (stop - start) - lq_b seen by all of them, then a square part where top-left == bottom-right. Applies
    when every 0 < lq_b <= its key count and, within each run of consecutive sequences with one key start (nested
    prefixes of one K/V: PCP's head then tail chunk of a request), P_b does not decrease. Then, with P_0 = 0 <
    P_1 < ... the distinct prefixes of a run, piece j (keys [P_{j-1}, P_j) of the run's start) is attended by the
    rows of every sequence with P_b >= P_j: a suffix of the run's query rows, so ONE call on slices of q and K/V.
    The squares of consecutive sequences with equal lq are one call with batch B.
    """
    n = len(cu_q) - 1
    lq = [cu_q[b + 1] - cu_q[b] for b in range(n)]
    if any(not 0 < lq[b] <= k1 - k0 for b, (k0, k1) in enumerate(keys)):
        return None
    prefix: list[tuple[int, int, int, int]] = []
    parts: list[list[int]] = []
    b = 0
    while b < n:
        end = b + 1
        while end < n and keys[end][0] == keys[b][0]:
            end += 1
        start, done, first = keys[b][0], 0, len(prefix)
        for s in range(b, end):
            p = keys[s][1] - keys[s][0] - lq[s]
            if p < done:
                return None
            if p > done:
                prefix.append((cu_q[s], cu_q[end], start + done, start + p))
                done = p
            parts.append(list(range(first, len(prefix))))
        b = end
    squares: list[tuple[int, int, list[int]]] = []
    for s in range(n):
        if squares and lq[squares[-1][0]] == lq[s]:
            squares[-1] = (squares[-1][0], s + 1, squares[-1][2] + [keys[s][1] - lq[s]])
        else:
            squares.append((s, s + 1, [keys[s][1] - lq[s]]))
    per_sequence = sum(1 if lq[b] == k1 - k0 else 2 for b, (k0, k1) in enumerate(keys))
    return PiecesPlan(prefix, squares, parts) if len(prefix) + len(squares) < per_sequence else None


def diagonal_blocks(x: Tensor, offsets: list[int], rows: int) -> Tensor:
    """Rows ``[o, o + rows)`` of ``x`` for each offset o, as one batch: a view (no copy) where the offsets are
    evenly spaced (one or two always are: PCP's head and tail squares), else stacked (a copy of B·rows rows).

    # x: [T, H, D] -> [B, rows, H, D]
    """
    o0, count = offsets[0], len(offsets)
    if count == 1:
        return x[o0 : o0 + rows].unsqueeze(0)
    step = offsets[1] - o0
    if step > 0 and all(b - a == step for a, b in zip(offsets, offsets[1:])):
        return x[o0 : o0 + step * (count - 1) + rows].unfold(0, rows, step).movedim(-1, 1)
    return torch.stack([x[o : o + rows] for o in offsets])


__all__ = ["PiecesPlan", "diagonal_blocks", "nested_prefix_plan"]
