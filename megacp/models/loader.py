"""Build a model and fill it from a Hugging Face checkpoint directory, each rank reading only its shards.

A checkpoint is ``config.json`` plus ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (whose
``weight_map`` names the file of every tensor). Files are opened with ``safetensors.safe_open`` and tensors taken
as lazy slices (``get_slice``), so a rank's weight loaders read only the rows/columns they keep.
``load_model(None, ...)`` builds the seeded tiny Llama instead (identical weights on every rank).

MoE checkpoints come in two layouts, both read: one tensor per expert and projection (published Mixtral/Qwen2-MoE
checkpoints, and what transformers v5's ``save_pretrained`` writes), or transformers v5's in-memory fused layout
(``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]). Under expert parallelism a rank
reads only its own experts' tensors (or its experts' rows of the fused ones). DeepSeek-V3 checkpoints may append
multi-token-prediction layers after the last decoder layer: ignored with a warning.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Iterator

import torch

from megacp import parallel_state
from megacp.layers.context_transfer import check_context_transfer
from megacp.models.config import ModelConfig, build_tiny_llama_config, load_model_config, read_json
from megacp.models.deepseek import DeepseekForCausalLM
from megacp.models.llama import LlamaForCausalLM
from megacp.moe import MoEParallelConfig
from megacp.parallel_state import ParallelContext, resolve_parallel_context

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that the model recomputes (or, tied, shares): present or not, both are fine.
_OPTIONAL_SUFFIXES = ("rotary_emb.inv_freq",)
# Mixtral's published checkpoints call the MoE block ``block_sparse_moe``; transformers v5 (and megacp) call it ``mlp``.
_NAME_ALIASES = ((".block_sparse_moe.", ".mlp."),)


def canonical_name(name: str) -> str:
    """The name megacp's model uses for checkpoint tensor ``name`` (e.g. Mixtral's ``block_sparse_moe.`` → ``mlp.``)."""
    for old, new in _NAME_ALIASES:
        name = name.replace(old, new)
    return name


def _unreadable(path: str, e: Exception) -> ValueError:
    return ValueError(
        f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt: re-download it, or re-save the "
        f"model with save_pretrained(..., safe_serialization=True)"
    )


@contextlib.contextmanager
def _open_safetensors(path: str) -> Iterator[Any]:
    """``safe_open(path)``; a file safetensors cannot parse (empty, truncated, random bytes) -> ValueError naming it."""
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt")
    except Exception as e:  # SafetensorError (a bad header), OSError
        raise _unreadable(path, e) from None
    with handle as f:
        yield f


def _read_index(index_path: str) -> dict[str, str]:
    index = read_json(index_path, 'a sharded checkpoint\'s {"weight_map": {tensor name: shard file}}')
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ValueError(
            f"{index_path} must hold {{\"weight_map\": {{tensor name: shard file name}}}}; its weight_map is "
            f"missing or malformed: re-download it"
        )
    return weight_map


def checkpoint_files(model_dir: str) -> dict[str, list[str]]:
    """``{safetensors file path: [tensor names]}`` for a checkpoint directory (single file or sharded index).

    ValueError naming the file for a malformed index, a missing shard or a file safetensors cannot parse.
    """
    index_path = os.path.join(model_dir, INDEX_FILE)
    single_path = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(index_path):
        files: dict[str, list[str]] = {}
        for name, filename in _read_index(index_path).items():
            files.setdefault(os.path.join(model_dir, filename), []).append(name)
        missing = sorted(p for p in files if not os.path.isfile(p))
        if missing:
            raise ValueError(f"{index_path} lists shard file(s) that do not exist: {', '.join(missing)}")
        return files
    if os.path.isfile(single_path):
        with _open_safetensors(single_path) as f:
            return {single_path: list(f.keys())}
    raise ValueError(
        f"no weights in {model_dir}: expected {SINGLE_FILE} or {INDEX_FILE} (+ its shards); "
        f"save the model with save_pretrained(..., safe_serialization=True)"
    )


def _check_names(expected: set[str], found: set[str], model_dir: str) -> None:
    missing = sorted(expected - found)
    unexpected = sorted(n for n in found - expected if not n.endswith(_OPTIONAL_SUFFIXES) and n != "lm_head.weight")
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    if problems:
        raise ValueError(
            f"checkpoint {model_dir} does not match its config.json ({'; '.join(problems)}); "
            f"check that config.json and the safetensors files belong to the same model"
        )


class _CheckedSlice:
    """A safetensors lazy slice whose reads fail with a ValueError naming the file: a read error (a shard cut short
    after its header) or, with ``check_finite``, NaN/inf values in the part this rank reads."""

    def __init__(self, inner: Any, path: str, check_finite: bool) -> None:
        self._inner, self._path, self._check_finite = inner, path, check_finite

    def get_shape(self) -> list[int]:
        return self._inner.get_shape()

    def __getitem__(self, index: Any) -> torch.Tensor:
        try:
            t = self._inner[index]
        except Exception as e:  # SafetensorError / OSError from the file
            raise ValueError(f"reading it from {self._path} failed ({e}); the file is corrupt: re-download it") from None
        if self._check_finite and t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(
                    f"{self._path} holds NaN/inf values in this tensor ({bad} of the {t.numel()} elements this rank "
                    f"reads), which would make every output garbage: use an intact checkpoint, or pass "
                    f"load_model(check_finite=False) (--skip-finite-check) to load it anyway"
                )
        return t


def _iter_slices(files: dict[str, list[str]], wanted: set[str], check_finite: bool = True,
                 index_path: str | None = None) -> Iterator[tuple[str, Any]]:
    """(canonical name, lazy slice) of every tensor whose canonical name is in ``wanted``."""
    for path, names in files.items():
        with _open_safetensors(path) as f:
            keys = set(f.keys())
            absent = [n for n in names if n not in keys and canonical_name(n) in wanted]
            if absent:
                raise ValueError(
                    f"{index_path or path} maps tensor {absent[0]} to {os.path.basename(path)}, but that file does not "
                    f"contain it{f' (nor {len(absent) - 1} more)' if len(absent) > 1 else ''}; the index and the "
                    f"shards do not belong together: re-download them"
                )
            for name in names:
                if canonical_name(name) in wanted:
                    yield canonical_name(name), _CheckedSlice(f.get_slice(name), path, check_finite)


def mtp_tensor_names(names: set[str], config: ModelConfig) -> set[str]:
    """The tensors of DeepSeek-V3's multi-token-prediction layers among ``names``: published V3 checkpoints append
    ``num_nextn_predict_layers`` of them as ``model.layers.{num_hidden_layers + i}.*`` (a speculative-decoding head
    that neither transformers' model nor megacp runs)."""
    extra = config.hf_config.get("num_nextn_predict_layers") or 0
    if not isinstance(extra, int) or extra <= 0:
        return set()
    first = config.num_hidden_layers
    prefixes = tuple(f"model.layers.{i}." for i in range(first, first + extra))
    return {n for n in names if n.startswith(prefixes)}


def load_weights(model: LlamaForCausalLM, model_dir: str, files: dict[str, list[str]] | None = None,
                 check_finite: bool = True) -> None:
    """Fill ``model`` from the safetensors in ``model_dir``; ValueError naming missing/unexpected/misshapen tensors,
    unreadable files and (``check_finite``) tensors with NaN/inf values in this rank's part. DeepSeek-V3's MTP
    layers (``mtp_tensor_names``) are skipped with a warning."""
    files = checkpoint_files(model_dir) if files is None else files
    index_path = os.path.join(model_dir, INDEX_FILE)
    found = {canonical_name(name) for names in files.values() for name in names}
    mtp = mtp_tensor_names(found, model.config)
    if mtp:
        warnings.warn(
            f"{model_dir}: ignoring the {len(mtp)} tensors of the multi-token-prediction layer(s) "
            f"model.layers.{model.config.num_hidden_layers}.* (num_nextn_predict_layers); megacp, like transformers, "
            f"runs the {model.config.num_hidden_layers} decoder layers only",
            stacklevel=2,
        )
        found -= mtp
    loaders = model.hf_weight_loaders(fused_experts=any(n.endswith(".mlp.experts.gate_up_proj") for n in found))
    _check_names(set(loaders), found, model_dir)
    for name, loaded in _iter_slices(files, set(loaders), check_finite,
                                     index_path if os.path.isfile(index_path) else None):
        try:
            loaders[name](loaded)
        except ValueError as e:
            raise ValueError(f"{name} in {model_dir}: {e}") from e


def seeded_hf_weights(model: LlamaForCausalLM, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random full (unsharded) HF-named tensors from ``seed``: same on every rank, so sharding them is consistent.

    Linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms ~ 1 + N(0, 0.1²): logits with clear argmax
    margins, so greedy outputs do not hinge on rounding.
    """
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in sorted(model.hf_weight_shapes().items()):
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif "embed_tokens" in name:
            t = torch.randn(shape, generator=gen)
        elif len(shape) == 2:
            t = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        else:  # biases
            t = 0.1 * torch.randn(shape, generator=gen)
        weights[name] = t
    return weights


def _parallel_context(config: ModelConfig, given: ParallelContext | None) -> ParallelContext:
    """The context to build for (given, else the initialised global one), with the model checked against it."""
    if given is None and not parallel_state.model_parallel_is_initialized():
        raise ValueError("load_model needs megacp.parallel_state.initialize_model_parallel(...) to be called first")
    ctx = resolve_parallel_context(given)
    ctx.config.check_model(
        config.num_attention_heads, config.num_key_value_heads, config.dense_intermediate_size, config.is_moe,
        config.is_mla,
    )
    return ctx


def load_model(
    model_dir: str | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    enable_expert_parallel: bool | None = None,
    check_finite: bool = True,
    parallel_context: ParallelContext | None = None,
    context_transfer: str = "auto",
) -> LlamaForCausalLM:
    """Build the model for this rank's TP shard and load it; ``model_dir=None`` → the seeded tiny Llama.

    MoE experts are split over all ``dp·pcp·tp`` ranks (DESIGN §4): tensor-parallel, or with
    ``enable_expert_parallel`` (default: what ``initialize_model_parallel`` was given) whole experts per rank.
    Checks (ValueError, the same on every rank, before any collective): checkpoint directory/config/weights exist,
    ``model_type`` is supported, heads fit ``tp`` and ``dcp`` (DESIGN §3 GQA rule), ``dp = 1`` for MoE models,
    tensor names and shapes match. Reading (ValueError naming the file): a malformed index, a truncated or corrupt
    safetensors file, an index that maps a tensor to the wrong shard, and, unless ``check_finite=False`` (faster),
    NaN/inf weights. Ranks read different shards, so the read errors are agreed on over all ranks (one collective):
    every rank raises the same message, none is left waiting. ``parallel_context``: the layout to build for
    (default: ``initialize_model_parallel``'s, ``get_parallel_context()``). ``context_transfer``: pass-Q or pass-KV
    for prefills over cached context (``LlamaForCausalLM.set_context_transfer``; checked first).
    """
    check_context_transfer(context_transfer)
    if model_dir is None:
        config, files = build_tiny_llama_config(), None
    else:
        config, files = load_model_config(model_dir), checkpoint_files(model_dir)
    ctx = _parallel_context(config, parallel_context)
    moe_config = MoEParallelConfig.make(use_ep=enable_expert_parallel, parallel_context=ctx) if config.is_moe else None
    model_cls = DeepseekForCausalLM if config.is_mla else LlamaForCausalLM
    with torch.device(device):
        model = model_cls(config, params_dtype=dtype, moe_parallel_config=moe_config, parallel_context=ctx)
    model.set_context_transfer(context_transfer)
    if model_dir is None:
        loaders = model.hf_weight_loaders()
        for name, tensor in seeded_hf_weights(model, seed).items():
            loaders[name](tensor)
        return model.requires_grad_(False).eval()  # inference: no autograd graph through the weights
    error = None
    try:
        load_weights(model, model_dir, files, check_finite)
    except ValueError as e:
        error = str(e)
    error = ctx.world.first_error(error)
    if error is not None:
        raise ValueError(error)
    return model.requires_grad_(False).eval()
