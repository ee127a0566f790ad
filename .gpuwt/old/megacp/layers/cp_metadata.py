"""Step metadata for context-parallel attention: a small common part plus one object per attention path.

A step schedules, per request, ``num_new`` tokens after ``num_computed`` cached ones. ``AttentionMetadataBuilder``
(``metadata_builder.py``) turns that into this rank's ``AttentionMetadata``, shared by every layer:

- the common part: which local rows hold which tokens (``token_index``, ``positions``, ``input_ids``) and which rows
  give the logits (``select_logits_hidden``);
- ``decode`` (``DecodeMetadata``): requests with cached tokens and one new token;
- ``prefill`` (``PrefillMetadata``): every other request's new tokens, PCP-split, attending causally to each other;
- ``context`` (``ContextMetadata``): the prefill rows of requests whose earlier tokens are already cached (chunked
  prefill, a follow-up turn), which also attend to that sharded context.

Each path object holds only what its path in ``ContextParallelAttention`` reads, and is made by its own function.

**Local row order** (the rows of every activation ``[T_local, ...]``): decode rows first, one per decode request in
caller order (not split: every PCP rank runs them); then each prefill request's local rows — with ``pcp > 1`` its head
chunk then its tail chunk, padded to the same count on every PCP rank (``pcp_split``), so the prefill K/V can be
all-gathered as one flat tensor.

**Crossing over.** Everything is computed on the host from the schedule's Python ints and the block table's host copy.
Decode metadata goes into a fixed ``CpuGpuBuffer`` (fixed device addresses: what a CUDA graph replays), the rest into a
``StagingArena``; each is copied with one non-blocking copy. Host values the kernels need (varlen offsets, shard
lengths, which index is a plain range) travel as Python ints, so no layer reads a device tensor back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import LongTensor, Tensor

from megacp.parallel_state import ParallelGroup

Range = Optional[tuple[int, int]]  # (start, stop) when an index tensor is exactly arange(start, stop), else None


def is_decode(num_computed: int, num_new: int) -> bool:
    """Whether a scheduled request is a decode (cached tokens and one new token); every other request is a prefill.
    The one rule: the builder splits a step's requests by it, and the engine asks it whether a step is pure decode
    (a CUDA-graph step) before building the step, whose ``AttentionMetadata.is_pure_decode`` then agrees."""
    return num_computed > 0 and num_new == 1


# --------------------------------------------------------------------------------------------- per-path metadata
@dataclass
class DecodeMetadata:
    """Decode rows ``[0, num_reqs)``: one query per request, against this rank's paged shard.

    ``slot_mapping`` [B]: where this rank stores the new token, or the cache's null slot when another CP rank does
    (or the row is CUDA-graph padding): every row is written, one fixed-shape copy. ``seq_lens`` [B]: the local
    shard length including the new token; ``seq_lens_host`` the same as ints (None inside a CUDA graph, where the
    kernel plans by the table's capacity). ``block_table`` [B, max_blocks]: the requests' rows (``req_rows``) of the
    device block table, gathered by ``gather_block_table`` (the graph runner replays that gather too).
    """

    num_reqs: int
    slot_mapping: LongTensor
    req_rows: LongTensor
    seq_lens: LongTensor
    seq_lens_host: list[int] | None
    block_table: LongTensor
    device_table: LongTensor  # [max_num_reqs, max_blocks], the BlockTable's device copy

    def gather_block_table(self) -> None:
        torch.index_select(self.device_table, 0, self.req_rows, out=self.block_table)


@dataclass
class PrefillMetadata:
    """Prefill rows ``[num_decodes, T_local)``: causal attention among each request's new tokens.

    After the PCP all-gather of the prefill K/V, ``gather_index`` picks every request's real new tokens in sequence
    order (requests concatenated); ``write_rows``/``write_slots`` are those this rank stores (rows None = all). One
    varlen sequence per local chunk with real queries: queries ``q_rows`` (local rows); keys, rows of the
    sequence-ordered K/V from the request's first new token to the chunk's end (bottom-right causal does the rest),
    given by start ``cu_seqlens_k[b]`` and length ``seqused_k[b]`` (``attention_with_lse``'s convention: the head and
    tail chunk read overlapping prefixes of one K/V, in one call); ``seqused_k`` is None when the ranges lie one
    after another (pcp = 1) and ``cu_seqlens_k`` is then cumulative. ``*_range``: the index is a plain range (slice
    instead of gather).
    """

    num_rows: int
    gather_index: LongTensor
    gather_range: Range
    write_rows: LongTensor | None
    write_slots: LongTensor
    q_rows: LongTensor
    q_range: Range
    cu_seqlens_q: Tensor  # [num_chunks+1] int32
    cu_seqlens_k: Tensor  # [num_chunks+1] int32: key starts (+ the total), cumulative without seqused_k
    cu_seqlens_q_host: list[int]
    cu_seqlens_k_host: list[int]
    seqused_k: Tensor | None = None  # [num_chunks] int32: each chunk's key count
    seqused_k_host: list[int] | None = None


@dataclass
class ContextMetadata:
    """Prefill rows of requests with cached context (``ContextParallelAttention._prefill_over_context``).

    ``rows`` [Tc]: every local row of those requests (padding included, so Tc is equal on all CP ranks). The queries
    are all-gathered over the CP group into ``W·Tc`` rows; ``q_perm`` regroups them request by request for one varlen
    non-causal call against each request's local context shard, read from the cache at ``kv_slots``.
    ``real_index``/``real_rows``: the entries of ``rows`` that are real tokens, and those rows.

    The pass-KV alternative (``megacp.layers.context_transfer`` says when): every rank's local context rows
    (``kv_slots``, zero-padded to ``gather_pad`` rows) are all-gathered over the CP group, ``gather_rows`` puts them
    in sequence order (request after request), and each request's ``rows`` (offsets ``cu_seqlens_rows``) attend to
    its whole context (offsets ``cu_seqlens_ctx``) locally, with no merge.
    """

    num_rows: int
    rows: LongTensor
    real_index: LongTensor
    real_rows: LongTensor
    q_perm: LongTensor
    kv_slots: LongTensor
    cu_seqlens_q: Tensor  # [S+1] int32, over the permuted W·Tc rows
    cu_seqlens_k: Tensor  # [S+1] int32, over kv_slots
    cu_seqlens_q_host: list[int]
    cu_seqlens_k_host: list[int]
    gather_rows: LongTensor
    gather_pad: int
    cu_seqlens_rows: Tensor  # [S+1] int32, over rows
    cu_seqlens_ctx: Tensor  # [S+1] int32, over gather_rows
    cu_seqlens_rows_host: list[int]
    cu_seqlens_ctx_host: list[int]


@dataclass
class AttentionMetadata:
    """One step on one rank: the common part, plus the metadata of each attention path the step uses.

    ``num_tokens``: the new tokens of all scheduled requests (``N``). ``token_index`` [T_local]: index of each local
    row into the concatenation (caller order) of all requests' new tokens, ``-1`` for PCP padding
    (``token_index_host``: the same on the CPU; a CUDA-graph bucket's padding rows, past ``num_tokens``, read token 0).
    ``positions`` [T_local]: absolute positions (padding: 0). ``input_ids`` [T_local]: this rank's token ids when the
    builder was given them. ``pcp_size``/``dcp_size``: the layout the metadata was built for (each layer checks it).
    ``caller_rows`` [N] (when a step has prefill rows): row of each new token, caller order, in this rank's rows
    all-gathered over PCP (rank-major; ``gather_hidden``).

    For your own per-token tensors: ``local_tokens(values)`` gives this rank's rows of any ``[N, ...]`` tensor (labels,
    positions, ...), ``gather_hidden(hidden)`` every token's hidden state back in caller order.
    """

    num_local_tokens: int
    num_tokens: int
    num_decodes: int
    pcp_size: int
    dcp_size: int
    token_index: LongTensor
    token_index_host: LongTensor
    positions: LongTensor
    input_ids: LongTensor | None
    logits_rows: LongTensor | None  # [num_reqs] local row of each request's last token where this rank has it, else -1
    logits_range: Range  # every request's logits row is local, consecutive (pure decode, pcp = 1)
    decode: DecodeMetadata | None = None
    prefill: PrefillMetadata | None = None
    context: ContextMetadata | None = None
    pcp_group: ParallelGroup | None = None  # the builder's parallel context's PCP group
    caller_rows: LongTensor | None = None
    caller_range: Range = None  # caller_rows is a plain range (one prefill, pcp = 1): a slice

    @property
    def is_pure_decode(self) -> bool:
        """Every request of the step is a decode (``is_decode``): no prefill rows, fixed shapes (CUDA-graph steps)."""
        return self.prefill is None

    def select_logits_hidden(self, hidden: Tensor) -> Tensor:
        """Hidden state of each request's last new token, in caller order, identical on every PCP rank.

        # hidden: [T_local, H] -> [num_reqs, H]
        Each row comes from one PCP rank (the token's owner; rank 0 for decodes in a mixed step); the others add
        exact zeros in one all-reduce over PCP.
        """
        if hidden.shape[0] != self.num_local_tokens:
            raise ValueError(
                f"select_logits_hidden: hidden has {hidden.shape[0]} rows, this step has {self.num_local_tokens} "
                "local tokens (pass the hidden states of meta.token_index's rows)"
            )
        if self.logits_range is not None:
            return hidden[self.logits_range[0] : self.logits_range[1]]
        rows = self.logits_rows
        if self.pcp_size == 1:
            return hidden[rows]
        mine = (rows >= 0).unsqueeze(-1)
        picked = torch.where(mine, hidden[rows.clamp(min=0)], torch.zeros_like(hidden[:1]))
        return self.pcp_group.all_reduce(picked)

    def local_tokens(self, values: Tensor, fill: float | int = 0) -> Tensor:
        """This rank's rows of a per-token tensor given for every new token in caller order (ids, labels, ...).

        # values: [num_tokens, ...] -> [T_local, ...]; padding rows (PCP padding, CUDA-graph padding) hold ``fill``
        Differentiable in ``values``. A CPU tensor is indexed on the host, any other on the metadata's device.
        """
        if values.shape[0] != self.num_tokens:
            raise ValueError(
                f"local_tokens: values has {values.shape[0]} rows, the step has {self.num_tokens} new tokens (give one "
                "row per new token, requests concatenated in the order they were scheduled)"
            )
        n, T = self.num_tokens, self.num_local_tokens
        if self.prefill is None:  # pure decode: local rows are the requests in caller order, then graph padding
            if T == n:
                return values
            return torch.cat([values, values.new_full((T - n, *values.shape[1:]), fill)])
        index = self.token_index_host if values.device.type == "cpu" else self.token_index
        out = values[index.clamp(min=0)]
        if self.pcp_size == 1:  # no PCP padding
            return out
        pad = (index < 0).view(-1, *[1] * (values.dim() - 1))
        return torch.where(pad, torch.full_like(out, fill), out)

    def gather_hidden(self, hidden: Tensor) -> Tensor:
        """Every new token's hidden state, in caller order, identical on every PCP rank (an all-gather over PCP).

        # hidden: [T_local, H] -> [num_tokens, H]
        For outputs of every position (scoring a prompt, a reward model). A training loss is cheaper on the local rows
        (``local_tokens(labels)``): this all-gather's backward sums every PCP rank's gradient.
        """
        if hidden.shape[0] != self.num_local_tokens:
            raise ValueError(
                f"gather_hidden: hidden has {hidden.shape[0]} rows, this step has {self.num_local_tokens} local tokens"
            )
        if self.prefill is None:  # decode rows are the same on every PCP rank, in caller order
            return hidden[: self.num_tokens]
        if self.pcp_size > 1:
            hidden = self.pcp_group.all_gather(hidden, dim=0)  # [pcp·T_local, H], rank-major
        if self.caller_range is not None:
            return hidden[self.caller_range[0] : self.caller_range[1]]
        return hidden[self.caller_rows]
