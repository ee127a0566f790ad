"""End to end on one GPU: megacp's engine vs ``transformers`` (sdpa attention), same weights, same dtype, same run.

The model is Llama-3-8B-shaped (hidden 4096, 32 query / 8 KV heads, head dim 128, MLP 14336, vocab 128256) with few
layers (``--layers``, default 4) and random weights, in bfloat16. Reported:

- TTFT for one prompt of each ``--prompt-lens`` (prefill of the whole prompt and the first sampled token),
- decode tokens/s at each ``--batch`` (prompts of ``--decode-prompt-len`` tokens, ``--new-tokens`` generated, greedy;
  tokens/s counts only the steps after the first token),
- ``ttft_ratio = megacp / transformers`` (target ≤ 0.98) and ``decode_speedup = megacp / transformers`` (≥ 2.0),
- ``weight_read_fraction``: per megacp decode step, the bytes that must be read (all weights + the batch's KV) over
  the step time, as a fraction of the device-to-device copy bandwidth measured in the same run (the physical limit
  of a memory-bound step), and megacp's CUDA-graph numbers (replays, capture time and memory),
- how many of the first greedy tokens agree (bf16: the two implementations round differently, so this is a sanity
  check, not a test).

    python bench/e2e.py --layers 4 --prompt-lens 8192 32768 --batch 1 16 64 --json-out e2e.json
    python bench/e2e.py --layers 32 --engines megacp --prompt-lens 8192 --batch 1 --json-out e2e32.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, environment, require_cuda  # noqa: E402


def build_checkpoint(path: str, layers: int, max_len: int) -> None:
    """Save a random Llama-3-8B-shaped checkpoint with ``layers`` layers to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=max_len,
        rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def _sync_time(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


class HF:
    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
        self.model = self.model.cuda().eval()
        self.config = lambda n: GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                                 eos_token_id=None, pad_token_id=0)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        x = torch.tensor(prompts, device="cuda")
        y = self.model.generate(x, attention_mask=torch.ones_like(x), generation_config=self.config(n))
        return y[:, x.shape[1]:].tolist()

    def ttft(self, prompt: list[int]) -> float:
        return _sync_time(lambda: self.generate([prompt], 1))

    def decode_tps(self, prompts: list[list[int]], n: int) -> float:
        first = _sync_time(lambda: self.generate(prompts, 1))
        total = _sync_time(lambda: self.generate(prompts, n))
        return len(prompts) * (n - 1) / max(total - first, 1e-9)


class Megacp:
    def __init__(self, path: str, max_batched: int, num_blocks: int, enforce_eager: bool = False):
        import torch.distributed as dist

        from megacp import parallel_state as ps
        from megacp.engine import LLMEngine
        from megacp.models import load_model

        if not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        ps.initialize_model_parallel(backend="gloo")
        self.model = load_model(path, torch.bfloat16, torch.device("cuda"))
        self.engine = LLMEngine(self.model, num_kv_blocks=num_blocks, block_size=16,
                                max_num_batched_tokens=max_batched, max_num_seqs=64, enforce_eager=enforce_eager)

    def generate(self, prompts: list[list[int]], n: int):
        from megacp.sampling import SamplingParams

        outs = self.engine.generate(prompts, SamplingParams(max_new_tokens=n, ignore_eos=True))
        return [o.output_ids for o in outs]

    def ttft(self, prompt: list[int]) -> float:
        torch.cuda.synchronize()
        self.generate([prompt], 1)
        return self.engine.stats.ttft_s[0]

    def decode_tps(self, prompts: list[list[int]], n: int) -> float:
        self.generate(prompts, n)
        return self.engine.stats.decode_tokens_per_s


def profile(name: str, eng, prompt: list[int], prompts: list[list[int]], n: int, chunk: int | None = None) -> None:
    """Where the time goes: GPU time per op of one long prefill and of a batch-1 decode (run megacp with
    ``--enforce-eager`` to see the decode step's kernels: a graph replay shows as one launch)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    def chunked() -> None:
        whole, eng.engine.max_num_batched_tokens = eng.engine.max_num_batched_tokens, chunk
        try:
            eng.ttft(prompt)
        finally:
            eng.engine.max_num_batched_tokens = whole

    parts = [("prefill", lambda: eng.ttft(prompt), "device_time_total"),
             ("decode", lambda: eng.decode_tps(prompts, n), "device_time_total")]
    if chunk and hasattr(eng, "engine"):
        parts.append((f"chunked prefill ({chunk}-token chunks)", chunked, "device_time_total"))
    for what, fn, key in parts:
        with torch_profiler_guard():
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
            print(f"--- profile {name} {what} (sorted by {key})", flush=True)
            print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60), flush=True)


class torch_profiler_guard:
    """Profiling is a diagnostic: a failure there must not lose the benchmark's numbers."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None:
            print(f"profiling failed: {type(exc).__name__}: {exc}", flush=True)
        return True


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), best of 5: the card's practical limit."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_sync_time(lambda: dst.copy_(src)) for _ in range(5))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / best


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--enforce-eager", action="store_true", help="megacp without CUDA graphs")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="also time megacp's TTFT with prompts prefilled in chunks of this many tokens (chunked "
                        "prefill over the cached context), reported as chunked_ttft_s and chunked_vs_whole")
    p.add_argument("--decode-prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json-out", default=None)
    p.add_argument("--engines", nargs="+", default=["megacp", "transformers"])
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one prefill and decode")
    args = p.parse_args(argv)
    require_cuda()
    g = torch.Generator().manual_seed(0)
    long_prompts = {n: torch.randint(3, 128000, (n,), generator=g).tolist() for n in args.prompt_lens}
    short = torch.randint(3, 128000, (max(args.batch), args.decode_prompt_len), generator=g).tolist()
    max_len = max(args.prompt_lens + [args.decode_prompt_len]) + args.new_tokens + 16
    result: dict = {"benchmark": "e2e", "env": environment(),
                    "model": {"shape": "llama-3-8b", "layers": args.layers, "dtype": "bfloat16"}, "results": {}}
    tokens = {}
    with tempfile.TemporaryDirectory() as path:
        build_checkpoint(path, args.layers, max_len)
        for name in args.engines:
            if name == "megacp":
                blocks = max(max(args.batch) * -(-(args.decode_prompt_len + args.new_tokens) // 16),
                             -(-max_len // 16)) + 16
                eng = Megacp(path, max_batched=max(args.prompt_lens + [args.decode_prompt_len * max(args.batch)]),
                             num_blocks=blocks, enforce_eager=args.enforce_eager)
            else:
                eng = HF(path)
            res: dict = {"ttft_s": {}, "decode_tokens_per_s": {}}
            tokens[name] = eng.generate([short[0]], 8)
            for n, prompt in long_prompts.items():
                eng.ttft(prompt)  # warm-up (kernel selection, allocator)
                res["ttft_s"][n] = _median([eng.ttft(prompt) for _ in range(args.reps)])
            if name == "megacp" and args.chunk_tokens:
                whole = eng.engine.max_num_batched_tokens
                eng.engine.max_num_batched_tokens = args.chunk_tokens  # the scheduler reads it every step
                res["chunked_ttft_s"], res["chunked_vs_whole"] = {}, {}
                for n, prompt in long_prompts.items():
                    eng.ttft(prompt)
                    res["chunked_ttft_s"][n] = _median([eng.ttft(prompt) for _ in range(args.reps)])
                    res["chunked_vs_whole"][n] = res["chunked_ttft_s"][n] / res["ttft_s"][n]
                eng.engine.max_num_batched_tokens = whole
            for b in args.batch:
                eng.decode_tps(short[:b], 4)  # warm-up
                res["decode_tokens_per_s"][b] = _median(
                    [eng.decode_tps(short[:b], args.new_tokens) for _ in range(args.reps)])
            if name == "megacp":
                st = eng.engine.stats
                res["cuda_graphs"] = {"status": st.cuda_graphs, "capture_s": st.graph_capture_s,
                                      "capture_bytes": st.graph_capture_bytes}
                # every weight is read once per step, except the embedding table (only the batch's rows)
                embed = eng.model.embed_tokens.weight
                weight_bytes = sum(p.numel() * p.element_size() for p in eng.model.parameters()) \
                    - embed.numel() * embed.element_size()
                kv_token_bytes = 2 * args.layers * 8 * 128 * 2  # K and V, 8 KV heads of 128, bf16, per token
                ctx = args.decode_prompt_len + args.new_tokens // 2  # mean context over the decode steps
                bw = copy_bandwidth()
                res["copy_bandwidth_bytes_per_s"] = bw
                res["weight_bytes"] = weight_bytes
                res["weight_read_fraction"] = {}
                for b, tps in res["decode_tokens_per_s"].items():
                    step_s = b / tps
                    res["weight_read_fraction"][b] = (weight_bytes + b * ctx * kv_token_bytes) / step_s / bw
            result["results"][name] = res
            print(name, res, flush=True)
            if args.profile:
                profile(name, eng, long_prompts[max(long_prompts)], short[:1], args.new_tokens, args.chunk_tokens)
            del eng
            torch.cuda.empty_cache()
    if {"megacp", "transformers"} <= set(result["results"]):
        m, t = result["results"]["megacp"], result["results"]["transformers"]
        result["ttft_ratio"] = {n: m["ttft_s"][n] / t["ttft_s"][n] for n in m["ttft_s"]}
        result["decode_speedup"] = {b: m["decode_tokens_per_s"][b] / t["decode_tokens_per_s"][b]
                                    for b in m["decode_tokens_per_s"]}
        a, b = tokens["megacp"][0], tokens["transformers"][0]
        result["greedy_agreement_first_8"] = next((i for i in range(8) if a[i] != b[i]), 8)
    emit(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
