"""The host plan of a step with prefill rows: which local row holds which token, what each rank writes and attends.

Pure: computed on the CPU from the schedule's Python ints and the block table's host copy, no device involved, so it
can be tested without one. ``AttentionMetadataBuilder`` stages a plan into its arena (one copy) and wraps the device
tensors in ``PrefillMetadata`` / ``ContextMetadata``. Offsets and counts are Python lists; per-token indices are CPU
tensors (a 128k-token prompt would cost a Python loop per token as a list).

Local rows (``cp_metadata``'s order): the ``n_dec`` decode rows first, then each prefill request's ``L`` rows —
with ``pcp > 1`` its head chunk then its tail chunk of ``L / 2`` rows each (``pcp_split``), padded so every PCP rank
has the same count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import LongTensor, Tensor

from megacp.kv.layout import cp_local_seq_lens, local_slots
from megacp.layers.cp_metadata import is_decode
from megacp.layers.pcp_split import pcp_chunk_size, pcp_restore_index, pcp_split_positions


class HostTable(Protocol):
    """What a plan reads of this rank's ``BlockTable`` (its host copy)."""

    cp_world_size: int
    cp_rank: int
    interleave_size: int
    block_size: int

    def slot_mapping_host(self, req_indices: Tensor, positions: Tensor) -> LongTensor: ...

    def row_host(self, req_index: int) -> LongTensor: ...


@dataclass
class Schedule:
    """A step's schedule on the host: each request's table row, cached and new token counts, new tokens' offset in
    the step's concatenated new tokens, and which requests (indices, caller order) are decodes and prefills."""

    rows: list[int]
    computed: list[int]
    new: list[int]
    offsets: list[int]
    decodes: list[int]
    prefills: list[int]


def make_schedule(req_rows, num_computed_tokens, num_new_tokens) -> Schedule:
    """The ``Schedule`` of one step (``ValueError`` for mismatched or out-of-range counts)."""
    n_req = len(req_rows)
    if not (len(num_computed_tokens) == len(num_new_tokens) == n_req):
        raise ValueError(
            f"AttentionMetadataBuilder.build: req_rows ({n_req}), num_computed_tokens ({len(num_computed_tokens)})"
            f" and num_new_tokens ({len(num_new_tokens)}) need one entry per scheduled request"
        )
    rows, computed = [int(i) for i in req_rows], [int(c) for c in num_computed_tokens]
    new = [int(n) for n in num_new_tokens]
    if any(n < 1 for n in new) or any(c < 0 for c in computed):
        raise ValueError("AttentionMetadataBuilder.build: every request needs num_new_tokens >= 1 and "
                         "num_computed_tokens >= 0")
    offsets = [0] * n_req
    for i in range(1, n_req):
        offsets[i] = offsets[i - 1] + new[i - 1]
    decodes = [i for i in range(n_req) if is_decode(computed[i], new[i])]
    prefills = [i for i in range(n_req) if not is_decode(computed[i], new[i])]
    return Schedule(rows, computed, new, offsets, decodes, prefills)


@dataclass
class ContextPlan:
    """The pass-Q context attention of the S prefill requests with cached context (``ContextMetadata``'s host form).

    ``rows`` [Tc]: their local rows; ``real_index``/``real_rows``: the entries that are real tokens, and those rows;
    ``q_perm`` [W·Tc]: the CP-gathered ``[W, Tc]`` query rows, flattened, regrouped request by request;
    ``kv_slots``: this rank's cache slots of each request's context, in local (= position) order; ``cu_q`` /
    ``cu_k``: the varlen offsets [S+1].

    The pass-KV alternative (MLA, when it moves fewer bytes): all-gather every CP rank's local context rows (each
    rank's ``kv_slots`` rows, zero-padded to ``gather_pad``, the most any rank holds) and put them back in sequence
    order: ``gather_rows`` [sum context lens] is the row of each context token, request after request, in the flat
    ``[W·gather_pad]`` gather; ``cu_rows`` (each request's entries among ``rows``) and ``cu_ctx`` (its context
    tokens) are offsets [S+1].
    """

    rows: LongTensor
    real_index: LongTensor
    real_rows: LongTensor
    q_perm: LongTensor
    kv_slots: LongTensor
    cu_q: list[int]
    cu_k: list[int]
    gather_rows: LongTensor
    gather_pad: int
    cu_rows: list[int]
    cu_ctx: list[int]


@dataclass
class PrefillPlan:
    """One rank's host plan of a step with prefill rows (``num_local`` rows: decodes, then prefill requests).

    ``token_index`` [T_local]: index of each local row into the step's new tokens (-1: PCP padding); ``positions``
    [T_local] (padding: 0); ``caller_rows`` [N]: row of each new token in the PCP all-gather of every rank's rows;
    ``logits_rows`` [num_reqs]: each request's last-token row where this rank holds it, else -1. After the PCP
    all-gather of the prefill K/V, ``gather`` [N_prefill] picks the new tokens in sequence order, ``slots`` [N_prefill]
    is where this rank stores each (-1: another rank does). One varlen sequence per chunk with real queries:
    queries ``q_rows`` (local rows, offsets ``cu_q``); keys, a prefix of the request's sequence-ordered K/V, by
    start ``cu_k[b]`` and length ``seqused_k[b]`` (``attention_with_lse``'s convention: the head and tail chunk of a
    request read the same K/V, no copy); ``seqused_k`` is None when the ranges lie one after another (pcp = 1), and
    ``cu_k`` is then cumulative. ``context``: the plan of prefills over cached context, or None.
    """

    num_local: int
    num_prefill_rows: int
    token_index: LongTensor
    positions: LongTensor
    caller_rows: LongTensor
    logits_rows: LongTensor
    gather: LongTensor
    slots: LongTensor
    q_rows: LongTensor
    cu_q: list[int]
    cu_k: list[int]
    seqused_k: list[int] | None
    context: ContextPlan | None


def _cat(parts: list[Tensor]) -> LongTensor:
    return torch.cat(parts).long() if parts else torch.zeros(0, dtype=torch.long)


def plan_prefill(s: Schedule, pcp_size: int, pcp_rank: int, table: HostTable) -> PrefillPlan:
    """The ``PrefillPlan`` of PCP rank ``pcp_rank`` of ``pcp_size`` for schedule ``s`` (which has prefills)."""
    P, r = pcp_size, pcp_rank
    n_dec = len(s.decodes)
    rows_per = {i: 2 * pcp_chunk_size(s.new[i], P) if P > 1 else s.new[i] for i in s.prefills}
    num_prefill_rows = sum(rows_per.values())
    T = n_dec + num_prefill_rows  # local rows, the same on every PCP rank
    caller_rows = torch.empty(sum(s.new), dtype=torch.long)
    caller_rows[[s.offsets[i] for i in s.decodes]] = torch.arange(n_dec)  # PCP rank 0's copy
    logits_rows = torch.full((len(s.rows),), -1, dtype=torch.long)
    if r == 0:  # decodes are replicated over PCP: one rank provides their logits rows
        logits_rows[s.decodes] = torch.arange(n_dec)
    token_index = [torch.tensor([s.offsets[i] for i in s.decodes], dtype=torch.long)]
    positions = [torch.tensor([s.computed[i] for i in s.decodes], dtype=torch.long)]
    gather, slots, q_rows, cu_q, k_starts, k_used = [], [], [], [0], [], []
    ctx_rows, ctx_real, ctx_req, ctx_len = [], [], [], []
    row, seq_offset = n_dec, 0  # where the current request starts: local rows / sequence-ordered new K/V
    for i in s.prefills:
        n, c0, L = s.new[i], s.computed[i], rows_per[i]
        rel = pcp_split_positions(n, P, r)  # [L]
        real = rel < n
        token_index.append(torch.where(real, s.offsets[i] + rel, -1))
        positions.append(torch.where(real, c0 + rel, 0))
        restore = pcp_restore_index(n, P)  # position -> row of the PCP all-gather of L rows per rank
        owner, j = restore // L, restore % L
        gather.append(owner * num_prefill_rows + (row - n_dec) + j)
        caller_rows[s.offsets[i] : s.offsets[i] + n] = owner * T + row + j
        slots.append(table.slot_mapping_host(torch.full((n,), s.rows[i], dtype=torch.long), c0 + torch.arange(n)))
        chunk = L // 2 if P > 1 else n
        for k, start in enumerate([r * chunk, (2 * P - 1 - r) * chunk] if P > 1 else [0]):
            end = min(start + chunk, n)
            if end <= start:
                continue  # the chunk is all padding
            q_rows.append(row + k * chunk + torch.arange(end - start))
            cu_q.append(cu_q[-1] + end - start)
            k_starts.append(seq_offset)  # both chunks read a prefix of the request's sequence-ordered K/V
            k_used.append(end)
        if c0 > 0:
            ctx_rows.append(row + torch.arange(L))
            ctx_real.append(real)
            ctx_req.append(s.rows[i])
            ctx_len.append(c0)
        if int(owner[-1]) == r:
            logits_rows[i] = row + int(j[-1])
        row, seq_offset = row + L, seq_offset + n
    cu_k = k_starts + [seq_offset]
    contiguous = all(a + n == b for a, n, b in zip(k_starts, k_used, cu_k[1:]))
    context = plan_context(ctx_rows, ctx_real, ctx_req, ctx_len, table) if ctx_rows else None
    return PrefillPlan(T, num_prefill_rows, _cat(token_index), _cat(positions), caller_rows, logits_rows,
                       _cat(gather), _cat(slots), _cat(q_rows), cu_q, cu_k, None if contiguous else k_used, context)


def plan_context(ctx_rows: list[Tensor], ctx_real: list[Tensor], req_rows: list[int], context_lens: list[int],
                 table: HostTable) -> ContextPlan:
    """The ``ContextPlan`` of the prefill requests with cached context: per request its local rows, which of them are
    real tokens, its block-table row and its cached length."""
    W = table.cp_world_size
    rows_t, real_t = torch.cat(ctx_rows), torch.cat(ctx_real)
    tc = int(rows_t.numel())
    local_lens = cp_local_seq_lens(torch.tensor(context_lens, dtype=torch.long), W, table.cp_rank,
                                   table.interleave_size).tolist()
    q_perm, kv_slots, cu_q, cu_k, start = [], [], [0], [0], 0
    for s, part in enumerate(ctx_rows):
        n_rows = part.numel()
        rows = start + torch.arange(n_rows)  # this request's entries among the Tc context rows
        q_perm.append((torch.arange(W).unsqueeze(1) * tc + rows.unsqueeze(0)).reshape(-1))  # same rows, every rank
        start += n_rows
        kv_slots.append(local_slots(table.row_host(req_rows[s]), torch.arange(local_lens[s]), table.block_size))
        cu_q.append(cu_q[-1] + W * n_rows)
        cu_k.append(cu_k[-1] + local_lens[s])
    real_index = torch.nonzero(real_t).flatten()
    gather_rows, gather_pad = _context_gather_rows(context_lens, table)
    cu_rows = torch.tensor([0] + [int(r.numel()) for r in ctx_rows]).cumsum(0).tolist()
    cu_ctx = torch.tensor([0, *context_lens]).cumsum(0).tolist()
    return ContextPlan(rows_t, real_index, rows_t[real_index], torch.cat(q_perm), _cat(kv_slots), cu_q, cu_k,
                       gather_rows, gather_pad, cu_rows, cu_ctx)


def _context_gather_rows(context_lens: list[int], table: HostTable) -> tuple[LongTensor, int]:
    """Pass-KV's ``(gather_rows, gather_pad)`` (see ``ContextPlan``) for requests with these cached lengths."""
    W, I = table.cp_world_size, table.interleave_size
    lens = torch.tensor(context_lens, dtype=torch.long)
    per_rank = torch.stack([cp_local_seq_lens(lens, W, rank, I) for rank in range(W)])  # [W, S]
    start = torch.cumsum(per_rank, dim=1) - per_rank  # [W, S]: each request's first local row on each rank
    pad = int(per_rank.sum(dim=1).max())
    rows = []
    for s, c in enumerate(context_lens):
        p = torch.arange(c)
        owner = (p // I) % W
        rows.append(owner * pad + start[owner, s] + (p // (W * I)) * I + p % I)
    return torch.cat(rows), pad
