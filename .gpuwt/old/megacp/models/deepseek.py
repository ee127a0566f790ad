"""DeepSeek-V2 / V3 decoder: multi-head latent attention (DESIGN §3b) and DeepSeek MoE, on megacp's layers.

    embed → N × [(+res) RMSNorm → MLAAttention → (+res) RMSNorm → dense SwiGLU (the first
                 ``first_k_dense_replace`` layers) or DeepSeek MoE] → (+res) RMSNorm → LM head

The decoder layer, the residual stream, the LM head and the weight schema are the Llama family's
(``megacp.models.llama``); what differs is the attention (``MLAAttention``: latent cache, absorbed decode, DCP =
TP) and its RoPE, which rotates only ``qk_rope_head_dim`` dims (YaRN with ``mscale`` in DeepSeek-V3 checkpoints).
The KV cache is one latent row per token and layer (``LatentPagedCache``): ``KVSession.for_model`` makes it.
Decode steps replay CUDA graphs; the MoE blocks are recorded in them or run between graph pieces
(``MoELayer.capturable``), like the Llama family's.
"""

from __future__ import annotations

import torch
from torch import nn

from megacp.layers.mla_attention import MLAAttention
from megacp.layers.norm import RMSNorm
from megacp.layers.rotary import RotaryEmbedding
from megacp.models.config import ModelConfig
from megacp.models.llama import (
    HFWeight,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    _bind,
    _bind_replicated,
    dense_mlp_loaders,
    moe_weight_loaders,
)
from megacp.moe import MoEParallelConfig
from megacp.moe.deepseek import DeepseekMoE
from megacp.parallel_state import ParallelContext, resolve_parallel_context


def mla_weight_loaders(attn: MLAAttention, prefix: str) -> dict[str, HFWeight]:
    """``{HF name: loader}`` of one MLA block (prefix ``"model.layers.N.self_attn."``): megacp's parameter names
    are the checkpoint's (``q_a_proj``, ``q_a_layernorm``, ``q_b_proj`` or ``q_proj``, ``kv_a_proj_with_mqa``,
    ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``; biases with ``attention_bias``)."""
    loaders: dict[str, HFWeight] = {}
    for module_name, module in attn.named_children():
        if module_name == "attn":  # the parameter-free attention core
            continue
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{prefix}{module_name}.{param_name}"
            loaders[name] = _bind_replicated(param) if isinstance(module, RMSNorm) else _bind(module, param)
    return loaders


class DeepseekDecoderLayer(LlamaDecoderLayer):
    """A Llama-family decoder layer whose attention is ``MLAAttention`` (``moe``: the MLP is DeepSeek's MoE)."""

    @staticmethod
    def make_attention(config: ModelConfig, params_dtype: torch.dtype | None, parallel_context: ParallelContext
                       ) -> nn.Module:
        return MLAAttention.from_config(config, params_dtype, parallel_context)

    @staticmethod
    def make_moe(config: ModelConfig, params_dtype: torch.dtype | None, moe_parallel_config: MoEParallelConfig | None,
                 parallel_context: ParallelContext) -> nn.Module:
        return DeepseekMoE.from_config(config, moe_parallel_config, params_dtype, parallel_context=parallel_context)

    def hf_weight_loaders(self, prefix: str, fused_experts: bool = False) -> dict[str, HFWeight]:
        loaders = {
            f"{prefix}input_layernorm.weight": _bind_replicated(self.input_layernorm.weight),
            f"{prefix}post_attention_layernorm.weight": _bind_replicated(self.post_attention_layernorm.weight),
        }
        loaders.update(mla_weight_loaders(self.self_attn, f"{prefix}self_attn."))
        if isinstance(self.mlp, LlamaMLP):
            loaders.update(dense_mlp_loaders(self.mlp, f"{prefix}mlp."))
        else:
            loaders.update(moe_weight_loaders(self.mlp, f"{prefix}mlp.", self.config, fused_experts))
        return loaders


class DeepseekForCausalLM(LlamaForCausalLM):
    """DeepSeek-V2 / V3 (``config.is_mla``). Same interface as ``LlamaForCausalLM``; its KV cache is latent:
    ``latent_dim`` numbers per token and layer (``num_local_kv_heads`` 1, ``head_dim`` = ``latent_dim``)."""

    def __init__(
        self,
        config: ModelConfig,
        params_dtype: torch.dtype | None = None,
        moe_parallel_config: MoEParallelConfig | None = None,
        parallel_context: ParallelContext | None = None,
    ) -> None:
        if not config.is_mla:
            raise ValueError(f"DeepseekForCausalLM needs an MLA config (kv_lora_rank > 0), got model_type "
                             f"{config.model_type!r} with kv_lora_rank={config.kv_lora_rank}")
        nn.Module.__init__(self)
        ctx = self.parallel_context = resolve_parallel_context(parallel_context)
        self.config = config
        self._build_common(config, params_dtype, ctx)
        moe_layers = set(config.moe_layers)
        self.layers = nn.ModuleList(
            DeepseekDecoderLayer(config, params_dtype, i in moe_layers, moe_parallel_config, ctx)
            for i in range(config.num_hidden_layers)
        )
        self.rotary_emb = RotaryEmbedding(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)
        self.latent_dim = config.kv_lora_rank + config.qk_rope_head_dim
        self.head_dim = self.latent_dim  # what the engine allocates per token and layer
        self.num_local_heads = self.layers[0].self_attn.num_local_heads if config.num_hidden_layers else 0
        self.num_local_kv_heads = 1
