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
import sys
import warnings
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from megacp import parallel_state as ps
from megacp.checks import check_int, check_memory, check_real, kv_cache_bytes
from megacp.config import ParallelConfig
from megacp.engine import LLMEngine
from megacp.kv import blocks_needed
from megacp.models import load_model
from megacp.models.config import ModelConfig, build_tiny_llama_config, load_model_config
from megacp.sampling import SEED_RANGE, SamplingParams
from megacp.session import check_request_fits

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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    size = _int_flag(1)
    p.add_argument("--model", default=None,
                   help="Hugging Face checkpoint directory, or 'tiny' (the default): the built-in seeded tiny Llama")
    p.add_argument("--tensor-parallel-size", "-tp", type=size, default=1)
    p.add_argument("--prefill-context-parallel-size", "-pcp", type=size, default=1)
    p.add_argument("--decode-context-parallel-size", "-dcp", type=size, default=1)
    p.add_argument("--data-parallel-size", "-dp", type=size, default=1)
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

    The first mention of a flag reads ``--long/-short``, later ones the short form. The flags come from
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
        names = flags[m.group(1)]
        text = "/".join(names) if m.group(1) not in seen else names[-1]
        seen.add(m.group(1))
        return text if m.group(2) is None else f"{text} {m.group(2)}"

    return pattern.sub(flag, message)


class Tokenizer:
    """Text <-> ids: the checkpoint's ``tokenizer.json`` if there is one, UTF-8 bytes for the built-in model."""

    def __init__(self, model_dir: str | None) -> None:
        self.hf = None
        self.byte_level = model_dir is None
        path = os.path.join(model_dir, "tokenizer.json") if model_dir else ""
        if model_dir and os.path.isfile(path):
            try:
                from tokenizers import Tokenizer as HFTokenizer
            except Exception as e:  # not installed, or a broken install
                raise ValueError(
                    f"--model {model_dir} has a tokenizer.json but the tokenizers package does not import ({e}); "
                    f"pip install tokenizers, or pass token ids with --prompt-ids"
                ) from None
            try:
                self.hf = HFTokenizer.from_file(path)
            except Exception as e:  # tokenizers raises a bare Exception for a corrupt or unsupported file
                raise ValueError(
                    f"{path} is not a readable tokenizer ({str(e).strip() or type(e).__name__}); re-download it, or "
                    f"pass token ids with --prompt-ids"
                ) from None
        self.model_dir = model_dir

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
    parallel.validate(world_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dense_intermediate_size,
                      cfg.is_moe)
    SamplingParams(args.max_new_tokens, args.temperature, args.top_p)  # validates the sampling flags
    tokenizer = Tokenizer(args.model)
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
    """ValueError unless ``--json-out`` can be written (checked before the model loads, not after generating)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise ValueError(f"--json-out {path} is a directory; pass a file name, e.g. --json-out {path}/out.json")
    parent = os.path.dirname(path)
    ancestor = parent
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"--json-out {path}: {ancestor} is not a directory; choose another path")
    try:
        if ancestor == parent:
            existed = os.path.exists(path)
            with open(path, "a"):
                pass
            if not existed:
                os.remove(path)
        elif not os.access(ancestor, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot create directories in {ancestor}")
    except OSError as e:
        raise ValueError(f"--json-out {path} is not writable ({e.strerror or e}); choose another path") from None


def _check_cache_memory(args: argparse.Namespace, cfg: ModelConfig, num_blocks: int, device: torch.device,
                        dtype: torch.dtype) -> None:
    """ValueError if this rank's KV cache cannot fit its device's memory, before the model loads."""
    tp = args.tensor_parallel_size
    local_kv_heads = max(cfg.num_key_value_heads // tp, 1)  # tp > KV heads: each rank keeps one replicated head
    max_blocks = min(num_blocks, blocks_needed(cfg.max_position_embeddings, args.block_size,
                                               args.prefill_context_parallel_size * args.decode_context_parallel_size))
    need = kv_cache_bytes(num_blocks, args.block_size, local_kv_heads, cfg.head_dim, cfg.num_hidden_layers,
                          dtype.itemsize, args.max_num_seqs, max_blocks)
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


def run(args: argparse.Namespace) -> tuple[dict[str, Any] | None, list[str]]:
    """Validate, initialise model parallel, load, generate: (the JSON dict on world rank 0, else None; the errors of
    requests stopped for NaN/inf logits, the same on every rank).

    Raises ``ValueError`` for configuration errors (before any collective) and, on every rank after agreeing on the
    failure, for an unwritable ``--json-out``, a cache too big for the device and a failed model load.
    """
    world_size, rank = _world()
    cfg, prompts, tokenizer, num_blocks = validate(args, world_size)
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
            built["model"] = load_model(args.model, dtype, device, check_finite=not args.skip_finite_check)
        except (ValueError, OSError, KeyError) as e:
            raise ValueError(f"could not load --model {args.model}: {e}") from None
        built["engine"] = LLMEngine(built["model"], num_blocks, args.block_size, args.max_num_batched_tokens,
                                    args.max_num_seqs,
                                    enforce_eager=args.enforce_eager)

    error = _first_error(load_and_build)
    if error is not None:
        raise ValueError(error)
    engine = built["engine"]

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = list(range(dp_rank, len(prompts), dp_size))  # this replica's share of the prompts
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


def _summary(args, prompts, tokenizer, reports, parallel, world_size, dtype, device) -> dict[str, Any]:
    by_index = {i: o for r in reports for i, o in r["outputs"].items()}
    prompt_texts = [*args.prompt, *[None] * len(args.prompt_ids)]  # the order validate() encoded them in
    outputs = [
        {
            "prompt": prompt_texts[i],
            "prompt_ids": prompts[i],
            "output_ids": by_index[i].output_ids,
            "text": tokenizer.decode(by_index[i].output_ids),
            "finish_reason": by_index[i].finish_reason,
            "error": by_index[i].error,
            "ttft_s": by_index[i].ttft_s,
        }
        for i in range(len(prompts))
    ]
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
          f"{t['num_steps']} steps")
    print(f"KV: {kv['capacity_tokens']} tokens per CP group ({kv['cp_world_size']} ranks x {kv['slots_per_rank']} "
          f"slots); peak tokens stored per rank {kv['peak_tokens_stored_per_rank']}")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """CLI entry point; returns the JSON dict on world rank 0 (None elsewhere).

    Exit code 2 on a bad flag, file or configuration (found before generating); 1 when a peer rank died or timed out
    (``--dist-timeout``) or a request was stopped because the model produced NaN/inf logits (the outputs are still
    printed and written). Every rank prints its own one-line ``[rank r] error: ...``.

    Callable in-process (tests): it initialises torch.distributed only if nobody has, and tears down only what it
    set up.
    """
    owns_process_group = not dist.is_initialized()
    try:
        args = build_parser().parse_args(argv)
        if args.model == "tiny":
            args.model = None
        result, errors = run(args)
    except ValueError as e:
        _fail(ValueError(cli_message(str(e))), owns_process_group, 2)
    except ps.CollectiveError as e:
        _fail(e, owns_process_group, 1)
    except dist.DistError as e:  # outside megacp's groups: process-group set-up, the rendezvous store
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        _fail(RuntimeError(f"torch.distributed failed ({first_line}); a peer rank died or did not join within "
                           f"--dist-timeout {args.dist_timeout:g} s: check the other ranks' errors, or raise "
                           f"--dist-timeout"), owns_process_group, 1)
    _teardown(owns_process_group)
    if result is not None:
        if args.json_out:
            os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
            with open(args.json_out, "w") as f:
                json.dump(result, f, indent=1)
        _print_summary(result)
    if errors:
        more = f" (and {len(errors) - 1} more stopped requests, see the outputs)" if len(errors) > 1 else ""
        _fail(RuntimeError(errors[0] + more), False, 1)
    return result


def _fail(e: BaseException, owns_process_group: bool, code: int) -> NoReturn:
    _, rank = _world()
    # One write() per message, so the ranks' lines never interleave on a shared stderr pipe.
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(2, f"[rank {rank}] error: {e}\n".encode())
    _teardown(owns_process_group)
    sys.exit(code)


def _teardown(owns_process_group: bool) -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
