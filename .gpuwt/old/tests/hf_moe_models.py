"""Tiny random Mixtral and Qwen2-MoE checkpoints from ``transformers``, in both expert layouts megacp reads.

- ``mixtral``:   2 layers, 4 experts, top-2 (renormalised), 4 heads / 1 KV head (so dcp=2 is legal with tp=2).
- ``qwen2_moe``: 3 layers with ``mlp_only_layers=[1]`` (sparse, dense, sparse), 6 experts, top-2 without
  renormalisation, a gated shared expert, qkv bias, 4 heads / 1 KV head.

``model_dir(kind)`` is ``save_pretrained``'s output: transformers v5 converts its fused in-memory experts back to
the per-expert layout of published checkpoints (Mixtral: ``block_sparse_moe.experts.<e>.w1/w2/w3``, Qwen2-MoE:
``mlp.experts.<e>.gate_proj/up_proj/down_proj``). ``model_dir(kind + "_fused")`` holds the same weights as the
model's own ``state_dict()`` (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]),
written with ``safetensors`` directly. References: ``tests.hf_models.greedy_reference``.
"""

from __future__ import annotations

import os
import shutil

import torch

from tests import hf_models

KINDS = ("mixtral", "qwen2_moe")
_DIRS: dict[str, str] = {}


def _common() -> dict:
    return dict(
        vocab_size=hf_models.VOCAB_SIZE,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=hf_models.MAX_POSITIONS,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=hf_models.EOS_TOKEN_ID,
        num_experts_per_tok=2,
    )


def build(kind: str) -> torch.nn.Module:
    """The fp32 transformers model of ``kind`` (seeded; larger-than-default weights for clear argmax margins)."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed({"mixtral": 10, "qwen2_moe": 11}.get(kind, 0))
    if kind == "mixtral":
        config = MixtralConfig(**_common(), num_hidden_layers=2, intermediate_size=48, num_local_experts=4,
                               sliding_window=None)
        model = MixtralForCausalLM(config)
    elif kind == "qwen2_moe":
        config = Qwen2MoeConfig(**_common(), num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=24,
                                shared_expert_intermediate_size=40, num_experts=6, norm_topk_prob=False,
                                decoder_sparse_step=1, mlp_only_layers=[1], use_sliding_window=False)
        model = Qwen2MoeForCausalLM(config)
    else:
        raise ValueError(f"unknown tiny MoE model kind {kind!r}; use one of {KINDS} (optionally + '_fused')")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.float().eval()


def _save_fused(model: torch.nn.Module, per_expert_dir: str, path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    shutil.copy(os.path.join(per_expert_dir, "config.json"), path)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or
               not model.config.tie_word_embeddings}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def model_dir(kind: str) -> str:
    """Directory of a saved tiny checkpoint; ``<kind>_fused`` for the fused expert layout. Built on first use."""
    if kind not in _DIRS:
        base = kind.removesuffix("_fused")
        model = build(base)
        per_expert = os.path.join(hf_models._root(), base)
        if base not in _DIRS:
            model.save_pretrained(per_expert)
            _DIRS[base] = per_expert
        if kind.endswith("_fused"):
            _save_fused(model, per_expert, os.path.join(hf_models._root(), kind))
            _DIRS[kind] = os.path.join(hf_models._root(), kind)
    return _DIRS[kind]
