"""End to end on one GPU: megacp's engine vs ``transformers`` (sdpa attention), same weights, same dtype, same run.

The model (``--model-shape``) is Llama-3-8B-shaped (hidden 4096, 32 query / 8 KV heads, head dim 128, MLP 14336, vocab
128256) or DeepSeek-V2-Lite-shaped (hidden 2048, 16 heads, MLA with kv_lora_rank 512, no q-LoRA, rope 64, nope 128,
v 128; 64 routed + 2 shared experts, top-6, MoE intermediate 1408, the first layer dense (10944), vocab 102400, 27
layers in the real model; plain RoPE instead of its YaRN, which changes no cost), with few layers (``--layers``,
default 4) and random weights, in bfloat16; ``--override KEY=VALUE`` changes any config field (tiny CPU runs:
``--device cpu``). Reported:

- TTFT for one prompt of each ``--prompt-lens`` (prefill of the whole prompt and the first sampled token),
- decode tokens/s at each ``--batch`` (prompts of ``--decode-prompt-len`` tokens, ``--new-tokens`` generated, greedy;
  tokens/s counts only the steps after the first token),
- ``ttft_ratio = megacp / transformers`` (target ≤ 0.98) and ``decode_speedup = megacp / transformers`` (≥ 2.0),
  and the same for every peer in ``vs``: ``transformers`` (eager, dynamic cache), ``transformers-static`` (static
  cache, decode forward compiled by ``generate``: CUDA graphs; its compile time is ``compile_s``, not in tokens/s)
  and ``megacp-sync`` (megacp with every step synchronous: the same-run gain of async scheduling),
- ``weight_read_fraction``: per megacp decode step, the bytes that must be read (all weights + the batch's KV) over
  the step time, as a fraction of the device-to-device copy bandwidth measured in the same run (the higher of a
  reading before the engines and one after megacp's decode, both in ``copy_bandwidth_readings``: the physical limit
  of a memory-bound step; for MoE shapes only the experts a batch is expected to touch under uniform routing,
  ``E·(1 − (1 − k/E)^B)`` per layer, count), and megacp's CUDA-graph numbers (replays, capture time and memory)
  and whether it ran with ``--async-scheduling`` (``async_scheduling``: on, steps launched ahead),
- ``model.kv_cache_bytes_per_token``: what one token's cache costs over all layers (K and V per KV head, or MLA's one
  latent row of ``kv_lora_rank + rope``),
- how many of the first greedy tokens agree (bf16: the two implementations round differently, so this is a sanity
  check, not a test).

    python bench/e2e.py --layers 4 --prompt-lens 8192 32768 --batch 1 16 64 --json-out e2e.json
    python bench/e2e.py --layers 32 --engines megacp --prompt-lens 8192 --batch 1 --json-out e2e32.json
    python bench/e2e.py --model-shape deepseek-v2-lite --layers 4 --json-out e2e_dsv2lite.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import copy_bandwidth, emit, environment, require_cuda  # noqa: E402

SHAPES = {  # transformers config class and fields of each --model-shape
    "llama-3-8b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0)),
    "deepseek-v2-lite": ("DeepseekV2Config", dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_attention_heads=16, num_key_value_heads=16,
        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1408,
        first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0, rms_norm_eps=1e-6, rope_theta=10000.0)),
}


def model_config(shape: str, layers: int, max_len: int, overrides: dict):
    """The transformers config of ``shape`` with ``layers`` layers and ``overrides`` applied."""
    import transformers

    cls_name, fields = SHAPES[shape]
    fields = {**fields, **overrides}
    return getattr(transformers, cls_name)(num_hidden_layers=layers, max_position_embeddings=max_len, bos_token_id=1,
                                           eos_token_id=2, tie_word_embeddings=False, **fields)


def build_checkpoint(path: str, config, device: str) -> None:
    """Save a random checkpoint of ``config`` (bfloat16) to ``path``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    _empty_cache()


def kv_cache_bytes_per_token(config) -> int:
    """Cache bytes of one token over all layers in bf16: MLA's latent row, or K and V of every KV head."""
    if getattr(config, "kv_lora_rank", None):
        return config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 2
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2


def step_weight_bytes(config, all_weight_bytes: int, batch: int) -> float:
    """Weight bytes one decode step of ``batch`` sequences reads: all of them for a dense model; for MoE the experts
    expected to be touched under uniform routing, ``E·(1 − (1 − k/E)^B)`` of each MoE layer's ``E``."""
    E = getattr(config, "n_routed_experts", None)
    if not E:
        return all_weight_bytes
    k = config.num_experts_per_tok
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    expert_bytes = 3 * config.hidden_size * config.moe_intermediate_size * 2
    touched = E * (1 - (1 - k / E) ** batch)
    return all_weight_bytes - moe_layers * (E - touched) * expert_bytes


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync_time(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


class HF:
    def __init__(self, path: str, device: str = "cuda"):
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
        self.model = self.model.to(device).eval()
        # cache_implementation="dynamic" named explicitly: on the GPU image (transformers 5.17) generate without it
        # ran a 4-layer decode step in 60 ms instead of 7.5 ms (docs/benchmarks.md, 2026-12-03 b).
        self.config = lambda n: GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                                 eos_token_id=None, pad_token_id=0, cache_implementation="dynamic")

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        x = torch.tensor(prompts, device=self.device)
        y = self.model.generate(x, attention_mask=torch.ones_like(x), generation_config=self.config(n))
        return y[:, x.shape[1]:].tolist()

    def ttft(self, prompt: list[int]) -> float:
        return _sync_time(lambda: self.generate([prompt], 1))

    def decode_tps(self, prompts: list[list[int]], n: int) -> float:
        first = _sync_time(lambda: self.generate(prompts, 1))
        total = _sync_time(lambda: self.generate(prompts, n))
        return len(prompts) * (n - 1) / max(total - first, 1e-9)


class HFStatic(HF):
    """``transformers`` at its fastest on one GPU: ``cache_implementation="static"``, with which ``generate``
    compiles the decode forward (transformers 5.x: ``torch.compile(mode="reduce-overhead")``, i.e. CUDA graphs) on
    CUDA devices. transformers compiles only there (``_valid_auto_compile_criteria``), so on the CPU this is the static
    cache uncompiled (``compile_skipped`` says so).

    The static cache is sized per call: ``decode_cache_len`` for every decode call (so the compiled step and its
    graphs are reused across the warm-up and the timed runs; a new batch size compiles once more, in its warm-up),
    the prompt + 1 for a TTFT call. transformers keeps the largest size it has seen (``_previous_max_cache_length``),
    which after a 32k TTFT would give batch 64 a 32k cache; we reset it before each call.
    """

    def __init__(self, path: str, device: str, decode_cache_len: int):
        super().__init__(path, device)
        from transformers import GenerationConfig

        self.decode_cache_len = decode_cache_len
        self.static_config = lambda n, cache_len: GenerationConfig(
            do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0,
            cache_implementation="static", max_cache_len=cache_len)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], n: int, cache_len: int | None = None) -> list[list[int]]:
        x = torch.tensor(prompts, device=self.device)
        self.model._previous_max_cache_length = -1
        config = self.static_config(n, cache_len or max(self.decode_cache_len, x.shape[1] + n))
        y = self.model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
        return y[:, x.shape[1]:].tolist()

    def ttft(self, prompt: list[int]) -> float:
        return _sync_time(lambda: self.generate([prompt], 1, cache_len=len(prompt) + 1))

    def compiled(self) -> bool:
        """Whether ``generate`` compiled the decode forward (it keeps the compiled call on the model)."""
        return hasattr(self.model, "_compiled_call")


class Megacp:
    """megacp on one rank. It initialises ``parallel_state`` for the process: ``close()`` (which ``main`` calls
    whatever happens) destroys it again, so a later engine, test or caller in the same process starts clean."""

    def __init__(self, path: str, max_batched: int, num_blocks: int, enforce_eager: bool = False,
                 device: str = "cuda", async_scheduling: bool = True):
        import torch.distributed as dist

        from megacp import parallel_state as ps
        from megacp.engine import LLMEngine
        from megacp.models import load_model

        if not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        ps.initialize_model_parallel(backend="gloo")
        try:
            self.model = load_model(path, torch.bfloat16, torch.device(device))
            self.engine = LLMEngine(self.model, num_kv_blocks=num_blocks, block_size=16,
                                    max_num_batched_tokens=max_batched, max_num_seqs=64,
                                    enforce_eager=enforce_eager, async_scheduling=async_scheduling)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Drop the engine (its CUDA graphs first) and destroy the parallel state ``__init__`` made."""
        from megacp import parallel_state as ps

        self.engine = None
        ps.destroy_model_parallel()

    def generate(self, prompts: list[list[int]], n: int):
        from megacp.sampling import SamplingParams

        outs = self.engine.generate(prompts, SamplingParams(max_new_tokens=n, ignore_eos=True))
        return [o.output_ids for o in outs]

    def ttft(self, prompt: list[int]) -> float:
        _sync()
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


def _parse_override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as an int, a float, true/false/none, or else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--override {text!r}: use KEY=VALUE, e.g. hidden_size=64")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False, "none": None}.get(value.lower(), value)


ENGINES = ("megacp", "megacp-sync", "transformers", "transformers-static")


def decode_kernel_counts(model, prompt: list[int], layers: int, steps: int = 8) -> dict:
    """Kernels per batch-1 pure-decode step of megacp (an eager engine on the same model; torch.profiler's CUDA
    events), with the fused decode kernels (megacp/ops/decode_fused.py) on and off: ``{"fused": {...},
    "unfused": {...}}``, each ``kernels_per_step`` (launches, copies and memsets excluded, which are
    ``copies_per_step``), ``per_layer`` (per step / layers: includes the embedding, final norm, LM head and sampling,
    so an upper bound) and the ``top`` kernel names per step. One step = (the run of 1 + ``steps`` tokens − the run of
    1 token) / ``steps``. A CPU model counts its aten ops instead (``counted`` says which; a smoke test of this
    function)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from megacp.engine import LLMEngine
    from megacp.sampling import SamplingParams

    engine = LLMEngine(model, num_kv_blocks=-(-(len(prompt) + steps + 1) // 16) + 2, block_size=16,
                       max_num_batched_tokens=len(prompt), max_num_seqs=1, enforce_eager=True)

    cuda = next(model.parameters()).is_cuda

    def gpu_events(n: int) -> dict[str, int]:
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            engine.generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))
            _sync()
        names: dict[str, int] = {}
        for e in prof.events():
            if (e.device_type == DeviceType.CUDA) if cuda else (e.name.startswith("aten::") and e.cpu_parent is None):
                names[e.name] = names.get(e.name, 0) + 1
        return names

    # the layers read $MEGACP_FUSED_DECODE once, when built: switch the built model's layers instead
    switches = [m for m in model.modules() if hasattr(m, "fused_decode")]
    saved, out = [m.fused_decode for m in switches], {}
    try:
        for mode, flag in (("fused", True), ("unfused", False)):
            for m in switches:
                m.fused_decode = flag
            engine.generate([prompt], SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up (Triton compiles)
            one, more = gpu_events(1), gpu_events(1 + steps)
            per = {k: (more.get(k, 0) - one.get(k, 0)) / steps for k in more}
            copy = {k: c for k, c in per.items() if k.startswith(("Memcpy", "Memset"))}
            kern = {k: c for k, c in per.items() if k not in copy and c > 0}
            out[mode] = {"counted": "cuda kernels" if cuda else "top-level cpu aten ops",
                         "kernels_per_step": sum(kern.values()), "copies_per_step": sum(copy.values()),
                         "per_layer": sum(kern.values()) / max(layers, 1),
                         "top": dict(sorted(kern.items(), key=lambda kv: -kv[1])[:25])}
    finally:
        for m, flag in zip(switches, saved):
            m.fused_decode = flag
    del engine
    return out


def static_compile_report(eng: HFStatic, short: list[list[int]], batches: list[int], warmup_s: dict) -> dict:
    """How transformers-static compiled: whether it did, and the compile time per batch size (its warm-up minus the
    same call once compiled), reported apart from tokens/s."""
    if not eng.compiled():
        return {"compiled": False, "compile_skipped": f"transformers' generate compiles the decode forward only on "
                                                      f"CUDA/XPU devices, not on {eng.device}"}
    again = {b: _sync_time(lambda: eng.decode_tps(short[:b], 4)) for b in batches}
    return {"compiled": True, "compile_s": {b: max(warmup_s[b] - again[b], 0.0) for b in batches}}


def peer_ratios(results: dict, tokens: dict) -> dict:
    """megacp / each peer: ``vs[peer] = {ttft_ratio, decode_speedup, greedy_agreement_first_8}``; the top-level
    ``ttft_ratio`` / ``decode_speedup`` / ``greedy_agreement_first_8`` stay megacp / eager transformers."""
    if "megacp" not in results:
        return {}
    m, out = results["megacp"], {"vs": {}}
    for peer in (name for name in ENGINES if name != "megacp" and name in results):
        t = results[peer]
        ours, theirs = tokens["megacp"][0], tokens[peer][0]
        out["vs"][peer] = {
            "ttft_ratio": {n: m["ttft_s"][n] / t["ttft_s"][n] for n in m["ttft_s"]},
            "decode_speedup": {b: m["decode_tokens_per_s"][b] / t["decode_tokens_per_s"][b]
                               for b in m["decode_tokens_per_s"]},
            "greedy_agreement_first_8": next((i for i in range(8) if ours[i] != theirs[i]), 8),
        }
    if "transformers" in out["vs"]:
        out.update(out["vs"]["transformers"])
    return out


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--enforce-eager", action="store_true", help="megacp without CUDA graphs")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="megacp launches each decode step before reading the previous step's ids back (default on, "
                        "as the engine)")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="also time megacp's TTFT with prompts prefilled in chunks of this many tokens (chunked "
                        "prefill over the cached context), reported as chunked_ttft_s and chunked_vs_whole")
    p.add_argument("--decode-prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json-out", default=None)
    p.add_argument("--engines", nargs="+", default=["megacp", "transformers"], choices=list(ENGINES),
                   help="transformers-static: static cache + the decode forward compiled by generate (CUDA); "
                        "megacp-sync: megacp with --no-async-scheduling, a peer (same-run A/B of async scheduling)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one prefill and decode")
    p.add_argument("--count-kernels", action="store_true",
                   help="megacp: kernels per batch-1 decode step with the fused decode kernels on and off (CUDA)")
    p.add_argument("--model-shape", default="llama-3-8b", choices=sorted(SHAPES))
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config fields to change, e.g. hidden_size=64 n_routed_experts=4 (tiny runs)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a tiny smoke run (no bandwidth numbers)")
    args = p.parse_args(argv)
    if args.device == "cuda":
        require_cuda()
    max_len = max(args.prompt_lens + [args.decode_prompt_len]) + args.new_tokens + 16
    overrides = dict(_parse_override(o) for o in args.override)
    config = model_config(args.model_shape, args.layers, max_len, overrides)
    g = torch.Generator().manual_seed(0)
    top = min(config.vocab_size, 128000)
    long_prompts = {n: torch.randint(3, top, (n,), generator=g).tolist() for n in args.prompt_lens}
    short = torch.randint(3, top, (max(args.batch), args.decode_prompt_len), generator=g).tolist()
    result: dict = {"benchmark": "e2e", "env": environment(),
                    "model": {"shape": args.model_shape, "layers": args.layers, "dtype": "bfloat16",
                              "overrides": overrides, "kv_cache_bytes_per_token": kv_cache_bytes_per_token(config)},
                    "results": {}}
    tokens = {}
    # the copy bandwidth read before any engine and again after megacp's decode: the limit is the higher reading
    # (one reading alone moved by 3% between runs on one card)
    bw_start = copy_bandwidth() if args.device == "cuda" and "megacp" in args.engines else None
    with tempfile.TemporaryDirectory() as path:
        build_checkpoint(path, config, args.device)
        for name in args.engines:
            if name in ("megacp", "megacp-sync"):  # megacp-sync: the same engine, every step synchronous
                blocks = max(max(args.batch) * -(-(args.decode_prompt_len + args.new_tokens) // 16),
                             -(-max_len // 16)) + 16
                eng = Megacp(path, max_batched=max(args.prompt_lens + [args.decode_prompt_len * max(args.batch)]),
                             num_blocks=blocks, enforce_eager=args.enforce_eager, device=args.device,
                             async_scheduling=args.async_scheduling and name == "megacp")
            elif name == "transformers-static":
                eng = HFStatic(path, args.device, decode_cache_len=args.decode_prompt_len + args.new_tokens)
            else:
                eng = HF(path, args.device)
            try:
                res: dict = {"ttft_s": {}, "decode_tokens_per_s": {}, "warmup_s": {}}
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
                    # warm-up (transformers-static: compiling the decode step for this batch size), kept out of tokens/s
                    res["warmup_s"][b] = _sync_time(lambda: eng.decode_tps(short[:b], 4))
                    res["decode_tokens_per_s"][b] = _median(
                        [eng.decode_tps(short[:b], args.new_tokens) for _ in range(args.reps)])
                if name == "transformers-static":
                    res.update(static_compile_report(eng, short, args.batch, res["warmup_s"]))
                if name == "megacp":
                    st = eng.engine.stats
                    runner = eng.engine.graph_runner
                    res["cuda_graphs"] = {"status": st.cuda_graphs, "capture_s": st.graph_capture_s,
                                          "capture_bytes": st.graph_capture_bytes,
                                          # 1: the step is one graph; more: pieces cut around eager MoE blocks
                                          "pieces": sorted({len(g.graph.pieces) for g in runner.graphs.values()})
                                          if runner is not None else []}
                    res["async_scheduling"] = {"on": st.async_scheduling, "async_steps": st.async_steps}
                if name == "megacp" and args.count_kernels and args.device == "cuda":
                    res["decode_kernels"] = decode_kernel_counts(eng.model, short[0], args.layers)
                if name == "megacp" and args.device == "cuda":
                    # every weight is read once per step, except the embedding table (only the batch's rows)
                    embed = eng.model.embed_tokens.weight
                    weight_bytes = sum(p.numel() * p.element_size() for p in eng.model.parameters()) \
                        - embed.numel() * embed.element_size()
                    kv_token_bytes = kv_cache_bytes_per_token(config)
                    ctx = args.decode_prompt_len + args.new_tokens // 2  # mean context over the decode steps
                    readings = [bw_start, copy_bandwidth()]
                    bw = max(readings)
                    res["copy_bandwidth_bytes_per_s"] = bw
                    res["copy_bandwidth_readings"] = readings
                    res["weight_bytes"] = weight_bytes
                    res["weight_read_fraction"] = {}
                    for b, tps in res["decode_tokens_per_s"].items():
                        step_s = b / tps
                        step_bytes = step_weight_bytes(config, weight_bytes, b) + b * ctx * kv_token_bytes
                        res["weight_read_fraction"][b] = step_bytes / step_s / bw
                result["results"][name] = res
                print(name, res, flush=True)
                if args.profile:
                    profile(name, eng, long_prompts[max(long_prompts)], short[:1], args.new_tokens, args.chunk_tokens)
            finally:
                if isinstance(eng, Megacp):
                    eng.close()
            del eng
            _empty_cache()
    result.update(peer_ratios(result["results"], tokens))
    emit(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
