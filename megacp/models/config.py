"""``ModelConfig``: the fields megacp needs from a Hugging Face ``config.json``.

One parser per supported ``model_type`` fills the architecture-specific fields (biases, MoE sizes, ...) on top of
the common dense-decoder fields; add an architecture by adding an entry to ``_ARCH_PARSERS``.
MoE architectures (Mixtral, Qwen2-MoE, DeepSeek-V2/V3) set ``num_experts > 0`` and list their sparse layers in
``moe_layers``; the other layers keep the dense SwiGLU MLP of size ``intermediate_size``.
DeepSeek-V2/V3 use multi-head latent attention (``kv_lora_rank > 0``, ``is_mla``: DESIGN §3b) and DeepSeek's router
(``scoring_func``, ``topk_method``, groups, ``routed_scaling_factor``, ungated shared experts).
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

from megacp.layers.rotary import compute_inv_freq, rope_type_of, yarn_mscale


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


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from either config layout; validates the rope type and its fields early."""
    params = cfg.get("rope_parameters")
    for key in ("rope_parameters", "rope_scaling"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise ValueError(f"field {key!r} must be an object (or null), got {cfg[key]!r}")
    key = "rope_parameters"
    if params and not any(isinstance(v, dict) for v in params.values()):
        theta = _float(params, "rope_theta", _float(cfg, "rope_theta", 10000.0))
        scaling: dict[str, Any] | None = dict(params)
    elif params:
        raise ValueError("per-layer-type rope_parameters are not supported by megacp")
    else:
        key, theta = "rope_scaling", _float(cfg, "rope_theta", 10000.0)
        scaling = dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else None
    if scaling is not None:
        scaling.pop("rope_theta", None)
        rope_type = rope_type_of(scaling)
        if rope_type == "default":
            scaling = None
        else:
            scaling["rope_type"] = rope_type
            if rope_type in ("llama3", "yarn"):
                scaling.setdefault(
                    "original_max_position_embeddings",
                    cfg.get("original_max_position_embeddings", cfg.get("max_position_embeddings")),
                )
            if rope_type == "yarn":
                _check_yarn(cfg, scaling, key)
    compute_inv_freq(2, float(theta), scaling)  # raises ValueError on an unsupported rope type
    return float(theta), scaling


def _check_yarn(cfg: dict[str, Any], scaling: dict[str, Any], key: str) -> None:
    """YaRN's fields, as transformers reads them: ``factor`` required (null: max_position_embeddings /
    original_max_position_embeddings), numbers where numbers belong, ``beta_fast``/``beta_slow`` null = 32/1."""
    if "factor" not in scaling:
        raise ValueError(f"field '{key}.factor' is required for rope_type 'yarn' (the context extension factor)")
    original = scaling["original_max_position_embeddings"]
    if original is None or isinstance(original, bool) or not isinstance(original, (int, float)) or original <= 0:
        raise ValueError(f"field '{key}.original_max_position_embeddings' must be a number > 0 for rope_type 'yarn', "
                         f"got {original!r}")
    if scaling["factor"] is None:
        scaling["factor"] = _int(cfg, "max_position_embeddings", 4096) / original
    sub = {k: v for k, v in scaling.items() if v is not None}
    for name, positive in (("factor", True), ("beta_fast", True), ("beta_slow", True), ("mscale", False),
                           ("mscale_all_dim", False), ("attention_factor", True)):
        if name in sub:
            try:
                _float(sub, name, 0.0, positive)
            except ValueError as e:
                raise ValueError(str(e).replace(f"field {name!r}", f"field '{key}.{name}'")) from None
    if "truncate" in sub and not isinstance(sub["truncate"], bool):
        raise ValueError(f"field '{key}.truncate' must be true or false, got {sub['truncate']!r}")


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


def _dense_fields(cfg: dict[str, Any], head_dim: int | None = None) -> dict[str, Any]:
    """Fields shared by every supported architecture (``head_dim`` given: not read from the config)."""
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
        head_dim=_head_dim(cfg, hidden, num_heads) if head_dim is None else head_dim,
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


# What each DeepSeek version's router does (transformers' DeepseekV2TopkRouter / DeepseekV3TopkRouter).
_DEEPSEEK_ROUTERS = {"deepseek_v2": ("softmax", ("greedy", "group_limited_greedy")),
                     "deepseek_v3": ("sigmoid", ("noaux_tc",))}
# Defaults of transformers' DeepseekV2Config / DeepseekV3Config for fields a config.json may omit.
_DEEPSEEK_DEFAULTS = {
    "deepseek_v2": dict(first_k_dense_replace=0, n_shared_experts=2, routed_scaling_factor=1.0, norm_topk_prob=False,
                        n_group=None, topk_group=None),
    "deepseek_v3": dict(first_k_dense_replace=3, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                        n_group=8, topk_group=4),
}


def _optional_int(cfg: dict[str, Any], key: str, default: Any, minimum: int = 1) -> int | None:
    return None if cfg.get(key, default) is None else _int(cfg, key, default, minimum)


def _mla_fields(cfg: dict[str, Any], version: str) -> dict[str, Any]:
    """Multi-head latent attention sizes; ``kv_lora_rank`` must be >= 1 (0 would be no latent at all)."""
    if cfg.get("kv_lora_rank") in (0, None):
        raise ValueError(
            f"field 'kv_lora_rank' is {cfg.get('kv_lora_rank')!r}: megacp runs DeepSeek models with multi-head latent "
            f"attention only, which needs kv_lora_rank >= 1 (DeepSeek-V2/V3 use 512)"
        )
    rope_dim = _int(cfg, "qk_rope_head_dim")
    if rope_dim % 2:
        raise ValueError(f"field 'qk_rope_head_dim' must be even (rotary pairs), got {rope_dim}")
    bias = _bool(cfg, "attention_bias", False)
    return dict(
        kv_lora_rank=_int(cfg, "kv_lora_rank"),
        q_lora_rank=_optional_int(cfg, "q_lora_rank", None),
        qk_nope_head_dim=_int(cfg, "qk_nope_head_dim"),
        qk_rope_head_dim=rope_dim,
        v_head_dim=_int(cfg, "v_head_dim"),
        # DeepSeek-V2's checkpoints always pair (x_2i, x_2i+1) (transformers rotates them as complex numbers).
        rope_interleave=True if version == "deepseek_v2" else _bool(cfg, "rope_interleave", True),
        rope_float32=version == "deepseek_v2",
        qkv_bias=bias,  # MLA: q_a_proj / kv_a_proj_with_mqa biases, as transformers' attention_bias
        o_proj_bias=bias,
    )


def _deepseek_router(cfg: dict[str, Any], version: str, num_experts: int, top_k: int) -> dict[str, Any]:
    """Router fields; ValueError naming the field for a scoring function / top-k method this version does not use,
    or groups that do not split the experts."""
    defaults = _DEEPSEEK_DEFAULTS[version]
    scoring, methods = _DEEPSEEK_ROUTERS[version]
    if cfg.get("scoring_func", scoring) != scoring:
        raise ValueError(f"field 'scoring_func' is {cfg['scoring_func']!r}, but {version} routes with {scoring!r}")
    method = cfg.get("topk_method") or methods[0]
    if method not in methods:
        raise ValueError(f"field 'topk_method' is {method!r}; {version} supports: {', '.join(methods)}")
    n_group = topk_group = 1
    if method != "greedy":
        for key in ("n_group", "topk_group"):
            if cfg.get(key, defaults[key]) is None:
                raise ValueError(f"field {key!r} is required for topk_method {method!r} (the expert groups)")
        n_group = _int(cfg, "n_group", defaults["n_group"])
        topk_group = _int(cfg, "topk_group", defaults["topk_group"])
        per_group = num_experts // n_group
        if num_experts % n_group:
            raise ValueError(f"field 'n_group' ({n_group}) must divide n_routed_experts ({num_experts})")
        if topk_group > n_group:
            raise ValueError(f"field 'topk_group' ({topk_group}) must be at most n_group ({n_group})")
        if method == "noaux_tc" and per_group < 2:
            raise ValueError(f"noaux_tc scores a group by its top-2 experts: n_routed_experts / n_group must be >= 2, "
                             f"got {num_experts} / {n_group} (field 'n_group')")
        if top_k > topk_group * per_group:
            raise ValueError(f"field 'num_experts_per_tok' ({top_k}) exceeds the experts of the "
                             f"topk_group={topk_group} chosen groups ({topk_group * per_group})")
    norm = _bool(cfg, "norm_topk_prob", defaults["norm_topk_prob"])
    if version == "deepseek_v2" and norm:
        warnings.warn("config.json sets norm_topk_prob=true for deepseek_v2: transformers' DeepseekV2 router does not "
                      "renormalise, and megacp follows it", stacklevel=4)
        norm = False
    return dict(scoring_func=scoring, topk_method=method, n_group=n_group, topk_group=topk_group,
                routed_scaling_factor=_float(cfg, "routed_scaling_factor", defaults["routed_scaling_factor"]),
                norm_topk_prob=norm)


def _deepseek(cfg: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V2 / V3: MLA attention, the first ``first_k_dense_replace`` layers dense, then every
    ``moe_layer_freq``-th layer sparse (DeepSeek's rule; the published checkpoints use 1, transformers' rule)."""
    version = cfg["model_type"]
    mla = _mla_fields(cfg, version)
    fields = dict(_dense_fields(cfg, head_dim=mla["qk_rope_head_dim"]), **mla, mlp_bias=_bool(cfg, "mlp_bias", False))
    num_experts = _int(cfg, "n_routed_experts", 0, minimum=0) if cfg.get("n_routed_experts") is not None else 0
    first_dense = _int(cfg, "first_k_dense_replace", _DEEPSEEK_DEFAULTS[version]["first_k_dense_replace"], minimum=0)
    freq = _int(cfg, "moe_layer_freq", 1)
    moe_layers = [i for i in range(fields["num_hidden_layers"]) if num_experts and i >= first_dense and i % freq == 0]
    if not moe_layers:
        return dict(fields, first_k_dense_replace=first_dense, moe_layer_freq=freq)
    top_k = _int(cfg, "num_experts_per_tok")
    moe_size = _int(cfg, "moe_intermediate_size")
    n_shared = _int(cfg, "n_shared_experts", _DEEPSEEK_DEFAULTS[version]["n_shared_experts"], minimum=0) \
        if cfg.get("n_shared_experts", 0) is not None else 0
    return _check_moe(dict(
        fields,
        **_deepseek_router(cfg, version, num_experts, top_k),
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=moe_size,
        n_shared_experts=n_shared,
        shared_expert_intermediate_size=n_shared * moe_size,
        shared_expert_gate=False,
        first_k_dense_replace=first_dense,
        moe_layer_freq=freq,
        moe_layers=moe_layers,
    ))


# model_type -> parser of the architecture-specific fields.
_ARCH_PARSERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
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
