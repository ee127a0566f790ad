"""Where a CUDA-graph decode step's time goes: GPU busy time by kernel kind, and the idle time between kernels.

    python bench/decode_step_profile.py --layers 32 --batch 1 16 --json-out decode_step_profile.json

Builds the random bf16 model of ``bench/e2e.py`` (``--model-shape``), runs megacp's engine with CUDA graphs, and for
each batch size profiles (torch.profiler, CUDA activity) a generate of ``1 + steps`` tokens and one of 1 token; their
difference divided by ``steps`` is one pure-decode step. Per step it reports the step time measured without the
profiler (``step_us``), the summed kernel time (``busy_us``), ``idle_us = step_us − busy_us`` (launch gaps inside the
graph, host time between replays), the busy time and kernel count of each kind (GEMM, split-K reduce, attention,
norm, RoPE + cache write, SiLU·mul, MoE, other), and the kernels with the most time. Kinds are read from kernel
names (cuBLAS ``nvjet``/``gemm``, megacp's Triton kernel names); unknown names land in "other".

``--variants`` profiles the same checkpoint under several kernel settings in one run, each a comma list of
``pdl=0|1`` (``MEGACP_PDL``: programmatic dependent launch) and ``gemv=ROLES`` (``MEGACP_DECODE_GEMV``, roles joined
by ``+``, or ``none``/``all``), e.g. ``--variants pdl=0,gemv=none pdl=1,gemv=o+down``; ``default`` leaves both unset.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, environment, require_cuda  # noqa: E402
from bench.e2e import SHAPES, Megacp, build_checkpoint, model_config  # noqa: E402

KINDS = (  # first match wins: (kind, name fragments)
    ("splitk_reduce", ("splitKreduce",)),  # the GEMMs named *_splitK_* count as GEMMs
    ("attention", ("_split_kernel", "_mla_split_kernel", "_merge_kernel", "paged", "flash", "sdpa")),
    ("norm", ("rms", "norm")),
    ("rope_cache", ("rope", "index_copy", "cache")),
    ("silu_mul", ("silu",)),
    ("moe", ("grouped", "sort", "scatter", "topk", "softmax")),
    ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "gemv", "sm90")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, parts in KINDS:
        if any(p.lower() in low for p in parts):
            return kind
    return "other"


def kernel_times(eng: Megacp, prompts: list[list[int]], n: int) -> dict[str, list[float]]:
    """Durations (µs) of every CUDA kernel a generate of ``n`` tokens launched, by kernel name."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.generate(prompts, n)
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")):
            times.setdefault(e.name, []).append(e.device_time)
    return times


def step_profile(eng: Megacp, prompts: list[list[int]], steps: int) -> dict:
    """One pure-decode step of ``len(prompts)`` sequences, as the module docstring describes."""
    eng.generate(prompts, 4)  # warm-up: graphs captured, kernels compiled
    tps = eng.decode_tps(prompts, steps)
    one, more = kernel_times(eng, prompts, 1), kernel_times(eng, prompts, 1 + steps)
    per_kernel = {}
    for name, ts in more.items():
        base = one.get(name, [])
        total, count = (sum(ts) - sum(base)) / steps, (len(ts) - len(base)) / steps
        if count > 0:
            per_kernel[name] = {"us": total, "count": count, "kind": kind_of(name)}
    kinds: dict[str, dict[str, float]] = {}
    for k in per_kernel.values():
        slot = kinds.setdefault(k["kind"], {"us": 0.0, "count": 0.0})
        slot["us"] += k["us"]
        slot["count"] += k["count"]
    step_us = len(prompts) / tps * 1e6
    busy = sum(k["us"] for k in per_kernel.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1]["us"])[:20]
    return {"batch": len(prompts), "step_us": step_us, "busy_us": busy, "idle_us": step_us - busy,
            "kernels_per_step": sum(k["count"] for k in per_kernel.values()), "kinds": kinds,
            "top": [{"name": name[:90], **v} for name, v in top]}


VARIANT_ENV = {"pdl": "MEGACP_PDL", "gemv": "MEGACP_DECODE_GEMV"}


def variant_env(spec: str) -> dict[str, str]:
    """``"pdl=1,gemv=o+down"`` -> ``{"MEGACP_PDL": "1", "MEGACP_DECODE_GEMV": "o,down"}`` (``default``: {})."""
    if spec == "default":
        return {}
    env = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key not in VARIANT_ENV or not value:
            raise SystemExit(f"--variants {spec!r}: use comma-separated pdl=0|1 and gemv=ROLE+ROLE|none|all")
        env[VARIANT_ENV[key]] = value.replace("+", ",")
    return env


def apply_variant(spec: str) -> None:
    """Set the variant's environment before a model is built (layers read it then; the PDL answer is cached)."""
    from megacp.ops import decode_fused

    for name in VARIANT_ENV.values():
        os.environ.pop(name, None)
    os.environ.update(variant_env(spec))
    decode_fused._pdl_on.cache_clear()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-shape", default="llama-3-8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--variants", nargs="+", default=["default"],
                   help="kernel settings to profile in turn, e.g. pdl=0,gemv=none pdl=1,gemv=all (module docstring)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    for spec in args.variants:
        variant_env(spec)  # a bad spec fails before the model is built
    require_cuda()
    config = model_config(args.model_shape, args.layers, args.prompt_len + 2 * args.steps + 64, {})
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, min(config.vocab_size, 128000), (max(args.batch), args.prompt_len),
                            generator=g).tolist()
    result = {"benchmark": "decode_step_profile", "env": environment(),
              "model": {"shape": args.model_shape, "layers": args.layers, "dtype": "bfloat16"}, "results": []}
    with tempfile.TemporaryDirectory() as path:
        build_checkpoint(path, config, "cuda")
        blocks = max(args.batch) * -(-(args.prompt_len + 2 * args.steps + 8) // 16) + 16
        for spec in args.variants:
            apply_variant(spec)
            eng = Megacp(path, max_batched=args.prompt_len * max(args.batch), num_blocks=blocks)
            try:
                for b in args.batch:
                    r = {"variant": spec, **step_profile(eng, prompts[:b], args.steps)}
                    r["kernels_per_layer"] = r["kernels_per_step"] / args.layers
                    result["results"].append(r)
                    kinds = ", ".join(f"{k} {v['us']:.0f}us/{v['count']:.0f}" for k, v in
                                      sorted(r["kinds"].items(), key=lambda kv: -kv[1]["us"]))
                    print(f"[{spec}] batch {b}: step {r['step_us']:.0f}us busy {r['busy_us']:.0f}us idle "
                          f"{r['idle_us']:.0f}us kernels {r['kernels_per_step']:.0f} | {kinds}", flush=True)
            finally:
                eng.close()
                del eng
                torch.cuda.empty_cache()
    emit(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
