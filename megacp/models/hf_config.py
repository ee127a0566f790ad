"""Reading a Hugging Face ``config.json`` into ``ModelConfig``'s fields: one parser per supported ``model_type``.

Each parser takes the loaded JSON object and returns a dict of ``ModelConfig`` fields (``models.config`` builds the
dataclass from it); add an architecture by adding a parser to ``ARCH_PARSERS``. The common dense-decoder fields are
read by ``_dense_fields``; the checked readers (``_int``, ``_float``, ``_bool``, ...) raise ``ValueError`` naming the
field, which ``model_config_from_dict`` prefixes with the file. Both the transformers v4 layout (``rope_theta`` +
``rope_scaling``) and the v5 layout (``rope_parameters``) are read; DeepSeek-V2/V3 add MLA's sizes and the router.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

from megacp.layers.rotary import compute_inv_freq, rope_type_of


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
ARCH_PARSERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
    "llama": _llama,
    "mistral": _mistral,
    "mixtral": _mixtral,
    "qwen2": _qwen2,
    "qwen2_moe": _qwen2_moe,
}


__all__ = ["ARCH_PARSERS"]
