"""Context-parallel attention over MLA latent rows (DESIGN §3b): the paths of ``ContextParallelAttention`` with one
latent row per token instead of per-head K/V.

A token's latent row is ``c_kv`` (``kv_lora_rank`` = r numbers) then ``k_pe`` (``qk_rope_head_dim``, RoPE applied),
``D = r + rope`` in all; ``kv_b_proj`` up-projects ``c_kv`` to each head's ``k_nope`` and ``v``. Its two halves
(``W_UK``, ``W_UV``: ``LatentUpProjection``) let decode skip the up-projection ("absorbed" weights):
``q·k = (q_nope·W_UK)·c_kv + q_pe·k_pe`` and ``softmax·V = W_UV·(softmax·c_kv)``, so every head attends to the
latent rows themselves, one shared "KV head" of width D whose values are the first r columns.

- ``_decode`` (absorbed): the new row is written on its owning CP rank (the others write the null slot); the latent
  queries are all-gathered over the DCP group's heads, each rank attends to its local latent shard
  (``paged_mla_decode_with_lse``) writing into the packed ``[out | lse]`` buffer, ``cp_merge_packed`` merges the
  CP group's partials in latent space (D = r: exact, since ``W_UV`` is linear), then ``W_UV``.
- ``_prefill_pcp`` (not absorbed): the latent rows, not the expanded K/V, are all-gathered over PCP (D numbers a
  token instead of ``H·(qk_head_dim + v_head_dim)``), restored to sequence order, the owned ones written, then
  up-projected and attended causally as for GQA (one varlen call, each chunk's keys a prefix of the new tokens'
  by ``seqused_k``); ``qk_head_dim`` may differ from ``v_head_dim``.
- ``_prefill_over_context``: the new tokens attend to the request's cached context, sharded over the CP group,
  by pass-Q or pass-KV (``ContextParallelAttention.context_way``, the rule of ``context_transfer.py``):
  pass-Q (absorbed): the latent queries are all-gathered over the CP group, attend to each rank's local context
  shard, are merged like DCP decode in latent space, then ``W_UV``; pass-KV: the context's latent rows (D numbers a
  token) are all-gathered, put in sequence order, up-projected and attended locally, with no merge. The layer
  merges either with the new-token part by LSE.

No host syncs and fixed decode shapes, as in ``ContextParallelAttention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from megacp.kv.latent_cache import LatentPagedCache
from megacp.layers.cp_attention import ContextParallelAttention, _rows
from megacp.layers.cp_metadata import AttentionMetadata, ContextMetadata, DecodeMetadata, PrefillMetadata
from megacp.ops.attention import attention_with_lse
from megacp.ops.merge import cp_merge_packed, dcp_merge
from megacp.ops.paged_mla_decode import paged_mla_decode_with_lse
from megacp.parallel_state import ParallelContext


class LatentUpProjection:
    """``kv_b_proj``'s local weight ``[H_local·(nope + v), r]`` as the prefill up-projection and as the absorbed
    ``W_UK [H_local, nope, r]`` / ``W_UV [H_local, v, r]`` of decode.

    The halves are views of the weight, split once per weight storage (after loading, after ``.to()``): no copy,
    nothing per step (a batched matmul reads the strided views as they are). A plain object, not a module: the
    weight belongs to the layer's ``kv_b_proj``.
    """

    def __init__(self, weight: nn.Parameter, num_local_heads: int, qk_nope_head_dim: int, v_head_dim: int) -> None:
        self.weight, self.heads, self.nope, self.v = weight, num_local_heads, qk_nope_head_dim, v_head_dim
        self._split: tuple[int, Tensor, Tensor] | None = None

    def _halves(self) -> tuple[Tensor, Tensor]:
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:  # training: views of the parameter itself, differentiable
            return self._views(w)
        if self._split is None or self._split[0] != w.data_ptr():
            self._split = (w.data_ptr(), *self._views(w.detach()))
        return self._split[1], self._split[2]

    def _views(self, w: Tensor) -> tuple[Tensor, Tensor]:
        w = w.view(self.heads, self.nope + self.v, -1)
        return w[:, : self.nope], w[:, self.nope :]

    def expand(self, c_kv: Tensor) -> tuple[Tensor, Tensor]:
        """Up-projection of latents.  # c_kv: [N, r] -> (k_nope [N, H_local, nope], v [N, H_local, v])"""
        kv = F.linear(c_kv, self.weight).view(c_kv.shape[0], self.heads, self.nope + self.v)
        return kv[..., : self.nope], kv[..., self.nope :]

    def absorb_query(self, q_nope: Tensor) -> Tensor:
        """``q_nope·W_UK``, per head.  # q_nope: [B, H_local, nope] -> [B, H_local, r]"""
        w_uk = self._halves()[0]
        return torch.bmm(q_nope.transpose(0, 1), w_uk.to(q_nope.dtype)).transpose(0, 1)

    def values(self, o_latent: Tensor) -> Tensor:
        """``W_UV·o``, per head.  # o_latent: [B, H_local, r] -> [B, H_local, v]"""
        w_uv = self._halves()[1]
        return torch.bmm(o_latent.transpose(0, 1), w_uv.to(o_latent.dtype).transpose(1, 2)).transpose(0, 1)


class LatentAttention(ContextParallelAttention):
    """Attention core of one MLA layer (after the projections and RoPE, before ``o_proj``).

    ``num_heads``: global query heads (``num_heads / tp`` on this rank); there is one latent "KV head", so DCP needs
    only ``tp % dcp == 0``. ``up``: the layer's ``LatentUpProjection``. ``parallel_context``: the layout.
    ``context_transfer``: how the prefill over cached context reaches the other CP ranks' shards: ``"auto"``
    (``megacp.layers.context_transfer.choose_context_transfer``), ``"pass_q"`` or ``"pass_kv"``.
    """

    latent = True

    def __init__(
        self,
        num_heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        scale: float,
        up: LatentUpProjection,
        backend: str | None = None,
        parallel_context: ParallelContext | None = None,
        context_transfer: str = "auto",
    ) -> None:
        super().__init__(num_heads, 1, qk_nope_head_dim + qk_rope_head_dim, scale, backend, parallel_context,
                         context_transfer)
        self.kv_lora_rank, self.nope, self.rope = kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim
        self.latent_dim = kv_lora_rank + qk_rope_head_dim
        self.out_dim = v_head_dim
        self.up = up

    def forward(self, q: Tensor, latent: Tensor, meta: AttentionMetadata, kv_cache: LatentPagedCache | None
                ) -> Tensor:  # type: ignore[override]
        """Attention output of this rank's local tokens.

        # q: [T_local, H_local, qk_head_dim] (q_nope | q_pe, RoPE applied), latent: [T_local, r + rope]
        # -> [T_local, H_local, v_head_dim]
        ``kv_cache=None``: a prefill-only step without context, differentiable. Padding rows return zeros.
        """
        self._check_layout(meta)
        T, H, D = meta.num_local_tokens, self.num_local_heads, self.head_dim
        if tuple(q.shape) != (T, H, D) or tuple(latent.shape) != (T, self.latent_dim):
            raise ValueError(
                f"LatentAttention expects q [{T}, {H}, {D}] and latent [{T}, {self.latent_dim}] (local tokens of the "
                f"step, this TP rank's heads of num_heads={self.num_heads}), got {tuple(q.shape)}, "
                f"{tuple(latent.shape)}"
            )
        if kv_cache is not None and (not isinstance(kv_cache, LatentPagedCache)
                                     or kv_cache.latent_dim != self.latent_dim):
            raise ValueError(
                f"LatentAttention needs a LatentPagedCache of latent_dim={self.latent_dim} (kv_lora_rank + "
                f"qk_rope_head_dim), got {type(kv_cache).__name__} "
                f"{getattr(kv_cache, 'latent_dim', '')}; make the session for the MLA model (KVSession.for_model)"
            )
        return self._attend(q, (latent,), meta, kv_cache)

    def _latent_query(self, q: Tensor) -> Tensor:
        """``[q_nope·W_UK | q_pe]``.  # q: [N, H_local, qk_head_dim] -> [N, H_local, r + rope]"""
        return torch.cat([self.up.absorb_query(q[..., : self.nope]), q[..., self.nope :]], dim=-1)

    # ------------------------------------------------------------------------------------------------ decode
    def _decode(self, q: Tensor, latent: Tensor, meta: DecodeMetadata, kv_cache: LatentPagedCache
                ) -> Tensor:  # type: ignore[override]
        """# q: [B, H_local, qk_head_dim], latent: [B, r + rope] -> [B, H_local, v_head_dim]"""
        kv_cache.write_rows(latent, None, meta.slot_mapping)
        q_lat = self._latent_query(q)  # [B, H, D]
        B, H, D = q_lat.shape
        dcp, r = self.dcp_group.world_size, self.kv_lora_rank
        if dcp > 1:
            q_lat = rearrange(self.dcp_group.all_gather(q_lat.unsqueeze(0), dim=0), "r b h d -> b (r h) d")
        packed = None
        if self.cp_group.world_size > 1:  # the partial goes straight into the merge's packed [out | lse] buffer
            packed = q.new_empty(B, dcp * H, r + 1, dtype=torch.float32)
        out, _ = paged_mla_decode_with_lse(
            q_lat, kv_cache.latent, meta.block_table, meta.seq_lens, self.scale, r,
            out=None if packed is None else packed[..., :r], lse=None if packed is None else packed[..., r],
            max_seq_len=None if meta.seq_lens_host is None else max(meta.seq_lens_host, default=0),
        )
        if packed is not None:
            out = cp_merge_packed(packed, dcp, self.cp_group, q.dtype)[0]  # [B, H, r], this rank's heads
        return self.up.values(out)

    # ------------------------------------------------------------------------------------------------ prefill
    def _expanded_kv(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head keys and values of latent rows.  # latent: [N, r + rope] -> (k [N, H, qk], v [N, H, v])"""
        k_nope, v = self.up.expand(latent[:, : self.kv_lora_rank])
        k_pe = latent[:, None, self.kv_lora_rank :].expand(-1, self.num_local_heads, -1)
        return torch.cat([k_nope, k_pe], dim=-1), v

    def _prefill_pcp(self, q: Tensor, latent: Tensor, meta: PrefillMetadata, kv_cache: LatentPagedCache | None
                     ) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """# q: [T_local, H, qk] (the chunks' rows are meta.q_rows), latent: [T_local − num_decodes, r + rope]
        # -> (out [Q, H, v_head_dim], lse [Q, H] float32) for the Q rows meta.q_rows"""
        lat_seq = _rows(self.pcp_group.all_gather(latent, dim=0), meta.gather_index, meta.gather_range)
        if kv_cache is not None:  # only the tokens this CP rank owns
            kv_cache.write_rows(lat_seq, meta.write_rows, meta.write_slots)
        k, v = self._expanded_kv(lat_seq)  # [N_new, H, qk], [N_new, H, v]
        # one varlen call; each chunk's keys are a prefix of k/v read in place (seqused_k: ranges may overlap)
        host = (meta.cu_seqlens_q_host, meta.cu_seqlens_k_host)
        return attention_with_lse(
            _rows(q, meta.q_rows, meta.q_range), k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, causal=True,
            scale=self.scale, backend=self.attention_backend(q.device),
            host_cu_seqlens=host if meta.seqused_k is None else host + (meta.seqused_k_host,),
            seqused_k=meta.seqused_k,
        )

    def _context_widths(self) -> tuple[int, int, int]:
        """Absorbed pass-Q moves latent queries (r + rope) and merges latent outputs (r); a context token is one
        latent row."""
        return self.latent_dim, self.kv_lora_rank, self.latent_dim

    def _context_pass_kv(self, q: Tensor, meta: ContextMetadata, kv_cache: LatentPagedCache
                         ) -> tuple[Tensor, Tensor]:
        """All-gather the context's latent rows, up-project, attend locally.  # q: [Tc, H, qk] -> out, lse"""
        local = kv_cache.rows(meta.kv_slots)  # [this rank's context rows, D], local order
        local = F.pad(local, (0, 0, 0, meta.gather_pad - meta.cu_seqlens_k_host[-1]))  # equal shapes to gather
        k, v = self._expanded_kv(self.cp_group.all_gather(local, dim=0)[meta.gather_rows])  # sequence order
        return attention_with_lse(
            q, k, v, meta.cu_seqlens_rows, meta.cu_seqlens_ctx, causal=False, scale=self.scale,
            backend=self.attention_backend(q.device),
            host_cu_seqlens=(meta.cu_seqlens_rows_host, meta.cu_seqlens_ctx_host),
        )

    def _context_pass_q(self, q: Tensor, meta: ContextMetadata, kv_cache: LatentPagedCache
                        ) -> tuple[Tensor, Tensor]:
        """All-gather the latent queries, attend the local shard absorbed, merge in latent space, ``W_UV``."""
        W, Tc, H, r = self.cp_group.world_size, q.shape[0], self.num_local_heads, self.kv_lora_rank
        q_lat = self._latent_query(q)  # [Tc, H, D]
        # [W·Tc, H, D], CP rank major
        q_all = rearrange(self.cp_group.all_gather(q_lat.unsqueeze(0), dim=0), "w t h d -> (w t) h d")
        ctx = kv_cache.rows(meta.kv_slots).unsqueeze(1)  # [sum local context lens, 1, D]: the one latent head
        out_seq, lse_seq = attention_with_lse(
            q_all[meta.q_perm], ctx, ctx[..., :r], meta.cu_seqlens_q, meta.cu_seqlens_k,
            causal=False, scale=self.scale, backend=self.attention_backend(q.device),
            host_cu_seqlens=(meta.cu_seqlens_q_host, meta.cu_seqlens_k_host),
        )
        out = torch.empty_like(out_seq).index_copy_(0, meta.q_perm, out_seq)  # back to CP-rank-major rows
        lse = torch.empty_like(lse_seq).index_copy_(0, meta.q_perm, lse_seq)
        # [W·Tc] rows -> [Tc, W·H]: the gathered ranks become "heads", ordered by CP rank, as dcp_merge expects.
        out = rearrange(out, "(w t) h r -> t (w h) r", w=W)
        lse = rearrange(lse, "(w t) h -> t (w h)", w=W)
        out, lse = dcp_merge(out, lse, self.cp_group)  # in latent space: W_UV is linear
        return self.up.values(out), lse
