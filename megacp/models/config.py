"""``ModelConfig``: the fields megacp needs from a Hugging Face ``config.json``.

One parser per supported ``model_type`` fills the architecture-specific fields (biases, MoE sizes, ...) on top of
the common dense-decoder fields; add an architecture by adding an entry to ``_ARCH_PARSERS``.
MoE architectures (Mixtral, Qwen2-MoE) set ``num_experts > 0`` and list their sparse layers in ``moe_layers``; the
other layers keep the dense SwiGLU MLP of size ``intermediate_size``.
Both the transformers v4 layout (``rope_theta`` + ``rope_scaling``) and the v5 layout (``rope_parameters``) are read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from megacp.layers.rotary import compute_inv_freq


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
    # MoE (num_experts == 0: a dense model). Sizes of one routed expert / of the shared expert (0: none).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k router weights (Mixtral always, Qwen2-MoE per config)
    moe_layers: list[int] = field(default_factory=list)  # indices of the sparse layers
    # Names of one expert's gate/up/down projections in per-expert checkpoints (Mixtral: w1/w3/w2).
    expert_proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)  # the raw config.json

    @property
    def attention_scale(self) -> float:
        return self.head_dim**-0.5

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def dense_intermediate_size(self) -> int | None:
        """The dense SwiGLU MLP's size, which TP must divide; None when every layer is MoE (Mixtral)."""
        return self.intermediate_size if len(self.moe_layers) < self.num_hidden_layers else None


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from either config layout; validates the rope type early."""
    params = cfg.get("rope_parameters")
    if params and not any(isinstance(v, dict) for v in params.values()):
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling: dict[str, Any] | None = dict(params)
    elif params:
        raise ValueError("per-layer-type rope_parameters in config.json are not supported by megacp")
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else None
    if scaling is not None:
        scaling.pop("rope_theta", None)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "default":
            scaling = None
        else:
            scaling["rope_type"] = rope_type
            if rope_type == "llama3":
                scaling.setdefault(
                    "original_max_position_embeddings",
                    cfg.get("original_max_position_embeddings", cfg.get("max_position_embeddings")),
                )
    compute_inv_freq(2, float(theta), scaling)  # raises ValueError on an unsupported rope type
    return float(theta), scaling


def _eos_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _dense_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fields shared by every supported architecture."""
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling = _rope(cfg)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act {act!r} is not supported; megacp's MLP is SwiGLU (silu)")
    return dict(
        model_type=cfg["model_type"],
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=num_heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        bos_token_id=cfg.get("bos_token_id"),
    )


def _warn_sliding_window(cfg: dict[str, Any]) -> None:
    window = cfg.get("sliding_window")
    if window and cfg.get("use_sliding_window", True):
        warnings.warn(
            f"config.json sets sliding_window={window}; megacp uses full causal attention, which matches the model "
            f"only for sequences of at most {window} tokens",
            stacklevel=3,
        )


def _llama(cfg: dict[str, Any]) -> dict[str, Any]:
    bias = bool(cfg.get("attention_bias", False))
    return dict(_dense_fields(cfg), qkv_bias=bias, o_proj_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)))


def _mistral(cfg: dict[str, Any]) -> dict[str, Any]:
    _warn_sliding_window(cfg)
    return _dense_fields(cfg)


def _qwen2(cfg: dict[str, Any]) -> dict[str, Any]:
    _warn_sliding_window(cfg)
    return dict(_dense_fields(cfg), qkv_bias=True)  # Qwen2's q/k/v projections always have a bias, o_proj none


def _check_moe(fields: dict[str, Any]) -> dict[str, Any]:
    num_experts, top_k = fields["num_experts"], fields["num_experts_per_tok"]
    if fields["moe_layers"] and not 1 <= top_k <= num_experts:
        raise ValueError(
            f"config.json num_experts_per_tok={top_k} must be between 1 and the number of experts ({num_experts})"
        )
    return fields


def _mixtral(cfg: dict[str, Any]) -> dict[str, Any]:
    _warn_sliding_window(cfg)
    fields = _dense_fields(cfg)
    return _check_moe(dict(
        fields,
        num_experts=int(cfg["num_local_experts"]),
        num_experts_per_tok=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=fields["intermediate_size"],  # every Mixtral layer is sparse: the experts' size
        norm_topk_prob=True,
        moe_layers=list(range(fields["num_hidden_layers"])),
        expert_proj_names=("w1", "w3", "w2"),
    ))


def _qwen2_moe(cfg: dict[str, Any]) -> dict[str, Any]:
    _warn_sliding_window(cfg)
    fields = _dense_fields(cfg)
    num_experts = int(cfg["num_experts"])
    step = int(cfg.get("decoder_sparse_step", 1))
    dense_only = set(cfg.get("mlp_only_layers") or [])
    # The rule of transformers' Qwen2MoeDecoderLayer: sparse unless listed in mlp_only_layers or off the sparse step.
    moe_layers = [
        i for i in range(fields["num_hidden_layers"])
        if num_experts > 0 and i not in dense_only and (i + 1) % step == 0
    ]
    return _check_moe(dict(
        fields,
        qkv_bias=bool(cfg.get("qkv_bias", True)),
        num_experts=num_experts,
        num_experts_per_tok=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=int(cfg["moe_intermediate_size"]),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=moe_layers,
    ))


# model_type -> parser of the architecture-specific fields.
_ARCH_PARSERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "llama": _llama,
    "mistral": _mistral,
    "mixtral": _mixtral,
    "qwen2": _qwen2,
    "qwen2_moe": _qwen2_moe,
}


def supported_model_types() -> list[str]:
    return sorted(_ARCH_PARSERS)


def model_config_from_dict(cfg: dict[str, Any]) -> ModelConfig:
    """Parse a loaded ``config.json`` dict; ValueError for an unsupported ``model_type`` or missing field."""
    model_type = cfg.get("model_type")
    parser = _ARCH_PARSERS.get(model_type)  # type: ignore[arg-type]
    if parser is None:
        raise ValueError(
            f"unsupported model_type {model_type!r} in config.json; "
            f"megacp supports: {', '.join(supported_model_types())}"
        )
    try:
        fields = parser(cfg)
    except KeyError as e:
        raise ValueError(f"config.json of model_type {model_type!r} lacks the required field {e.args[0]!r}") from e
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in fields.items() if k in known}, hf_config=dict(cfg))


def load_model_config(model_dir: str) -> ModelConfig:
    """Read ``<model_dir>/config.json``."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise ValueError(f"--model {model_dir!r} is not a directory; pass a Hugging Face checkpoint directory")
    if not os.path.isfile(path):
        raise ValueError(
            f"{path} not found: --model must be a Hugging Face checkpoint directory with config.json and *.safetensors"
        )
    with open(path) as f:
        return model_config_from_dict(json.load(f))


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
