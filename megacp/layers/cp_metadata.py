"""Step metadata for context-parallel attention: who computes which token, and where its K/V lives.

Built once per engine step by ``build_step_metadata`` and shared by every attention layer of the model
(``ContextParallelAttention`` in ``cp_attention.py``). Everything here is index arithmetic on small integer tensors,
computed identically on every rank from the step's schedule plus this rank's (pcp, dcp) coordinates.

**Local token order** (the rows of every activation ``[T_local, ...]`` a rank computes):

1. one row per *decode* request (``num_computed > 0`` and one new token), in caller order. Decodes are not split:
   every PCP rank runs them.
2. then, per *prefill* request in caller order, its local share of the new tokens. With ``pcp > 1`` the new tokens
   are padded to a multiple of ``2·pcp`` and cut into ``2·pcp`` chunks of ``c`` tokens; rank ``r`` holds chunk ``r``
   (the "head") then chunk ``2·pcp−1−r`` (the "tail"), so every rank does the same causal work (DESIGN §3,
   ``pcp_split_positions``). With ``pcp == 1`` a request's new tokens are simply all local, unpadded.

Because every rank pads each request to the same ``2·c`` rows, ``T_local`` is equal on all PCP ranks, so the K/V of
the prefill rows can be all-gathered as one flat tensor and put back in sequence order with one index.

Positions below are *relative* (``0 .. num_new-1``, into the new tokens) unless called absolute
(``num_computed + relative``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import LongTensor, Tensor

from megacp.kv.block_table import BlockTable
from megacp.kv.layout import cp_local_seq_lens

if TYPE_CHECKING:  # keep the pure parts importable without torch.distributed set up
    from megacp.parallel_state import ParallelGroup


# --------------------------------------------------------------------------------------------- the PCP split (pure)
def pcp_split_positions(num_tokens: int, pcp_size: int, pcp_rank: int) -> LongTensor:
    """This PCP rank's positions in the padded prompt: head chunk, then tail chunk (DESIGN §3).

    -> [2·c] long with ``c = ceil(num_tokens / (2·pcp))``; entries ``>= num_tokens`` are padding.
    Rank ``r`` takes chunk ``r`` and chunk ``2·pcp−1−r``, so causal work is balanced ("DualChunkSwap").
    With ``pcp_size == 1`` nothing is split or padded: ``arange(num_tokens)``.
    """
    if pcp_size < 1 or not 0 <= pcp_rank < pcp_size:
        raise ValueError(
            f"pcp_split_positions needs pcp_size >= 1 and 0 <= pcp_rank < pcp_size, got {pcp_size}, {pcp_rank} "
            "(--prefill-context-parallel-size)"
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
    gathered = torch.cat([pcp_split_positions(num_tokens, pcp_size, r) for r in range(pcp_size)])
    return torch.argsort(gathered)[:num_tokens]


# --------------------------------------------------------------------------------------------- the metadata
@dataclass
class StepMetadata:
    """Everything the attention layers need about one step, on one rank (see the module docstring for the order).

    Public fields the model and engine rely on: ``token_index``, ``positions``, ``select_logits_hidden``.
    The rest is consumed by ``ContextParallelAttention``.
    """

    num_reqs: int
    num_decodes: int  # decode rows are local rows [0, num_decodes)
    pcp_size: int
    pcp_rank: int
    dcp_size: int
    dcp_rank: int

    # [T_local] index into the concatenation (caller order) of all requests' new tokens; -1 for PCP padding.
    token_index: LongTensor
    # [T_local] absolute position of each local token (padding: 0).
    positions: LongTensor
    # [num_reqs] tokens already in the (sharded) cache, per request in caller order, and this rank's share of them.
    num_computed_tokens: LongTensor
    local_context_lens: LongTensor

    # Decode: the new token's slot on this rank (-1: another CP rank stores it), the request's block-table row, and
    # the local shard length *including* the new token (it is written before attention).
    decode_slots: LongTensor  # [num_decodes]
    decode_block_table: LongTensor  # [num_decodes, max_blocks]
    decode_local_seq_lens: LongTensor  # [num_decodes]

    # Prefill, new tokens. The prefill rows (local rows [num_decodes:]) are all-gathered over PCP;
    # ``prefill_gather_index`` picks every prefill request's real new tokens, in sequence order, requests concatenated.
    prefill_gather_index: LongTensor  # [N_new] rows of the gathered [pcp·(T_local−num_decodes)] tensor
    prefill_slots: LongTensor  # [N_new] slot of each of those tokens on this rank, -1 when not owned
    # One varlen "sequence" per local chunk with real queries: queries are the chunk's real local rows, keys the
    # request's new tokens from position 0 up to the chunk's end (bottom-right causal alignment does the rest).
    chunk_q_rows: LongTensor  # [Q] local rows, chunk after chunk
    chunk_k_index: LongTensor  # [K] rows of the sequence-ordered new-token K/V (the N_new rows above)
    cu_seqlens_q: Tensor  # [num_chunks+1] int32
    cu_seqlens_k: Tensor  # [num_chunks+1] int32

    # Prefill over cached context ("pass-Q", see ContextParallelAttention._prefill_over_context): every local row
    # (padding included, so the count is equal on all CP ranks) of the S prefill requests that already have tokens
    # in the cache. The queries are all-gathered over the CP group into [W, Tc] rows; ``ctx_q_perm`` regroups those
    # W·Tc rows request by request, so one varlen non-causal call attends each request's queries (from all CP
    # ranks) to the request's local context shard, read from the cache at ``ctx_kv_slots``. The context is the
    # positions < num_computed, which are the first ``ctx_local_lens`` local slots of the request.
    ctx_rows: LongTensor  # [Tc] local rows
    ctx_is_real: Tensor  # [Tc] bool, False for padding rows
    ctx_q_perm: LongTensor  # [W·Tc] rows of the gathered, flattened [W·Tc] queries, request after request
    ctx_kv_slots: LongTensor  # [sum(ctx_local_lens)] this rank's cache slots of the context, request after request
    ctx_local_lens: LongTensor  # [S]
    ctx_cu_seqlens_q: Tensor  # [S+1] int32, over the permuted W·Tc rows
    ctx_cu_seqlens_k: Tensor  # [S+1] int32, over ctx_kv_slots

    # [num_reqs] local row of each request's last new token where this rank provides it for the logits, else -1.
    logits_rows: LongTensor
    pcp_group: "ParallelGroup | None" = None

    @property
    def num_local_tokens(self) -> int:
        return int(self.token_index.numel())

    @property
    def num_prefill_rows(self) -> int:
        return self.num_local_tokens - self.num_decodes

    def select_logits_hidden(self, hidden: Tensor) -> Tensor:
        """Hidden state of each request's last new token, in caller order, identical on every PCP rank.

        # hidden: [T_local, H] -> [num_reqs, H]
        Each row comes from exactly one PCP rank (the owner of the token; rank 0 for decodes); the others contribute
        zeros and one all-reduce over PCP assembles them (adding exact zeros, so no rounding).
        """
        if hidden.shape[0] != self.num_local_tokens:
            raise ValueError(
                f"select_logits_hidden: hidden has {hidden.shape[0]} rows, this step has {self.num_local_tokens} "
                "local tokens (pass the hidden states of meta.token_index's rows)"
            )
        rows = self.logits_rows.to(hidden.device)
        mine = rows >= 0
        picked = torch.where(mine.unsqueeze(-1), hidden[rows.clamp(min=0)], torch.zeros_like(hidden[:1]))
        if self.pcp_size == 1:
            return picked
        group = self.pcp_group
        if group is None:
            from megacp.parallel_state import get_pcp_group

            group = get_pcp_group()
        return group.all_reduce(picked)


def _parallel_coords(
    pcp_size: int | None, pcp_rank: int | None, dcp_size: int | None, dcp_rank: int | None
) -> tuple[int, int, int, int]:
    """Fill unset coordinates from ``parallel_state`` (when initialised), else single-rank defaults."""
    if None in (pcp_size, pcp_rank, dcp_size, dcp_rank):
        from megacp import parallel_state as ps

        if ps.model_parallel_is_initialized():
            pcp_size = ps.get_prefill_context_parallel_world_size() if pcp_size is None else pcp_size
            pcp_rank = ps.get_prefill_context_parallel_rank() if pcp_rank is None else pcp_rank
            dcp_size = ps.get_decode_context_parallel_world_size() if dcp_size is None else dcp_size
            dcp_rank = ps.get_decode_context_parallel_rank() if dcp_rank is None else dcp_rank
    return (1 if pcp_size is None else pcp_size, 0 if pcp_rank is None else pcp_rank,
            1 if dcp_size is None else dcp_size, 0 if dcp_rank is None else dcp_rank)


class _NoCacheTable:
    """The one part of ``BlockTable`` a cache-free (prefill-only) step needs: every token's slot is -1."""

    interleave_size = 1
    block_size = 1
    max_num_blocks_per_req = 1
    device = torch.device("cpu")

    def __init__(self, cp_world_size: int, cp_rank: int) -> None:
        self.cp_world_size, self.cp_rank = cp_world_size, cp_rank

    def compute_slot_mapping(self, req_indices: Tensor, positions: Tensor) -> LongTensor:
        return torch.full((len(positions),), -1, dtype=torch.long)

    def local_block_table(self, req_indices: Tensor) -> LongTensor:
        return torch.zeros(len(req_indices), 1, dtype=torch.long)


def build_step_metadata(
    req_indices: Sequence[int],
    num_computed_tokens: Sequence[int],
    num_new_tokens: Sequence[int],
    block_table: BlockTable | None,
    device: torch.device | str | None = None,
    pcp_size: int | None = None,
    pcp_rank: int | None = None,
    dcp_size: int | None = None,
    dcp_rank: int | None = None,
    pcp_group: "ParallelGroup | None" = None,
) -> StepMetadata:
    """Metadata of one step on this rank.

    req_indices: each scheduled request's row in ``block_table``; num_computed_tokens: tokens already cached per
    request; num_new_tokens: tokens computed this step per request (>= 1). Blocks for all ``num_computed + num_new``
    positions must already be in ``block_table`` (this rank's CP-aware table); ``block_table=None`` means no KV cache
    (training-style: prefill-only, nothing cached, every slot -1). PCP/DCP sizes and ranks default to
    ``parallel_state``'s (or 1/0 when it is not initialised). Tensors land on ``device`` (default: the table's).
    """
    n_req = len(req_indices)
    if not (len(num_computed_tokens) == len(num_new_tokens) == n_req):
        raise ValueError(
            f"build_step_metadata: req_indices ({n_req}), num_computed_tokens ({len(num_computed_tokens)}) and "
            f"num_new_tokens ({len(num_new_tokens)}) must have one entry per scheduled request"
        )
    if any(n < 1 for n in num_new_tokens) or any(c < 0 for c in num_computed_tokens):
        raise ValueError("build_step_metadata: every request needs num_new_tokens >= 1 and num_computed_tokens >= 0")
    P, r, D, d = _parallel_coords(pcp_size, pcp_rank, dcp_size, dcp_rank)
    if block_table is None:
        if any(c > 0 for c in num_computed_tokens):
            raise ValueError(
                "build_step_metadata: requests with num_computed_tokens > 0 read the KV cache; pass the rank's "
                "BlockTable (block_table=None is only for prefill-only steps without a cache)"
            )
        block_table = _NoCacheTable(P * D, r * D + d)
    W, R, I = block_table.cp_world_size, block_table.cp_rank, block_table.interleave_size
    if W != P * D or R != r * D + d:
        raise ValueError(
            f"block_table is for cp_world_size={W}, cp_rank={R} but this rank has pcp={P} (rank {r}), dcp={D} "
            f"(rank {d}): build the BlockTable with cp_world_size=pcp·dcp={P * D} and cp_rank=pcp_rank·dcp+dcp_rank"
            f"={r * D + d}"
        )
    device = block_table.device if device is None else torch.device(device)

    computed = torch.as_tensor(list(num_computed_tokens), dtype=torch.long)
    new = torch.as_tensor(list(num_new_tokens), dtype=torch.long)
    new_offsets = torch.cumsum(new, 0) - new  # start of each request in the concatenated new tokens
    is_decode = (computed > 0) & (new == 1)
    decodes = [i for i in range(n_req) if is_decode[i]]
    prefills = [i for i in range(n_req) if not is_decode[i]]
    rows_per_prefill = {i: 2 * pcp_chunk_size(int(new[i]), P) if P > 1 else int(new[i]) for i in prefills}
    num_prefill_rows = sum(rows_per_prefill.values())
    n_dec = len(decodes)
    logits_rows = torch.full((n_req,), -1, dtype=torch.long)

    # ---- decodes: one row each, the same on every PCP rank
    dec = torch.as_tensor(decodes, dtype=torch.long)
    dec_req = torch.as_tensor([req_indices[i] for i in decodes], dtype=torch.long)
    token_index = [new_offsets[dec]]
    positions = [computed[dec]]
    decode_slots = block_table.compute_slot_mapping(dec_req, computed[dec]).cpu()
    decode_block_table = block_table.local_block_table(dec_req).cpu()
    decode_local_seq_lens = cp_local_seq_lens(computed[dec] + 1, W, R, I)
    if r == 0:  # decodes are replicated over PCP: one rank provides their logits rows
        logits_rows[dec] = torch.arange(n_dec)

    # ---- prefills
    gather_index, slots, q_rows, k_index, cu_q, cu_k = [], [], [], [], [0], [0]
    ctx_rows, ctx_real, ctx_req, ctx_len = [], [], [], []
    row = n_dec  # local row where the current request starts
    seq_offset = 0  # start of the current request in the sequence-ordered new-token K/V
    for i in prefills:
        n, c0, L = int(new[i]), int(computed[i]), rows_per_prefill[i]
        rel = pcp_split_positions(n, P, r)  # [L]
        real = rel < n
        token_index.append(torch.where(real, new_offsets[i] + rel, torch.full_like(rel, -1)))
        positions.append(torch.where(real, c0 + rel, torch.zeros_like(rel)))

        # Where each of the request's real positions sits after the all-gather of all ranks' prefill rows.
        restore = pcp_restore_index(n, P)  # index into cat over ranks of L rows each
        owner, j = restore // L, restore % L
        gather_index.append(owner * num_prefill_rows + (row - n_dec) + j)
        slots.append(block_table.compute_slot_mapping(
            torch.full((n,), req_indices[i], dtype=torch.long), c0 + torch.arange(n)).cpu())

        # This rank's chunks (head and tail with PCP, the whole request without), real queries only.
        chunk = L // 2 if P > 1 else n
        starts = [r * chunk, (2 * P - 1 - r) * chunk] if P > 1 else [0]
        for k, s in enumerate(starts):
            end = min(s + chunk, n)
            if end <= s:
                continue  # the chunk is all padding
            q_rows.append(row + k * chunk + torch.arange(end - s))
            k_index.append(seq_offset + torch.arange(end))
            cu_q.append(cu_q[-1] + end - s)
            cu_k.append(cu_k[-1] + end)

        if c0 > 0:
            ctx_rows.append(row + torch.arange(L))
            ctx_real.append(real)
            ctx_req.append(req_indices[i])
            ctx_len.append(c0)

        last_owner, last_j = int(owner[-1]), int(j[-1])
        if last_owner == r:
            logits_rows[i] = row + last_j
        row += L
        seq_offset += n

    def cat(parts: list[Tensor], dtype: torch.dtype = torch.long) -> Tensor:
        return torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype)

    ctx_rows_t = cat(ctx_rows)
    ctx = _context_index([part.numel() for part in ctx_rows], ctx_req, ctx_len, block_table)
    return StepMetadata(
        num_reqs=n_req, num_decodes=n_dec, pcp_size=P, pcp_rank=r, dcp_size=D, dcp_rank=d,
        token_index=cat(token_index).to(device),
        positions=cat(positions).to(device),
        num_computed_tokens=computed.to(device),
        local_context_lens=cp_local_seq_lens(computed, W, R, I).to(device),
        decode_slots=decode_slots.to(device),
        decode_block_table=decode_block_table.to(device),
        decode_local_seq_lens=decode_local_seq_lens.to(device),
        prefill_gather_index=cat(gather_index).to(device),
        prefill_slots=cat(slots).to(device),
        chunk_q_rows=cat(q_rows).to(device),
        chunk_k_index=cat(k_index).to(device),
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
        ctx_rows=ctx_rows_t.to(device),
        ctx_is_real=cat(ctx_real, torch.bool).to(device),
        ctx_q_perm=ctx["q_perm"].to(device),
        ctx_kv_slots=ctx["kv_slots"].to(device),
        ctx_local_lens=ctx["local_lens"].to(device),
        ctx_cu_seqlens_q=ctx["cu_q"].to(device),
        ctx_cu_seqlens_k=ctx["cu_k"].to(device),
        logits_rows=logits_rows.to(device),
        pcp_group=pcp_group,
    )


def _context_index(
    rows_per_req: list[int], req_indices: list[int], context_lens: list[int], block_table: BlockTable
) -> dict[str, Tensor]:
    """Index tensors of the pass-Q context attention for the S prefill requests with cached context.

    rows_per_req: each request's local rows (equal on every CP rank); context_lens: its num_computed. Returns
    ``q_perm`` [W·Tc] (the CP-gathered ``[W, Tc]`` query rows, flattened, regrouped request by request),
    ``kv_slots`` (this rank's cache slots of each request's context, in local = position order), ``local_lens`` [S]
    and the int32 ``cu_q`` / ``cu_k`` [S+1] offsets of the varlen call.
    """
    W, B = block_table.cp_world_size, block_table.block_size
    tc = sum(rows_per_req)
    local_lens = cp_local_seq_lens(torch.tensor(context_lens, dtype=torch.long), W, block_table.cp_rank,
                                   block_table.interleave_size)
    q_perm, kv_slots, cu_q, cu_k, start = [], [], [0], [0], 0
    for s, n_rows in enumerate(rows_per_req):
        rows = start + torch.arange(n_rows)  # this request's entries among the Tc context rows
        q_perm.append((torch.arange(W).unsqueeze(1) * tc + rows.unsqueeze(0)).reshape(-1))  # the same rows, every rank
        start += n_rows
        j = torch.arange(int(local_lens[s]))  # local indices 0..n-1 fill the request's blocks densely
        kv_slots.append(block_table.row(req_indices[s]).cpu()[j // B] * B + j % B)
        cu_q.append(cu_q[-1] + W * n_rows)
        cu_k.append(cu_k[-1] + j.numel())
    empty = torch.zeros(0, dtype=torch.long)
    return {
        "q_perm": torch.cat(q_perm) if q_perm else empty,
        "kv_slots": torch.cat(kv_slots) if kv_slots else empty,
        "local_lens": local_lens,
        "cu_q": torch.tensor(cu_q, dtype=torch.int32),
        "cu_k": torch.tensor(cu_k, dtype=torch.int32),
    }
