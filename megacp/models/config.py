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
import math
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
    for key in ("rope_parameters", "rope_scaling"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise ValueError(f"field {key!r} must be an object (or null), got {cfg[key]!r}")
    if params and not any(isinstance(v, dict) for v in params.values()):
        theta = _float(params, "rope_theta", _float(cfg, "rope_theta", 10000.0))
        scaling: dict[str, Any] | None = dict(params)
    elif params:
        raise ValueError("per-layer-type rope_parameters are not supported by megacp")
    else:
        theta = _float(cfg, "rope_theta", 10000.0)
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


_REQUIRED = object()


def _int(cfg: dict[str, Any], key: str, default: Any = _REQUIRED, minimum: int = 1) -> int:
    """Field ``key`` as an int >= ``minimum`` (an integral float such as 4096.0 is accepted): missing and no default
    -> KeyError (reported as a missing field); a string, bool, fraction or out-of-range value -> ValueError."""
    value = cfg[key] if default is _REQUIRED else cfg.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"field {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _float(cfg: dict[str, Any], key: str, default: float, positive: bool = True) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
        positive and value <= 0
    ):
        raise ValueError(f"field {key!r} must be a finite number{' > 0' if positive else ''}, got {value!r}")
    return float(value)


def _bool(cfg: dict[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"field {key!r} must be true or false, got {value!r}")
    return value


def _eos_ids(value: Any) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"field 'eos_token_id' must be a token id or a list of token ids, got {value!r}")
    return list(values)


def _head_dim(cfg: dict[str, Any], hidden: int, num_heads: int) -> int:
    if cfg.get("head_dim") is not None:
        return _int(cfg, "head_dim")
    if hidden % num_heads != 0:
        raise ValueError(
            f"field 'head_dim' is missing and hidden_size {hidden} is not a multiple of num_attention_heads "
            f"{num_heads}, so it cannot be derived; add head_dim"
        )
    return hidden // num_heads


def _dense_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fields shared by every supported architecture."""
    num_heads = _int(cfg, "num_attention_heads")
    hidden = _int(cfg, "hidden_size")
    theta, scaling = _rope(cfg)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported; megacp's MLP is SwiGLU (silu)")
    bos = cfg.get("bos_token_id")
    if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int)):
        raise ValueError(f"field 'bos_token_id' must be a token id or null, got {bos!r}")
    return dict(
        model_type=cfg["model_type"],
        vocab_size=_int(cfg, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(cfg, "intermediate_size"),
        num_hidden_layers=_int(cfg, "num_hidden_layers"),
        num_attention_heads=num_heads,
        # HF's rule: a missing (or null) num_key_value_heads means one KV head per attention head.
        num_key_value_heads=num_heads if cfg.get("num_key_value_heads") is None else _int(cfg, "num_key_value_heads"),
        head_dim=_head_dim(cfg, hidden, num_heads),
        rms_norm_eps=_float(cfg, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=_int(cfg, "max_position_embeddings", 4096),
        tie_word_embeddings=_bool(cfg, "tie_word_embeddings", False),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        bos_token_id=bos,
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
    bias = _bool(cfg, "attention_bias", False)
    return dict(_dense_fields(cfg), qkv_bias=bias, o_proj_bias=bias, mlp_bias=_bool(cfg, "mlp_bias", False))


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
            f"num_experts_per_tok={top_k} must be between 1 and the number of experts ({num_experts})"
        )
    return fields


def _mixtral(cfg: dict[str, Any]) -> dict[str, Any]:
    _warn_sliding_window(cfg)
    fields = _dense_fields(cfg)
    return _check_moe(dict(
        fields,
        num_experts=_int(cfg, "num_local_experts"),
        num_experts_per_tok=_int(cfg, "num_experts_per_tok"),
        moe_intermediate_size=fields["intermediate_size"],  # every Mixtral layer is sparse: the experts' size
        norm_topk_prob=True,
        moe_layers=list(range(fields["num_hidden_layers"])),
        expert_proj_names=("w1", "w3", "w2"),
    ))


def _qwen2_moe(cfg: dict[str, Any]) -> dict[str, Any]:
    _warn_sliding_window(cfg)
    fields = _dense_fields(cfg)
    num_experts = _int(cfg, "num_experts", minimum=0)
    step = _int(cfg, "decoder_sparse_step", 1)
    dense_only = cfg.get("mlp_only_layers") or []
    if not isinstance(dense_only, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in dense_only):
        raise ValueError(f"field 'mlp_only_layers' must be a list of layer indices, got {dense_only!r}")
    dense_only = set(dense_only)
    # The rule of transformers' Qwen2MoeDecoderLayer: sparse unless listed in mlp_only_layers or off the sparse step.
    moe_layers = [
        i for i in range(fields["num_hidden_layers"])
        if num_experts > 0 and i not in dense_only and (i + 1) % step == 0
    ]
    return _check_moe(dict(
        fields,
        qkv_bias=_bool(cfg, "qkv_bias", True),
        num_experts=num_experts,
        num_experts_per_tok=_int(cfg, "num_experts_per_tok", minimum=0),
        moe_intermediate_size=_int(cfg, "moe_intermediate_size"),
        shared_expert_intermediate_size=_int(cfg, "shared_expert_intermediate_size", 0, minimum=0)
        if cfg.get("shared_expert_intermediate_size") is not None else 0,
        norm_topk_prob=_bool(cfg, "norm_topk_prob", False),
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


def model_config_from_dict(cfg: Any, source: str = "config.json") -> ModelConfig:
    """Parse a loaded ``config.json`` object; one ``ValueError`` starting with ``source`` (the file) and naming the
    field for anything that is not a supported, well-formed config: not an object, an unsupported ``model_type``, a
    missing field, a string or 0 where a size belongs, ..."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{source} must hold a JSON object of model settings, got a {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    parser = _ARCH_PARSERS.get(model_type) if isinstance(model_type, str) else None
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
        raise ValueError(f"--model {model_dir!r} is not a directory; pass a Hugging Face checkpoint directory")
    if not os.path.isfile(path):
        raise ValueError(
            f"{path} not found: --model must be a Hugging Face checkpoint directory with config.json and *.safetensors"
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
