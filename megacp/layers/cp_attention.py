"""Context-parallel attention: PCP prefill, prefill over cached context, DCP/PCP decode (DESIGN §3).

One step's local tokens (``AttentionMetadata`` of ``cp_metadata.py``, built once per step by ``metadata_builder.py``)
are decode rows first, then each prefill request's share of new tokens. ``ContextParallelAttention.forward`` sends
each kind down its own path, with that path's metadata (``meta.decode``, ``meta.prefill``, ``meta.context``):

- ``_decode``: decode rows. Their new K/V is written on the owning CP rank, then DCP all-gathers the query heads,
  every rank attends to its local paged shard, writing out and LSE into one packed buffer, and ``cp_merge_packed``
  all-gathers it over the CP group once and merges this rank's heads locally: two collectives per layer at most,
  none at pcp = dcp = 1 (it equals a DCP merge then a PCP merge, which cost four).
- ``_prefill_pcp``: prefill rows. K/V are all-gathered over PCP and restored to sequence order; each rank writes the
  tokens it owns into its cache; each local chunk (head and tail of the DualChunkSwap split) attends causally,
  bottom-right aligned, to the request's new tokens up to the chunk's end.
- ``_prefill_over_context``: prefill rows of requests with tokens already cached (chunked prefill, a follow-up turn).
  Their queries also attend to the context, which lives sharded over the ``pcp·dcp`` ranks of the CP group, by
  pass-Q (``_context_pass_q``: gather the queries, attend each shard, merge like DCP decode with the group's ranks in
  place of heads) or pass-KV (``_context_pass_kv``: gather the context's K/V shards, attend locally, no merge);
  ``context_transfer`` picks one, "auto" by the rule of ``megacp.layers.context_transfer`` (Meta's CP inference
  paper), the same verdict on every CP rank. The partial result is then LSE-merged with the causal attention over
  the new tokens from ``_prefill_pcp``.

Conventions: q ``[T, Hq_local, D]``, k/v ``[T, Hkv_local, D]``; LSE natural log, float32, ``-inf`` for a row that sees
no key (an empty local shard), so every merge is exact.

No host syncs: the layer reads only host values of the metadata (counts, varlen offsets, shard lengths, ranges) and
indexes with precomputed index tensors, never with boolean masks or ``.item()``; cache writes get the rows this rank
stores and their slots ready-made (``PagedKVCache.write_rows``). tests/test_no_host_sync.py holds it to that. The
decode path has fixed shapes on top (every row writes, non-owned ones to the null slot), so it can be captured in a
CUDA graph (``megacp.cuda_graph``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import LongTensor, Tensor, nn

from megacp.config import debug_checks, kv_head_layout, validate_model_parallel
from megacp.kv.paged_cache import PagedKVCache
from megacp.layers.context_transfer import check_context_transfer, choose_context_transfer
from megacp.layers.cp_metadata import AttentionMetadata, ContextMetadata, DecodeMetadata, PrefillMetadata
from megacp.layers.pcp_split import pcp_chunk_size, pcp_restore_index, pcp_split_positions
from megacp.ops.attention import AttentionBackend, attention_with_lse, paged_attention_with_lse, select_backend
from megacp.ops.attention_grad import needs_grad
from megacp.ops.merge import cp_merge_gathered, cp_merge_packed, dcp_merge, merge_attn_states
from megacp.parallel_state import ParallelContext, resolve_parallel_context

__all__ = [
    "ContextParallelAttention",
    "pcp_chunk_size",
    "pcp_restore_index",
    "pcp_split_positions",
]


def _rows(x: Tensor, index: LongTensor | None, as_range: tuple[int, int] | None) -> Tensor:
    """``x[index]``, as a slice (no copy) when the metadata says the index is a plain range."""
    if as_range is not None:
        return x[as_range[0] : as_range[1]]
    return x[index]


def _index(index: LongTensor | None, as_range: tuple[int, int] | None, device: torch.device) -> LongTensor:
    """The index tensor itself; a range's ``arange`` (made on the device: no copy over) when only a range was sent."""
    return index if as_range is None else torch.arange(as_range[0], as_range[1], device=device)


class ContextParallelAttention(nn.Module):
    """Attention core of one layer (after QKV projection and RoPE, before the output projection).

    ``num_heads`` / ``num_kv_heads`` are the model's *global* head counts; this TP rank gets ``num_heads / tp`` query
    heads and ``max(1, num_kv_heads / tp)`` KV heads (``config.kv_head_layout``: replicated when
    ``tp > num_kv_heads``, DESIGN §3 GQA). Its TP/PCP/DCP/CP groups are those of ``parallel_context``
    (``resolve_parallel_context``: given, else the global one, else one rank); ``backend`` picks the attention
    kernel (see ``megacp.ops.attention``). ``context_transfer``: how the prefill over cached context reaches the other
    CP ranks' shards: ``"auto"`` (``choose_context_transfer``), ``"pass_q"`` or ``"pass_kv"``. The layer has no
    parameters.
    """

    latent = False  # MLA's LatentAttention: one latent row per token, so only tp % dcp == 0 (DESIGN §3b)

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        backend: str | None = None,
        parallel_context: ParallelContext | None = None,
        context_transfer: str = "auto",
    ) -> None:
        super().__init__()
        self.context_transfer = check_context_transfer(context_transfer)
        ctx = self.parallel_context = resolve_parallel_context(parallel_context)
        self.pcp_group, self.dcp_group, self.cp_group = ctx.pcp, ctx.dcp, ctx.cp
        validate_model_parallel(num_heads, num_kv_heads, ctx.tp_size, ctx.dcp_size, mla=self.latent)
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.num_local_heads = num_heads // ctx.tp_size
        self.num_local_kv_heads = kv_head_layout(num_kv_heads, ctx.tp_size, ctx.tp_rank)[0]
        self.head_dim = self.out_dim = head_dim
        self.scale = float(scale)
        self.backend = backend  # as given (None: automatic); what runs is attention_backend(device)
        self._backends: dict[str, AttentionBackend] = {}

    def attention_backend(self, device: torch.device) -> AttentionBackend:
        """The attention backend this layer runs on ``device``'s type: chosen on the first call for that device
        (``select_backend``: ``backend=``, else ``$MEGACP_ATTN_BACKEND``, else the best available) and kept, so the
        environment is read once and every step runs the same kernels. Its ``varlen`` serves prefill; its ``paged``
        hook decode (the CUDA backends': ``megacp.ops.backends_common._paged`` → the Triton kernel of
        ``megacp.ops.paged_decode``), else ``paged_attention_with_lse`` gathers the shard."""
        impl = self._backends.get(device.type)
        if impl is None:
            impl = self._backends[device.type] = select_backend(device, self.backend)
        return impl

    # ------------------------------------------------------------------------------------------------ entry point
    def forward(self, q: Tensor, k: Tensor | None, v: Tensor | None, meta: AttentionMetadata,
                kv_cache: PagedKVCache | None, kv_written: bool = False) -> Tensor:
        """Attention output of this rank's local tokens.

        # q: [T_local, Hq_local, D], k/v: [T_local, Hkv_local, D] (rows in meta's local order) -> [T_local, Hq_local, D]
        With ``kv_cache=None`` (training-style) the step must be prefill-only without cached context; that path is
        differentiable (the PCP all-gather's backward is a reduce-scatter). Padding rows return zeros.
        ``kv_written``: a pure-decode step whose new K/V are already at ``meta.decode.slot_mapping`` in ``kv_cache``
        (a fused kernel wrote them with RoPE: ``megacp.ops.decode_fused``); ``k`` and ``v`` are then None.
        """
        self._check_layout(meta)
        if kv_written:
            if meta.prefill is not None or meta.decode is None or kv_cache is None:
                raise ValueError("ContextParallelAttention: kv_written=True is for pure-decode steps with a kv_cache "
                                 "(the fused kernel wrote the decode rows' K/V); pass k and v otherwise")
            self._check_shapes(q, None, None, meta, kv_cache)
            return self._decode(q, None, None, meta.decode, kv_cache)
        self._check_shapes(q, k, v, meta, kv_cache)
        return self._attend(q, (k, v), meta, kv_cache)

    def _attend(self, q: Tensor, kv: tuple[Tensor, ...], meta: AttentionMetadata, kv_cache: Any) -> Tensor:
        """Each path on its rows, the prefill outputs scattered to their local rows, the context part LSE-merged in.

        # q: [T_local, Hq_local, Dq], kv: per-token tensors [T_local, ...] handed to the paths (GQA: k and v; MLA:
        # the latent rows) -> [T_local, Hq_local, out_dim]
        """
        if kv_cache is None and (meta.decode is not None or meta.context is not None):
            raise ValueError(
                f"{type(self).__name__}: decode requests and prefills over cached context need a kv_cache; "
                "pass the layer's cache (kv_cache=None is only for prefill-only steps without context)"
            )
        T, B = meta.num_local_tokens, meta.num_decodes
        o_dec = self._decode(q[:B], *(t[:B] for t in kv), meta.decode, kv_cache) if B else None
        pre = meta.prefill
        if pre is None:
            return o_dec if o_dec is not None else q.new_zeros(T, self.num_local_heads, self.out_dim)
        o_new, lse_new = self._prefill_pcp(q, *(t[B:] for t in kv), pre, kv_cache)
        in_order = pre.q_range == (B, T)  # every prefill row is a real chunk query, in order (pcp = 1): no scatter
        ctx = meta.context
        q_rows = None if in_order and ctx is None else _index(pre.q_rows, pre.q_range, q.device)
        if in_order:
            out = o_new if o_dec is None else torch.cat([o_dec, o_new])
        else:
            out = q.new_zeros(T, self.num_local_heads, self.out_dim)
            if o_dec is not None:
                out = torch.cat([o_dec, out[B:]])
            out = out.index_copy(0, q_rows, o_new)
        if ctx is not None:
            lse = q.new_full((T, self.num_local_heads), float("-inf"), dtype=torch.float32)
            lse = lse.index_copy(0, q_rows, lse_new)
            o_ctx, lse_ctx = self._prefill_over_context(q[ctx.rows], ctx, kv_cache)
            merged, _ = merge_attn_states(out[ctx.rows], lse[ctx.rows], o_ctx, lse_ctx)
            out = out.index_copy(0, ctx.real_rows, merged[ctx.real_index])
        return out

    # ------------------------------------------------------------------------------------------------ decode
    def _decode(self, q: Tensor, k: Tensor | None, v: Tensor | None, meta: DecodeMetadata, kv_cache: PagedKVCache
                ) -> Tensor:
        """Decode rows (identical on every PCP rank).

        # q: [B, Hq_local, D], k/v: [B, Hkv_local, D] (None: already written) -> [B, Hq_local, D]
        The new token's K/V is written first (on its owning CP rank; the others write it to the null slot), so it
        is attended exactly once. Fixed shapes and no host values except the optional shard lengths: this whole
        path is captured in the CUDA-graph decode step.
        """
        if k is not None:
            kv_cache.write_rows(k, v, None, meta.slot_mapping)
        # DCP ranks share one KV head (GQA rule) but hold different query heads: gather them all (dcp_rank major;
        # a flat gather along a new leading dim, then one copy into head order) and attend to our shard.
        B, H, D = q.shape
        dcp = self.dcp_group.world_size
        q_all = q
        if dcp > 1:
            q_all = rearrange(self.dcp_group.all_gather(q.unsqueeze(0), dim=0), "r b h d -> b (r h) d")
        # Every CP rank (the PCP ranks too: they hold the other shards and computed the same queries) has a partial
        # over all dcp·H heads. One packed all-gather over the CP group and a local merge give this rank its own
        # heads, LSE-corrected: the same as a DCP then a PCP merge, in one latency-bound small collective
        # instead of up to four (see cp_merge_gathered). The kernel writes its partial straight into the
        # collective's packed [out | lse] buffer (float32): no cast or concatenation before the send. Under autograd
        # the partial is a new tensor instead (writing into views of one buffer is not differentiable) and
        # cp_merge_gathered packs it.
        packed = None
        if self.cp_group.world_size > 1 and not needs_grad(q_all):
            packed = q.new_empty(B, dcp * H, D + 1, dtype=torch.promote_types(q.dtype, torch.float32))
        out, lse = paged_attention_with_lse(
            q_all, kv_cache.k, kv_cache.v, meta.block_table, meta.seq_lens, self.scale,
            backend=self.attention_backend(q.device),
            seq_lens_host=meta.seq_lens_host, out=None if packed is None else packed[..., :D],
            lse=None if packed is None else packed[..., D],
        )
        if packed is not None:
            return cp_merge_packed(packed, dcp, self.cp_group, q.dtype)[0]  # [B, Hq_local, D]
        if self.cp_group.world_size > 1:
            return cp_merge_gathered(out, lse, dcp, self.cp_group)[0]
        return out

    # ------------------------------------------------------------------------------------------------ prefill
    def _prefill_pcp(
        self, q: Tensor, k: Tensor, v: Tensor, meta: PrefillMetadata, kv_cache: PagedKVCache | None
    ) -> tuple[Tensor, Tensor]:
        """Causal attention of the local prefill chunks over their requests' new tokens.

        # q: [T_local, Hq_local, D] (all rows; the chunks' rows are meta.q_rows),
        # k/v: [T_local − num_decodes, Hkv_local, D] (the prefill rows)
        # -> (out [Q, Hq_local, D], lse [Q, Hq_local] float32) for the Q rows meta.q_rows
        """
        # Every PCP rank has the same number of prefill rows, so one flat all-gather collects all of them.
        # [N_new, Hkv_local, D], in sequence order
        k_seq = _rows(self.pcp_group.all_gather(k, dim=0), meta.gather_index, meta.gather_range)
        v_seq = _rows(self.pcp_group.all_gather(v, dim=0), meta.gather_index, meta.gather_range)
        if kv_cache is not None:  # only the tokens this CP rank owns
            kv_cache.write_rows(k_seq, v_seq, meta.write_rows, meta.write_slots)
        # ONE varlen call, one sequence per chunk: its real queries against the request's keys up to the chunk's
        # end, a prefix of k_seq read in place (seqused_k: the head and tail chunk's ranges overlap). With
        # bottom-right alignment the chunk's last query sees every key, its first sees the prefix up to itself.
        host = (meta.cu_seqlens_q_host, meta.cu_seqlens_k_host)
        return attention_with_lse(
            _rows(q, meta.q_rows, meta.q_range), k_seq, v_seq,
            meta.cu_seqlens_q, meta.cu_seqlens_k, causal=True, scale=self.scale,
            backend=self.attention_backend(q.device),
            host_cu_seqlens=host if meta.seqused_k is None else host + (meta.seqused_k_host,),
            seqused_k=meta.seqused_k,
        )

    def _prefill_over_context(self, q: Tensor, meta: ContextMetadata, kv_cache: Any) -> tuple[Tensor, Tensor]:
        """Attention of prefill rows to their requests' cached context, sharded over the CP group.

        # q: [Tc, Hq_local, Dq] (meta.rows, padding included so Tc is equal on every CP rank)
        # -> (out [Tc, Hq_local, out_dim], lse [Tc, Hq_local] float32) over all context tokens of the request
        """
        if meta.kv_slots.device.type == "cpu" or debug_checks():  # free on CPU; a sync on CUDA
            kv_cache.check_slots(meta.kv_slots)
        if self.context_way(meta, q.dtype) == "pass_kv":
            return self._context_pass_kv(q, meta, kv_cache)
        return self._context_pass_q(q, meta, kv_cache)

    def context_way(self, meta: ContextMetadata, dtype: torch.dtype) -> str:
        """``"pass_q"`` or ``"pass_kv"`` for this step's context rows: the override, else ``choose_context_transfer``
        on host ints equal on every CP rank (so all ranks take the same collectives)."""
        if self.context_transfer != "auto":
            return self.context_transfer
        q_dim, out_dim, kv_row_dim = self._context_widths()
        return choose_context_transfer(meta.num_rows, meta.gather_pad, self.num_local_heads, q_dim, out_dim,
                                       kv_row_dim, self.cp_group.world_size, dtype.itemsize)[0]

    def _context_widths(self) -> tuple[int, int, int]:
        """(query width, merged output width per head, numbers per context token) as the two ways move them."""
        return self.head_dim, self.head_dim, 2 * self.num_local_kv_heads * self.head_dim

    def _context_pass_q(self, q: Tensor, meta: ContextMetadata, kv_cache: PagedKVCache) -> tuple[Tensor, Tensor]:
        """Pass-Q: every CP rank attends all ``W·Tc`` gathered queries to its own shard (non-causal: the whole context
        precedes the new tokens); the partials are merged like DCP decode, with the CP ranks in place of the heads.

        # q: [Tc, Hq_local, D] -> (out [Tc, Hq_local, D], lse [Tc, Hq_local] float32)
        """
        W = self.cp_group.world_size
        q_all = rearrange(self.cp_group.all_gather(q.unsqueeze(0), dim=0), "w t h d -> (w t) h d")  # CP rank major
        k_ctx = kv_cache.k.flatten(0, 1)[meta.kv_slots]  # [sum local context lens, Hkv_local, D], local order
        v_ctx = kv_cache.v.flatten(0, 1)[meta.kv_slots]
        out_seq, lse_seq = attention_with_lse(
            q_all[meta.q_perm], k_ctx, v_ctx, meta.cu_seqlens_q, meta.cu_seqlens_k,
            causal=False, scale=self.scale, backend=self.attention_backend(q.device),
            host_cu_seqlens=(meta.cu_seqlens_q_host, meta.cu_seqlens_k_host),
        )
        out = torch.empty_like(out_seq).index_copy_(0, meta.q_perm, out_seq)  # back to CP-rank-major rows
        lse = torch.empty_like(lse_seq).index_copy_(0, meta.q_perm, lse_seq)
        # [W·Tc] rows -> [Tc, W·H]: the gathered ranks become "heads", ordered by CP rank, as dcp_merge expects.
        out = rearrange(out, "(w t) h d -> t (w h) d", w=W)
        lse = rearrange(lse, "(w t) h -> t (w h)", w=W)
        return dcp_merge(out, lse, self.cp_group)

    def _context_pass_kv(self, q: Tensor, meta: ContextMetadata, kv_cache: PagedKVCache) -> tuple[Tensor, Tensor]:
        """Pass-KV: all-gather the context's K/V shards (K and V side by side: one collective), put them in sequence
        order (``meta.gather_rows``), attend the local queries to each request's whole context; no merge.

        # q: [Tc, Hq_local, D] -> (out [Tc, Hq_local, D], lse [Tc, Hq_local] float32)
        """
        D = self.head_dim
        slots = meta.kv_slots
        local = torch.cat([kv_cache.k.flatten(0, 1)[slots], kv_cache.v.flatten(0, 1)[slots]], dim=-1)
        local = F.pad(local, (0, 0, 0, 0, 0, meta.gather_pad - meta.cu_seqlens_k_host[-1]))  # equal shapes to gather
        kv = self.cp_group.all_gather(local, dim=0)[meta.gather_rows]  # [sum context lens, Hkv_local, 2·D]
        return attention_with_lse(
            q, kv[..., :D], kv[..., D:], meta.cu_seqlens_rows, meta.cu_seqlens_ctx, causal=False, scale=self.scale,
            backend=self.attention_backend(q.device),
            host_cu_seqlens=(meta.cu_seqlens_rows_host, meta.cu_seqlens_ctx_host),
        )

    # ------------------------------------------------------------------------------------------------ checks
    def _check_layout(self, meta: AttentionMetadata) -> None:
        """The metadata must be built for the PCP and DCP sizes this layer was built with (else its indices point
        at rows, and its slots at shards, of another layout)."""
        built = (self.pcp_group.world_size, self.dcp_group.world_size)
        if (meta.pcp_size, meta.dcp_size) != built:
            raise ValueError(
                f"{type(self).__name__} was built for prefill_context_parallel_size={built[0]}, "
                f"decode_context_parallel_size={built[1]} but the step metadata is for "
                f"prefill_context_parallel_size={meta.pcp_size}, decode_context_parallel_size={meta.dcp_size}; build "
                f"the model and the metadata under the same initialize_model_parallel(...) (a layer built before it "
                f"is initialised runs as a single rank)"
            )

    def _check_shapes(self, q: Tensor, k: Tensor | None, v: Tensor | None, meta: AttentionMetadata,
                      kv_cache: PagedKVCache | None) -> None:
        T, Hq, Hkv, D = meta.num_local_tokens, self.num_local_heads, self.num_local_kv_heads, self.head_dim
        if kv_cache is not None and (kv_cache.num_kv_heads, kv_cache.head_dim) != (Hkv, D):
            raise ValueError(
                f"ContextParallelAttention holds {Hkv} KV heads of dim {D} on this rank, but the kv_cache was made for "
                f"{kv_cache.num_kv_heads} of dim {kv_cache.head_dim}; make the caches under the same "
                f"tensor_model_parallel_size (KVSession(num_kv_heads=<the model's global count>) does)"
            )
        # kv_written: only q is passed
        k_shape, v_shape = ((T, Hkv, D),) * 2 if k is None else (tuple(k.shape), tuple(v.shape))
        if tuple(q.shape) != (T, Hq, D) or k_shape != (T, Hkv, D) or k_shape != v_shape:
            raise ValueError(
                f"ContextParallelAttention expects q [{T}, {Hq}, {D}] and k, v [{T}, {Hkv}, {D}] (local tokens of "
                f"the step, this TP rank's heads of num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}), "
                f"got {tuple(q.shape)}, {k_shape}, {v_shape}"
            )
