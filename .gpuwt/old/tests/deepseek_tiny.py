"""Tiny random DeepSeek-V2/V3 checkpoints saved by ``transformers`` (``save_pretrained``, float32), for the tests.

``save_tiny_deepseek(path, version=3, **overrides) -> path`` builds a seeded ``DeepseekV{2,3}ForCausalLM`` with
everything issue 20's acceptance asks for: YaRN rope scaling whose ``mscale != mscale_all_dim`` (so both the cos/sin
magnitude and the softmax-scale correction differ from 1), q-LoRA (``q_lora_rank=None`` for the plain ``q_proj`` of
DeepSeek-V2-Lite), ``v_head_dim != qk_nope_head_dim``, a dense first layer (``first_k_dense_replace=1``), ``n_group >
1`` group-limited routing (V3: noaux_tc with a nonzero random ``e_score_correction_bias``; V2:
``group_limited_greedy``), shared experts and ``routed_scaling_factor != 1``. 8 heads, so every (tp, dcp) with
``dcp | tp | 8`` loads. A CPU forward of a few tokens takes milliseconds.

Layouts (keyword arguments, not config fields): ``fused=True`` writes the model's own ``state_dict()`` (transformers
v5's fused ``mlp.experts.gate_up_proj`` [E, 2I, H] / ``mlp.experts.down_proj`` [E, H, I]) instead of the per-expert
tensors ``save_pretrained`` converts them to; ``max_shard_size="40KB"`` saves a sharded index; ``mtp=True`` appends
a DeepSeek-V3 multi-token-prediction layer's tensors (``model.layers.{num_hidden_layers}.*``) as published V3
checkpoints carry it (transformers' model has none: the loader must ignore them). ``seed`` seeds the weights.
``tiny_deepseek_config(version, **overrides)`` returns the transformers config alone.

MoE blocks alone (``tests/test_deepseek_moe*.py``): ``hf_moe_block(version, seed)`` is a random transformers
``DeepseekV3MoE`` (16 experts in 4 groups, top-4 of 2 groups, nonzero bias) or ``DeepseekV2Moe``
(group_limited_greedy) with its config; ``router_spec(config)`` the ``RouterSpec`` megacp's config parser makes of
it; ``per_expert_state(block)`` its weights in the per-expert layout of published checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch

VOCAB_SIZE = 320
EOS_TOKEN_ID = 2
MAX_POSITIONS = 256


def _defaults(version: int) -> dict[str, Any]:
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=96,  # the dense first layer
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=8,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=EOS_TOKEN_ID,
        tie_word_embeddings=False,
        # YaRN as DeepSeek configures it, with mscale != mscale_all_dim so cos/sin are scaled by
        # yarn_mscale(4, 1) / yarn_mscale(4, 0.8) and the softmax by yarn_mscale(4, 0.8)².
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
                             beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.8),
    )
    if version == 2:
        return dict(common, topk_method="group_limited_greedy", routed_scaling_factor=2.0, n_shared_experts=2)
    return dict(common, routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True)


def tiny_deepseek_config(version: int = 3, **overrides: Any) -> Any:
    """The transformers ``DeepseekV{version}Config`` of the tiny model, ``overrides`` applied."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    if version not in (2, 3):
        raise ValueError(f"version must be 2 or 3, got {version!r}")
    cls = DeepseekV2Config if version == 2 else DeepseekV3Config
    return cls(**dict(_defaults(version), **overrides))


def build_tiny_deepseek(version: int = 3, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The seeded float32 transformers model (weights larger than transformers' init, for clear argmax margins)."""
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    config = tiny_deepseek_config(version, **overrides)
    torch.manual_seed(seed)
    model = (DeepseekV2ForCausalLM if version == 2 else DeepseekV3ForCausalLM)(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # sigmoid scores lie in (0, 1): a bias that changes choices
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    return model.float().eval()


def _mtp_tensors(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """A V3 MTP module named as published checkpoints name it: a full decoder layer at index ``num_layers`` (copied
    from the last layer) plus its enorm/hnorm/eh_proj/shared_head/embed_tokens tensors."""
    last, mtp = f"model.layers.{num_layers - 1}.", f"model.layers.{num_layers}."
    out = {mtp + k[len(last):]: v.clone() for k, v in state.items() if k.startswith(last)}
    hidden = state["model.norm.weight"].shape[0]
    out.update({
        mtp + "enorm.weight": torch.ones(hidden), mtp + "hnorm.weight": torch.ones(hidden),
        mtp + "eh_proj.weight": torch.zeros(hidden, 2 * hidden),
        mtp + "shared_head.norm.weight": torch.ones(hidden),
        mtp + "shared_head.head.weight": state["lm_head.weight"].clone(),
        mtp + "embed_tokens.weight": state["model.embed_tokens.weight"].clone(),
    })
    return out


def save_tiny_deepseek(path: str, version: int = 3, seed: int = 0, fused: bool = False, mtp: bool = False,
                       max_shard_size: str | None = None, **overrides: Any) -> str:
    """Save the tiny model into ``path`` (created) with ``save_pretrained``; return ``path``. See the module
    docstring for ``fused``, ``mtp`` and ``max_shard_size``; ``overrides`` are config fields."""
    from safetensors.torch import load_file, save_file

    model = build_tiny_deepseek(version, seed, **overrides)
    os.makedirs(path, exist_ok=True)
    if max_shard_size is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    if not (fused or mtp):
        return path
    if max_shard_size is not None:
        raise ValueError("fused= and mtp= write one model.safetensors; leave max_shard_size unset with them")
    file = os.path.join(path, "model.safetensors")
    state = ({k: v.detach().contiguous() for k, v in model.state_dict().items()} if fused else load_file(file))
    if mtp:
        state.update(_mtp_tensors(state, model.config.num_hidden_layers))
    save_file(state, file, metadata={"format": "pt"})
    return path


def load_tiny_reference(path: str) -> torch.nn.Module:
    """The saved model read back by transformers (float32, eval): the oracle."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def copy_with_config(path: str, dest: str, **fields: Any) -> str:
    """A copy of checkpoint ``path`` in ``dest`` whose ``config.json`` has ``fields`` replaced (``None`` deletes):
    for the bad-config tests."""
    shutil.copytree(path, dest, dirs_exist_ok=True)
    with open(os.path.join(dest, "config.json")) as f:
        cfg = json.load(f)
    for k, v in fields.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dest


# ------------------------------------------------------------------------------------------- MoE blocks alone
MOE_HIDDEN, MOE_INTERMEDIATE = 32, 12


def moe_block_config(version: int, **overrides: Any) -> Any:
    """A transformers DeepSeek config for a lone MoE block (hidden 32, experts of 12, 2 shared experts)."""
    kw = dict(hidden_size=MOE_HIDDEN, moe_intermediate_size=MOE_INTERMEDIATE, n_shared_experts=2,
              n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    if version == 3:
        kw.update(norm_topk_prob=True, routed_scaling_factor=2.5)
    else:
        kw.update(topk_method="group_limited_greedy", routed_scaling_factor=3.0)
    return tiny_deepseek_config(version, **dict(kw, **overrides))


def router_spec(config: Any) -> Any:
    """The ``RouterSpec`` megacp's own config parser makes of a transformers DeepSeek config."""
    from megacp.models.config import model_config_from_dict
    from megacp.moe import RouterSpec

    return RouterSpec.from_config(model_config_from_dict(dict(config.to_dict(), num_hidden_layers=2,
                                                              first_k_dense_replace=0)))


def hf_moe_block(version: int, seed: int) -> tuple[torch.nn.Module, Any]:
    """(random float32 transformers DeepseekV3MoE / DeepseekV2Moe, its config); V3's bias nonzero."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = moe_block_config(version)
    torch.manual_seed(seed)
    block = (DeepseekV3MoE if version == 3 else DeepseekV2Moe)(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        if version == 3:
            block.gate.e_score_correction_bias.normal_(0, 0.3)
    return block.float().eval(), config


def per_expert_state(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The block's weights as published checkpoints store them (one tensor per expert and projection)."""
    state = {}
    for name, t in block.state_dict().items():
        if name == "experts.gate_up_proj":
            i = t.shape[1] // 2
            for e in range(t.shape[0]):
                state[f"experts.{e}.gate_proj.weight"] = t[e, :i].clone()
                state[f"experts.{e}.up_proj.weight"] = t[e, i:].clone()
        elif name == "experts.down_proj":
            for e in range(t.shape[0]):
                state[f"experts.{e}.down_proj.weight"] = t[e].clone()
        else:
            state[name] = t.clone()
    return state
