"""Builds each step's ``AttentionMetadata`` (``megacp.layers.cp_metadata``) on this rank, over persistent buffers.

``AttentionMetadataBuilder.build`` turns a step's schedule (per request: block-table row, cached tokens, new tokens)
into the common part and one metadata object per attention path, each made by its own method: ``_build_decode``
(a fixed ``CpuGpuBuffer``: fixed device addresses, what a CUDA graph replays), ``_build_with_prefill`` and
``_context_host`` (a ``StagingArena``: one copy). Everything is computed on the host from Python ints and the block
table's host copy; ``build_attention_metadata`` is the one-off form (training-style steps, tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import LongTensor, Tensor

from megacp.buffers import CpuGpuBuffer, StagingArena
from megacp.kv.block_table import BlockTable
from megacp.kv.layout import cp_local_seq_lens, local_slots
from megacp.kv.paged_cache import write_plan
from megacp.layers.cp_metadata import (
    AttentionMetadata,
    ContextMetadata,
    DecodeMetadata,
    PrefillMetadata,
    Range,
)
from megacp.layers.pcp_split import pcp_chunk_size, pcp_restore_index, pcp_split_positions
from megacp.parallel_state import ParallelContext, resolve_parallel_context


def _as_range(index: Tensor) -> Range:
    """(start, stop) if the host index is ``arange(start, stop)`` (then a slice replaces a gather), else None."""
    n = index.numel()
    if n == 0:
        return (0, 0)
    start = int(index[0])
    return (start, start + n) if torch.equal(index, torch.arange(start, start + n)) else None


def _cat(parts: list[Tensor], dtype: torch.dtype = torch.long) -> Tensor:
    return torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype)


class _NoCacheTable:
    """The part of ``BlockTable`` a cache-free (prefill-only, training-style) step needs: every slot is -1."""

    interleave_size = 1
    block_size = 1
    max_num_blocks_per_req = 1

    def __init__(self, cp_world_size: int, cp_rank: int, device: torch.device) -> None:
        self.cp_world_size, self.cp_rank = cp_world_size, cp_rank
        self.table = torch.zeros(1, 1, dtype=torch.long, device=device)

    def slot_mapping_host(self, req_indices: Tensor, positions: Tensor) -> LongTensor:
        return torch.full((len(positions),), -1, dtype=torch.long)

    def commit(self) -> None:
        pass


@dataclass
class _Schedule:
    """A step's schedule on the host: each request's table row, cached and new token counts, new tokens' offset."""

    rows: list[int]
    computed: list[int]
    new: list[int]
    offsets: list[int]
    decodes: list[int]  # indices (caller order) of decode requests
    prefills: list[int]


class AttentionMetadataBuilder:
    """Builds each step's ``AttentionMetadata`` on this rank over persistent buffers.

    ``block_table``: this rank's CP-aware table (None: no KV cache, prefill-only steps). ``max_num_reqs``: most decode
    requests in a step (the fixed decode buffer's size; default: the table's rows). ``null_slot``: the caches'
    ``PagedKVCache.null_slot`` (needed for decodes). PCP/DCP sizes and ranks are ``parallel_context``'s
    (``resolve_parallel_context``), the layout the table must be built for too.
    """

    # rows of the fixed decode buffer
    _IDS, _POS, _SLOT, _ROW, _LEN, _TOK = range(6)

    def __init__(
        self,
        block_table: BlockTable | None,
        device: torch.device | str | None = None,
        max_num_reqs: int | None = None,
        null_slot: int | None = None,
        parallel_context: ParallelContext | None = None,
    ) -> None:
        ctx = self.parallel_context = resolve_parallel_context(parallel_context)
        self.pcp_size, self.pcp_rank, self.pcp_group = ctx.pcp_size, ctx.pcp_rank, ctx.pcp
        self.dcp_size = ctx.dcp_size
        if device is None:
            device = block_table.device if block_table is not None else "cpu"
        self.device = torch.device(device)
        if block_table is None:
            block_table = _NoCacheTable(ctx.cp_world_size, ctx.cp_rank, self.device)
        if (block_table.cp_world_size, block_table.cp_rank) != (ctx.cp_world_size, ctx.cp_rank):
            raise ValueError(
                f"block_table is for cp_world_size={block_table.cp_world_size}, cp_rank={block_table.cp_rank} but "
                f"this rank has pcp={ctx.pcp_size} (rank {ctx.pcp_rank}), dcp={ctx.dcp_size} (rank {ctx.dcp_rank}): "
                f"build the BlockTable with cp_world_size=pcp·dcp={ctx.cp_world_size} and cp_rank=pcp_rank·dcp+"
                f"dcp_rank={ctx.cp_rank}"
            )
        self.block_table = block_table
        self.has_cache = isinstance(block_table, BlockTable)
        self.max_num_reqs = max_num_reqs or getattr(block_table, "max_num_reqs", 1)
        self.null_slot = null_slot
        self._decode_buf = CpuGpuBuffer(6, self.max_num_reqs, dtype=torch.long, device=self.device)
        self._decode_table = torch.zeros(self.max_num_reqs, block_table.max_num_blocks_per_req, dtype=torch.long,
                                         device=self.device)
        self._arena = StagingArena(self.device)

    # ------------------------------------------------------------------ entry point
    def build(
        self,
        req_rows: Sequence[int],
        num_computed_tokens: Sequence[int],
        num_new_tokens: Sequence[int],
        token_ids: Sequence[int] | Tensor | None = None,
        pad_decodes_to: int | None = None,
        logits_requests: Sequence[int] | None = None,
    ) -> AttentionMetadata:
        """Metadata of one step. Per scheduled request (caller order): its block-table row, tokens already cached,
        tokens computed now (>= 1). ``token_ids``: the new tokens of all requests, concatenated (gives
        ``meta.input_ids``). ``pad_decodes_to``: a pure-decode step padded to that many rows (CUDA-graph buckets).
        ``logits_requests``: the requests (indices in caller order) ``select_logits_hidden`` returns, default all.
        Blocks for every ``num_computed + num_new`` position must already be in the block table.
        """
        s = self._schedule(req_rows, num_computed_tokens, num_new_tokens)
        ids = None if token_ids is None else torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        if ids is not None and ids.numel() != sum(s.new):
            raise ValueError(f"token_ids has {ids.numel()} entries for {sum(s.new)} scheduled new tokens")
        if pad_decodes_to is not None and (s.prefills or pad_decodes_to < len(s.decodes)
                                           or pad_decodes_to > self.max_num_reqs):
            raise ValueError(f"pad_decodes_to={pad_decodes_to} needs a pure-decode step of at most that many "
                             f"requests and at most max_num_reqs={self.max_num_reqs}")
        self.block_table.commit()
        decode = self._build_decode(s, ids, pad_decodes_to) if s.decodes or pad_decodes_to else None
        if not s.prefills and logits_requests is not None and list(logits_requests) != list(range(len(s.rows))):
            raise ValueError("logits_requests: a pure-decode step gives every request's logits")
        if not s.prefills:  # pure decode: the common part lives in the fixed decode buffer too
            B = decode.num_reqs
            dev = self._decode_buf.gpu
            tok_host = self._decode_buf.cpu[self._TOK, :B].clone()
            return AttentionMetadata(
                num_local_tokens=B, num_tokens=len(s.decodes), num_decodes=B, pcp_size=self.pcp_size,
                dcp_size=self.dcp_size,
                token_index=dev[self._TOK, :B], token_index_host=tok_host, positions=dev[self._POS, :B],
                input_ids=None if ids is None else dev[self._IDS, :B], logits_rows=None, logits_range=(0, B),
                decode=decode, pcp_group=self.pcp_group,
            )
        return self._build_with_prefill(s, ids, decode, logits_requests)

    def _schedule(self, req_rows, num_computed_tokens, num_new_tokens) -> _Schedule:
        n_req = len(req_rows)
        if not (len(num_computed_tokens) == len(num_new_tokens) == n_req):
            raise ValueError(
                f"AttentionMetadataBuilder.build: req_rows ({n_req}), num_computed_tokens ({len(num_computed_tokens)})"
                f" and num_new_tokens ({len(num_new_tokens)}) need one entry per scheduled request"
            )
        rows, computed, new = [int(i) for i in req_rows], [int(c) for c in num_computed_tokens], \
            [int(n) for n in num_new_tokens]
        if any(n < 1 for n in new) or any(c < 0 for c in computed):
            raise ValueError("AttentionMetadataBuilder.build: every request needs num_new_tokens >= 1 and "
                             "num_computed_tokens >= 0")
        if not self.has_cache and any(c > 0 for c in computed):
            raise ValueError(
                "requests with num_computed_tokens > 0 read the KV cache; build the metadata with the rank's "
                "BlockTable (block_table=None is only for prefill-only steps without a cache)"
            )
        offsets = [0] * n_req
        for i in range(1, n_req):
            offsets[i] = offsets[i - 1] + new[i - 1]
        decodes = [i for i in range(n_req) if computed[i] > 0 and new[i] == 1]
        prefills = [i for i in range(n_req) if not (computed[i] > 0 and new[i] == 1)]
        return _Schedule(rows, computed, new, offsets, decodes, prefills)

    # ------------------------------------------------------------------ decode
    def _build_decode(self, s: _Schedule, ids: Tensor | None, pad_to: int | None) -> DecodeMetadata:
        n = len(s.decodes)
        B = n if pad_to is None else pad_to
        if B > self.max_num_reqs:
            raise ValueError(f"{B} decode requests in one step exceed max_num_reqs={self.max_num_reqs}")
        if self.null_slot is None:
            raise ValueError("decode steps write every row's K/V (non-owned rows to the null slot): build the "
                             "AttentionMetadataBuilder with null_slot=kv_cache.null_slot")
        t = self.block_table
        pos = torch.tensor([s.computed[i] for i in s.decodes], dtype=torch.long)
        rows = torch.tensor([s.rows[i] for i in s.decodes], dtype=torch.long)
        slots = t.slot_mapping_host(rows, pos)
        lens = cp_local_seq_lens(pos + 1, t.cp_world_size, t.cp_rank, t.interleave_size)
        host = self._decode_buf.host()
        host[:, n:B] = 0  # padding rows: token 0 at position 0, table row 0, an empty shard...
        host[self._SLOT, n:B] = self.null_slot  # ...and a write that lands in the null block
        host[self._POS, :n] = pos
        host[self._SLOT, :n] = torch.where(slots >= 0, slots, self.null_slot)
        host[self._ROW, :n] = rows
        host[self._LEN, :n] = lens
        host[self._TOK, :n] = torch.tensor([s.offsets[i] for i in s.decodes], dtype=torch.long)
        if ids is not None:
            host[self._IDS, :n] = ids[host[self._TOK, :n]]
        dev = self._decode_buf.to_device()
        meta = DecodeMetadata(
            num_reqs=B, slot_mapping=dev[self._SLOT, :B], req_rows=dev[self._ROW, :B], seq_lens=dev[self._LEN, :B],
            seq_lens_host=lens.tolist() + [0] * (B - n) if pad_to is None else None,
            block_table=self._decode_table[:B],
            # a table kept on another device than the step (tests) is copied over; the engine's never is
            device_table=t.table if t.table.device == self.device else t.table.to(self.device),
        )
        if pad_to is None:  # a CUDA-graph step (padded) gathers the rows inside the graph
            meta.gather_block_table()
        return meta

    # ------------------------------------------------------------------ prefill (+ context)
    def _build_with_prefill(self, s: _Schedule, ids: Tensor | None, decode: DecodeMetadata | None,
                            logits_requests: Sequence[int] | None) -> AttentionMetadata:
        P, r, t = self.pcp_size, self.pcp_rank, self.block_table
        n_dec = len(s.decodes)
        rows_per = {i: 2 * pcp_chunk_size(s.new[i], P) if P > 1 else s.new[i] for i in s.prefills}
        num_prefill_rows = sum(rows_per.values())
        T = n_dec + num_prefill_rows  # local rows, the same on every PCP rank
        caller_rows = torch.empty(sum(s.new), dtype=torch.long)  # for gather_hidden: see AttentionMetadata
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
            slots.append(t.slot_mapping_host(torch.full((n,), s.rows[i], dtype=torch.long), c0 + torch.arange(n)))
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

        arena = self._arena
        token_index_t, positions_t = _cat(token_index), _cat(positions)
        arena.add("token_index", token_index_t)
        arena.add("positions", positions_t)
        if ids is not None:
            arena.add("input_ids", ids[token_index_t.clamp(min=0)])  # padding rows read any real token
        if logits_requests is not None:
            logits_rows = logits_rows[torch.as_tensor(list(logits_requests), dtype=torch.long)]
        logits_range = _as_range(logits_rows) if P == 1 else None
        if logits_range is None:
            arena.add("logits_rows", logits_rows)
        caller_range = _as_range(caller_rows)
        if caller_range is None:
            arena.add("caller_rows", caller_rows)
        gather_t, q_rows_t = _cat(gather), _cat(q_rows)
        write_rows, write_slots = write_plan(_cat(slots))
        ranges = {"gather": _as_range(gather_t), "q": _as_range(q_rows_t)}
        for name, index in (("gather", gather_t), ("q", q_rows_t)):
            if ranges[name] is None:
                arena.add(name, index)
        if write_rows is not None:
            arena.add("write_rows", write_rows)
        arena.add("write_slots", write_slots)
        arena.add("cu_q", torch.tensor(cu_q, dtype=torch.int32))
        # Keys by start and length (seqused_k): one call reads each chunk's prefix of the shared K/V, no copy. When
        # the ranges lie one after another (pcp = 1) plain cumulative offsets say the same.
        cu_k = k_starts + [seq_offset]
        contiguous = all(a + n == b for a, n, b in zip(k_starts, k_used, cu_k[1:]))
        arena.add("cu_k", torch.tensor(cu_k, dtype=torch.int32))
        if not contiguous:
            arena.add("seqused_k", torch.tensor(k_used, dtype=torch.int32))
        ctx_host = self._context_host(ctx_rows, ctx_real, ctx_req, ctx_len) if ctx_rows else None
        if ctx_host is not None:
            for name, value in ctx_host.items():
                if isinstance(value, Tensor):
                    arena.add("ctx_" + name, value)
        dev = arena.publish()

        def index(name: str) -> Tensor | None:
            return dev.get(name)

        prefill = PrefillMetadata(
            num_rows=num_prefill_rows,
            gather_index=index("gather"), gather_range=ranges["gather"],
            write_rows=index("write_rows"), write_slots=dev["write_slots"],
            q_rows=index("q"), q_range=ranges["q"],
            cu_seqlens_q=dev["cu_q"], cu_seqlens_k=dev["cu_k"], cu_seqlens_q_host=cu_q, cu_seqlens_k_host=cu_k,
            seqused_k=dev.get("seqused_k"), seqused_k_host=None if contiguous else k_used,
        )
        context = None
        if ctx_host is not None:
            context = ContextMetadata(
                num_rows=int(ctx_host["rows"].numel()), rows=dev["ctx_rows"], real_index=dev["ctx_real_index"],
                real_rows=dev["ctx_real_rows"], q_perm=dev["ctx_q_perm"], kv_slots=dev["ctx_kv_slots"],
                cu_seqlens_q=dev["ctx_cu_q"], cu_seqlens_k=dev["ctx_cu_k"],
                cu_seqlens_q_host=ctx_host["cu_q"].tolist(), cu_seqlens_k_host=ctx_host["cu_k"].tolist(),
            )
        return AttentionMetadata(
            num_local_tokens=int(token_index_t.numel()), num_tokens=int(caller_rows.numel()), num_decodes=n_dec,
            pcp_size=P, dcp_size=self.dcp_size, caller_rows=dev.get("caller_rows"), caller_range=caller_range,
            token_index=dev["token_index"], token_index_host=token_index_t, positions=dev["positions"],
            input_ids=dev.get("input_ids"), logits_rows=dev.get("logits_rows"), logits_range=logits_range,
            decode=decode, prefill=prefill, context=context, pcp_group=self.pcp_group,
        )

    def _context_host(self, ctx_rows: list[Tensor], ctx_real: list[Tensor], req_rows: list[int],
                      context_lens: list[int]) -> dict[str, Tensor]:
        """Host index tensors of the pass-Q context attention for the S prefill requests with cached context.

        Returns ``rows`` [Tc], ``real_index``/``real_rows``, ``q_perm`` [W·Tc] (the CP-gathered ``[W, Tc]`` query rows,
        flattened, regrouped request by request), ``kv_slots`` (this rank's cache slots of each request's context,
        in local = position order) and the int32 ``cu_q`` / ``cu_k`` [S+1] offsets of the varlen call.
        """
        t = self.block_table
        W = t.cp_world_size
        rows_t, real_t = torch.cat(ctx_rows), torch.cat(ctx_real)
        tc = int(rows_t.numel())
        local_lens = cp_local_seq_lens(torch.tensor(context_lens, dtype=torch.long), W, t.cp_rank, t.interleave_size)
        q_perm, kv_slots, cu_q, cu_k, start = [], [], [0], [0], 0
        for s, part in enumerate(ctx_rows):
            n_rows = part.numel()
            rows = start + torch.arange(n_rows)  # this request's entries among the Tc context rows
            q_perm.append((torch.arange(W).unsqueeze(1) * tc + rows.unsqueeze(0)).reshape(-1))  # same rows, every rank
            start += n_rows
            kv_slots.append(local_slots(t.row_host(req_rows[s]), torch.arange(int(local_lens[s])), t.block_size))
            cu_q.append(cu_q[-1] + W * n_rows)
            cu_k.append(cu_k[-1] + int(local_lens[s]))
        real_index = torch.nonzero(real_t).flatten()
        return {
            "rows": rows_t, "real_index": real_index, "real_rows": rows_t[real_index],
            "q_perm": torch.cat(q_perm), "kv_slots": _cat(kv_slots),
            "cu_q": torch.tensor(cu_q, dtype=torch.int32), "cu_k": torch.tensor(cu_k, dtype=torch.int32),
        }


def build_attention_metadata(
    req_rows: Sequence[int],
    num_computed_tokens: Sequence[int],
    num_new_tokens: Sequence[int],
    block_table: BlockTable | None,
    device: torch.device | str | None = None,
    null_slot: int | None = None,
    token_ids: Sequence[int] | Tensor | None = None,
    parallel_context: ParallelContext | None = None,
) -> AttentionMetadata:
    """One step's metadata without keeping a builder: ``AttentionMetadataBuilder(...).build(...)``.

    For one-off steps (training-style prefill with ``block_table=None``, tests); an engine keeps one builder, whose
    buffers persist across steps.
    """
    builder = AttentionMetadataBuilder(block_table, device, max_num_reqs=max(1, len(req_rows)),
                                       null_slot=null_slot, parallel_context=parallel_context)
    return builder.build(req_rows, num_computed_tokens, num_new_tokens, token_ids=token_ids)
