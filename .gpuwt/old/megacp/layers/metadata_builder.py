"""Builds each step's ``AttentionMetadata`` (``megacp.layers.cp_metadata``) on this rank, over persistent buffers.

``AttentionMetadataBuilder.build`` turns a step's schedule (per request: block-table row, cached tokens, new tokens)
into the common part and one metadata object per attention path: ``_build_decode`` (a fixed ``CpuGpuBuffer``: fixed
device addresses, what a CUDA graph replays) and ``_build_with_prefill``, which stages the pure host plan of
``step_plan.plan_prefill`` (prefill and context rows) in a ``StagingArena`` (one copy). Everything is computed on the
host from Python ints and the block table's host copy; ``build_attention_metadata`` is the one-off form
(training-style steps, tests).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import LongTensor, Tensor

from megacp.buffers import CpuGpuBuffer, StagingArena
from megacp.kv.block_table import BlockTable
from megacp.kv.layout import cp_local_seq_lens
from megacp.kv.paged_cache import write_plan
from megacp.layers.cp_metadata import (
    AttentionMetadata,
    ContextMetadata,
    DecodeMetadata,
    PrefillMetadata,
    Range,
)
from megacp.layers.step_plan import Schedule, make_schedule, plan_prefill
from megacp.parallel_state import ParallelContext, resolve_parallel_context


def _as_range(index: Tensor) -> Range:
    """(start, stop) if the host index is ``arange(start, stop)`` (then a slice replaces a gather), else None."""
    n = index.numel()
    if n == 0:
        return (0, 0)
    start = int(index[0])
    return (start, start + n) if torch.equal(index, torch.arange(start, start + n)) else None


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
        if not s.prefills:
            if logits_requests is not None and list(logits_requests) != list(range(len(s.rows))):
                raise ValueError("logits_requests: a pure-decode step gives every request's logits")
            return self.build_decode(torch.tensor(s.rows, dtype=torch.long),
                                     torch.tensor(s.computed, dtype=torch.long), ids, pad_decodes_to)
        if pad_decodes_to is not None:
            raise ValueError(f"pad_decodes_to={pad_decodes_to} needs a pure-decode step of at most that many "
                             f"requests and at most max_num_reqs={self.max_num_reqs}")
        self.block_table.commit()
        dec_pos = torch.tensor([s.computed[i] for i in s.decodes], dtype=torch.long)
        dec_rows = torch.tensor([s.rows[i] for i in s.decodes], dtype=torch.long)
        dec_tok = torch.tensor([s.offsets[i] for i in s.decodes], dtype=torch.long)
        decode = self._build_decode(dec_rows, dec_pos, dec_tok, ids, None) if s.decodes else None
        return self._build_with_prefill(s, ids, decode, logits_requests)

    def _schedule(self, req_rows, num_computed_tokens, num_new_tokens) -> Schedule:
        s = make_schedule(req_rows, num_computed_tokens, num_new_tokens)
        if not self.has_cache and any(c > 0 for c in s.computed):
            raise ValueError(
                "requests with num_computed_tokens > 0 read the KV cache; build the metadata with the rank's "
                "BlockTable (block_table=None is only for prefill-only steps without a cache)"
            )
        return s

    # ------------------------------------------------------------------ decode
    def build_decode(self, req_rows: LongTensor, num_computed: LongTensor, token_ids: Tensor | None = None,
                     pad_to: int | None = None) -> AttentionMetadata:
        """A pure-decode step's metadata from host tensors, with no loop over requests: the same metadata as
        ``build(req_rows, num_computed, [1] * n, token_ids, pad_to)``.

        # req_rows: [n] long (block-table rows), num_computed: [n] long (cached tokens, each >= 1),
        # token_ids: [n] long or None -> AttentionMetadata of max(n, pad_to) rows
        """
        n = int(req_rows.numel())
        if n == 0 and not pad_to:
            raise ValueError("AttentionMetadataBuilder.build_decode: schedule at least one request")
        if n and int(num_computed.min()) < 1:
            raise ValueError("AttentionMetadataBuilder.build_decode: every request needs num_computed_tokens >= 1 "
                             "(a request without cached tokens is a prefill: use build)")
        if token_ids is not None and token_ids.numel() != n:
            raise ValueError(f"token_ids has {token_ids.numel()} entries for {n} scheduled new tokens")
        if pad_to is not None and not n <= pad_to <= self.max_num_reqs:  # build's message too
            raise ValueError(f"pad_decodes_to={pad_to} needs a pure-decode step of at most that many "
                             f"requests and at most max_num_reqs={self.max_num_reqs}")
        self.block_table.commit()
        decode = self._build_decode(req_rows, num_computed, torch.arange(n), token_ids, pad_to)
        B = decode.num_reqs
        dev = self._decode_buf.gpu
        tok_host = self._decode_buf.cpu[self._TOK, :B].clone()
        # the common part lives in the fixed decode buffer too
        return AttentionMetadata(
            num_local_tokens=B, num_tokens=n, num_decodes=B, pcp_size=self.pcp_size, dcp_size=self.dcp_size,
            token_index=dev[self._TOK, :B], token_index_host=tok_host, positions=dev[self._POS, :B],
            input_ids=None if token_ids is None else dev[self._IDS, :B], logits_rows=None, logits_range=(0, B),
            decode=decode, pcp_group=self.pcp_group,
        )

    def _build_decode(self, rows: LongTensor, pos: LongTensor, tok: LongTensor, ids: Tensor | None,
                      pad_to: int | None) -> DecodeMetadata:
        """The decode rows of a step: table row, position and index into the step's new tokens of each decode
        (``ids``: all the step's new tokens) -> DecodeMetadata over the fixed decode buffer."""
        n = int(rows.numel())
        B = n if pad_to is None else pad_to
        if B > self.max_num_reqs:
            raise ValueError(f"{B} decode requests in one step exceed max_num_reqs={self.max_num_reqs}")
        if self.null_slot is None:
            raise ValueError("decode steps write every row's K/V (non-owned rows to the null slot): build the "
                             "AttentionMetadataBuilder with null_slot=kv_cache.null_slot")
        t = self.block_table
        slots = t.slot_mapping_host(rows, pos)
        lens = cp_local_seq_lens(pos + 1, t.cp_world_size, t.cp_rank, t.interleave_size)
        host = self._decode_buf.host()
        host[:, n:B] = 0  # padding rows: token 0 at position 0, table row 0, an empty shard...
        host[self._SLOT, n:B] = self.null_slot  # ...and a write that lands in the null block
        host[self._POS, :n] = pos
        host[self._SLOT, :n] = torch.where(slots >= 0, slots, self.null_slot)
        host[self._ROW, :n] = rows
        host[self._LEN, :n] = lens
        host[self._TOK, :n] = tok
        if ids is not None:
            host[self._IDS, :n] = ids[tok]
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
    def _build_with_prefill(self, s: Schedule, ids: Tensor | None, decode: DecodeMetadata | None,
                            logits_requests: Sequence[int] | None) -> AttentionMetadata:
        """Stage the step's host plan (``step_plan.plan_prefill``) in the arena, one copy, and wrap the results."""
        plan = plan_prefill(s, self.pcp_size, self.pcp_rank, self.block_table)
        arena = self._arena
        arena.add("token_index", plan.token_index)
        arena.add("positions", plan.positions)
        if ids is not None:
            arena.add("input_ids", ids[plan.token_index.clamp(min=0)])  # padding rows read any real token
        logits_rows = plan.logits_rows
        if logits_requests is not None:
            logits_rows = logits_rows[torch.as_tensor(list(logits_requests), dtype=torch.long)]
        logits_range = _as_range(logits_rows) if self.pcp_size == 1 else None
        if logits_range is None:
            arena.add("logits_rows", logits_rows)
        indices = {"caller_rows": plan.caller_rows, "gather": plan.gather, "q": plan.q_rows}
        ranges = {name: _as_range(index) for name, index in indices.items()}
        for name, index in indices.items():
            if ranges[name] is None:  # a plain range travels as (start, stop): the layer slices
                arena.add(name, index)
        write_rows, write_slots = write_plan(plan.slots)
        if write_rows is not None:
            arena.add("write_rows", write_rows)
        arena.add("write_slots", write_slots)
        arena.add("cu_q", torch.tensor(plan.cu_q, dtype=torch.int32))
        arena.add("cu_k", torch.tensor(plan.cu_k, dtype=torch.int32))
        if plan.seqused_k is not None:
            arena.add("seqused_k", torch.tensor(plan.seqused_k, dtype=torch.int32))
        ctx = plan.context
        if ctx is not None:
            for name in ("rows", "real_index", "real_rows", "q_perm", "kv_slots", "gather_rows"):
                arena.add("ctx_" + name, getattr(ctx, name))
            for name in ("cu_q", "cu_k", "cu_rows", "cu_ctx"):
                arena.add("ctx_" + name, torch.tensor(getattr(ctx, name), dtype=torch.int32))
        dev = arena.publish()
        prefill = PrefillMetadata(
            num_rows=plan.num_prefill_rows,
            gather_index=dev.get("gather"), gather_range=ranges["gather"],
            write_rows=dev.get("write_rows"), write_slots=dev["write_slots"],
            q_rows=dev.get("q"), q_range=ranges["q"],
            cu_seqlens_q=dev["cu_q"], cu_seqlens_k=dev["cu_k"],
            cu_seqlens_q_host=plan.cu_q, cu_seqlens_k_host=plan.cu_k,
            seqused_k=dev.get("seqused_k"), seqused_k_host=plan.seqused_k,
        )
        context = None if ctx is None else ContextMetadata(
            num_rows=int(ctx.rows.numel()), rows=dev["ctx_rows"], real_index=dev["ctx_real_index"],
            real_rows=dev["ctx_real_rows"], q_perm=dev["ctx_q_perm"], kv_slots=dev["ctx_kv_slots"],
            cu_seqlens_q=dev["ctx_cu_q"], cu_seqlens_k=dev["ctx_cu_k"],
            cu_seqlens_q_host=ctx.cu_q, cu_seqlens_k_host=ctx.cu_k,
            gather_rows=dev["ctx_gather_rows"], gather_pad=ctx.gather_pad,
            cu_seqlens_rows=dev["ctx_cu_rows"], cu_seqlens_ctx=dev["ctx_cu_ctx"],
            cu_seqlens_rows_host=ctx.cu_rows, cu_seqlens_ctx_host=ctx.cu_ctx,
        )
        return AttentionMetadata(
            num_local_tokens=plan.num_local, num_tokens=int(plan.caller_rows.numel()), num_decodes=len(s.decodes),
            pcp_size=self.pcp_size, dcp_size=self.dcp_size, caller_rows=dev.get("caller_rows"),
            caller_range=ranges["caller_rows"], token_index=dev["token_index"], token_index_host=plan.token_index,
            positions=dev["positions"], input_ids=dev.get("input_ids"), logits_rows=dev.get("logits_rows"),
            logits_range=logits_range, decode=decode, prefill=prefill, context=context, pcp_group=self.pcp_group,
        )


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
