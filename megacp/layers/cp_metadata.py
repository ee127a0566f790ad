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

**No host syncs in the layers.** Everything is computed on the host from the schedule's Python ints and the block
table's host copy, then moved to the device in one non-blocking copy per dtype (from pinned memory on CUDA). What the
layers and kernels need on the host (varlen offsets, lengths, which index is a plain range) travels as Python ints in
the metadata, so no attention layer reads a device tensor back: on CUDA each read-back stalls the host until the GPU
has caught up, and a step of ~40 of them made decode host-bound (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import LongTensor, Tensor

from megacp.kv.block_table import BlockTable
from megacp.kv.layout import cp_local_seq_lens
from megacp.kv.paged_cache import write_plan

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


# --------------------------------------------------------------------------------------------- the metadata
Range = Optional[tuple[int, int]]  # (start, stop) when an index tensor is exactly arange(start, stop), else None


@dataclass
class StepMetadata:
    """Everything the attention layers need about one step, on one rank (see the module docstring for the order).

    Public fields the model and engine rely on: ``token_index``, ``positions``, ``select_logits_hidden``.
    The rest is consumed by ``ContextParallelAttention``. Tensors are on the step's device; ``*_host`` fields and
    the ``*_range`` shortcuts are host values, so the layers never read a device tensor back.
    """

    num_decodes: int  # decode rows are local rows [0, num_decodes)
    pcp_size: int

    # [T_local] index into the concatenation (caller order) of all requests' new tokens; -1 for PCP padding.
    token_index: LongTensor
    # [T_local] absolute position of each local token (padding: 0).
    positions: LongTensor
    # [num_reqs] this rank's share of each request's tokens already in the (sharded) cache, in caller order.
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

    # ---- sync-free forms of the above, computed on the host (the layers use these)
    # Cache writes: only the rows this rank stores, with their slots (all >= 0). rows None = every row, in order.
    decode_write_rows: LongTensor | None = None  # [Nd] rows of the decode batch
    decode_write_slots: LongTensor | None = None  # [Nd]
    prefill_write_rows: LongTensor | None = None  # [Np] rows of the sequence-ordered new-token K/V
    prefill_write_slots: LongTensor | None = None  # [Np]
    ctx_real_index: LongTensor | None = None  # [Tc_real] entries of ctx_rows that are real rows
    ctx_real_rows: LongTensor | None = None  # [Tc_real] ctx_rows[ctx_real_index]
    # Host copies: varlen offsets for the kernels, decode shard lengths, the local rows' token indices.
    cu_seqlens_q_host: list[int] | None = None
    cu_seqlens_k_host: list[int] | None = None
    ctx_cu_seqlens_q_host: list[int] | None = None
    ctx_cu_seqlens_k_host: list[int] | None = None
    decode_local_seq_lens_host: list[int] | None = None
    token_index_host: LongTensor | None = None  # CPU copy of token_index (the engine gathers input ids on the host)
    num_ctx_rows: int = 0
    # Index tensors that are a plain range, as (start, stop): the layers slice instead of gathering.
    prefill_gather_range: Range = None
    chunk_q_range: Range = None
    chunk_k_range: Range = None
    logits_range: Range = None  # every request's logits row is local and they are consecutive (e.g. pure decode)

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
        if self.logits_range is not None:  # a slice: no gather, no masking (pcp == 1 always ends up here or below)
            return hidden[self.logits_range[0] : self.logits_range[1]]
        rows = self.logits_rows.to(hidden.device)
        if self.pcp_size == 1:  # every row is local on a single PCP rank
            return hidden[rows]
        mine = rows >= 0
        picked = torch.where(mine.unsqueeze(-1), hidden[rows.clamp(min=0)], torch.zeros_like(hidden[:1]))
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
    """The part of ``BlockTable`` a cache-free (prefill-only) step needs: every token's slot is -1, no decodes."""

    interleave_size = 1
    block_size = 1
    max_num_blocks_per_req = 1
    device = torch.device("cpu")

    def __init__(self, cp_world_size: int, cp_rank: int) -> None:
        self.cp_world_size, self.cp_rank = cp_world_size, cp_rank

    def slot_mapping_host(self, req_indices: Tensor, positions: Tensor) -> LongTensor:
        return torch.full((len(positions),), -1, dtype=torch.long)


def host_to_device(tensors: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Move host tensors to ``device`` with one copy per dtype: packed flat, pinned and non-blocking on CUDA.

    A blocking host->device copy synchronises the stream, and a copy per tensor costs a launch each; this is the
    one place a step's metadata crosses over. Returns views of the packed device buffer, in the input shapes.
    """
    if device.type == "cpu":
        return dict(tensors)
    out: dict[str, Tensor] = {}
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, t in tensors.items():
        by_dtype.setdefault(t.dtype, []).append(name)
    for dtype, names in by_dtype.items():
        flat = torch.cat([tensors[n].reshape(-1) for n in names])
        if flat.numel() == 0:
            out.update({n: torch.empty(tensors[n].shape, dtype=dtype, device=device) for n in names})
            continue
        if device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=True)
        start = 0
        for n in names:
            size = tensors[n].numel()
            out[n] = flat[start : start + size].view(tensors[n].shape)
            start += size
    return out


def _as_range(index: Tensor) -> Range:
    """(start, stop) if the host index is ``arange(start, stop)`` (then a slice replaces a gather), else None."""
    n = index.numel()
    if n == 0:
        return (0, 0)
    start = int(index[0])
    return (start, start + n) if torch.equal(index, torch.arange(start, start + n)) else None


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
    Everything is computed on the host (the block table's host copy) and copied over once per dtype.
    """
    n_req = len(req_indices)
    if not (len(num_computed_tokens) == len(num_new_tokens) == n_req):
        raise ValueError(
            f"build_step_metadata: req_indices ({n_req}), num_computed_tokens ({len(num_computed_tokens)}) and "
            f"num_new_tokens ({len(num_new_tokens)}) must have one entry per scheduled request"
        )
    computed_l, new_l, req_l = [int(c) for c in num_computed_tokens], [int(n) for n in num_new_tokens], \
        [int(i) for i in req_indices]
    if any(n < 1 for n in new_l) or any(c < 0 for c in computed_l):
        raise ValueError("build_step_metadata: every request needs num_new_tokens >= 1 and num_computed_tokens >= 0")
    P, r, D, d = _parallel_coords(pcp_size, pcp_rank, dcp_size, dcp_rank)
    if block_table is None:
        if any(c > 0 for c in computed_l):
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

    computed = torch.tensor(computed_l, dtype=torch.long)
    new_offsets = [0] * n_req  # start of each request in the concatenated new tokens
    for i in range(1, n_req):
        new_offsets[i] = new_offsets[i - 1] + new_l[i - 1]
    decodes = [i for i in range(n_req) if computed_l[i] > 0 and new_l[i] == 1]
    prefills = [i for i in range(n_req) if not (computed_l[i] > 0 and new_l[i] == 1)]
    rows_per_prefill = {i: 2 * pcp_chunk_size(new_l[i], P) if P > 1 else new_l[i] for i in prefills}
    num_prefill_rows = sum(rows_per_prefill.values())
    n_dec = len(decodes)
    logits_rows = torch.full((n_req,), -1, dtype=torch.long)

    # ---- decodes: one row each, the same on every PCP rank
    dec_pos = torch.tensor([computed_l[i] for i in decodes], dtype=torch.long)
    dec_req = torch.tensor([req_l[i] for i in decodes], dtype=torch.long)
    token_index = [torch.tensor([new_offsets[i] for i in decodes], dtype=torch.long)]
    positions = [dec_pos]
    decode_slots = block_table.slot_mapping_host(dec_req, dec_pos)
    decode_local_seq_lens = cp_local_seq_lens(dec_pos + 1, W, R, I)
    if r == 0:  # decodes are replicated over PCP: one rank provides their logits rows
        logits_rows[decodes] = torch.arange(n_dec)

    # ---- prefills
    gather_index, slots, q_rows, k_index, cu_q, cu_k = [], [], [], [], [0], [0]
    ctx_rows, ctx_real, ctx_req, ctx_len = [], [], [], []
    row = n_dec  # local row where the current request starts
    seq_offset = 0  # start of the current request in the sequence-ordered new-token K/V
    for i in prefills:
        n, c0, L = new_l[i], computed_l[i], rows_per_prefill[i]
        rel = pcp_split_positions(n, P, r)  # [L]
        real = rel < n
        token_index.append(torch.where(real, new_offsets[i] + rel, torch.full_like(rel, -1)))
        positions.append(torch.where(real, c0 + rel, torch.zeros_like(rel)))

        # Where each of the request's real positions sits after the all-gather of all ranks' prefill rows.
        restore = pcp_restore_index(n, P)  # index into cat over ranks of L rows each
        owner, j = restore // L, restore % L
        gather_index.append(owner * num_prefill_rows + (row - n_dec) + j)
        slots.append(block_table.slot_mapping_host(torch.full((n,), req_l[i], dtype=torch.long),
                                                   c0 + torch.arange(n)))

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
            ctx_req.append(req_l[i])
            ctx_len.append(c0)

        last_owner, last_j = int(owner[-1]), int(j[-1])
        if last_owner == r:
            logits_rows[i] = row + last_j
        row += L
        seq_offset += n

    def cat(parts: list[Tensor], dtype: torch.dtype = torch.long) -> Tensor:
        return torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype)

    token_index_t, gather_t, q_rows_t, k_index_t = cat(token_index), cat(gather_index), cat(q_rows), cat(k_index)
    slots_t, ctx_rows_t, ctx_real_t = cat(slots), cat(ctx_rows), cat(ctx_real, torch.bool)
    ctx = _context_index([part.numel() for part in ctx_rows], ctx_req, ctx_len, block_table)
    dec_write_rows, dec_write_slots = write_plan(decode_slots)
    pre_write_rows, pre_write_slots = write_plan(slots_t)
    ctx_real_index = torch.nonzero(ctx_real_t).flatten()
    host = {
        "token_index": token_index_t,
        "positions": cat(positions),
        "local_context_lens": cp_local_seq_lens(computed, W, R, I),
        "decode_slots": decode_slots,
        "decode_req": dec_req,
        "decode_local_seq_lens": decode_local_seq_lens,
        "prefill_gather_index": gather_t,
        "prefill_slots": slots_t,
        "chunk_q_rows": q_rows_t,
        "chunk_k_index": k_index_t,
        "cu_seqlens_q": torch.tensor(cu_q, dtype=torch.int32),
        "cu_seqlens_k": torch.tensor(cu_k, dtype=torch.int32),
        "ctx_rows": ctx_rows_t,
        "ctx_is_real": ctx_real_t,
        "ctx_q_perm": ctx["q_perm"],
        "ctx_kv_slots": ctx["kv_slots"],
        "ctx_local_lens": ctx["local_lens"],
        "ctx_cu_seqlens_q": ctx["cu_q"],
        "ctx_cu_seqlens_k": ctx["cu_k"],
        "logits_rows": logits_rows,
        "decode_write_slots": dec_write_slots,
        "prefill_write_slots": pre_write_slots,
        "ctx_real_index": ctx_real_index,
        "ctx_real_rows": ctx_rows_t[ctx_real_index],
    }
    if dec_write_rows is not None:
        host["decode_write_rows"] = dec_write_rows
    if pre_write_rows is not None:
        host["prefill_write_rows"] = pre_write_rows
    dev = host_to_device(host, device)
    # The decode rows of the block table are gathered on the device (the table can be large; no copy over).
    if n_dec:
        decode_block_table = block_table.local_block_table(dev["decode_req"]).to(device)
    else:
        decode_block_table = torch.zeros(0, block_table.max_num_blocks_per_req, dtype=torch.long, device=device)
    return StepMetadata(
        num_decodes=n_dec, pcp_size=P,
        token_index=dev["token_index"],
        positions=dev["positions"],
        local_context_lens=dev["local_context_lens"],
        decode_slots=dev["decode_slots"],
        decode_block_table=decode_block_table,
        decode_local_seq_lens=dev["decode_local_seq_lens"],
        prefill_gather_index=dev["prefill_gather_index"],
        prefill_slots=dev["prefill_slots"],
        chunk_q_rows=dev["chunk_q_rows"],
        chunk_k_index=dev["chunk_k_index"],
        cu_seqlens_q=dev["cu_seqlens_q"],
        cu_seqlens_k=dev["cu_seqlens_k"],
        ctx_rows=dev["ctx_rows"],
        ctx_is_real=dev["ctx_is_real"],
        ctx_q_perm=dev["ctx_q_perm"],
        ctx_kv_slots=dev["ctx_kv_slots"],
        ctx_local_lens=dev["ctx_local_lens"],
        ctx_cu_seqlens_q=dev["ctx_cu_seqlens_q"],
        ctx_cu_seqlens_k=dev["ctx_cu_seqlens_k"],
        logits_rows=dev["logits_rows"],
        pcp_group=pcp_group,
        decode_write_rows=dev.get("decode_write_rows"),
        decode_write_slots=dev["decode_write_slots"],
        prefill_write_rows=dev.get("prefill_write_rows"),
        prefill_write_slots=dev["prefill_write_slots"],
        ctx_real_index=dev["ctx_real_index"],
        ctx_real_rows=dev["ctx_real_rows"],
        cu_seqlens_q_host=cu_q,
        cu_seqlens_k_host=cu_k,
        ctx_cu_seqlens_q_host=ctx["cu_q"].tolist(),
        ctx_cu_seqlens_k_host=ctx["cu_k"].tolist(),
        decode_local_seq_lens_host=decode_local_seq_lens.tolist(),
        token_index_host=token_index_t,
        num_ctx_rows=int(ctx_rows_t.numel()),
        prefill_gather_range=_as_range(gather_t),
        chunk_q_range=_as_range(q_rows_t),
        chunk_k_range=_as_range(k_index_t),
        logits_range=_as_range(logits_rows) if P == 1 else None,
    )


def _context_index(
    rows_per_req: list[int], req_indices: list[int], context_lens: list[int], block_table: BlockTable
) -> dict[str, Tensor]:
    """Index tensors of the pass-Q context attention for the S prefill requests with cached context.

    rows_per_req: each request's local rows (equal on every CP rank); context_lens: its num_computed. Returns
    ``q_perm`` [W·Tc] (the CP-gathered ``[W, Tc]`` query rows, flattened, regrouped request by request),
    ``kv_slots`` (this rank's cache slots of each request's context, in local = position order), ``local_lens`` [S]
    and the int32 ``cu_q`` / ``cu_k`` [S+1] offsets of the varlen call. All on the host.
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
        kv_slots.append(block_table.row_host(req_indices[s])[j // B] * B + j % B)
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
