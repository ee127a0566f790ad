"""PCP prefill and DCP decode scaling over several GPUs (one torchrun world, NCCL), Llama-3-8B-shaped, random weights.

    torchrun --nproc-per-node 2 bench/multi_gpu.py --json-out multi_gpu.json
    torchrun --nproc-per-node 2 bench/multi_gpu.py --device cpu --tiny    # the same code path on gloo (dry run)

Three parts, each looping over layouts "tp,pcp,dcp" inside the one world (dp = world / (tp·pcp) fills the rest, so
tp = pcp = 1 runs a full replica on every GPU at once):

- ``prefill``: TTFT of one prompt of each ``--tokens`` through megacp's engine (``LLMEngine.generate`` with one new
  token, the whole prompt in one step): embedding, ``--layers`` decoder layers, the last token's logits and sampling.
  The model is Llama-3-8B's shape (hidden 4096, 32 / 8 heads, head dim 128, MLP 14336, vocab 128256) in bf16 with
  random weights. One warm-up per length, then the median of ``--reps``; each rep's time is the slowest rank's.
  ``speedup = T(1,1,1) / T`` and ``efficiency = T(1,1,1) / (tp·pcp·T)``.
- ``attention``: the same prompts through one ``ContextParallelAttention`` layer alone (PCP all-gather of K/V, cache
  write, head + tail chunk attention), CUDA events, median of ``--reps``: the part of a layer that PCP splits
  unevenly and communicates for, without the (perfectly split) linear layers.
- ``decode_attention``: one decode step of ``--decode-batch`` requests at each ``--contexts`` length through one
  attention layer alone (random K/V in the cache): the part DCP shrinks (each rank reads 1/dcp of the KV) next to
  what it adds (Q all-gather, LSE all-gather, reduce-scatter).
- ``decode``: per-token latency of one request at each ``--contexts`` length (prefill, then ``--new-tokens``
  greedy steps; the median step time of the slowest rank, median over ``--reps`` runs), with ``--decode-kv-heads`` KV heads (1: the GQA rule lets tp = 2 use
  dcp = 2). KV: every layout gets the same per-rank cache of ``--kv-gib`` GiB, so slots per rank are equal and the
  longest context the CP group can hold (``kv_capacity_tokens``) must grow exactly ×dcp; ``peak_tokens_stored`` is
  what each rank really held for the request; ``max_context_in_free_memory`` is how long a context the memory left
  after the weights (less ``--reserve-gib`` for activations) would hold.

``--profile`` prints torch.profiler tables (by GPU time) of one TTFT and one attention call at the first
``--tokens``, of one decode-attention call at the first context and batch, and of 8 engine decode steps at the first
context (with the GPU's busy time per step next to the wall time; rank 0's timeline goes next to ``--json-out``). Prints a table last; rank 0 writes the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacp import parallel_state as ps  # noqa: E402
from megacp.engine import LLMEngine  # noqa: E402
from megacp.kv import blocks_needed  # noqa: E402
from megacp.models.config import ModelConfig, model_config_from_dict  # noqa: E402
from megacp.models.llama import LlamaForCausalLM  # noqa: E402
from megacp.sampling import SamplingParams  # noqa: E402

BLOCK = 16
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _layout(text: str) -> tuple[int, int, int]:
    try:
        tp, pcp, dcp = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"layout {text!r} must be tp,pcp,dcp, e.g. 1,2,1") from None
    return tp, pcp, dcp


def model_config(args: argparse.Namespace, num_kv_heads: int, max_len: int) -> ModelConfig:
    return model_config_from_dict(dict(
        model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=num_kv_heads,
        head_dim=args.head_dim, max_position_embeddings=max_len, rms_norm_eps=1e-5, rope_theta=500000.0,
        eos_token_id=None,
    ))


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """This rank's shard of the model with random weights (std 0.02, norms 1): timing needs no checkpoint."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config, params_dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _slowest(x: float) -> float:
    """Max over all ranks (a collective)."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, x)
    return max(out)


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _profile(what: str, fn, log) -> None:
    """torch.profiler table of one call of ``fn`` (every rank profiles, rank 0 prints): where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    log(f"--- profile: {what}\n" + prof.key_averages().table(sort_by="device_time_total", row_limit=20,
                                                               max_name_column_width=60))


def _release(device: torch.device) -> None:
    ps.destroy_model_parallel()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ prefill (TTFT)
def bench_prefill(args, layout, device, dtype, log) -> list[dict]:
    tp, pcp, dcp = layout
    world = dist.get_world_size()
    ps.initialize_model_parallel(tp, pcp, dcp, world // (tp * pcp))
    longest = max(args.tokens)
    model = build_model(model_config(args, args.kv_heads, longest + 64), dtype, device)
    engine = LLMEngine(model, blocks_needed(longest + 1, BLOCK, pcp * dcp) + 1, BLOCK,
                       max_num_batched_tokens=longest, max_num_seqs=1)
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)

    def ttft(prompt: list[int]) -> float:
        dist.barrier()
        _sync(device)
        engine.generate([prompt], one)
        return _slowest(engine.stats.ttft_s[0])

    ttft(_prompt(min(1024, longest), args.vocab, 1))  # NCCL communicators, kernel plans
    rows = []
    for n in args.tokens:
        prompt = _prompt(n, args.vocab, n)
        ttft(prompt)
        times = [ttft(prompt) for _ in range(args.reps)]
        if args.profile and n == args.tokens[0]:
            _profile(f"TTFT tp={tp} pcp={pcp} tokens={n}", lambda: ttft(prompt), log)
        rows.append({"tp": tp, "pcp": pcp, "dcp": dcp, "tokens": n, "ttft_s": statistics.median(times),
                     "ttft_all_s": times})
        log(f"prefill tp={tp} pcp={pcp} dcp={dcp} tokens={n}: TTFT {rows[-1]['ttft_s'] * 1e3:.1f} ms "
            f"(reps {', '.join(f'{t * 1e3:.1f}' for t in times)})")
    del engine, model
    _release(device)
    return rows


# ------------------------------------------------------------------------------------------------ attention alone
def _time_ms(fn, device: torch.device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_attention(args, layout, device, dtype, log) -> list[dict]:
    from megacp.kv import BlockTable, PagedKVCache
    from megacp.layers.cp_attention import ContextParallelAttention
    from megacp.layers.metadata_builder import build_attention_metadata

    tp, pcp, dcp = layout
    world = dist.get_world_size()
    ps.initialize_model_parallel(tp, pcp, dcp, world // (tp * pcp))
    W, R = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    layer = ContextParallelAttention(args.heads, args.kv_heads, args.head_dim, args.head_dim ** -0.5)
    rows = []
    for n in args.tokens:
        bt = BlockTable(BLOCK, 1, blocks_needed(n, BLOCK, W), cp_world_size=W, cp_rank=R, device=device)
        bt.set_row(0, list(range(blocks_needed(n, BLOCK, W))))
        cache = PagedKVCache(blocks_needed(n, BLOCK, W), BLOCK, layer.num_local_kv_heads, args.head_dim, dtype, device)
        meta = build_attention_metadata([0], [0], [n], bt, device=device)
        T = meta.num_local_tokens
        g = torch.Generator(device=device).manual_seed(R)
        q = torch.randn(T, layer.num_local_heads, args.head_dim, generator=g, device=device, dtype=dtype)
        k, v = (torch.randn(T, layer.num_local_kv_heads, args.head_dim, generator=g, device=device, dtype=dtype)
                for _ in range(2))
        with torch.inference_mode():
            ms = _slowest(_time_ms(lambda: layer(q, k, v, meta, cache), device, args.reps))
            if args.profile and n == args.tokens[0]:
                _profile(f"attention layer tp={tp} pcp={pcp} tokens={n}", lambda: layer(q, k, v, meta, cache), log)
        rows.append({"tp": tp, "pcp": pcp, "dcp": dcp, "tokens": n, "layer_ms": ms})
        log(f"attention tp={tp} pcp={pcp} dcp={dcp} tokens={n}: {ms:.2f} ms per layer call")
        del cache, q, k, v, meta
    _release(device)
    return rows


# ------------------------------------------------------------------------------------------------ decode attention
def bench_decode_attention(args, layout, device, dtype, log) -> list[dict]:
    """One decode step of ``batch`` requests of ``context`` tokens through the attention layer alone (DCP: Q
    all-gather, paged attention over this rank's shard, LSE merge and reduce-scatter); the cache holds random K/V."""
    from megacp.kv import BlockTable, PagedKVCache
    from megacp.layers.cp_attention import ContextParallelAttention
    from megacp.layers.metadata_builder import build_attention_metadata

    tp, pcp, dcp = layout
    world = dist.get_world_size()
    ps.initialize_model_parallel(tp, pcp, dcp, world // (tp * pcp))
    W, R = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    layer = ContextParallelAttention(args.heads, args.decode_kv_heads, args.head_dim, args.head_dim ** -0.5)
    hq, hkv = layer.num_local_heads, layer.num_local_kv_heads
    rows = []
    for n in args.contexts:
        for b in args.decode_batch:
            per_req = blocks_needed(n, BLOCK, W)
            bt = BlockTable(BLOCK, b, per_req, cp_world_size=W, cp_rank=R, device=device)
            for i in range(b):
                bt.set_row(i, list(range(i * per_req, (i + 1) * per_req)))
            cache = PagedKVCache(b * per_req, BLOCK, hkv, args.head_dim, dtype, device)
            cache.k.normal_()
            cache.v.normal_()
            meta = build_attention_metadata(list(range(b)), [n - 1] * b, [1] * b, bt, device=device,
                                            null_slot=cache.null_slot)
            q = torch.randn(b, hq, args.head_dim, device=device, dtype=dtype)
            k, v = (torch.randn(b, hkv, args.head_dim, device=device, dtype=dtype) for _ in range(2))
            with torch.inference_mode():
                ms = _slowest(_time_ms(lambda: layer(q, k, v, meta, cache), device, max(args.reps, 20)))
                if args.profile and (n, b) == (args.contexts[0], args.decode_batch[0]):
                    _profile(f"decode attention tp={tp} dcp={dcp} context={n} batch={b}",
                             lambda: layer(q, k, v, meta, cache), log)
            kv_bytes = 2 * b * -(-n // W) * hkv * args.head_dim * torch.finfo(dtype).bits // 8  # this rank's shard
            rows.append({"tp": tp, "pcp": pcp, "dcp": dcp, "context": n, "batch": b, "layer_ms": ms,
                         "kv_bytes_per_rank": kv_bytes, "kv_tb_per_s": kv_bytes / ms / 1e9})
            log(f"decode attention tp={tp} pcp={pcp} dcp={dcp} context={n} batch={b}: {ms:.3f} ms per layer call, "
                f"{rows[-1]['kv_tb_per_s']:.2f} TB/s of this rank's KV")
            del cache, meta, q, k, v
    _release(device)
    return rows


# ------------------------------------------------------------------------------------------------ decode (DCP)
def bench_decode(args, layout, device, dtype, log) -> list[dict]:
    tp, pcp, dcp = layout
    began = time.perf_counter()  # where a slow run spends its time: logged per phase
    world = dist.get_world_size()
    ps.initialize_model_parallel(tp, pcp, dcp, world // (tp * pcp))
    longest = max(args.contexts) + args.new_tokens
    model = build_model(model_config(args, args.decode_kv_heads, longest + 64), dtype, device)
    per_token_bytes = args.layers * 2 * model.num_local_kv_heads * args.head_dim * torch.finfo(dtype).bits // 8
    num_blocks = int(args.kv_gib * 2**30) // (per_token_bytes * BLOCK)
    free = torch.cuda.mem_get_info()[0] if device.type == "cuda" else 0
    log(f"decode tp={tp} pcp={pcp} dcp={dcp}: model built, {time.perf_counter() - began:.1f} s")
    engine = LLMEngine(model, num_blocks, BLOCK, max_num_batched_tokens=max(args.contexts), max_num_seqs=1)
    log(f"decode tp={tp} pcp={pcp} dcp={dcp}: engine with {num_blocks} KV blocks per rank made, "
        f"{time.perf_counter() - began:.1f} s")
    marks: list[float] = []
    profiler = None  # --profile: started at the first decode step of one run, stopped after it

    run_step = engine._run_step

    def marked_step(*args, **kwargs):
        _sync(device)  # the step before has finished its GPU work (it read its sampled ids back already)
        marks.append(time.perf_counter())
        if profiler is not None and len(marks) == 2:
            profiler.start()
        return run_step(*args, **kwargs)

    engine._run_step = marked_step
    warm = _prompt(min(1024, max(args.contexts)), args.vocab, 1)
    engine.generate([warm], SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
    log(f"decode tp={tp} pcp={pcp} dcp={dcp}: model, engine and warm-up (graph capture "
        f"{engine.stats.graph_capture_s:.1f} s) took {time.perf_counter() - began:.1f} s")
    rows = []
    for n in args.contexts:
        medians, means = [], []  # per rep, this rank's
        for _ in range(args.reps):  # a single run's median moved by up to 50% on a shared host (docs/benchmarks.md)
            marks.clear()
            dist.barrier()
            engine.generate([_prompt(n, args.vocab, n)],
                            SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True))
            _sync(device)
            marks.append(time.perf_counter())
            steps = [b - a for a, b in zip(marks, marks[1:])]  # step 0: the prefill; then one decode token per step
            medians.append(statistics.median(steps[1:]))
            means.append(statistics.mean(steps[1:]))
        if args.profile and n == args.contexts[0] and device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            marks.clear()
            engine.generate([_prompt(n, args.vocab, n)], SamplingParams(max_new_tokens=9, ignore_eos=True))
            _sync(device)
            profiler.stop()
            kernels = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / 8
            wall_ms = statistics.median(medians) * 1e3
            log(f"--- profile: 8 decode steps tp={tp} pcp={pcp} dcp={dcp} context={n}: GPU busy {busy_ms:.3f} ms per "
                f"step, {len(kernels) / 8:.0f} kernels per step (wall median {wall_ms:.3f} ms)\n"
                + profiler.key_averages().table(sort_by="device_time_total", row_limit=30, max_name_column_width=70))
            if args.json_out and dist.get_rank() == 0:  # the timeline (chrome://tracing, Perfetto): kernel gaps
                stem = os.path.splitext(args.json_out)[0]
                profiler.export_chrome_trace(f"{stem}.trace_tp{tp}_pcp{pcp}_dcp{dcp}.json.gz")
            profiler = None
        stats = engine.stats
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {"medians": medians, "means": means, "peak": stats.peak_tokens_stored,
                                          "ttft": stats.ttft_s[0]})
        per_rep = [max(g["medians"][i] for g in gathered) * 1e3 for i in range(args.reps)]  # slowest rank per rep
        reserve = int(args.reserve_gib * 2**30)
        row = {
            "tp": tp, "pcp": pcp, "dcp": dcp, "context": n, "new_tokens": args.new_tokens,
            "decode_ms_per_token": statistics.median(per_rep),
            "decode_ms_per_token_reps": per_rep,
            "decode_ms_per_token_mean": max(statistics.mean(g["means"]) for g in gathered) * 1e3,
            "ttft_s": max(g["ttft"] for g in gathered),
            "kv_bytes_per_token_per_rank": per_token_bytes,
            "kv_gib_per_rank": args.kv_gib,
            "kv_slots_per_rank": stats.kv_slots_per_rank,
            "kv_capacity_tokens": stats.kv_capacity_tokens,
            "peak_tokens_stored_per_rank": [g["peak"] for g in gathered],
            "max_context_in_free_memory": (max(free - reserve, 0) // per_token_bytes) * pcp * dcp,
            "cuda_graphs": stats.cuda_graphs,
            "graph_replays": stats.graph_replays,
            "seconds_since_layout_start": time.perf_counter() - began,
        }
        rows.append(row)
        log(f"decode tp={tp} pcp={pcp} dcp={dcp} context={n}: {row['decode_ms_per_token']:.2f} ms/token "
            f"(reps {', '.join(f'{t:.2f}' for t in per_rep)}; mean {row['decode_ms_per_token_mean']:.2f}), KV capacity {row['kv_capacity_tokens']} tokens, "
            f"stored per rank {row['peak_tokens_stored_per_rank']}, graph replays {row['graph_replays']}, "
            f"{row['seconds_since_layout_start']:.1f} s since the layout started")
    del engine, model
    _release(device)
    return rows


# ------------------------------------------------------------------------------------------------ summary
def summarise(result: dict) -> None:
    """Add speedup/efficiency vs (1,1,1) for prefill/attention and ratios vs dcp = 1 for decode; print tables."""
    for part, key in (("prefill", "ttft_s"), ("attention", "layer_ms")):
        rows = result.get(part, [])
        base = {r["tokens"]: r[key] for r in rows if (r["tp"], r["pcp"]) == (1, 1)}
        if rows:
            print(f"\n{part}: {key}, speedup and efficiency = T(1 GPU) / (tp·pcp · T)")
            print("| tokens | tp | pcp | " + key + " | speedup | efficiency |\n|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            if r["tokens"] in base:
                r["speedup"] = base[r["tokens"]] / r[key]
                r["efficiency"] = r["speedup"] / (r["tp"] * r["pcp"])
            print(f"| {r['tokens']} | {r['tp']} | {r['pcp']} | {r[key]:.4g} | {r.get('speedup', float('nan')):.3f} "
                  f"| {r.get('efficiency', float('nan')):.3f} |")
    rows = result.get("decode_attention", [])
    base = {(r["tp"], r["pcp"], r["context"], r["batch"]): r["layer_ms"] for r in rows if r["dcp"] == 1}
    if rows:
        print("\ndecode_attention: one decode step through the attention layer, vs dcp = 1")
        print("| context | batch | tp | dcp | layer ms | vs dcp 1 | KV TB/s per rank |\n|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b = base.get((r["tp"], r["pcp"], r["context"], r["batch"]))
        if b is not None:
            r["time_vs_dcp1"] = r["layer_ms"] / b
        print(f"| {r['context']} | {r['batch']} | {r['tp']} | {r['dcp']} | {r['layer_ms']:.3f} "
              f"| {r.get('time_vs_dcp1', float('nan')):.3f} | {r['kv_tb_per_s']:.2f} |")
    rows = result.get("decode", [])
    base = {(r["tp"], r["pcp"], r["context"]): r for r in rows if r["dcp"] == 1}
    if rows:
        print("\ndecode: ms/token (median step), latency and KV capacity vs dcp = 1 at the same tp, pcp")
        print("| context | tp | dcp | ms/token | latency vs dcp 1 | KV capacity tokens | capacity vs dcp 1 "
              "| tokens stored per rank |\n|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        b = base.get((r["tp"], r["pcp"], r["context"]))
        if b is not None:
            r["latency_vs_dcp1"] = r["decode_ms_per_token"] / b["decode_ms_per_token"]
            r["capacity_vs_dcp1"] = r["kv_capacity_tokens"] / b["kv_capacity_tokens"]
        print(f"| {r['context']} | {r['tp']} | {r['dcp']} | {r['decode_ms_per_token']:.2f} "
              f"| {r.get('latency_vs_dcp1', float('nan')):.3f} | {r['kv_capacity_tokens']} "
              f"| {r.get('capacity_vs_dcp1', float('nan')):.3f} | {r['peak_tokens_stored_per_rank']} |")


def environment(device: torch.device) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "world_size": dist.get_world_size(), "backend": dist.get_backend(),
            "argv": sys.argv}
    if device.type == "cuda":
        from megacp.ops import available_backends

        info.update(gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                    nccl=".".join(map(str, torch.cuda.nccl.version())), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), attention_backends=available_backends("cuda"),
                    nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"))
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--parts", nargs="+", choices=["prefill", "attention", "decode_attention", "decode"],
                   default=["prefill", "attention", "decode_attention", "decode"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--decode-kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--tokens", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--prefill-layouts", type=_layout, nargs="+", default=[(1, 1, 1), (1, 2, 1), (2, 1, 1)])
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--decode-layouts", type=_layout, nargs="+", default=[(2, 1, 1), (2, 1, 2)])
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 16, 64], help="batches of decode_attention")
    p.add_argument("--new-tokens", type=int, default=33)
    p.add_argument("--kv-gib", type=float, default=16.0, help="KV cache per rank in the decode part")
    p.add_argument("--reserve-gib", type=float, default=16.0, help="memory kept for activations (max context)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="torch.profiler tables at the first --tokens (CUDA)")
    p.add_argument("--tiny", action="store_true", help="small shapes for a CPU dry run")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    if args.tiny:
        args.layers, args.hidden, args.heads, args.kv_heads, args.head_dim = 2, 64, 8, 2, 8
        args.intermediate, args.vocab, args.tokens, args.contexts = 128, 512, [256, 512], [256, 512]
        args.kv_gib, args.reserve_gib, args.new_tokens, args.decode_batch = 0.01, 0.0, 5, [1, 4]
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

    result: dict = {"benchmark": "multi_gpu", "env": environment(device),
                    "model": {"shape": "llama-3-8b" if not args.tiny else "tiny", "layers": args.layers,
                              "hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv_heads,
                              "decode_kv_heads": args.decode_kv_heads, "head_dim": args.head_dim,
                              "intermediate": args.intermediate, "vocab": args.vocab, "dtype": args.dtype}}
    benches = {"prefill": (bench_prefill, args.prefill_layouts), "attention": (bench_attention, args.prefill_layouts),
               "decode_attention": (bench_decode_attention, args.decode_layouts),
               "decode": (bench_decode, args.decode_layouts)}
    world = dist.get_world_size()
    for part in args.parts:
        fn, todo = benches[part]
        result[part] = []
        for layout in todo:
            if world % (layout[0] * layout[1]):
                log(f"{part}: layout {layout} does not fit a world of {world}; skipped")
                continue
            result[part] += fn(args, layout, device, dtype, log)
    if dist.get_rank() == 0:
        summarise(result)
        if args.json_out:
            os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
            with open(args.json_out, "w") as f:
                json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
