"""Llama-family decoder (Llama, Mistral, Qwen2, Mixtral, Qwen2-MoE) built from megacp's tensor-parallel layers.

    embed → N × [(+res) RMSNorm → QKV → RoPE(meta.positions) → ContextParallelAttention → o_proj
                 (+res) RMSNorm → gate/up → SiLU·mul → down] → (+res) RMSNorm
    (each residual add is fused into the norm after it; the residual stream is carried beside the hidden states)

The RoPE cos/sin tables of the step's positions are built once per forward and shared by every layer. On CUDA a
pure-decode step rotates q and k and writes k and v into the paged cache in one kernel, and SwiGLU's ``silu·mul`` is
one kernel in every step (``megacp.ops.decode_fused``: exact, the same ops and roundings as the eager path the CPU
runs; ``MEGACP_FUSED_DECODE=0`` when the model is built turns them off: each layer's ``fused_decode``). The
projections named by ``megacp.ops.gemv.roles()`` run decode-shaped calls on a Triton GEMV (``decode_gemv``).

In MoE models the layers listed in ``config.moe_layers`` replace the dense MLP by ``megacp.moe.MoELayer`` (router,
experts, optional shared expert), parallelised over all ranks as its ``MoEParallelConfig`` says. Its forward is a
collective over every rank, so every rank must run every step (the engine does).

Every layer works on this rank's local tokens (PCP-split during prefill); only attention talks across PCP/DCP
ranks, and only the row-parallel projections / vocab layers across TP. The engine picks the rows it needs
with ``meta.select_logits_hidden(hidden)`` and then calls ``compute_logits``. This file uses no
``torch.distributed`` directly: every collective lives in the layers.

Weights are loaded by name: ``hf_weight_loaders()`` maps each Hugging Face tensor name to an ``HFWeight``, a
callable that takes the full tensor (or a safetensors lazy slice) and keeps this rank's shard, and that knows the
full shape it expects (asked from the owning layer's ``checkpoint_shape``). That map is the model's one checkpoint
schema: ``hf_weight_shapes()`` is read off it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from megacp.kv.paged_cache import PagedKVCache
from megacp.layers.context_transfer import check_context_transfer
from megacp.layers.cp_attention import ContextParallelAttention
from megacp.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from megacp.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from megacp.layers.norm import RMSNorm
from megacp.layers.rotary import RotaryEmbedding, RotaryTables, apply_rotary_tables
from megacp.models.config import ModelConfig
from megacp.moe import MoELayer, MoEParallelConfig
from megacp.ops import decode_fused, gemv
from megacp.parallel_state import ParallelContext, resolve_parallel_context
from megacp.weights import default_weight_loader


@dataclass(frozen=True)
class HFWeight:
    """One checkpoint tensor the model expects: its full (unsharded) shape and the function that loads it.

    Calling it with the full tensor or a safetensors lazy slice keeps this rank's shard (shape-checked).
    """

    shape: tuple[int, ...]
    load: Callable[[Any], Any]

    def __call__(self, loaded: Any) -> None:
        self.load(loaded)


class LlamaAttention(nn.Module):
    """forward: hidden ``[T_local, hidden]``, the step's RoPE tables → ``[T_local, hidden]`` (summed over TP)."""

    def __init__(self, config: ModelConfig, params_dtype: torch.dtype | None = None,
                 parallel_context: ParallelContext | None = None) -> None:
        super().__init__()
        parallel_context = resolve_parallel_context(parallel_context)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=config.qkv_bias,
            params_dtype=params_dtype,
            parallel_context=parallel_context,
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * config.head_dim,
            config.hidden_size,
            bias=config.o_proj_bias,
            params_dtype=params_dtype,
            parallel_context=parallel_context,
        )
        self.attn = ContextParallelAttention(  # takes the global head counts
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            config.attention_scale,
            parallel_context=parallel_context,
        )
        self.fused_decode = decode_fused.enabled()  # $MEGACP_FUSED_DECODE, read once (not per step)
        roles = gemv.roles()  # $MEGACP_DECODE_GEMV, read once
        self.qkv_proj.decode_gemv, self.o_proj.decode_gemv = "qkv" in roles, "o" in roles

    def forward(
        self, hidden: torch.Tensor, meta: Any, kv_cache: PagedKVCache | None, rope: RotaryTables
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [T, (Hq_l + 2·Hkv_l)·D]
        T, hq, hkv, d = qkv.shape[0], self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, self.qkv_proj.head_dim
        if self.fused_decode and _pure_decode(meta, kv_cache) and decode_fused.available(qkv):
            # one kernel: RoPE of q and k, k and v straight into the cache (CUDA; exact, see decode_fused)
            q = decode_fused.rope_and_cache_write(qkv, rope.cos, rope.sin_signed, *kv_cache.storage,
                                                  meta.decode.slot_mapping, hq, hkv)
            out = self.attn(q, None, None, meta, kv_cache, kv_written=True)
            return self.o_proj(out.reshape(T, -1))
        # q and k are adjacent columns: rotate them as one [T, Hq_l + Hkv_l, D] view (half the kernels of rotating
        # each; elementwise, so bitwise the same), then split the heads again.
        qk = apply_rotary_tables(qkv[:, : (hq + hkv) * d].view(T, hq + hkv, d), rope)
        q, k = qk[:, :hq], qk[:, hq:]
        v = qkv[:, (hq + hkv) * d :].view(T, hkv, d)
        out = self.attn(q, k, v, meta, kv_cache)  # [T, Hq_l, D]
        return self.o_proj(out.reshape(out.shape[0], -1))


class LlamaMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) · up(x))``; x ``[T, hidden]`` → ``[T, hidden]``."""

    def __init__(self, config: ModelConfig, params_dtype: torch.dtype | None = None,
                 parallel_context: ParallelContext | None = None) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=config.mlp_bias, params_dtype=params_dtype,
            parallel_context=parallel_context,
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias, params_dtype=params_dtype,
            parallel_context=parallel_context,
        )
        self.fused_decode = decode_fused.enabled()  # $MEGACP_FUSED_DECODE, read once (not per step)
        roles = gemv.roles()  # $MEGACP_DECODE_GEMV, read once
        self.gate_up_proj.decode_gemv, self.down_proj.decode_gemv = "gate_up" in roles, "down" in roles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused_decode and decode_fused.available(gate_up):  # one kernel on CUDA, exact (see decode_fused)
            return self.down_proj(decode_fused.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _pure_decode(meta: Any, kv_cache: PagedKVCache | None) -> bool:
    """A step of decode rows only, with a cache: the fused RoPE + cache-write kernel's case."""
    return kv_cache is not None and meta.decode is not None and meta.prefill is None and meta.context is None


def _moe_layer(
    config: ModelConfig, params_dtype: torch.dtype | None, parallel_config: MoEParallelConfig | None,
    parallel_context: ParallelContext | None,
) -> MoELayer:
    return MoELayer(
        config.hidden_size,
        config.moe_intermediate_size,
        config.num_experts,
        config.num_experts_per_tok,
        renormalize=config.norm_topk_prob,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size or None,
        parallel_config=parallel_config,
        params_dtype=params_dtype,
        parallel_context=parallel_context,
    )


class LlamaDecoderLayer(nn.Module):
    """``moe=True``: the MLP is an ``MoELayer`` (``moe_parallel_config=None``: ``MoEParallelConfig.make`` of the
    layer's parallel context)."""

    def __init__(
        self,
        config: ModelConfig,
        params_dtype: torch.dtype | None = None,
        moe: bool = False,
        moe_parallel_config: MoEParallelConfig | None = None,
        parallel_context: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        parallel_context = resolve_parallel_context(parallel_context)
        self.config = config
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, params_dtype)
        self.self_attn = self.make_attention(config, params_dtype, parallel_context)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, params_dtype)
        self.mlp: nn.Module = (
            self.make_moe(config, params_dtype, moe_parallel_config, parallel_context) if moe
            else LlamaMLP(config, params_dtype, parallel_context)
        )

    @staticmethod
    def make_attention(config: ModelConfig, params_dtype: torch.dtype | None, parallel_context: ParallelContext
                       ) -> nn.Module:
        """The layer's attention block (a subclass's architecture overrides it)."""
        return LlamaAttention(config, params_dtype, parallel_context)

    @staticmethod
    def make_moe(config: ModelConfig, params_dtype: torch.dtype | None, moe_parallel_config: MoEParallelConfig | None,
                 parallel_context: ParallelContext) -> nn.Module:
        """The layer's MoE block when ``moe`` (a subclass's architecture overrides it)."""
        return _moe_layer(config, params_dtype, moe_parallel_config, parallel_context)

    def forward(
        self, hidden: torch.Tensor, meta: Any, kv_cache: PagedKVCache | None, rope: RotaryTables,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) ``[T_local, hidden]`` each → the same; ``rope``: the step's tables.

        The residual stream is carried separately (vLLM style) so that each residual add is fused into the norm
        after it: the layer's input is ``hidden + residual`` (``residual`` None: ``hidden`` alone, the first layer).
        """
        if residual is None:
            residual, h = hidden, self.input_layernorm(hidden)
        else:
            h, residual = self.input_layernorm(hidden, residual)
        h = self.self_attn(h, meta, kv_cache, rope)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual

    def hf_weight_loaders(self, prefix: str, fused_experts: bool = False) -> dict[str, HFWeight]:
        """``{HF name: loader}`` for ``model.layers.N.*`` (prefix ``"model.layers.N."``).

        MoE layers expect the per-expert layout of published checkpoints, or with ``fused_experts`` the
        transformers v5 layout (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]).
        """
        attn, mlp = self.self_attn, self.mlp
        qkv = attn.qkv_proj
        loaders: dict[str, HFWeight] = {
            f"{prefix}input_layernorm.weight": _bind_replicated(self.input_layernorm.weight),
            f"{prefix}post_attention_layernorm.weight": _bind_replicated(self.post_attention_layernorm.weight),
            f"{prefix}self_attn.o_proj.weight": _bind(attn.o_proj, attn.o_proj.weight),
        }
        for shard_id in ("q", "k", "v"):
            loaders[f"{prefix}self_attn.{shard_id}_proj.weight"] = _bind(qkv, qkv.weight, shard_id)
            if qkv.bias is not None:
                loaders[f"{prefix}self_attn.{shard_id}_proj.bias"] = _bind(qkv, qkv.bias, shard_id)
        if attn.o_proj.bias is not None:
            loaders[f"{prefix}self_attn.o_proj.bias"] = _bind(attn.o_proj, attn.o_proj.bias)
        if isinstance(mlp, MoELayer):
            loaders.update(moe_weight_loaders(mlp, f"{prefix}mlp.", self.config, fused_experts))
            return loaders
        loaders.update(dense_mlp_loaders(mlp, f"{prefix}mlp."))
        return loaders


def dense_mlp_loaders(mlp: LlamaMLP, prefix: str) -> dict[str, HFWeight]:
    """``{HF name: loader}`` of a SwiGLU MLP (prefix ``"model.layers.N.mlp."``): gate/up/down (+ biases)."""
    gate_up, down = mlp.gate_up_proj, mlp.down_proj
    loaders = {
        f"{prefix}gate_proj.weight": _bind(gate_up, gate_up.weight, 0),
        f"{prefix}up_proj.weight": _bind(gate_up, gate_up.weight, 1),
        f"{prefix}down_proj.weight": _bind(down, down.weight),
    }
    if gate_up.bias is not None:
        loaders[f"{prefix}gate_proj.bias"] = _bind(gate_up, gate_up.bias, 0)
        loaders[f"{prefix}up_proj.bias"] = _bind(gate_up, gate_up.bias, 1)
        loaders[f"{prefix}down_proj.bias"] = _bind(down, down.bias)
    return loaders


def _bind(layer: nn.Module, param: nn.Parameter, *shard: Any) -> HFWeight:
    """``param`` of a TP ``layer``: its ``checkpoint_shape`` and ``param.weight_loader(param, ., *shard)``."""
    loader = param.weight_loader
    return HFWeight(layer.checkpoint_shape(param, *shard), lambda loaded: loader(param, loaded, *shard))


def _bind_replicated(param: nn.Parameter) -> HFWeight:
    """A parameter every rank holds whole (norm weights)."""
    return HFWeight(tuple(param.shape), lambda loaded: default_weight_loader(param, loaded))


def _bind_moe(moe: MoELayer, name: str) -> HFWeight:
    """``moe.load_weight(name, .)`` (reads nothing for another rank's expert) with ``moe.checkpoint_shape(name)``."""
    return HFWeight(moe.checkpoint_shape(name), lambda loaded: moe.load_weight(name, loaded))


def moe_weight_loaders(moe: MoELayer, prefix: str, config: ModelConfig, fused_experts: bool) -> dict[str, HFWeight]:
    """``{HF name: loader}`` of one MoE block (any ``MoELayer``: Mixtral, Qwen2-MoE, DeepSeek's ``DeepseekMoE``).

    ``prefix`` is the block's checkpoint prefix (``"model.layers.N.mlp."``); the names are the layer's
    ``checkpoint_names`` (router, its DeepSeek-V3 bias, shared expert(s), experts per expert with the config's
    ``expert_proj_names`` or, with ``fused_experts``, transformers v5's fused pair). Each loader reads only this
    rank's share (nothing for another rank's expert).
    """
    names = moe.checkpoint_names(fused_experts, config.expert_proj_names)
    return {f"{prefix}{n}": _bind_moe(moe, n) for n in names}


class LlamaForCausalLM(nn.Module):
    """Llama / Mistral / Qwen2 / Mixtral / Qwen2-MoE decoder with a vocab-parallel LM head (see the module docstring).

    ``parallel_context``: the layout every layer is built for (``resolve_parallel_context``: given, else
    parallel_state's, else one rank). ``moe_parallel_config`` says how the experts of MoE layers are split over
    ranks; None means ``MoEParallelConfig.make`` of the context. Parameters are trainable
    (``load_model`` freezes them); see ``parallel_state.allreduce_grads`` for training.
    """

    def __init__(
        self,
        config: ModelConfig,
        params_dtype: torch.dtype | None = None,
        moe_parallel_config: MoEParallelConfig | None = None,
        parallel_context: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        ctx = self.parallel_context = resolve_parallel_context(parallel_context)
        self.config = config
        self._build_common(config, params_dtype, ctx)
        moe_layers = set(config.moe_layers)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, params_dtype, i in moe_layers, moe_parallel_config, ctx)
            for i in range(config.num_hidden_layers)
        )
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)  # one for all layers
        qkv = self.layers[0].self_attn.qkv_proj if config.num_hidden_layers else None
        self.head_dim = config.head_dim
        self.num_local_heads = qkv.num_heads if qkv else 0
        self.num_local_kv_heads = qkv.num_kv_heads if qkv else 0  # per TP rank: what the engine allocates

    def _build_common(self, config: ModelConfig, params_dtype: torch.dtype | None, ctx: ParallelContext) -> None:
        """The embedding, final norm and LM head (tied to the embedding when the config says so)."""
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, params_dtype=params_dtype,
                                                   parallel_context=ctx)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, params_dtype)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, params_dtype=params_dtype,
                                      parallel_context=ctx)
        if config.tie_word_embeddings:
            self.lm_head.tie_weights(self.embed_tokens)

    def forward(
        self, input_ids: torch.Tensor, meta: Any, kv_caches: list[PagedKVCache] | None = None
    ) -> torch.Tensor:
        """input_ids ``[T_local]`` (this rank's tokens, PCP padding included) → final hidden ``[T_local, hidden]``."""
        if kv_caches is not None and len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for a model with {len(self.layers)} layers")
        hidden = self.embed_tokens(input_ids)
        # the same positions in every layer; float32 tables make the MLA layers rotate in float32 (rope_float32)
        rope = self.rotary_emb.tables(meta.positions, torch.float32 if self.config.rope_float32 else hidden.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, meta, kv_caches[i] if kv_caches is not None else None, rope, residual)
        return self.norm(hidden) if residual is None else self.norm(hidden, residual)[0]

    def set_context_transfer(self, context_transfer: str) -> None:
        """How every attention layer's prefill over cached context (a chunk of a long prompt after the first, with
        ``pcp·dcp > 1``) reaches the other CP ranks' KV shards: ``"auto"`` (fewer bytes, the rule of
        ``megacp.layers.context_transfer``), ``"pass_q"`` or ``"pass_kv"``. Results are the same either way.
        ValueError naming the argument for another value (before changing any layer)."""
        way = check_context_transfer(context_transfer)
        for module in self.modules():
            if isinstance(module, ContextParallelAttention):
                module.context_transfer = way

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[N, hidden]`` → float32 logits ``[N, vocab_size]``, the full vocabulary on every TP rank."""
        return self.lm_head.compute_logits(hidden).float()

    def hf_weight_loaders(self, fused_experts: bool = False) -> dict[str, HFWeight]:
        """Every Hugging Face tensor name this model expects → the function that loads it.

        MoE blocks are named ``model.layers.N.mlp.*`` (the loader maps Mixtral's ``block_sparse_moe.`` here), experts
        per expert or, with ``fused_experts``, in transformers v5's fused layout.
        """
        loaders: dict[str, HFWeight] = {
            "model.embed_tokens.weight": _bind(self.embed_tokens, self.embed_tokens.weight),
            "model.norm.weight": _bind_replicated(self.norm.weight),
        }
        if not self.config.tie_word_embeddings:
            loaders["lm_head.weight"] = _bind(self.lm_head, self.lm_head.weight)
        for i, layer in enumerate(self.layers):
            loaders.update(layer.hf_weight_loaders(f"model.layers.{i}.", fused_experts))
        return loaders

    def hf_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Full (unsharded) shape of every expected HF tensor (per-expert layout), e.g. to build seeded weights."""
        return {name: weight.shape for name, weight in self.hf_weight_loaders().items()}
