"""Launch-plan sweep of the Triton paged decode kernel, timed inside CUDA-graph replays next to contiguous SDPA.

For each (batch, shard tokens) case it times ``paged_decode_with_lse`` under every ``DecodePlan`` of the grid
(splits × tile × warps × stages × fused merge; plans Triton cannot fit in shared memory are skipped) and SDPA over a contiguous
copy of the same K/V, and reports each plan's time, its ratio to SDPA, and the plan ``choose_plan`` picks. It is how
``choose_plan``'s rule was chosen (docs/benchmarks.md); rerun it after changing the kernel.

``--kind mla`` sweeps the paged latent (MLA) kernel instead: every ``MLADecodePlan`` of its grid (splits × tile ×
head block × warps × stages × fused merge) on latent cases, each plan's time in a graph replay and its fraction of
the copy bandwidth measured in the same run, and ``choose_mla_plan``'s pick against the best.

    python bench/decode_sweep.py --json-out decode_sweep.json
    python bench/decode_sweep.py --kind mla --json-out decode_sweep_mla.json
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

from bench.common import copy_bandwidth, emit, environment, require_cuda  # noqa: E402
from bench.decode import case_tensors, graph_time_us, latent_case  # noqa: E402
from megacp.ops import paged_decode, paged_mla_decode  # noqa: E402

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


MLA_CASES = ["1x32768", "1x131072", "16x8192", "16x32768", "64x2048", "64x8192"]


def sweep_mla_case(B: int, L: int, args: argparse.Namespace, copy_bps: float) -> dict:
    c = latent_case(B, L, args.mla_heads, args.kv_lora_rank, args.rope_dim, args.mla_block_size)
    ref = paged_mla_decode.paged_mla_decode_reference(c["q"], c["cache"], c["block_table"], c["lens"], c["scale"],
                                                      c["v_head_dim"])[0].float()
    nbytes = B * L * c["cache"].shape[-1] * c["cache"].element_size()
    rows = []
    grid = itertools.product(args.splits, args.block_n, args.block_h, args.warps, args.stages, args.fused_merge)
    for splits, block_n, block_h, warps, stages, fused in grid:
        if splits > -(-L // block_n) or (fused and splits == 1):
            continue
        plan = paged_mla_decode.MLADecodePlan(splits, block_n, warps, stages, bool(fused), block_h)

        def run():
            return paged_mla_decode.paged_mla_decode_kernel(c["q"], c["cache"], c["block_table"], c["lens"],
                                                            c["scale"], c["v_head_dim"], plan=plan)

        try:
            out, _ = run()
            us = graph_time_us(run)
        except Exception as e:  # noqa: BLE001  (out of shared memory / registers for this tile size)
            rows.append({"plan": plan.__dict__, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        err = ((out.float() - ref).norm() / ref.norm()).item()
        rows.append({"plan": plan.__dict__, "us": us, "vs_copy": nbytes / us * 1e6 / copy_bps, "rel_err": err})
    chosen = paged_mla_decode.choose_mla_plan(B, args.mla_heads, c["block_table"].shape[1] * args.mla_block_size,
                                              torch.cuda.get_device_properties(0).multi_processor_count)
    ok = [r for r in rows if "us" in r]
    chosen_row = next((r for r in ok if r["plan"] == chosen.__dict__), None)
    if chosen_row is None:  # the rule picked a plan outside the grid: time it too
        def run_chosen():
            return paged_mla_decode.paged_mla_decode_kernel(c["q"], c["cache"], c["block_table"], c["lens"],
                                                            c["scale"], c["v_head_dim"], plan=chosen)
        us = graph_time_us(run_chosen)
        chosen_row = {"plan": chosen.__dict__, "us": us, "vs_copy": nbytes / us * 1e6 / copy_bps}
    best = min(ok, key=lambda r: r["us"])
    del c
    torch.cuda.empty_cache()
    return {"batch": B, "shard_tokens": L, "latent_bytes": nbytes, "best": best, "chosen": chosen.__dict__,
            "chosen_us": chosen_row["us"], "chosen_vs_copy": chosen_row["vs_copy"],
            "chosen_vs_best": best["us"] / chosen_row["us"], "plans": rows}


def _main_mla(args: argparse.Namespace) -> dict:
    copy_bps = copy_bandwidth()
    results = []
    summary = {"benchmark": "decode_sweep_mla", "env": environment(), "copy_bandwidth_bytes_per_s": copy_bps,
               "shape": {"heads": args.mla_heads, "kv_lora_rank": args.kv_lora_rank, "rope": args.rope_dim,
                         "block_size": args.mla_block_size, "dtype": "bfloat16"},
               "plan_fields": list(paged_mla_decode.MLADecodePlan(1).__dict__), "results": results}
    for case in args.cases or MLA_CASES:
        B, L = (int(x) for x in case.split("x"))
        r = sweep_mla_case(B, L, args, copy_bps)
        results.append(r)
        if args.json_out:  # after every case: a run cut short keeps what it measured
            _write(summary, args.json_out)
        top = sorted((x for x in r["plans"] if "us" in x), key=lambda x: x["us"])[:4]
        print(f"B={B:3d} L={L:6d} chosen {tuple(r['chosen'].values())} {r['chosen_us']:.1f}us vs_copy "
              f"{r['chosen_vs_copy']:.3f} (best/chosen {r['chosen_vs_best']:.3f}) | best: "
              + "; ".join(f"{tuple(x['plan'].values())} {x['us']:.1f}us {x['vs_copy']:.3f}" for x in top), flush=True)
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", default="gqa", choices=["gqa", "mla"], help="which paged decode kernel to sweep")
    p.add_argument("--cases", nargs="+", default=None, help="BATCHxSHARD_TOKENS (default: per kind)")
    p.add_argument("--splits", type=int, nargs="+", default=None,
                   help="default: 1 2 4 8 16 32 64 (gqa), 1 2 4 8 16 32 64 128 (mla)")
    p.add_argument("--block-n", type=int, nargs="+", default=None, help="default: 32 64 128 (gqa), 16 32 64 (mla)")
    p.add_argument("--block-h", type=int, nargs="+", default=[16], help="mla: heads per program")
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=None, help="default: 2 3 4 (gqa), 2 3 (mla)")
    p.add_argument("--fused-merge", type=int, nargs="+", default=[0, 1], choices=[0, 1],
                   help="0 merge kernel, 1 fused merge (the split kernel's last program merges)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--mla-heads", type=int, default=16)
    p.add_argument("--kv-lora-rank", type=int, default=512)
    p.add_argument("--rope-dim", type=int, default=64)
    p.add_argument("--mla-block-size", type=int, default=64)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    mla = args.kind == "mla"
    args.splits = args.splits or ([1, 2, 4, 8, 16, 32, 64, 128] if mla else [1, 2, 4, 8, 16, 32, 64])
    args.block_n = args.block_n or ([16, 32, 64] if mla else [32, 64, 128])
    args.stages = args.stages or ([2, 3] if mla else [2, 3, 4])
    require_cuda()
    if mla:
        result = _main_mla(args)
        _write(result, args.json_out)
        return result
    results = []
    for case in args.cases or DEFAULT_CASES:
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
    _write(result, args.json_out)
    return result


def _write(result: dict, path: str | None) -> None:
    if path:  # the whole grid is long: only the summary lines above go to stdout then
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    else:
        emit(result, None)


if __name__ == "__main__":
    main()
