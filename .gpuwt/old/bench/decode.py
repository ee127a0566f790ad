"""Paged decode attention: KV read bandwidth of the Triton paged kernel vs contiguous SDPA, same run, same GPU.

For each (batch B, context length, DCP size) the rank holds a shard of ``L = context / dcp`` tokens per sequence in a
paged cache ``[num_blocks, block_size, Hkv, D]`` with shuffled block ids, and attends all ``Hq`` query heads (DCP
gathers them) to it. A step must read at least ``2·B·L·Hkv·D·2`` bytes of K and V; bandwidth = those bytes / time.

- ``paged``: ``megacp.ops.paged_decode.paged_decode_with_lse`` (reads the cache through the block table; LSE out),
- ``sdpa``: ``F.scaled_dot_product_attention`` over a contiguous ``[B, Hkv, L, D]`` copy (enable_gqa): the baseline,
- ``gather_sdpa``: gather the paged shard into a contiguous copy, then SDPA (what a paged cache costs without a
  paged kernel).

The latent case (``--kinds mla``, DeepSeek MLA): the rank holds ``L`` latent rows of ``kv_lora_rank + rope`` (576)
numbers per sequence in a paged ``[num_blocks, block_size, 576]`` cache and attends ``--mla-heads`` latent query heads
to it with ``megacp.ops.paged_mla_decode`` (one MQA: every row is shared by all heads). A step must read at least
``B·L·576·2`` bytes; the row's ``vs_copy`` is that over the time, divided by the device-to-device copy bandwidth
measured in the same run (read + write counted), eagerly and inside a CUDA-graph replay.

Times are medians of ``triton.testing.do_bench`` (which clears the L2 cache between runs).

    python bench/decode.py --batch 1 16 64 --context 8192 32768 131072 --dcp 1 2 4 8 --json-out decode.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import copy_bandwidth, emit, environment, require_cuda  # noqa: E402
from megacp.ops import paged_decode, paged_mla_decode  # noqa: E402


def graph_time_us(fn, calls: int = 20, reps: int = 5) -> float:
    """Median time of one ``fn()`` inside a CUDA graph of ``calls`` back-to-back calls, replayed ``reps`` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def kv_read_bytes(batch: int, seq_len: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of K and V a decode step must read at least: ``2 · B · L · Hkv · D · itemsize``."""
    return 2 * batch * seq_len * num_kv_heads * head_dim * itemsize


def case_tensors(B: int, L: int, hq: int, hkv: int, d: int, block: int) -> dict:
    """One decode case in bfloat16: a paged cache with shuffled block ids holding ``L`` tokens for each of ``B``
    sequences, the same K/V as contiguous ``[B, Hkv, L, D]`` copies, the ``[B, Hq, D]`` queries."""
    per = -(-L // block)
    g = torch.Generator(device="cuda").manual_seed(B * 7 + L)
    k_cache = torch.randn(B * per, block, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v_cache = torch.randn(B * per, block, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    ids = torch.randperm(B * per, device="cuda", generator=g).to(torch.int32)
    block_table = ids.view(B, per)
    seq_lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    q = torch.randn(B, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    slots = (block_table.long().unsqueeze(-1) * block + torch.arange(block, device="cuda")).view(B, -1)[:, :L]
    return {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_table": block_table, "seq_lens": seq_lens,
            "slots": slots, "scale": d ** -0.5,
            "k_contig": k_cache.flatten(0, 1)[slots].transpose(1, 2).contiguous(),
            "v_contig": v_cache.flatten(0, 1)[slots].transpose(1, 2).contiguous()}


def bench_case(B: int, L: int, hq: int, hkv: int, d: int, block: int, max_tokens: int,
               plan: paged_decode.DecodePlan | None = None) -> dict | None:
    from triton.testing import do_bench

    if B * L > max_tokens:
        return None
    c = case_tensors(B, L, hq, hkv, d, block)
    q, k_cache, v_cache, block_table, seq_lens, slots, scale = (
        c[k] for k in ("q", "k_cache", "v_cache", "block_table", "seq_lens", "slots", "scale"))
    k_contig, v_contig = c.pop("k_contig"), c.pop("v_contig")
    q4 = q.unsqueeze(2)  # [B, Hq, 1, D]

    def paged():
        return paged_decode.paged_decode_with_lse(q, k_cache, v_cache, block_table, seq_lens, scale, max_seq_len=L,
                                                  plan=plan)

    def sdpa():
        return F.scaled_dot_product_attention(q4, k_contig, v_contig, scale=scale, enable_gqa=True)

    def gather_sdpa():
        k = k_cache.flatten(0, 1)[slots].transpose(1, 2)
        v = v_cache.flatten(0, 1)[slots].transpose(1, 2)
        return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)

    out, _ = paged()
    ref = sdpa()[:, :, 0]
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    nbytes = kv_read_bytes(B, L, hkv, d, k_cache.element_size())
    row = {"batch": B, "shard_tokens": L, "kv_bytes": nbytes, "rel_err_vs_sdpa": err}
    for name, fn in (("paged", paged), ("sdpa", sdpa), ("gather_sdpa", gather_sdpa)):
        ms = do_bench(fn, warmup=10, rep=40, return_mode="median")
        row[f"{name}_us"] = ms * 1e3
        row[f"{name}_TBps"] = nbytes / ms / 1e9
    row["paged_vs_sdpa"] = row["paged_TBps"] / row["sdpa_TBps"]
    # The same two kernels timed inside a CUDA-graph replay (as the engine's decode step runs them): no launch gaps.
    # The paged kernel plans by the block table's capacity there (no host lengths), like the engine's graph.
    def paged_in_graph():
        return paged_decode.paged_decode_with_lse(q, k_cache, v_cache, block_table, seq_lens, scale)

    for name, fn in (("paged", paged_in_graph), ("sdpa", sdpa)):
        us = graph_time_us(fn)
        row[f"{name}_graph_us"] = us
        row[f"{name}_graph_TBps"] = nbytes / us / 1e6
    row["paged_vs_sdpa_graph"] = row["paged_graph_TBps"] / row["sdpa_graph_TBps"]
    del c, k_cache, v_cache, k_contig, v_contig
    torch.cuda.empty_cache()
    return row


def latent_case(B: int, L: int, heads: int, kv_lora_rank: int, rope: int, block: int) -> dict:
    """One latent decode case in bfloat16: a paged latent cache with shuffled block ids holding ``L`` rows for each
    of ``B`` sequences, ``[B, heads, kv_lora_rank + rope]`` latent queries."""
    per = -(-L // block)
    D = kv_lora_rank + rope
    g = torch.Generator(device="cuda").manual_seed(B * 11 + L)
    cache = torch.randn(B * per, block, D, device="cuda", dtype=torch.bfloat16, generator=g)
    block_table = torch.randperm(B * per, device="cuda", generator=g).to(torch.int32).view(B, per)
    return {"q": torch.randn(B, heads, D, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1,
            "cache": cache, "block_table": block_table,
            "lens": torch.full((B,), L, dtype=torch.int32, device="cuda"),
            "scale": 192 ** -0.5, "v_head_dim": kv_lora_rank}


def bench_mla_case(B: int, L: int, args: argparse.Namespace, copy_bps: float,
                   plan: paged_mla_decode.MLADecodePlan | None = None) -> dict | None:
    """Time the paged MLA decode kernel on one case: eager (``do_bench``) and in a CUDA-graph replay."""
    from triton.testing import do_bench

    if B * L > args.max_tokens:
        return None
    c = latent_case(B, L, args.mla_heads, args.kv_lora_rank, args.rope_dim, args.mla_block_size)

    def run():
        return paged_mla_decode.paged_mla_decode_kernel(c["q"], c["cache"], c["block_table"], c["lens"], c["scale"],
                                                        c["v_head_dim"], plan=plan)

    out, _ = run()
    ref, _ = paged_mla_decode.paged_mla_decode_reference(c["q"], c["cache"], c["block_table"], c["lens"],
                                                         c["scale"], c["v_head_dim"])
    nbytes = B * L * c["cache"].shape[-1] * c["cache"].element_size()
    ms = do_bench(run, warmup=10, rep=40, return_mode="median")
    graph_us = graph_time_us(run)
    capacity = c["block_table"].shape[1] * args.mla_block_size
    chosen = plan or paged_mla_decode.choose_mla_plan(B, args.mla_heads, capacity,
                                                      torch.cuda.get_device_properties(0).multi_processor_count)
    row = {"batch": B, "shard_tokens": L, "latent_bytes": nbytes, "plan": chosen.__dict__,
           "rel_err_vs_reference": ((out.float() - ref.float()).norm() / ref.float().norm()).item(),
           "mla_us": ms * 1e3, "mla_TBps": nbytes / ms / 1e9, "vs_copy": nbytes / ms * 1e3 / copy_bps,
           "mla_graph_us": graph_us, "mla_graph_TBps": nbytes / graph_us / 1e6,
           "vs_copy_graph": nbytes / graph_us * 1e6 / copy_bps}
    del c
    torch.cuda.empty_cache()
    return row


def _gqa_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for ctx in args.context:
        for dcp in args.dcp:
            for B in args.batch:
                row = bench_case(B, ctx // dcp, args.heads, args.kv_heads, args.head_dim, args.block_size,
                                 args.max_tokens,
                                 paged_decode.DecodePlan(args.num_splits) if args.num_splits else None)
                if row is not None:
                    rows.append({"context": ctx, "dcp": dcp, **row})
    return rows


def _print_gqa(rows: list[dict]) -> None:
    print("context dcp batch shard  paged_TB/s sdpa_TB/s gather+sdpa_TB/s paged/sdpa  in-graph: paged sdpa ratio",
          flush=True)
    for r in rows:
        print(f"{r['context']:>7} {r['dcp']:>3} {r['batch']:>5} {r['shard_tokens']:>6} {r['paged_TBps']:10.2f} "
              f"{r['sdpa_TBps']:9.2f} {r['gather_sdpa_TBps']:16.2f} {r['paged_vs_sdpa']:10.2f} "
              f"{r['paged_graph_TBps']:15.2f} {r['sdpa_graph_TBps']:5.2f} {r['paged_vs_sdpa_graph']:5.2f}", flush=True)


def _mla_rows(args: argparse.Namespace, copy_bps: float) -> list[dict]:
    rows = []
    for ctx in args.context:
        for dcp in args.dcp:
            for B in args.batch:
                row = bench_mla_case(B, ctx // dcp, args, copy_bps)
                if row is not None:
                    rows.append({"context": ctx, "dcp": dcp, **row})
    return rows


def _print_mla(rows: list[dict], copy_bps: float) -> None:
    print(f"latent (MLA) decode, copy bandwidth {copy_bps / 1e12:.2f} TB/s\n"
          "context dcp batch  shard  mla_us  TB/s vs_copy  in-graph: us  TB/s vs_copy  splits", flush=True)
    for r in rows:
        print(f"{r['context']:>7} {r['dcp']:>3} {r['batch']:>5} {r['shard_tokens']:>6} {r['mla_us']:7.1f} "
              f"{r['mla_TBps']:5.2f} {r['vs_copy']:7.3f} {r['mla_graph_us']:13.1f} {r['mla_graph_TBps']:5.2f} "
              f"{r['vs_copy_graph']:7.3f} {r['plan']['num_splits']:7d}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--context", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--dcp", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=2 * 1024 * 1024, help="skip cases with B·L above this")
    p.add_argument("--num-splits", type=int, default=None, help="override the kernel's split-KV plan (eager timing)")
    p.add_argument("--kinds", nargs="+", default=["gqa", "mla"], choices=["gqa", "mla"],
                   help="gqa: the paged GQA kernel vs SDPA; mla: the paged latent (MLA) kernel vs the copy bandwidth")
    p.add_argument("--mla-heads", type=int, default=16, help="latent query heads per rank (DeepSeek-V2-Lite: 16)")
    p.add_argument("--kv-lora-rank", type=int, default=512)
    p.add_argument("--rope-dim", type=int, default=64)
    p.add_argument("--mla-block-size", type=int, default=64)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    require_cuda()
    result = {"benchmark": "decode", "env": environment(),
              "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                        "block_size": args.block_size, "dtype": "bfloat16"}}
    if "mla" in args.kinds:
        result["copy_bandwidth_bytes_per_s"] = copy_bandwidth()
        result["mla_shape"] = {"heads": args.mla_heads, "kv_lora_rank": args.kv_lora_rank, "rope": args.rope_dim,
                               "block_size": args.mla_block_size, "dtype": "bfloat16"}
    result["results"] = _gqa_rows(args) if "gqa" in args.kinds else []
    if "mla" in args.kinds:
        result["mla_results"] = _mla_rows(args, result["copy_bandwidth_bytes_per_s"])
    emit(result, args.json_out)  # the tables after the JSON: the session script keeps the output's tail
    _print_gqa(result["results"])
    if "mla" in args.kinds:
        _print_mla(result["mla_results"], result["copy_bandwidth_bytes_per_s"])
    return result


if __name__ == "__main__":
    main()
