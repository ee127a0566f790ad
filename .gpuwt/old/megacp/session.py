"""A KV session: this rank's KV cache of a set of requests, and each step's metadata over it.

``KVSession`` owns what a model needs to run steps over a context-parallel paged KV cache, so a model of your own
needs no plumbing of its own (``LLMEngine`` uses the same object):

- the ``BlockTable`` (its CP world size, CP rank and interleave from the session's ``ParallelContext``), the
  ``BlockAllocator`` of virtual block ids and one ``PagedKVCache`` per layer;
- each request's cached length (tokens already in the CP group's caches);
- the ``AttentionMetadataBuilder`` whose persistent buffers every step's ``AttentionMetadata`` lives in (the CUDA-graph
  decode replays them, ``megacp.cuda_graph``).

Per step::

    meta = session.step([(request_id, new_token_ids), ...])   # blocks allocated as needed, metadata built
    hidden = model(meta.input_ids, meta, session.kv_caches)     # this rank's rows
    logits = lm_head(meta.select_logits_hidden(hidden))         # last new token of each request
    session.free(request_id)                                    # when a request is done

``step`` allocates before anything else and all-or-nothing: a step that does not fit raises ``KVCacheFullError``
before any collective, with the session unchanged. Every rank of a model-parallel replica holds the same session state
(same calls, same block ids), so the verdict is the same on every rank. The cached lengths advance when ``step``
returns: the step's new tokens are written into the caches by the forward that follows it; a step whose forward
fails should be followed by ``free`` of its requests.

``check_request_fits`` / ``validate_requests`` check requests against a cache before anything runs (what
``LLMEngine.generate`` calls first; pure, so every rank reaches the same verdict before any collective).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import torch
from torch import Tensor

from megacp.checks import check_int, check_memory, kv_cache_bytes, validate_prompt_ids
from megacp.config import kv_head_layout
from megacp.kv.allocator import BlockAllocator, KVCacheFullError, blocks_needed
from megacp.kv.block_table import BlockTable
from megacp.kv.latent_cache import LatentPagedCache
from megacp.kv.layout import cp_local_seq_lens, kv_capacity_tokens, local_slots
from megacp.kv.paged_cache import PagedKVCache
from megacp.layers.cp_metadata import AttentionMetadata
from megacp.layers.metadata_builder import AttentionMetadataBuilder
from megacp.parallel_state import ParallelContext, resolve_parallel_context


# ------------------------------------------------------------------------------------------------ sizes
def _max_blocks_per_seq(num_kv_blocks: int, block_size: int, max_seq_len: int | None, cp_world_size: int) -> int:
    """A block-table row's length: the blocks of the longest request, at most the whole cache."""
    if max_seq_len is None:
        return num_kv_blocks
    return min(num_kv_blocks, blocks_needed(max_seq_len, block_size, cp_world_size))


def kv_session_bytes(num_layers: int, num_kv_heads: int, head_dim: int, num_kv_blocks: int, block_size: int,
                     max_num_seqs: int, max_seq_len: int | None, itemsize: int, tp_size: int = 1,
                     cp_world_size: int = 1, latent: bool = False) -> int:
    """Bytes one rank's ``KVSession`` of these arguments allocates: its paged K/V caches (this TP rank's KV heads,
    ``config.kv_head_layout``; with ``latent=True`` one latent tensor per layer, ``num_kv_heads=1``) and its block
    table. What the session checks against the device's memory, and what a command line checks before it loads the
    model (examples/infer_llama.py)."""
    local_kv_heads = kv_head_layout(num_kv_heads, tp_size, 0)[0]  # the count is the same on every TP rank
    return kv_cache_bytes(num_kv_blocks, block_size, local_kv_heads, head_dim, num_layers, itemsize, max_num_seqs,
                          _max_blocks_per_seq(num_kv_blocks, block_size, max_seq_len, cp_world_size),
                          num_tensors=1 if latent else 2)


# ------------------------------------------------------------------------------------------------ requests
def check_request_fits(prompt_len: int, max_new_tokens: int, max_model_len: int, num_kv_blocks: int,
                       block_size: int, cp_world_size: int) -> None:
    """Raise ``ValueError`` (naming the arguments to change) if one request could never run, even in an empty cache."""
    if prompt_len < 1:
        raise ValueError("every prompt needs at least one token (got an empty prompt)")
    total = prompt_len + max_new_tokens
    if total > max_model_len:
        raise ValueError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens = {total} exceeds the model's "
            f"max_position_embeddings {max_model_len}; shorten the prompt or lower max_new_tokens "
            f"to {max(max_model_len - prompt_len, 0)}"
        )
    need = blocks_needed(total, block_size, cp_world_size)
    if need > num_kv_blocks:
        raise ValueError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens needs {need} KV blocks of "
            f"{block_size}x{cp_world_size} tokens, the cache has {num_kv_blocks}; raise num_kv_blocks to {need} "
            f"or lower max_new_tokens, or spread the cache over more ranks with a larger "
            f"prefill_context_parallel_size / decode_context_parallel_size"
        )


def validate_requests(prompt_ids: Any, max_new_tokens: int, *, vocab_size: int, max_model_len: int,
                      num_kv_blocks: int, block_size: int, cp_world_size: int) -> list[list[int]]:
    """Everything about a batch of requests that can be checked before the first step; returns the prompts as
    ``list[list[int]]``. ``max_new_tokens`` comes from an already validated ``SamplingParams``.
    """
    prompts = validate_prompt_ids(prompt_ids, vocab_size)
    for ids in prompts:
        check_request_fits(len(ids), max_new_tokens, max_model_len, num_kv_blocks, block_size, cp_world_size)
    return prompts


@dataclass
class _Sequence:
    row: int  # BlockTable row (its cached length is KVSession._cached[row])
    blocks: list[int] = field(default_factory=list)


def _token_list(request_id: Hashable, tokens: Sequence[int]) -> list[int]:
    """``tokens`` as Python ints; ``ValueError`` for a non-integer id (``int(2.5)`` would silently give token 2)."""
    try:
        return [operator.index(t) for t in tokens]
    except TypeError:
        raise ValueError(f"KVSession.step: request {request_id!r} has a non-integer token id in {list(tokens)!r}") \
            from None


class KVSession:
    """This rank's paged KV cache of up to ``max_num_seqs`` requests, and the metadata of each step over it.

    ``num_layers``: one ``PagedKVCache`` each (``kv_caches``). ``num_kv_heads``: the model's global KV head count
    (this rank stores ``max(1, num_kv_heads / tp)`` of them, ``config.kv_head_layout``, like
    ``ContextParallelAttention``). ``num_kv_blocks``:
    physical blocks per rank and layer, the same virtual ids on every CP rank (a block holds ``block_size`` tokens on
    each of the ``pcp·dcp`` CP ranks). ``max_seq_len``: the longest request (sizes the block table's rows; default:
    the whole cache). The cache memory is checked against the device before it is allocated. ``vocab_size``:
    given, every step's token ids are checked against it on the host, before anything changes (a tensor-parallel
    embedding would otherwise turn an out-of-vocabulary id into a zero row; ``LLMEngine`` checks its requests itself).
    ``latent=True``: an MLA model's cache (``LatentPagedCache``, one row of ``head_dim = kv_lora_rank +
    qk_rope_head_dim`` per token and layer, shared by every head and TP rank): give ``num_kv_heads=1``.
    ``parallel_context``: the layout (``resolve_parallel_context``: given, else the global one, else one rank).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_kv_blocks: int,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_seq_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        vocab_size: int | None = None,
        latent: bool = False,
        parallel_context: ParallelContext | None = None,
    ) -> None:
        self.vocab_size = None if vocab_size is None else check_int("KVSession(vocab_size)", vocab_size, 1)
        num_layers = check_int("KVSession(num_layers)", num_layers, 0)
        num_kv_heads = check_int("KVSession(num_kv_heads)", num_kv_heads, 1, hint="the model's global KV head count")
        head_dim = check_int("KVSession(head_dim)", head_dim, 1)
        num_blocks = check_int("KVSession(num_kv_blocks)", num_kv_blocks, 1, hint="KV blocks per rank, e.g. 64")
        block_size = check_int("KVSession(block_size)", block_size, 1, hint="KV tokens per block, e.g. 16")
        max_num_seqs = check_int("KVSession(max_num_seqs)", max_num_seqs, 1, hint="requests cached at once, e.g. 64")
        if latent and num_kv_heads != 1:
            raise ValueError(f"KVSession(latent=True) caches one latent row per token (MLA): pass num_kv_heads=1, "
                             f"got {num_kv_heads}")
        self.latent = bool(latent)
        ctx = self.parallel_context = resolve_parallel_context(parallel_context)
        W, R, interleave = ctx.cp_world_size, ctx.cp_rank, ctx.interleave_size
        self.cp_world_size, self.cp_rank, self.interleave_size = W, R, interleave
        self.block_size, self.num_kv_blocks = block_size, num_blocks
        self.device, self.dtype = torch.device(device), dtype
        self.num_local_kv_heads = kv_head_layout(num_kv_heads, ctx.tp_size, ctx.tp_rank)[0]
        if max_seq_len is not None:
            max_seq_len = check_int("KVSession(max_seq_len)", max_seq_len, 1)
        self.max_seq_len = max_seq_len
        max_blocks = _max_blocks_per_seq(num_blocks, block_size, max_seq_len, W)
        # Checked against this rank's device memory before allocating: a huge num_blocks or block_size is a clear
        # "needs N GiB" here rather than a MemoryError or an allocator failure.
        check_memory(
            kv_session_bytes(num_layers, num_kv_heads, head_dim, num_blocks, block_size, max_num_seqs, max_seq_len,
                             dtype.itemsize, ctx.tp_size, W, latent),
            self.device, "the KV cache (num_kv_blocks x block_size tokens, all layers)",
            "lower num_kv_blocks, block_size or max_num_seqs, or spread the cache over more ranks",
        )
        # The one check of the KV interleave against the block size (BlockTable's); the slot math trusts it after.
        self.block_table = BlockTable(block_size, max_num_seqs, max_blocks, W, R, interleave, self.device)
        self.allocator = BlockAllocator(num_blocks)
        self.kv_caches: list[PagedKVCache] | list[LatentPagedCache] = [
            LatentPagedCache(num_blocks, block_size, head_dim, dtype, self.device) if latent
            else PagedKVCache(num_blocks, block_size, self.num_local_kv_heads, head_dim, dtype, self.device)
            for _ in range(num_layers)
        ]
        self.builder = AttentionMetadataBuilder(
            self.block_table, self.device, max_num_reqs=max_num_seqs,
            null_slot=self.kv_caches[0].null_slot if self.kv_caches else None, parallel_context=ctx,
        )
        self._seqs: dict[Hashable, _Sequence] = {}
        # Each row's cached length, on the host: a pure-decode step reads its positions from it (decode_step)
        # with tensor ops; a free row holds 0.
        self._cached = torch.zeros(max_num_seqs, dtype=torch.long)
        self._free_rows = list(range(max_num_seqs))

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_kv_blocks: int, block_size: int = 16, max_num_seqs: int = 64,
                  max_seq_len: int | None = None, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, vocab_size: int | None = None,
                  parallel_context: ParallelContext | None = None) -> "KVSession":
        """A session whose caches fit ``model`` (megacp's ``LlamaForCausalLM`` / ``DeepseekForCausalLM``, or any
        module with their ``config.num_hidden_layers``, ``config.num_key_value_heads`` and ``head_dim``): K/V of
        the model's KV heads, or, when it has a ``latent_dim`` (MLA), one latent row per token. ``dtype`` and
        ``device`` default to the model's parameters'."""
        cfg = model.config
        latent_dim = getattr(model, "latent_dim", None)
        param = next(model.parameters())
        return cls(
            cfg.num_hidden_layers, 1 if latent_dim else cfg.num_key_value_heads, latent_dim or model.head_dim,
            num_kv_blocks, block_size, max_num_seqs, max_seq_len=max_seq_len, dtype=dtype or param.dtype,
            device=param.device if device is None else device, vocab_size=vocab_size, latent=bool(latent_dim),
            parallel_context=parallel_context,
        )

    # ------------------------------------------------------------------ sizes
    @property
    def max_num_seqs(self) -> int:
        return self.block_table.max_num_reqs

    @property
    def capacity_tokens(self) -> int:
        """Tokens the CP group's caches hold: ``num_blocks·block_size·pcp·dcp``."""
        return kv_capacity_tokens(self.num_kv_blocks, self.block_size, self.cp_world_size)

    def num_cached(self, request_id: Hashable) -> int:
        """Tokens of ``request_id`` already in the caches (0 for a request the session does not hold)."""
        seq = self._seqs.get(request_id)
        return 0 if seq is None else int(self._cached[seq.row])

    def __contains__(self, request_id: Hashable) -> bool:
        return request_id in self._seqs

    def tokens_stored(self) -> int:
        """Tokens this rank stores: its CP share of every held request's cached length."""
        return int(cp_local_seq_lens(self._cached, self.cp_world_size, self.cp_rank, self.interleave_size).sum())

    def local_slots(self, request_id: Hashable) -> Tensor:
        """This rank's cache slots of ``request_id``'s cached tokens, in local order (the positions they hold are
        ``cp_local_positions(num_cached, cp_world_size, cp_rank, interleave_size)``), e.g. to read its rows back.

        # -> [local cached length] long
        """
        seq = self._seqs.get(request_id)
        if seq is None:
            raise ValueError(f"KVSession.local_slots: request {request_id!r} is not in this session")
        n = int(cp_local_seq_lens(self._cached[seq.row : seq.row + 1], self.cp_world_size, self.cp_rank,
                                  self.interleave_size)[0])
        return local_slots(self.block_table.row_host(seq.row), torch.arange(n), self.block_size)

    # ------------------------------------------------------------------ blocks
    def _blocks_to_add(self, request_id: Hashable, num_tokens: int) -> int:
        seq = self._seqs.get(request_id)
        have = 0 if seq is None else len(seq.blocks)
        return max(0, blocks_needed(num_tokens, self.block_size, self.cp_world_size) - have)

    def _check_fits(self, wanted: dict[Hashable, int]) -> None:
        """KVCacheFullError unless every request of ``wanted`` (id -> total tokens) can get its rows and blocks."""
        blocks = sum(self._blocks_to_add(rid, n) for rid, n in wanted.items())
        rows = sum(1 for rid in wanted if rid not in self._seqs)
        too_long = [(rid, n) for rid, n in wanted.items() if blocks_needed(n, self.block_size, self.cp_world_size)
                    > self.block_table.max_num_blocks_per_req]
        if too_long:
            rid, n = too_long[0]
            raise KVCacheFullError(
                f"request {rid!r} needs {n} tokens, more than this session's max_seq_len / num_kv_blocks allow "
                f"({self.block_table.max_num_blocks_per_req} blocks of {self.block_size}x{self.cp_world_size} "
                f"tokens); build the KVSession with a larger max_seq_len or num_kv_blocks"
            )
        if rows > len(self._free_rows) or blocks > self.allocator.num_free:
            raise KVCacheFullError(
                f"out of KV cache: this step needs {blocks} more blocks and {rows} more request rows, "
                f"{self.allocator.num_free} of {self.num_kv_blocks} blocks and {len(self._free_rows)} of "
                f"{self.max_num_seqs} rows are free; free finished requests (KVSession.free), schedule fewer tokens, "
                f"or build the session with more num_kv_blocks / max_num_seqs (a larger "
                f"decode_context_parallel_size also spreads each sequence over more ranks)"
            )

    def can_reserve(self, request_id: Hashable, num_tokens: int) -> bool:
        """Whether ``reserve(request_id, num_tokens)`` would succeed."""
        try:
            self._check_fits({request_id: num_tokens})
        except KVCacheFullError:
            return False
        return True

    def reserve(self, request_id: Hashable, num_tokens: int) -> None:
        """Make room for ``num_tokens`` tokens of ``request_id`` (a new request gets a row), allocating its blocks now
        rather than step by step; ``KVCacheFullError`` and nothing changed when they do not fit."""
        self._check_fits({request_id: num_tokens})
        self._grow(request_id, num_tokens)

    def _grow(self, request_id: Hashable, num_tokens: int) -> _Sequence:
        seq = self._seqs.get(request_id)
        if seq is None:
            seq = self._seqs[request_id] = _Sequence(self._free_rows.pop(0))
        add = self._blocks_to_add(request_id, num_tokens)
        if add:
            new = self.allocator.allocate(add)
            seq.blocks += new
            self.block_table.append_row(seq.row, new)
        return seq

    def free(self, request_id: Hashable) -> None:
        """Forget ``request_id``: its blocks go back to the allocator, its row to the table."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            raise ValueError(f"KVSession.free: request {request_id!r} is not in this session")
        self.allocator.free(seq.blocks)
        self.block_table.clear_row(seq.row)
        self._cached[seq.row] = 0
        self._free_rows.append(seq.row)
        self._free_rows.sort()

    # ------------------------------------------------------------------ steps
    def step(
        self,
        requests: Sequence[tuple[Hashable, Sequence[int] | Tensor | int]],
        logits_requests: Sequence[int] | None = None,
        pad_decodes_to: int | None = None,
    ) -> AttentionMetadata:
        """Allocate what the step needs, build its metadata, advance the cached lengths.

        ``requests``: ``[(request_id, new_token_ids), ...]``, the new tokens of each request (a list or a CPU tensor of
        ids, or just their count: then ``meta.input_ids`` is None and the caller picks its rows with
        ``meta.local_tokens(...)``).
        A request the session does not hold yet starts at position 0; one with cached tokens continues after them
        (one new token = a decode, several = a prefill chunk over its cached context). ``logits_requests``: indices
        into ``requests`` whose last token ``meta.select_logits_hidden`` returns (default all);
        ``pad_decodes_to``: a pure-decode step padded to that many rows (CUDA-graph buckets).
        """
        parts, counts, kinds = [], [], set()
        for item in requests:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(f"KVSession.step: each request must be (request_id, new_token_ids), got {item!r}")
            rid, tokens = item
            if isinstance(tokens, int) and not isinstance(tokens, bool):
                kinds.add("count")
                counts.append(tokens)
            else:
                kinds.add("ids")
                parts.append(tokens.reshape(-1) if isinstance(tokens, Tensor) else _token_list(rid, tokens))
                counts.append(len(parts[-1]))
            if counts[-1] < 1:
                raise ValueError(f"KVSession.step: request {rid!r} has no new tokens; schedule at least one")
        if len(kinds) > 1:
            raise ValueError("KVSession.step: give every request's new tokens as ids, or every request's count")
        if self.vocab_size is not None and parts:  # on the host, the same verdict on every rank, nothing changed yet
            validate_prompt_ids([p.tolist() if isinstance(p, Tensor) else p for p in parts], self.vocab_size,
                                name="KVSession.step new token ids")
        rids = [rid for rid, _ in requests]
        if len(set(rids)) != len(rids):
            raise ValueError(f"KVSession.step: a request appears twice in one step: {rids}")
        held = torch.tensor([self._seqs[rid].row if rid in self._seqs else -1 for rid in rids], dtype=torch.long)
        cached = torch.where(held >= 0, self._cached[held.clamp(min=0)], 0).tolist()  # one read of the row state
        self._check_fits({rid: c + n for rid, c, n in zip(rids, cached, counts)})
        seqs = [self._grow(rid, c + n) for rid, c, n in zip(rids, cached, counts)]
        token_ids: list[int] | Tensor | None = None
        if "count" not in kinds:
            token_ids = (torch.cat([torch.as_tensor(part, dtype=torch.long) for part in parts])
                         if any(isinstance(part, Tensor) for part in parts) else [t for part in parts for t in part])
        rows = torch.tensor([s.row for s in seqs], dtype=torch.long)
        meta = self.builder.build(rows.tolist(), cached, counts, token_ids=token_ids,
                                  pad_decodes_to=pad_decodes_to, logits_requests=logits_requests)
        self._cached[rows] += torch.tensor(counts, dtype=torch.long)
        return meta

    def decode_step(self, request_ids: Sequence[Hashable], token_ids: Tensor | Sequence[int] | None = None,
                    pad_decodes_to: int | None = None) -> AttentionMetadata:
        """A pure-decode step: one new token for each of ``request_ids``, all held with cached tokens. The same
        metadata and state change as ``step([(rid, [tok]), ...], pad_decodes_to=...)``, built with tensor ops from
        the session's per-row state (positions from the cached lengths, slots from the block table's host copy),
        with no Python loop over requests but the id -> row lookup.

        # token_ids: [n] long (one new id per request, or None: counts only, ``meta.input_ids`` None)
        """
        try:
            rows = torch.tensor([self._seqs[rid].row for rid in request_ids], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"KVSession.decode_step: request {e.args[0]!r} is not in this session; its first step "
                             f"(the prompt) goes through KVSession.step") from None
        if len(set(request_ids)) != rows.numel():
            raise ValueError(f"KVSession.decode_step: a request appears twice in one step: {list(request_ids)}")
        ids = None if token_ids is None else torch.as_tensor(token_ids).reshape(-1)
        if ids is not None:
            if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.numel() != rows.numel():
                raise ValueError(f"KVSession.decode_step: token_ids must be {rows.numel()} integer ids (one per "
                                 f"request), got {ids.numel()} of {ids.dtype}")
            ids = ids.long()
            if self.vocab_size is not None and ids.numel() and bool(((ids < 0) | (ids >= self.vocab_size)).any()):
                bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
                raise ValueError(f"KVSession.decode_step new token ids: id {bad} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        pos = self._cached[rows]
        if rows.numel() and int(pos.min()) < 1:
            raise ValueError("KVSession.decode_step: every request needs cached tokens (a prompt goes through "
                             "KVSession.step)")
        grow = (pos // self.block_table.tokens_per_block >= self.block_table.num_blocks_host(rows)).nonzero()
        if grow.numel():  # the requests that cross into a new block: one more block each
            grow = grow.flatten()
            crossing = [request_ids[i] for i in grow.tolist()]
            self._check_fits({rid: p + 1 for rid, p in zip(crossing, pos[grow].tolist())})
            new = self.allocator.allocate(len(crossing))  # in caller order, the ids step would hand out
            for rid, block in zip(crossing, new):
                self._seqs[rid].blocks.append(block)
            self.block_table.append_blocks(rows[grow], new)
        meta = self.builder.build_decode(rows, pos, ids, pad_decodes_to)
        self._cached[rows] += 1
        return meta


# ------------------------------------------------------------------------------------------------ the step forward
def step_logits(model: Any, meta: AttentionMetadata, kv_caches: Sequence[Any] | None, logits: bool = True
                ) -> Tensor | None:
    """One step's forward: ``model`` over this rank's rows, then the logits of the rows ``meta`` selects.

    # -> [n, vocab] float32 (``model.compute_logits``' contract, full vocabulary on every TP rank), the last new token
    # of each request ``meta.select_logits_hidden`` picks; None with ``logits=False`` (a prompt chunk that samples
    # nothing still runs the forward: it writes the KV cache)
    The one step function of the eager engine and of the CUDA-graph capture (``megacp.cuda_graph``).
    """
    hidden = model(meta.input_ids, meta, kv_caches)  # [T_local, hidden]
    if not logits:
        return None
    return model.compute_logits(meta.select_logits_hidden(hidden))
