"""Generate text with a Llama-family model under tensor + prefill/decode context parallelism.

    torchrun --nproc-per-node 2 examples/infer_llama.py --model "$(python -m megacp.models.prepare smollm2)" -pcp 2 \
        --chat --prompt "What is the capital of France?"
    torchrun --nproc-per-node 4 examples/infer_llama.py -tp 2 -pcp 2 -dcp 2 --prompt "Hello, megacp"
    torchrun --nproc-per-node 2 examples/infer_llama.py --model DIR -pcp 2 --prompt-ids 1,2,3 --json-out out.json

``--nproc-per-node`` must equal dp·pcp·tp (``-dp`` defaults to 1; with dp > 1 the prompts are dealt round-robin to
the data-parallel replicas). Without ``--model`` (or with ``--model tiny``) a small seeded Llama with byte-level ids
(UTF-8 bytes) is built, so the command runs anywhere, CPU included; its text is noise. ``--chat`` wraps each
``--prompt`` in the checkpoint's chat template as one user turn (what an instruction-tuned model expects). Every
configuration error (a bad flag value, file, request or cache size) is found on every rank before generating and ends
the job with exit code 2 and one message naming the flag or file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator, NoReturn

# torch without numpy (the minimal install) works but warns at import; megacp needs no numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
if __name__ == "__main__":  # Ctrl-C while torch imports, before main() handles signals: one line, no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: (
        os.write(2, f"[rank {os.environ.get('RANK', '0')}] interrupted (SIGINT) while starting\n".encode()),
        os._exit(128 + signum)))

import torch
import torch.distributed as dist

from megacp import parallel_state as ps
from megacp.checks import check_int, check_memory, check_real
from megacp.config import ParallelConfig, launched_by_torchrun
from megacp.engine import LLMEngine
from megacp.kv import blocks_needed
from megacp.layers.context_transfer import CONTEXT_TRANSFERS
from megacp.models import load_model
from megacp.models.config import ModelConfig, build_tiny_llama_config, load_model_config
from megacp.ops import gemv
from megacp.sampling import SEED_RANGE, SamplingParams
from megacp.session import check_request_fits, kv_session_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Parser(argparse.ArgumentParser):
    """An unknown flag or a bad value ends every rank the way every other configuration error does: one
    ``[rank r] error: argument --flag: ...`` line and exit code 2 (``main`` prints it)."""

    def error(self, message: str):  # type: ignore[override]
        raise ValueError(f"{message} (see --help)")


def _checked_flag(convert, check, kind: str):
    """argparse ``type``: ``convert`` the text (kept as text when it cannot be), then ``check`` it at parse time; a
    failed check becomes argparse's error naming the flag."""
    def parse(text: str):
        try:
            value: Any = convert(text)
        except ValueError:
            value = text
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = kind
    return parse


def _int_flag(minimum: int = 1, maximum: int | None = None):
    """An integer in range ("1e12" or "2.5" is not an integer)."""
    return _checked_flag(int, lambda value: check_int("", value, minimum, maximum), "integer")


def _real_flag(minimum: float, maximum: float | None = None, min_inclusive: bool = True):
    """A finite number in range (NaN and inf are rejected here, not when they break something)."""
    return _checked_flag(float, lambda value: check_real("", value, minimum, maximum, min_inclusive), "number")


MAX_DIST_TIMEOUT_S = 7 * 24 * 3600.0  # a week; larger values only overflow torch's timedelta handling


LAUNCH = "torchrun --nproc-per-node N examples/infer_llama.py [flags]   (N = dp·pcp·tp processes, one per rank)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=f"{__doc__.split(chr(10) * 2)[0]}\n\nlaunch: {LAUNCH}",
                formatter_class=argparse.RawTextHelpFormatter)
    size = _int_flag(1)
    p.add_argument("--model", default=None,
                   help="Hugging Face checkpoint directory, or 'tiny' (the default): the built-in seeded tiny Llama")
    p.add_argument("--tensor-parallel-size", "-tp", type=size, default=1,
                   help="ranks that split every layer's heads and MLP (Megatron tensor parallelism)")
    p.add_argument("--prefill-context-parallel-size", "-pcp", type=size, default=1,
                   help="ranks that split each prompt's tokens during prefill (and shard its KV cache)")
    p.add_argument("--decode-context-parallel-size", "-dcp", type=size, default=1,
                   help="TP ranks that also shard the KV cache for decode (divides -tp; adds no processes)")
    p.add_argument("--data-parallel-size", "-dp", type=size, default=1,
                   help="independent replicas; the prompts are dealt round-robin to them")
    p.add_argument("--cp-kv-cache-interleave-size", type=size, default=1, help="tokens per CP rank in a row")
    p.add_argument("--block-size", type=size, default=16, help="KV tokens per block on each rank")
    p.add_argument("--num-kv-blocks", type=size, default=None,
                   help="KV blocks per rank and layer (default: enough for all prompts at once)")
    p.add_argument("--enable-expert-parallel", action="store_true")
    p.add_argument("--max-num-batched-tokens", type=size, default=512, help="tokens per engine step")
    p.add_argument("--max-num-seqs", type=size, default=64, help="requests running at once")
    p.add_argument("--max-new-tokens", type=size, default=32)
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on CUDA, else float32")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=_int_flag(*SEED_RANGE), default=0)
    p.add_argument("--temperature", type=_real_flag(0.0), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=_real_flag(0.0, 1.0, min_inclusive=False), default=1.0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run decode steps eagerly (default on CUDA with a dense model: replay CUDA graphs)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="launch each greedy decode step before the previous step's ids are read back (same ids; "
                        "default on, --no-async-scheduling runs every step synchronously)")
    p.add_argument("--context-transfer", choices=CONTEXT_TRANSFERS, default="auto",
                   help="how a prompt chunk after the first (over cached context) reaches the other CP ranks' KV "
                        "shards: pass the queries or the K/V (auto: fewer bytes); the same tokens either way")
    p.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable)")
    p.add_argument("--chat", action="store_true",
                   help="apply the checkpoint's chat template to each --prompt (one user turn, then the assistant's)")
    p.add_argument("--prompt-ids", action="append", default=[], help="comma-separated token ids (repeatable)")
    p.add_argument("--json-out", default=None,
                   help="rank 0 writes outputs, timings and KV numbers here (checked for writability first)")
    p.add_argument("--dist-timeout", type=_real_flag(0.0, MAX_DIST_TIMEOUT_S, min_inclusive=False), default=300.0,
                   help="seconds a collective may wait for a peer")
    p.add_argument("--skip-finite-check", action="store_true",
                   help="do not check the checkpoint's weights for NaN/inf while loading (faster)")
    return p


# The Python argument names megacp's messages use for what a flag sets, where they differ from the flag's dest.
_ARGUMENT_OF_DEST = {"tensor_parallel_size": "tensor_model_parallel_size", "model": "model_dir"}


def cli_message(message: str) -> str:
    """A library message in this command line's words: every Python argument it names (``tensor_model_parallel_size``,
    ``block_size``, ``world_size``, ...) becomes the flag that sets it, ``name=value`` becomes ``flag value``.

    One-word names (``device``, ``chat``, ``seed``) are rewritten only as ``name=value``: bare, they are words of
    the message. The first mention of a flag reads ``--long/-short``, later ones the short form. The flags come from
    ``build_parser`` (plus torchrun's ``--nproc-per-node`` for the world size), so the mapping lives here once.
    """
    flags = {"world_size": ["--nproc-per-node"]}
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            flags[_ARGUMENT_OF_DEST.get(action.dest, action.dest)] = action.option_strings
    pattern = re.compile(r"(?<![\w.-])(" + "|".join(sorted(flags, key=len, reverse=True)) +
                         r")(?![\w-])(?:=('[^']*'|\"[^\"]*\"|[^\s,;:)]+))?")
    seen: set[str] = set()

    def flag(m: re.Match) -> str:
        if "_" not in m.group(1) and m.group(2) is None:  # a plain word ("device", "chat"), not an argument
            return m.group(0)
        names = flags[m.group(1)]
        text = "/".join(names) if m.group(1) not in seen else names[-1]
        seen.add(m.group(1))
        return text if m.group(2) is None else f"{text} {m.group(2)}"

    return pattern.sub(flag, message)


class Tokenizer:
    """Text <-> ids: the checkpoint's ``tokenizer.json`` if there is one, UTF-8 bytes for the built-in model.

    ``required=False`` (only ``--prompt-ids`` given): a tokenizer that cannot be loaded (``tokenizers`` not
    installed, a corrupt file) is no error; the outputs then have no text.
    """

    def __init__(self, model_dir: str | None, required: bool = True) -> None:
        self.hf = None
        self.byte_level = model_dir is None
        self.model_dir = model_dir
        path = os.path.join(model_dir, "tokenizer.json") if model_dir else ""
        if model_dir and os.path.isfile(path):
            try:
                self.hf = self._load(model_dir, path)
            except ValueError:
                if required:
                    raise

    @staticmethod
    def _load(model_dir: str, path: str):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except Exception as e:  # not installed, or a broken install
            raise ValueError(
                f"--prompt needs the tokenizers package for {model_dir}/tokenizer.json, which does not import ({e}); "
                f"pip install tokenizers, or pass token ids with --prompt-ids instead of --prompt"
            ) from None
        try:
            return HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for a corrupt or unsupported file
            raise ValueError(
                f"{path} is not a readable tokenizer ({str(e).strip() or type(e).__name__}); re-download it, or "
                f"pass token ids with --prompt-ids"
            ) from None

    def encode(self, text: str) -> list[int]:
        if self.hf is not None:
            return self.hf.encode(text).ids
        if self.byte_level:
            return list(text.encode("utf-8"))
        raise ValueError("--prompt needs a tokenizer.json in the --model directory; pass token ids with --prompt-ids")

    def encode_chat(self, text: str) -> list[int]:
        """``text`` as one user turn of the checkpoint's chat template, ready for the assistant's answer.

        Rendered like transformers' ``apply_chat_template`` (a sandboxed jinja2 template, ``add_generation_prompt``);
        the template writes the special tokens itself, so none are added.
        """
        template, special = _chat_template(self.model_dir) if self.hf is not None else (None, {})
        if template is None:
            raise ValueError("--chat needs a --model directory with tokenizer.json and a chat template "
                             "(chat_template.jinja or tokenizer_config.json's chat_template); drop --chat otherwise")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        rendered = env.from_string(template).render(
            messages=[{"role": "user", "content": text}], add_generation_prompt=True, **special)
        return self.hf.encode(rendered, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str | None:
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=True)
        if self.byte_level:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return None


def _chat_template(model_dir: str) -> tuple[str | None, dict[str, str]]:
    """(chat template or None, its special-token variables) from the files ``save_pretrained`` writes."""
    config: dict[str, Any] = {}
    config_path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
    template = config.get("chat_template")
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path) as f:
            template = f.read()
    special = {k: v if isinstance(v, str) else v.get("content", "") for k, v in config.items()
               if k in ("bos_token", "eos_token") and isinstance(v, (str, dict))}
    return template if isinstance(template, str) else None, special


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r} must be comma-separated integers, e.g. --prompt-ids 1,2,3") from None


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def validate(args: argparse.Namespace, world_size: int) -> tuple[ModelConfig, list[list[int]], Tokenizer, int]:
    """Every check that needs no collective: (model config, prompt ids, tokenizer, KV blocks per rank).

    Raises ``ValueError`` with one message naming the flag; identical on every rank.
    """
    try:
        cfg = load_model_config(args.model) if args.model else build_tiny_llama_config()
    except ValueError as e:
        raise ValueError(str(e) if "model_dir" in str(e) else f"--model {args.model}: {e}") from None
    parallel = _parallel_config(args)
    if not dist.is_initialized() and not launched_by_torchrun():  # plain python: the message says torchrun
        parallel.check_world_size(world_size, launched=False)
    parallel.validate(world_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dense_intermediate_size,
                      cfg.is_moe, cfg.is_mla)
    SamplingParams(args.max_new_tokens, args.temperature, args.top_p)  # validates the sampling flags
    gemv.roles()  # $MEGACP_DECODE_GEMV, read again when the layers are built: a bad value fails here, by name
    tokenizer = Tokenizer(args.model, required=bool(args.prompt))
    encode = tokenizer.encode_chat if args.chat else tokenizer.encode
    prompts = [encode(t) for t in args.prompt] + [_parse_ids(t) for t in args.prompt_ids]
    if not prompts:
        raise ValueError("no prompt given; pass --prompt TEXT or --prompt-ids 1,2,3 (both repeatable)")
    for ids in prompts:
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"--prompt-ids token {bad[0]} is outside the model's vocabulary [0, {cfg.vocab_size})")
    cp = parallel.cp_world_size
    per_req = [blocks_needed(len(ids) + args.max_new_tokens, args.block_size, cp) for ids in prompts]
    num_blocks = args.num_kv_blocks if args.num_kv_blocks is not None else max(sum(per_req), 1)
    for ids in prompts:
        check_request_fits(len(ids), args.max_new_tokens, cfg.max_position_embeddings, num_blocks, args.block_size, cp)
    _device(args.device)
    return cfg, prompts, tokenizer, num_blocks


def _check_json_out(path: str) -> None:
    """ValueError unless ``--json-out`` can be written (checked before the model loads, not after generating).

    It really creates the missing directories and opens the file for appending, then removes what it created:
    permission bits (``os.access``) say yes to root, also under ``/proc`` where nothing can be created.
    """
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise ValueError(f"--json-out {path} is a directory; pass a file name, e.g. --json-out {path}/out.json")
    missing = []  # the directories to create, innermost first
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        missing.append(ancestor)
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"--json-out {path}: {ancestor} is not a directory; choose another path")
    existed = os.path.exists(path)
    created: list[str] = []
    try:
        for d in reversed(missing):
            os.mkdir(d)
            created.append(d)
        with open(path, "a"):
            pass
    except OSError as e:
        raise ValueError(f"--json-out {path} is not writable ({e.strerror or e}); choose another path") from None
    finally:
        if not existed and os.path.exists(path):
            os.remove(path)
        for d in reversed(created):
            os.rmdir(d)


def _check_cache_memory(args: argparse.Namespace, cfg: ModelConfig, num_blocks: int, device: torch.device,
                        dtype: torch.dtype) -> None:
    """ValueError if this rank's KV cache cannot fit its device's memory, before the model loads."""
    if cfg.is_mla:  # one latent row per token and layer, shared by every head (KVSession(latent=True))
        kv_heads, head_dim = 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        kv_heads, head_dim = cfg.num_key_value_heads, cfg.head_dim
    need = kv_session_bytes(cfg.num_hidden_layers, kv_heads, head_dim, num_blocks, args.block_size,
                            args.max_num_seqs, cfg.max_position_embeddings, dtype.itemsize, args.tensor_parallel_size,
                            args.prefill_context_parallel_size * args.decode_context_parallel_size, latent=cfg.is_mla)
    check_memory(need, device, f"the KV cache ({num_blocks} blocks x {args.block_size} tokens, "
                               f"{cfg.num_hidden_layers} layers, {str(dtype).removeprefix('torch.')})",
                 "lower --num-kv-blocks, --block-size or --max-num-seqs, or spread the cache over more ranks "
                 "with a larger -pcp / -dcp")


def _parallel_config(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(
        tensor_model_parallel_size=args.tensor_parallel_size,
        prefill_context_parallel_size=args.prefill_context_parallel_size,
        decode_context_parallel_size=args.decode_context_parallel_size,
        data_parallel_size=args.data_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        cp_kv_cache_interleave_size=args.cp_kv_cache_interleave_size,
        block_size=args.block_size,
    )


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def _first_error(check) -> str | None:
    """Run ``check()`` on this rank and agree over all ranks (a collective): the first rank's ValueError message on
    every rank, or None. For checks whose verdict can differ between ranks (memory, a file only rank 0 writes)."""
    try:
        check()
        error = None
    except ValueError as e:
        error = str(e)
    return ps.first_error_across_ranks(error)


def run(args: argparse.Namespace, progress: dict[str, Any] | None = None
        ) -> tuple[dict[str, Any] | None, list[str]]:
    """Validate, initialise model parallel, load, generate: (the JSON dict on world rank 0, else None; the errors of
    requests stopped for NaN/inf logits, the same on every rank). ``progress`` receives what an interrupt reports
    (``prompts``, ``tokenizer``, this replica's prompt indices ``mine``, the ``engine``).

    Raises ``ValueError`` for configuration errors (before any collective) and, on every rank after agreeing on the
    failure, for an unwritable ``--json-out``, a cache too big for the device and a failed model load.
    """
    progress = {} if progress is None else progress
    world_size, rank = _world()
    cfg, prompts, tokenizer, num_blocks = validate(args, world_size)
    progress.update(prompts=prompts, tokenizer=tokenizer)
    device = _device(args.device)
    dtype = DTYPES["bfloat16" if device.type == "cuda" else "float32"] if args.dtype == "auto" else DTYPES[args.dtype]
    parallel = _parallel_config(args)
    ps.initialize_model_parallel(**parallel.initialize_kwargs(), timeout=timedelta(seconds=args.dist_timeout))

    def before_loading() -> None:
        if args.json_out and rank == 0:
            _check_json_out(args.json_out)
        _check_cache_memory(args, cfg, num_blocks, device, dtype)

    error = _first_error(before_loading)
    if error is not None:
        raise ValueError(error)
    built: dict[str, Any] = {}

    def load_and_build() -> None:
        try:
            built["model"] = load_model(args.model, dtype, device, check_finite=not args.skip_finite_check,
                                        context_transfer=args.context_transfer)
        except (ValueError, OSError, KeyError) as e:
            raise ValueError(f"could not load --model {args.model}: {e}") from None
        built["engine"] = LLMEngine(built["model"], num_blocks, args.block_size, args.max_num_batched_tokens,
                                    args.max_num_seqs, enforce_eager=args.enforce_eager,
                                    async_scheduling=args.async_scheduling)

    error = _first_error(load_and_build)
    if error is not None:
        raise ValueError(error)
    engine = built["engine"]

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = list(range(dp_rank, len(prompts), dp_size))  # this replica's share of the prompts
    progress.update(engine=engine, mine=mine)
    sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.ignore_eos, args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a stopped request is reported below, once per rank
        outs = engine.generate([prompts[i] for i in mine], sampling) if mine else []
    replica_leader = ps.get_tensor_model_parallel_rank() == 0 and ps.get_prefill_context_parallel_rank() == 0
    report = {
        "outputs": {i: o for i, o in zip(mine, outs)} if replica_leader else {},
        "stats": engine.stats,
    }
    reports: list[Any] = ps.get_world_group().all_gather_object(report)
    # Every rank sees every replica's outputs, so every rank reports the same stopped requests.
    errors = [o.error for r in reports for _, o in sorted(r["outputs"].items()) if o.error]
    if rank != 0:
        return None, errors
    return _summary(args, prompts, tokenizer, reports, parallel, world_size, dtype, device), errors


def _outputs(args, prompts, tokenizer, by_index: dict[int, Any]) -> list[dict[str, Any]]:
    """The JSON rows of the requests in ``by_index`` (prompt index -> RequestOutput), in prompt order."""
    prompt_texts = [*args.prompt, *[None] * len(args.prompt_ids)]  # the order validate() encoded them in
    return [
        {
            "prompt": prompt_texts[i],
            "prompt_ids": prompts[i],
            "output_ids": o.output_ids,
            "text": tokenizer.decode(o.output_ids),
            "finish_reason": o.finish_reason,
            "error": o.error,
            "ttft_s": o.ttft_s,
        }
        for i, o in sorted(by_index.items())
    ]


def _summary(args, prompts, tokenizer, reports, parallel, world_size, dtype, device) -> dict[str, Any]:
    outputs = _outputs(args, prompts, tokenizer, {i: o for r in reports for i, o in r["outputs"].items()})
    stats = [r["stats"] for r in reports]
    ttft = [o["ttft_s"] for o in outputs]
    return {
        "outputs": outputs,
        "timings": {
            "ttft_s": ttft,
            "mean_ttft_s": sum(ttft) / len(ttft),
            "decode_tokens_per_s": stats[0].decode_tokens_per_s,
            "total_s": max(s.total_time_s for s in stats),
            "num_steps": max(s.num_steps for s in stats),  # of the slowest data-parallel replica
            "cuda_graphs": stats[0].cuda_graphs,
            "graph_replays": stats[0].graph_replays,
            "graph_capture_s": stats[0].graph_capture_s,
            "graph_capture_bytes": stats[0].graph_capture_bytes,
            "async_scheduling": stats[0].async_scheduling,
            "async_steps": stats[0].async_steps,
        },
        "kv": {
            "block_size": args.block_size,
            "num_kv_blocks_per_rank": stats[0].kv_slots_per_rank // args.block_size,
            "cp_world_size": parallel.cp_world_size,
            "cp_kv_cache_interleave_size": args.cp_kv_cache_interleave_size,
            "capacity_tokens": stats[0].kv_capacity_tokens,
            "slots_per_rank": stats[0].kv_slots_per_rank,
            "peak_tokens_stored_per_rank": [s.peak_tokens_stored for s in stats],
        },
        "config": {
            "model": args.model or "built-in tiny llama",
            "tp": parallel.tensor_model_parallel_size,
            "pcp": parallel.prefill_context_parallel_size,
            "dcp": parallel.decode_context_parallel_size,
            "dp": parallel.data_parallel_size,
            "world_size": world_size,
            "dtype": str(dtype).removeprefix("torch."),
            "device": device.type,
        },
    }


def _print_summary(result: dict[str, Any]) -> None:
    c, t, kv = result["config"], result["timings"], result["kv"]
    print(f"megacp: {c['model']}, world {c['world_size']} = dp {c['dp']} x pcp {c['pcp']} x tp {c['tp']}, "
          f"dcp {c['dcp']}, {c['dtype']} on {c['device']}")
    pcp = c["pcp"]
    if pcp > 1:
        print(f"PCP {pcp}: each prompt is padded to a multiple of {2 * pcp} tokens and cut into {2 * pcp} chunks; "
              f"rank r prefills chunks r and {2 * pcp - 1}-r (long prompts: per step, up to --max-num-batched-tokens)")
    for i, o in enumerate(result["outputs"]):
        n = len(o["prompt_ids"])
        split = f", ~{-(-n // (2 * pcp)) * 2} per PCP rank" if pcp > 1 else ""
        prompt = o.get("prompt")
        shown = f"{prompt[:60]!r}{'...' if len(prompt) > 60 else ''} " if prompt is not None else ""
        answer = repr(o["text"]) if o["text"] is not None else str(o["output_ids"])
        print(f"[{i}] {shown}({n} tokens{split}) -> {answer} ({len(o['output_ids'])} new, {o['finish_reason']}, "
              f"TTFT {o['ttft_s'] * 1e3:.0f} ms)")
    print(f"TTFT mean {t['mean_ttft_s'] * 1e3:.1f} ms, decode {t['decode_tokens_per_s']:.1f} tok/s, "
          f"{t['num_steps']} steps" + (f" ({t['async_steps']} launched ahead: async scheduling)"
                                       if t["async_scheduling"] else ""))
    print(f"KV: {kv['capacity_tokens']} tokens per CP group ({kv['cp_world_size']} ranks x {kv['slots_per_rank']} "
          f"slots); peak tokens stored per rank {kv['peak_tokens_stored_per_rank']}")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """CLI entry point; returns the JSON dict on world rank 0 (None elsewhere).

    Exit code 2 on a bad flag, file or configuration (found before generating); 1 when a peer rank died or timed out
    (``--dist-timeout``) or a request was stopped because the model produced NaN/inf logits (the outputs are still
    printed and written). Every rank prints its own one-line ``[rank r] error: ...``.

    SIGINT (Ctrl-C) or SIGTERM ends every rank with one ``[rank r] interrupted ... at step N`` line and exit code
    130 / 143; with ``--json-out``, rank 0 first writes its replica's outputs so far there (``"interrupted"`` in it).

    Callable in-process (tests): it initialises torch.distributed only if nobody has, and tears down only what it
    set up.
    """
    progress: dict[str, Any] = {}
    with _interrupts_raise():
        try:
            return _main(argv, progress)
        except _Interrupted as e:
            _report_interrupt(e.signum, progress)


def _main(argv: list[str] | None, progress: dict[str, Any]) -> dict[str, Any] | None:
    owns_process_group = not dist.is_initialized()
    try:
        args = build_parser().parse_args(argv)
        if args.model == "tiny":
            args.model = None
        progress["args"] = args
        result, errors = run(args, progress)
    except ValueError as e:
        _fail(ValueError(cli_message(str(e))), owns_process_group, 2)
    except ps.CollectiveError as e:
        _fail(e, owns_process_group, 1, peer_failed=True)
    except dist.DistError as e:  # outside megacp's groups: process-group set-up, the rendezvous store
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        _fail(RuntimeError(f"torch.distributed failed ({first_line}); a peer rank died or did not join within "
                           f"--dist-timeout {args.dist_timeout:g} s: check the other ranks' errors, or raise "
                           f"--dist-timeout"), owns_process_group, 1, peer_failed=True)
    _teardown(owns_process_group)
    if result is not None:
        if args.json_out:
            _write_json(args.json_out, result)
        _print_summary(result)
    if errors:
        more = f" (and {len(errors) - 1} more stopped requests, see the outputs)" if len(errors) > 1 else ""
        _fail(RuntimeError(errors[0] + more), False, 1)
    return result


def _write_json(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def _fail(e: BaseException, owns_process_group: bool, code: int, peer_failed: bool = False) -> NoReturn:
    """Report ``e`` as this rank's one line and exit with ``code`` (``SystemExit``, or see ``peer_failed``)."""
    _, rank = _world()
    _ignore_interrupts()  # this rank's line is its error; a signal now (torchrun stopping it) adds no second one
    _report(f"[rank {rank}] error: {e}")
    if peer_failed and owns_process_group:
        # A peer died or timed out. gloo's worker thread still holds the failed collective's work and frees its
        # tensors a moment later, which takes the GIL; once Python is finalizing, taking the GIL ends the thread
        # (pthread_exit) inside a noexcept destructor: std::terminate, SIGABRT ("terminate called without an
        # active exception"), after the line above. The process is ours alone (main made its process group) and
        # the line is out: leave without finalizing, as an interrupted rank does (no teardown: a group's
        # destruction may wait for the dead peer).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _teardown(owns_process_group)
    sys.exit(code)


def _report(line: str) -> None:
    """Print this rank's one line, and hand it to torchrun so that its failure summary shows it."""
    # One write() per message, so the ranks' lines never interleave on a shared stderr pipe.
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(2, f"{line}\n".encode())
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")  # torchrun's per-rank file (what @record writes)
    if error_file:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
        except OSError:
            pass  # the summary then says less; the line above is printed anyway


class _Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException like KeyboardInterrupt, so no ``except Exception`` eats it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


def _ignore_interrupts() -> None:
    if threading.current_thread() is threading.main_thread():
        for s in _INTERRUPTS:
            signal.signal(s, signal.SIG_IGN)


@contextmanager
def _interrupts_raise() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise ``_Interrupted`` once (later ones are ignored while the rank
    reports); the previous handlers come back afterwards. Only the main thread can own signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def handler(signum: int, frame: Any) -> None:
        _ignore_interrupts()
        raise _Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in _INTERRUPTS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _report_interrupt(signum: int, progress: dict[str, Any]) -> NoReturn:
    """One line on this rank and, on rank 0 with ``--json-out``, the outputs so far; exit 128 + signal number.

    No teardown: a peer may already be gone, and destroying groups would wait for it.
    """
    _, rank = _world()
    engine, args = progress.get("engine"), progress.get("args")
    line = f"[rank {rank}] interrupted ({signal.Signals(signum).name}) "
    line += f"at step {engine.stats.num_steps}" if engine is not None else "before generating"
    if engine is not None and rank == 0 and args is not None and args.json_out:
        mine = progress["mine"]
        partial = {
            "outputs": _outputs(args, progress["prompts"], progress["tokenizer"],
                                dict(zip(mine, engine.outputs_so_far()))),
            "interrupted": {"signal": signal.Signals(signum).name, "step": engine.stats.num_steps},
        }
        try:
            _write_json(args.json_out, partial)
            line += f"; partial results written to {args.json_out}"
        except OSError as e:
            line += f"; could not write --json-out {args.json_out} ({e.strerror or e})"
    _report(line)
    os._exit(128 + signum)


def _teardown(owns_process_group: bool) -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    from megacp.program import exit_after  # no Python finalization: see megacp/program.py

    exit_after(main)
