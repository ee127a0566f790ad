"""Multi-head latent attention (DeepSeek-V2/V3, DESIGN §3b) from megacp's tensor-parallel layers.

    q:  hidden → q_a_proj → q_a_layernorm → q_b_proj        (or one q_proj when q_lora_rank is None)
        → [q_nope | q_pe] per head, RoPE on q_pe
    kv: hidden → kv_a_proj_with_mqa → [c_kv | k_pe]; kv_a_layernorm on c_kv, RoPE on k_pe: the latent row
    attention (LatentAttention: latent cache, PCP/DCP) → W_UV → o_proj

The down-projections (``q_a_proj``, ``kv_a_proj_with_mqa``) are small and their outputs needed by every head: they
are replicated over TP. The heads are column-parallel over TP (``q_b_proj``/``q_proj``, ``kv_b_proj``) and
``o_proj`` is row-parallel, as in a GQA layer. The latent row is the same on every TP rank; its gradient is made
whole once (``copy_to_tp_region``), so the replicated weights get whole gradients.

RoPE pairs follow the checkpoint: with ``rope_interleave`` (DeepSeek's layout, pairs ``(x0, x1), (x2, x3), ...``)
``apply_rotary_tables(..., interleave=True)`` de-interleaves first, bit for bit transformers' V3 rotation; the latent
cache then stores ``k_pe`` in halves order (q and k alike, so the scores are unchanged). The softmax scale is
``ModelConfig.attention_scale`` (``qk_head_dim^-0.5``, times ``mscale²`` with YaRN). At inference on CUDA one
kernel rotates ``q_pe`` inside the query projection's output and another ``k_pe`` inside ``kv_a_proj_with_mqa``'s
(``megacp.ops.rope_inplace``: exact, the eager roundings), so no ``[q_nope | q_pe]`` concatenation is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from megacp.kv.latent_cache import LatentPagedCache
from megacp.layers.latent_attention import LatentAttention, LatentUpProjection
from megacp.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, copy_to_tp_region
from megacp.layers.norm import RMSNorm
from megacp.layers.rotary import RotaryTables, apply_rotary_tables
from megacp.ops import decode_fused, rope_inplace
from megacp.parallel_state import ParallelContext, resolve_parallel_context

if TYPE_CHECKING:
    from megacp.layers.cp_metadata import AttentionMetadata


class MLAAttention(nn.Module):
    """forward: hidden ``[T_local, hidden]``, the step's RoPE tables (``qk_rope_head_dim``) → ``[T_local, hidden]``.

    Sizes are global; ``num_heads`` must be divisible by ``tp`` and ``dcp`` must divide ``tp``. ``scale``: the
    softmax scale (default ``qk_head_dim^-0.5``). ``bias``: on the down-projections and ``o_proj``
    (DeepSeek's ``attention_bias``). ``parallel_context``: the layout (``resolve_parallel_context``).
    ``context_transfer``: pass-Q or pass-KV for the prefill over cached context (``LatentAttention``; default
    ``"auto"``: the rule of ``megacp.layers.context_transfer``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        q_lora_rank: int | None = None,
        scale: float | None = None,
        rms_norm_eps: float = 1e-6,
        rope_interleave: bool = False,
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        backend: str | None = None,
        parallel_context: ParallelContext | None = None,
        context_transfer: str = "auto",
    ) -> None:
        super().__init__()
        ctx = self.parallel_context = resolve_parallel_context(parallel_context)
        self.tp_group = ctx.tp
        tp = ctx.tp_size
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.kv_lora_rank, self.nope, self.rope, self.v_head_dim = (kv_lora_rank, qk_nope_head_dim,
                                                                    qk_rope_head_dim, v_head_dim)
        self.q_lora_rank, self.rope_interleave = q_lora_rank, rope_interleave
        if qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={qk_rope_head_dim} must be even (RoPE rotates pairs)")
        q_out = num_heads * self.qk_head_dim
        if q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden_size, q_out, params_dtype=params_dtype, parallel_context=ctx)
        else:
            self.q_a_proj = ReplicatedLinear(hidden_size, q_lora_rank, bias=bias, params_dtype=params_dtype)
            self.q_a_layernorm = RMSNorm(q_lora_rank, rms_norm_eps, params_dtype)
            self.q_b_proj = ColumnParallelLinear(q_lora_rank, q_out, params_dtype=params_dtype, parallel_context=ctx)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=bias,
                                                   params_dtype=params_dtype)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, rms_norm_eps, params_dtype)
        self.kv_b_proj = ColumnParallelLinear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim),
                                              params_dtype=params_dtype, parallel_context=ctx)
        self.o_proj = RowParallelLinear(num_heads * v_head_dim, hidden_size, bias=bias, params_dtype=params_dtype,
                                        parallel_context=ctx)
        self.num_local_heads = num_heads // tp
        up = LatentUpProjection(self.kv_b_proj.weight, self.num_local_heads, qk_nope_head_dim, v_head_dim)
        self.attn = LatentAttention(
            num_heads, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
            self.qk_head_dim**-0.5 if scale is None else scale, up, backend=backend, parallel_context=ctx,
            context_transfer=context_transfer,
        )
        self.fused_decode = decode_fused.enabled()  # $MEGACP_FUSED_DECODE, read once: in-place RoPE on CUDA

    @classmethod
    def from_config(cls, config: Any, params_dtype: torch.dtype | None = None,
                    parallel_context: ParallelContext | None = None) -> "MLAAttention":
        """The layer of a DeepSeek ``megacp.models.config.ModelConfig`` (``config.is_mla``; read by attribute, so
        layers do not import models)."""
        return cls(
            config.hidden_size, config.num_attention_heads, config.kv_lora_rank, config.qk_nope_head_dim,
            config.qk_rope_head_dim, config.v_head_dim, q_lora_rank=config.q_lora_rank,
            scale=config.attention_scale, rms_norm_eps=config.rms_norm_eps, rope_interleave=config.rope_interleave,
            bias=config.qkv_bias, params_dtype=params_dtype, parallel_context=parallel_context,
        )

    @property
    def latent_dim(self) -> int:
        """Width of a latent cache row: ``kv_lora_rank + qk_rope_head_dim``."""
        return self.kv_lora_rank + self.rope

    def _rotate(self, x: Tensor, rope: RotaryTables) -> Tensor:
        if rope.cos.dtype != x.dtype:  # float32 tables (DeepSeek-V2): rotate in float32, round once
            return apply_rotary_tables(x.float(), rope, interleave=self.rope_interleave).to(x.dtype)
        return apply_rotary_tables(x, rope, interleave=self.rope_interleave)

    def forward(self, hidden: Tensor, meta: "AttentionMetadata", kv_cache: LatentPagedCache | None,
                rope: RotaryTables) -> Tensor:
        T = hidden.shape[0]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = q.view(T, self.num_local_heads, self.qk_head_dim)
        kv = self.kv_a_proj_with_mqa(hidden)  # [T, r + rope]: c_kv | k_pe
        if self.fused_decode and rope_inplace.available(q) and rope.cos.dtype in (q.dtype, torch.float32):
            # one kernel each rotates q_pe and k_pe where the projections wrote them: no cat (exact, rope_inplace)
            rope_inplace.rotate_(q[..., self.nope :], rope.cos, rope.sin_signed, self.rope_interleave)
            rope_inplace.rotate_(kv[:, None, self.kv_lora_rank :], rope.cos, rope.sin_signed, self.rope_interleave)
            c_kv, k_pe = kv.split([self.kv_lora_rank, self.rope], dim=-1)
        else:
            q = torch.cat([q[..., : self.nope], self._rotate(q[..., self.nope :], rope)], dim=-1)
            c_kv, k_pe = kv.split([self.kv_lora_rank, self.rope], dim=-1)
            k_pe = self._rotate(k_pe.unsqueeze(1), rope).squeeze(1)
        latent = copy_to_tp_region(torch.cat([self.kv_a_layernorm(c_kv), k_pe], dim=-1), self.tp_group)
        out = self.attn(q, latent, meta, kv_cache)  # [T, H_local, v_head_dim]
        return self.o_proj(out.reshape(T, -1))
