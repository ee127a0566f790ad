"""``ModelConfig``: the fields megacp needs from a Hugging Face ``config.json``.

One parser per supported ``model_type`` fills the architecture-specific fields (biases, MoE sizes, ...) on top of
the common dense-decoder fields (``megacp.models.hf_config``; add an architecture there, in ``ARCH_PARSERS``).
MoE architectures (Mixtral, Qwen2-MoE, DeepSeek-V2/V3) set ``num_experts > 0`` and list their sparse layers in
``moe_layers``; the other layers keep the dense SwiGLU MLP of size ``intermediate_size``.
DeepSeek-V2/V3 use multi-head latent attention (``kv_lora_rank > 0``, ``is_mla``: DESIGN §3b) and DeepSeek's router
(``scoring_func``, ``topk_method``, groups, ``routed_scaling_factor``, ungated shared experts).
Both the transformers v4 layout (``rope_theta`` + ``rope_scaling``) and the v5 layout (``rope_parameters``) are read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from megacp.layers.rotary import yarn_mscale
from megacp.models.hf_config import ARCH_PARSERS


@dataclass
class ModelConfig:
    """A decoder-only Llama-family model. Sizes are global (before tensor parallelism)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF dict with "rope_type" (never "default"); None = plain RoPE
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 always; Llama when attention_bias
    o_proj_bias: bool = False  # Llama when attention_bias
    mlp_bias: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    # MoE (num_experts == 0: a dense model). Sizes of one routed expert / of the shared expert (0: none): Qwen2-MoE's
    # gated ``shared_expert``, or DeepSeek's ungated ``shared_experts`` of n_shared_experts·moe_intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = True  # Qwen2-MoE gates its shared expert (sigmoid); DeepSeek's are always on
    norm_topk_prob: bool = False  # renormalise the top-k router weights (Mixtral always, Qwen2-MoE/DeepSeek per config)
    moe_layers: list[int] = field(default_factory=list)  # indices of the sparse layers
    # Names of one expert's gate/up/down projections in per-expert checkpoints (Mixtral: w1/w3/w2).
    expert_proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # DeepSeek router: softmax (V2) or sigmoid (V3) scores; top-k over all experts ("greedy"), or inside the best
    # topk_group of n_group expert groups ("group_limited_greedy": V2, group score = its best expert; "noaux_tc":
    # V3, the choice biased by e_score_correction_bias, group score = sum of its top-2); weights ×
    # routed_scaling_factor.
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    # Multi-head latent attention (kv_lora_rank == 0: not MLA). For MLA models ``head_dim`` is the rotary dimension
    # (qk_rope_head_dim, as transformers sets it) and num_key_value_heads transformers' num_attention_heads: neither
    # describes the cache, which holds one latent row of kv_lora_rank + qk_rope_head_dim numbers per token.
    kv_lora_rank: int = 0
    q_lora_rank: int | None = None  # None: a plain q_proj (DeepSeek-V2-Lite), else q_a_proj → norm → q_b_proj
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotary pairs (x_2i, x_2i+1) (DeepSeek) instead of neox halves
    # rotate in float32 and round once (DeepSeek-V2's complex-number form in transformers) instead of in the
    # activations' dtype with each product rounded (Llama, DeepSeek-V3)
    rope_float32: bool = False
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)  # the raw config.json

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def attention_scale(self) -> float:
        """Softmax scale: ``head_dim**-0.5``; MLA: ``qk_head_dim**-0.5``, times ``yarn_mscale(factor,
        mscale_all_dim)²`` when the rope scaling sets ``mscale_all_dim`` (transformers' DeepSeek
        ``yarn_apply_mscale``)."""
        if not self.is_mla:
            return self.head_dim**-0.5
        scale = self.qk_head_dim**-0.5
        rope = self.rope_scaling or {}
        if rope.get("mscale_all_dim"):
            scale *= yarn_mscale(float(rope["factor"]), float(rope["mscale_all_dim"])) ** 2
        return scale

    @property
    def router_has_bias(self) -> bool:
        """DeepSeek-V3's router carries ``e_score_correction_bias`` (``mlp.gate.e_score_correction_bias``)."""
        return self.topk_method == "noaux_tc"

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def dense_intermediate_size(self) -> int | None:
        """The dense SwiGLU MLP's size, which TP must divide; None when every layer is MoE (Mixtral)."""
        return self.intermediate_size if len(self.moe_layers) < self.num_hidden_layers else None


def supported_model_types() -> list[str]:
    return sorted(ARCH_PARSERS)


def model_config_from_dict(cfg: Any, source: str = "config.json") -> ModelConfig:
    """Parse a loaded ``config.json`` object; one ``ValueError`` starting with ``source`` (the file) and naming the
    field for anything that is not a supported, well-formed config: not an object, an unsupported ``model_type``, a
    missing field, a string or 0 where a size belongs, ..."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{source} must hold a JSON object of model settings, got a {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    parser = ARCH_PARSERS.get(model_type) if isinstance(model_type, str) else None
    if parser is None:
        raise ValueError(
            f"{source}: unsupported model_type {model_type!r}; megacp supports: {', '.join(supported_model_types())}"
        )
    try:
        fields = parser(cfg)
    except KeyError as e:
        raise ValueError(f"{source} of model_type {model_type!r} lacks the required field {e.args[0]!r}") from None
    except ValueError as e:
        raise ValueError(f"{source} (model_type {model_type!r}): {e}") from None
    except (TypeError, AttributeError, ArithmeticError) as e:  # a field of an unexpected JSON type
        raise ValueError(f"{source} (model_type {model_type!r}) has a malformed field: {e}") from None
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in fields.items() if k in known}, hf_config=dict(cfg))


def load_model_config(model_dir: str) -> ModelConfig:
    """Read ``<model_dir>/config.json``; ValueError naming the file for a missing, unreadable or malformed one."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise ValueError(f"model_dir={model_dir!r} is not a directory; pass a Hugging Face checkpoint directory")
    if not os.path.isfile(path):
        raise ValueError(
            f"{path} not found: model_dir must be a Hugging Face checkpoint directory with config.json and *.safetensors"
        )
    return model_config_from_dict(read_json(path, "the model's config"), source=path)


def read_json(path: str, what: str) -> Any:
    """``json.load`` of ``path``; ValueError naming the file (and the line and column) when it cannot be read or is
    not valid JSON (truncated, binary, ...). ``what`` says what the file should hold."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e.msg}: line {e.lineno}, column {e.colno}); it should hold {what}: "
            f"re-download or re-save it"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not valid JSON (not UTF-8 text); it should hold {what}: re-download it") from None
    except OSError as e:
        raise ValueError(f"cannot read {path} ({e.strerror or e}); it should hold {what}") from None


def build_tiny_llama_config(
    vocab_size: int = 256,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 8,
    num_key_value_heads: int = 1,
    max_position_embeddings: int = 4096,
) -> ModelConfig:
    """The built-in model (``--model`` omitted): byte-level vocabulary, one KV head so any ``dcp | tp`` is legal."""
    return model_config_from_dict(
        dict(
            model_type="llama",
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            max_position_embeddings=max_position_embeddings,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            eos_token_id=None,  # byte ids have no EOS: generation runs to --max-new-tokens
        )
    )
