"""Launch-plan sweep of the Triton paged decode kernel, timed inside CUDA-graph replays next to contiguous SDPA.

For each (batch, shard tokens) case it times ``paged_decode_with_lse`` under every ``DecodePlan`` of the grid
(splits × tile × warps × stages × fused merge; plans Triton cannot fit in shared memory are skipped) and SDPA over a contiguous
copy of the same K/V, and reports each plan's time, its ratio to SDPA, and the plan ``choose_plan`` picks. It is how
``choose_plan``'s rule was chosen (docs/benchmarks.md); rerun it after changing the kernel.

    python bench/decode_sweep.py --json-out decode_sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, environment, require_cuda  # noqa: E402
from bench.decode import case_tensors, graph_time_us  # noqa: E402
from megacp.ops import paged_decode  # noqa: E402

DEFAULT_CASES = ["1x2048", "1x8192", "1x16384", "1x32768", "16x1024", "16x2048", "16x4096", "16x8192", "16x16384",
                 "64x1024", "64x2048", "64x8192"]


def sweep_case(B: int, L: int, args: argparse.Namespace) -> dict:
    c = case_tensors(B, L, args.heads, args.kv_heads, args.head_dim, args.block_size)
    q4, k_contig, v_contig = c["q"].unsqueeze(2), c.pop("k_contig"), c.pop("v_contig")
    ref = F.scaled_dot_product_attention(q4, k_contig, v_contig, scale=c["scale"], enable_gqa=True)[:, :, 0].float()
    sdpa_us = graph_time_us(lambda: F.scaled_dot_product_attention(q4, k_contig, v_contig, scale=c["scale"],
                                                                   enable_gqa=True))
    del k_contig, v_contig
    rows = []
    grid = itertools.product(args.splits, args.block_n, args.warps, args.stages, args.fused_merge)
    for splits, block_n, warps, stages, fused in grid:
        if splits > -(-L // block_n) or (fused and splits == 1):
            continue
        plan = paged_decode.DecodePlan(splits, block_n, warps, stages, bool(fused))

        def run():
            return paged_decode.paged_decode_with_lse(c["q"], c["k_cache"], c["v_cache"], c["block_table"],
                                                      c["seq_lens"], c["scale"], plan=plan)

        try:
            out, _ = run()
            us = graph_time_us(run)
        except Exception as e:  # noqa: BLE001  (out of shared memory / registers for this tile size)
            rows.append({"plan": plan.__dict__, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        err = ((out.float() - ref).norm() / ref.norm()).item()
        rows.append({"plan": plan.__dict__, "us": us, "vs_sdpa": sdpa_us / us, "rel_err": err})
    chosen = paged_decode.choose_plan(B, args.kv_heads, L, torch.cuda.get_device_properties(0).multi_processor_count)
    ok = [r for r in rows if "us" in r]
    best = min(ok, key=lambda r: r["us"])
    del c
    torch.cuda.empty_cache()
    return {"batch": B, "shard_tokens": L, "sdpa_graph_us": sdpa_us, "best": best, "chosen": chosen.__dict__,
            "chosen_vs_sdpa": next((r["vs_sdpa"] for r in ok if r["plan"] == chosen.__dict__), None), "plans": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="BATCHxSHARD_TOKENS")
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--fused-merge", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    require_cuda()
    results = []
    for case in args.cases:
        B, L = (int(x) for x in case.split("x"))
        r = sweep_case(B, L, args)
        results.append(r)
        top = sorted((x for x in r["plans"] if "us" in x), key=lambda x: x["us"])[:5]
        print(f"B={B:3d} L={L:6d} sdpa {r['sdpa_graph_us']:8.1f} us | chosen {r['chosen']} "
              f"{r['chosen_vs_sdpa'] if r['chosen_vs_sdpa'] is None else round(r['chosen_vs_sdpa'], 3)} | best: "
              + "; ".join(f"{tuple(x['plan'].values())} {x['us']:.1f}us {x['vs_sdpa']:.3f}" for x in top), flush=True)
    result = {"benchmark": "decode_sweep", "env": environment(),
              "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                        "block_size": args.block_size, "dtype": "bfloat16"},
              "results": results}
    if args.json_out:  # the whole grid is long: only the summary lines above go to stdout then
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    else:
        emit(result, None)
    return result


if __name__ == "__main__":
    main()
