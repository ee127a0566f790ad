"""PCP prefill split on one GPU: every rank's share of the causal attention, run one after another.

For a prompt of T tokens and PCP size p, DualChunkSwap gives rank r the query chunks r and 2p−1−r (each
c = T / 2p tokens); each chunk attends, bottom-right causal, to the gathered keys up to its own end. This script runs
rank r's two chunks as one packed varlen call over the one K/V, keys by start and length (``seqused_k``: exactly
what ``ContextParallelAttention._prefill_pcp`` does; layout "shared"), and, for comparison, over each chunk's key
prefix copied out (layout "copied": the layer before, copy not timed), times each rank, and reports against one
single-device causal call over all T tokens:

- ``split_efficiency = T_single_cudnn / (p · max_r T_r)`` (1.0: the split costs nothing; target ≥ 0.90),
- ``imbalance = max_r T_r / mean_r T_r`` (target ≤ 1.05),
- ``rank_tflops_vs_single = min_r (FLOPs_r / T_r) / (FLOPs_single / T_single_cudnn)`` (target ≥ 0.90),

for every CUDA backend. FLOPs count only the unmasked (query, key) pairs: 4·H·D per pair.

    python bench/prefill_split.py --tokens 32768 131072 --pcp 1 2 4 8 --json-out prefill.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, environment, require_cuda, time_ms  # noqa: E402
from megacp.ops import attention_with_lse, available_backends  # noqa: E402


def causal_pairs(lq: int, lk: int) -> int:
    """Unmasked (query, key) pairs of a bottom-right causal block with lq <= lk."""
    return lq * lk - lq * (lq - 1) // 2


def rank_inputs(q, k, v, T: int, pcp: int, r: int, layout: str):
    """Rank r's packed head + tail chunks as keyword arguments of ``attention_with_lse`` (q [2c, H, D]; "shared":
    k/v the whole [T, Hk, D], seqused_k; "copied": k/v [Lh + Lt, Hk, D], cumulative offsets), and the pair count."""
    c = T // (2 * pcp)
    head, tail = r, 2 * pcp - 1 - r
    qs = torch.cat([q[head * c:(head + 1) * c], q[tail * c:(tail + 1) * c]])
    lens = [(head + 1) * c, (tail + 1) * c]
    i32 = dict(dtype=torch.int32, device=q.device)
    pairs = causal_pairs(c, lens[0]) + causal_pairs(c, lens[1])
    if layout == "shared":  # what PrefillMetadata hands the layer: host offsets, so no read-back
        host = ([0, c, 2 * c], [0, 0, T], lens)
        return dict(q=qs, k=k, v=v, cu_seqlens_q=torch.tensor(host[0], **i32),
                    cu_seqlens_k=torch.tensor(host[1], **i32), host_cu_seqlens=host,
                    seqused_k=torch.tensor(lens, **i32)), pairs
    host = ([0, c, 2 * c], [0, lens[0], lens[0] + lens[1]])
    return dict(q=qs, k=torch.cat([k[:lens[0]], k[:lens[1]]]), v=torch.cat([v[:lens[0]], v[:lens[1]]]),
                cu_seqlens_q=torch.tensor(host[0], **i32), cu_seqlens_k=torch.tensor(host[1], **i32),
                host_cu_seqlens=host), pairs


def run(tokens: list[int], pcps: list[int], backends: list[str], heads: int, kv_heads: int, head_dim: int,
        reps: int, layouts: tuple[str, ...] = ("shared", "copied")) -> dict:
    flop_per_pair = 4 * heads * head_dim
    scale = head_dim ** -0.5
    results = []
    for T in tokens:
        g = torch.Generator(device="cuda").manual_seed(T)
        q = torch.randn(T, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(T, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(T, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
        n = max(2, reps if T <= 32768 else reps // 3)
        single = {}
        for b in backends:
            ms = time_ms(lambda: attention_with_lse(q, k, v, cu, cu, True, scale, backend=b,
                                                    host_cu_seqlens=([0, T], [0, T])), warmup=1, reps=n)
            single[b] = {"ms": ms, "tflops": flop_per_pair * causal_pairs(T, T) / ms / 1e9}
        base = single["cudnn"] if "cudnn" in single else next(iter(single.values()))
        row = {"tokens": T, "single": single, "split": []}
        for b, pcp, layout in [(b, p, lay) for b in backends for p in pcps for lay in layouts]:
                if T % (2 * pcp):
                    continue
                ranks = []
                for r in range(pcp):
                    kw, pairs = rank_inputs(q, k, v, T, pcp, r, layout)
                    ms = time_ms(lambda: attention_with_lse(causal=True, scale=scale, backend=b, **kw),
                                 warmup=1, reps=n)
                    ranks.append({"rank": r, "ms": ms, "tflops": flop_per_pair * pairs / ms / 1e9})
                    del kw
                worst = max(x["ms"] for x in ranks)
                mean = sum(x["ms"] for x in ranks) / pcp
                row["split"].append({
                    "backend": b, "pcp": pcp, "layout": layout, "rank_ms": [x["ms"] for x in ranks],
                    "split_efficiency": base["ms"] / (pcp * worst),
                    "split_efficiency_same_backend": single[b]["ms"] / (pcp * worst),
                    "imbalance": worst / mean,
                    "rank_tflops_min": min(x["tflops"] for x in ranks),
                    "rank_tflops_vs_single": min(x["tflops"] for x in ranks) / base["tflops"],
                })
        results.append(row)
        del q, k, v
        torch.cuda.empty_cache()
    return {"benchmark": "prefill_split", "env": environment(),
            "shape": {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": "bfloat16"},
            "results": results}


def table(result: dict) -> str:
    lines = ["tokens backend layout pcp split_eff imbalance rank_TFLOPs/single_cuDNN (single cuDNN TFLOP/s)"]
    for row in result["results"]:
        base = row["single"].get("cudnn", next(iter(row["single"].values())))["tflops"]
        for s in row["split"]:
            lines.append(f"{row['tokens']:>7} {s['backend']:>6} {s['layout']:>6} {s['pcp']:>3} "
                         f"{s['split_efficiency']:9.3f} "
                         f"{s['imbalance']:9.3f} {s['rank_tflops_vs_single']:9.3f} ({base:.0f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--pcp", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--backends", nargs="+", default=None, help="default: every available CUDA backend")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--layouts", nargs="+", default=["shared", "copied"], choices=["shared", "copied"])
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    require_cuda()
    backends = args.backends or [b for b in available_backends("cuda") if b in ("cuda", "te", "cudnn", "flash")]
    result = run(args.tokens, args.pcp, backends, args.heads, args.kv_heads, args.head_dim, args.reps,
                 tuple(args.layouts))
    emit(result, args.json_out)
    print(table(result), flush=True)
    return result


if __name__ == "__main__":
    main()
