"""Prefill over cached context: pass-Q vs pass-KV vs the adaptive rule, one GQA attention layer (one torchrun world).

    torchrun --nproc-per-node 2 bench/context_prefill.py --json-out bench/results/<run>/context_prefill.json
    torchrun --nproc-per-node 2 bench/context_prefill.py --device cpu --tiny    # the same code path on gloo (smoke)

Rows (Llama-3-8B attention shape: 32 / 8 heads of 128, bf16; random K/V in the cache):

- ``128k context + 2k new``: one step of 2048 new tokens over a cached context of 131072 (a follow-up turn);
- ``16k chunks over 128k``: a 128k prompt's chunked prefill in 16k chunks, the 7 chunks that have cached context
  (16k ... 112k), each timed alone and summed.

For every chunk and every layout of ``--layouts`` (tp,pcp,dcp; dp fills the world) the layer
(``ContextParallelAttention``: the new tokens' PCP prefill, the context part, the LSE merge) is timed forced to
``pass_q``, to ``pass_kv`` and on ``auto``: CUDA events, median of ``--reps``, the slowest rank's time. Each chunk
records the bytes ``context_transfer_bytes`` counts, the rule's verdict and the winner; each row the totals, the faster
fixed method and whether ``auto`` is within 5% of it. ``crossover_bracket``: over all chunks of the run, the largest
``bytes_kv / bytes_q`` at which pass-KV was faster and the smallest at which pass-Q was: the measured crossover
(``megacp.layers.context_transfer.PASS_KV_CROSSOVER``) lies between (rule: pass-KV when that ratio < crossover).
Rank 0 prints the JSON (and writes ``--json-out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.multi_gpu import DTYPES, _layout, _slowest, _time_ms, environment  # noqa: E402
from megacp import parallel_state as ps  # noqa: E402
from megacp.kv import BlockTable, PagedKVCache, blocks_needed  # noqa: E402
from megacp.layers.context_transfer import PASS_KV_CROSSOVER, choose_context_transfer  # noqa: E402
from megacp.layers.cp_attention import ContextParallelAttention  # noqa: E402
from megacp.layers.metadata_builder import build_attention_metadata  # noqa: E402

BLOCK = 16
WAYS = ("pass_q", "pass_kv", "auto")


def rows(args: argparse.Namespace) -> list[tuple[str, list[tuple[int, int]]]]:
    """(name, [(context, new) per timed chunk])."""
    ctx, turn, chunk = args.context, args.new, args.chunk
    return [(f"{ctx // 1024}k context + {turn // 1024}k new" if not args.tiny else f"{ctx} context + {turn} new",
             [(ctx, turn)]),
            (f"{chunk // 1024}k chunks over {ctx // 1024}k" if not args.tiny else f"{chunk} chunks over {ctx}",
             [(c, chunk) for c in range(chunk, ctx, chunk)])]


def time_chunk(args, layer: ContextParallelAttention, context: int, new: int, device, dtype) -> dict:
    """One step of ``new`` tokens over ``context`` cached ones, timed per way."""
    W, R = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    n_blocks = blocks_needed(context + new, BLOCK, W)
    bt = BlockTable(BLOCK, 1, n_blocks, cp_world_size=W, cp_rank=R, device=device)
    bt.set_row(0, list(range(n_blocks)))
    cache = PagedKVCache(n_blocks, BLOCK, layer.num_local_kv_heads, args.head_dim, dtype, device)
    g = torch.Generator(device=device).manual_seed(R)
    for t in (cache.k, cache.v):
        t.normal_(generator=g)
    meta = build_attention_metadata([0], [context], [new], bt, device=device, null_slot=cache.null_slot)
    T = meta.num_local_tokens
    q = torch.randn(T, layer.num_local_heads, args.head_dim, generator=g, device=device, dtype=dtype)
    k, v = (torch.randn(T, layer.num_local_kv_heads, args.head_dim, generator=g, device=device, dtype=dtype)
            for _ in range(2))
    ctx = meta.context
    verdict, moved = choose_context_transfer(ctx.num_rows, ctx.gather_pad, layer.num_local_heads, args.head_dim,
                                             args.head_dim, 2 * layer.num_local_kv_heads * args.head_dim, W,
                                             dtype.itemsize)
    ms = {}
    with torch.inference_mode():
        for way in WAYS:
            layer.context_transfer = way
            ms[way] = _slowest(_time_ms(lambda: layer(q, k, v, meta, cache), device, args.reps))
    assert layer.context_way(ctx, dtype) == verdict  # auto took the rule's verdict
    return {"context": context, "new": new, "bytes": moved, "bytes_ratio": moved["pass_kv"] / max(moved["pass_q"], 1),
            "auto_way": verdict, "ms": ms, "winner": min(("pass_q", "pass_kv"), key=ms.__getitem__)}


def bench_layout(args, layout, device, dtype, log) -> list[dict]:
    tp, pcp, dcp = layout
    ps.initialize_model_parallel(tp, pcp, dcp, dist.get_world_size() // (tp * pcp))
    try:
        layer = ContextParallelAttention(args.heads, args.kv_heads, args.head_dim, args.head_dim ** -0.5)
        out = []
        for name, chunks in rows(args):
            timed = [time_chunk(args, layer, c, n, device, dtype) for c, n in chunks]
            total = {way: sum(t["ms"][way] for t in timed) for way in WAYS}
            best = min(("pass_q", "pass_kv"), key=total.__getitem__)
            row = {"row": name, "tp": tp, "pcp": pcp, "dcp": dcp, "chunks": timed, "total_ms": total,
                   "faster_fixed": best, "auto_over_best": total["auto"] / total[best],
                   "auto_within_5pct": total["auto"] <= 1.05 * total[best]}
            log(f"{name} tp={tp} pcp={pcp} dcp={dcp}: " + ", ".join(f"{w} {total[w]:.2f} ms" for w in WAYS)
                + f"; auto/best {row['auto_over_best']:.3f}")
            out.append(row)
        return out
    finally:
        ps.destroy_model_parallel()


def crossover_bracket(results: list[dict]) -> list[float | None]:
    """[largest bytes ratio where pass-KV won, smallest where pass-Q won] over every timed chunk."""
    chunks = [c for r in results for c in r["chunks"]]
    kv_won = [c["bytes_ratio"] for c in chunks if c["winner"] == "pass_kv"]
    q_won = [c["bytes_ratio"] for c in chunks if c["winner"] == "pass_q"]
    return [max(kv_won, default=None), min(q_won, default=None)]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--new", type=int, default=2048, help="new tokens of the follow-up-turn row")
    p.add_argument("--chunk", type=int, default=16384, help="chunk size of the chunked-prefill row")
    p.add_argument("--layouts", type=_layout, nargs="+", default=[(1, 2, 1)])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="small shapes for a CPU smoke run")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.heads, args.kv_heads, args.head_dim, args.context, args.new, args.chunk = 8, 2, 8, 256, 8, 64
        args.reps = min(args.reps, 2)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=600))
    dtype = DTYPES[args.dtype]

    def log(msg: str) -> None:
        if dist.get_rank() == 0:
            print(msg, flush=True)

    result: dict = {"benchmark": "context_prefill", "env": environment(device), "crossover": PASS_KV_CROSSOVER,
                    "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                              "dtype": args.dtype}, "rows": []}
    for layout in args.layouts:
        if dist.get_world_size() % (layout[0] * layout[1]):
            log(f"layout {layout} does not fit a world of {dist.get_world_size()}; skipped")
            continue
        result["rows"] += bench_layout(args, layout, device, dtype, log)
    result["crossover_bracket"] = crossover_bracket(result["rows"])
    if dist.get_rank() == 0:
        print(json.dumps(result, indent=1), flush=True)
        if args.json_out:
            os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
            with open(args.json_out, "w") as f:
                json.dump(result, f, indent=1)
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
