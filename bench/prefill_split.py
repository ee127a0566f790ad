"""PCP prefill split on one GPU: every rank's share of the causal attention, timed interleaved with one
single-device call.

For a prompt of T tokens and PCP size p, DualChunkSwap gives rank r the query chunks r and 2p−1−r (each
c = T / 2p tokens); each chunk attends, bottom-right causal, to the gathered keys up to its own end. This script runs
rank r's two chunks as one packed varlen call over the one K/V, keys by start and length (``seqused_k``: exactly
what ``ContextParallelAttention._prefill_pcp`` does; layout "shared"), and, for comparison, over each chunk's key
prefix copied out (layout "copied": the layer before, copy not timed). At p = 1 the layer does not split a prompt
(``megacp.layers.pcp_split``: one chunk, one call, which is the single-device call itself); the pcp-1 rows time the
head + tail split anyway, as a measure of what the decomposition itself costs.

Timing: the GPU's clock drifts over a run (thermal / power: the same 32k call measured 13.2 ms and then 15.1 ms in
one run), so for every (backend, pcp, layout) the calls are timed in ROUNDS: round i runs the
single-device call (and the single call of the baseline backend, when that is another one), then rank 0, rank 1,
..., each alone on the GPU (synchronize, CUDA events, synchronize), after one untimed warm-up round. Every ratio is
computed per round, from calls that saw the same clock state, and reported as the median over rounds, with the
spread:

- ``split_efficiency = T_single_base / (p · max_r T_r)`` per round, median (1.0: the split costs nothing; the
  issue's target: 0.95 / 0.95 / 0.92 at 32k for p = 2 / 4 / 8); ``split_efficiency_min`` / ``_max`` over rounds,
  ``round_efficiency`` every round's value. The baseline backend ("base") is "cudnn" when it is run, else the
  first backend; ``split_efficiency_same_backend`` uses the backend's own single call;
- ``imbalance = max_r T_r / mean_r T_r`` (target ≤ 1.05), per round, median;
- ``rank_tflops_vs_single = min_r (FLOPs_r / T_r) / (FLOPs_single / T_single_base)`` (target ≥ 0.90), per round,
  median; ``rank_tflops_min`` from the ranks' median times;
- ``rank_ms``: each rank's median over rounds; ``single_ms`` / ``base_ms``: the single calls' medians in these
  rounds; the per-T ``single`` block: each backend's single-call median over all its rounds at that T.

FLOPs count only the unmasked (query, key) pairs: 4·H·D per pair. ``--decompositions pieces per_sequence`` times
the "cudnn" kernel's two decompositions of a rank's chunks (``backends_cuda.CUDNN_PIECES``) in the SAME rounds
(round i: single, ranks with pieces, ranks per sequence), so both rows share the single calls, and the pieces row
gets ``speedup_vs_per_sequence``: per round, the slowest rank per sequence / the slowest rank with pieces, median
(and its min / max). Decompositions apply to "cudnn", and to "cuda" where that routes to cuDNN; other backends run
once, decomposition "-". The single whole-prompt call is the same in both (one causal cuDNN call). Ranks whose
longest key range reaches ``backends_cuda.PIECES_MAX_KEYS`` (64k) run per sequence in both rows; set it higher to
time the pieces there.
``--profile`` prints (to stderr) a torch.profiler kernel table of one rank's call at the largest pcp, per T,
backend and decomposition.

    python bench/prefill_split.py --tokens 32768 131072 --pcp 1 2 4 8 --rounds 5 --json-out prefill.json
    python bench/prefill_split.py --backends cudnn --layouts shared --decompositions pieces per_sequence --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, environment, require_cuda  # noqa: E402
from megacp.ops import attention_with_lse, available_backends, backends_cuda  # noqa: E402


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


def _timed(fn) -> float:
    """One call's GPU time in ms: CUDA events around it, the GPU idle before (synchronize) and after."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _rounds(calls: dict, rounds: int) -> dict[str, list[float]]:
    """Each named call timed once per round, in order, after one untimed warm-up round."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(_timed(fn))
    return times


def _split_stats(times: dict[str, list[float]], ranks: list[str], pairs: list[int], single_pairs: int,
                 flop_per_pair: int) -> dict:
    """The per-round ratios of one (backend, decomposition, pcp, layout), from the ``times`` of its ``ranks``'
    calls and the single calls ("base", "single"), and their medians (module docstring)."""
    pcp = len(ranks)
    base, own = times["base"], times.get("single", times["base"])
    eff, eff_same, imb, tf = [], [], [], []
    for i in range(len(base)):
        rank_ms = [times[name][i] for name in ranks]
        worst = max(rank_ms)
        eff.append(base[i] / (pcp * worst))
        eff_same.append(own[i] / (pcp * worst))
        imb.append(worst / (sum(rank_ms) / pcp))
        tf.append(min(n / t for n, t in zip(pairs, rank_ms)) / (single_pairs / base[i]))
    med = [statistics.median(times[name]) for name in ranks]
    return {
        "rank_ms": med, "single_ms": statistics.median(own), "base_ms": statistics.median(base),
        "split_efficiency": statistics.median(eff), "split_efficiency_min": min(eff),
        "split_efficiency_max": max(eff), "round_efficiency": eff,
        "split_efficiency_same_backend": statistics.median(eff_same),
        "imbalance": statistics.median(imb),
        "rank_tflops_min": min(flop_per_pair * n / t / 1e9 for n, t in zip(pairs, med)),
        "rank_tflops_vs_single": statistics.median(tf),
    }


def _with_decomposition(fn, decomposition: str):
    """``fn`` run with the "cudnn" kernel's decomposition set (``backends_cuda.CUDNN_PIECES``)."""
    def call():
        backends_cuda.CUDNN_PIECES = decomposition != "per_sequence"
        return fn()
    return call


def _profile(fn, what: str) -> None:
    """torch.profiler kernel table of two calls of ``fn`` (after the timed rounds, so warm), to stderr."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70)
    print(f"--- profile (2 calls): {what}\n{table}", file=sys.stderr, flush=True)


def _split_rows(calls: dict, inputs: list, b: str, pcp: int, layout: str, decompositions: list[str], rounds: int,
                T: int, flop_per_pair: int, profile: bool) -> tuple[dict, list[dict]]:
    """Time one (backend, pcp, layout) in rounds: the single call(s) in ``calls``, then every rank under each
    decomposition, all in the same rounds. -> (times, one split row per decomposition)"""
    scale = inputs[0][0]["q"].shape[-1] ** -0.5
    for dec in decompositions:
        for r, (kw, _) in enumerate(inputs):
            calls[f"{dec}/rank{r}"] = _with_decomposition(
                (lambda kw_: lambda: attention_with_lse(causal=True, scale=scale, backend=b, **kw_))(kw), dec)
    times = _rounds(calls, rounds)
    backends_cuda.CUDNN_PIECES = True
    rows = []
    for dec in decompositions:
        ranks = [f"{dec}/rank{r}" for r in range(pcp)]
        stats = _split_stats(times, ranks, [pairs for _, pairs in inputs], causal_pairs(T, T), flop_per_pair)
        rows.append({"backend": b, "decomposition": dec, "pcp": pcp, "layout": layout, **stats})
        if profile:
            r = min(1, pcp - 1)
            _profile(calls[ranks[r]], f"T={T} {b} {dec} pcp={pcp} {layout} rank {r}")
    if {"pieces", "per_sequence"} <= set(decompositions):  # the A/B in equal clock states: per round, slowest rank
        per_round = [max(times[f"per_sequence/rank{r}"][i] for r in range(pcp)) /
                     max(times[f"pieces/rank{r}"][i] for r in range(pcp)) for i in range(rounds)]
        pieces_row = rows[decompositions.index("pieces")]
        pieces_row["speedup_vs_per_sequence"] = statistics.median(per_round)
        pieces_row["speedup_vs_per_sequence_min_max"] = [min(per_round), max(per_round)]
    return times, rows


def run(tokens: list[int], pcps: list[int], backends: list[str], heads: int, kv_heads: int, head_dim: int,
        rounds: int, layouts: tuple[str, ...] = ("shared", "copied"), decompositions: tuple[str, ...] = ("pieces",),
        profile: bool = False) -> dict:
    flop_per_pair = 4 * heads * head_dim
    scale = head_dim ** -0.5
    base_name = "cudnn" if "cudnn" in backends else backends[0]
    results = []
    for T in tokens:
        g = torch.Generator(device="cuda").manual_seed(T)
        q = torch.randn(T, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(T, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(T, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")

        def single(b):
            return lambda: attention_with_lse(q, k, v, cu, cu, True, scale, backend=b, host_cu_seqlens=([0, T], [0, T]))

        singles: dict[str, list[float]] = {}
        row = {"tokens": T, "base_backend": base_name, "rounds": rounds, "single": {}, "split": []}
        for b, pcp, layout in [(b, p, lay) for b in backends for p in pcps for lay in layouts]:
            if T % (2 * pcp):
                continue
            calls = {"base": single(base_name)}
            if b != base_name:
                calls["single"] = single(b)
            inputs = [rank_inputs(q, k, v, T, pcp, r, layout) for r in range(pcp)]
            decs = list(decompositions) if b in ("cudnn", "cuda") else ["-"]
            times, rows = _split_rows(calls, inputs, b, pcp, layout, decs, rounds, T, flop_per_pair,
                                      profile and pcp == max(pcps) and layout == layouts[0])
            for name in calls.keys() & {"base", "single"}:
                singles.setdefault(base_name if name == "base" else b, []).extend(times[name])
            row["split"].extend(rows)
            del inputs, calls
        for b, ts in singles.items():
            ms = statistics.median(ts)
            row["single"][b] = {"ms": ms, "tflops": flop_per_pair * causal_pairs(T, T) / ms / 1e9}
        results.append(row)
        del q, k, v
        torch.cuda.empty_cache()
    return {"benchmark": "prefill_split", "env": environment(),
            "shape": {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": "bfloat16"},
            "results": results}


def table(result: dict) -> str:
    lines = ["tokens backend decomposition layout pcp split_eff (min-max over rounds) imbalance "
             "rank_TFLOPs/single_base pieces_speedup (single base TFLOP/s)"]
    for row in result["results"]:
        single = row["single"]
        base = single.get(row.get("base_backend", "cudnn"), next(iter(single.values()), {"tflops": 0.0}))["tflops"]
        for s in row["split"]:
            speedup = f"{s['speedup_vs_per_sequence']:14.3f}" if "speedup_vs_per_sequence" in s else f"{'':>14}"
            lines.append(f"{row['tokens']:>7} {s['backend']:>6} {s['decomposition']:>12} {s['layout']:>6} "
                         f"{s['pcp']:>3} {s['split_efficiency']:9.3f} ({s['split_efficiency_min']:.3f}-"
                         f"{s['split_efficiency_max']:.3f}) {s['imbalance']:9.3f} "
                         f"{s['rank_tflops_vs_single']:9.3f} {speedup} ({base:.0f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--pcp", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--backends", nargs="+", default=None, help="default: every available CUDA backend")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per configuration (after one warm-up)")
    p.add_argument("--reps", type=int, default=None, help="old name of --rounds")
    p.add_argument("--layouts", nargs="+", default=["shared", "copied"], choices=["shared", "copied"])
    p.add_argument("--decompositions", nargs="+", default=["pieces"], choices=["pieces", "per_sequence"],
                   help="the cudnn kernel's decomposition of a rank's chunks (both: an A/B in one run)")
    p.add_argument("--profile", action="store_true", help="kernel table of one rank's call at the largest pcp")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    require_cuda()
    backends = args.backends or [b for b in available_backends("cuda") if b in ("cuda", "te", "cudnn", "flash")]
    result = run(args.tokens, args.pcp, backends, args.heads, args.kv_heads, args.head_dim,
                 args.reps if args.reps is not None else args.rounds, tuple(args.layouts), tuple(args.decompositions),
                 args.profile)
    emit(result, args.json_out)
    print(table(result), flush=True)
    return result


if __name__ == "__main__":
    main()
