"""MLA prefill attention on CUDA: qk_head_dim ≠ v_head_dim (DeepSeek: 192 / 128), every backend, same run.

For each case (a causal prompt of T tokens, or a packed batch of prompts) and each CUDA backend it times
``attention_with_lse`` with V of 128 columns as it is (``native``: TE / cuDNN take it when they can,
``backends_common._NATIVE_V_DIM`` records whether they did; FlashAttention is padded inside) and with V zero-padded
to 192 by the caller (``padded``, the pad and the slice included), next to the equal-dims 192 / 192 call
(``equal_dims``, what padding costs at most). TFLOP/s count the unmasked (query, key) pairs: 2·H·(192 + 128) per
pair. ``rel_diff`` is each result against the first backend's native one.

    python bench/prefill_mla.py --tokens 8192 32768 --json-out prefill_mla.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, environment, require_cuda, time_ms  # noqa: E402
from megacp.ops import attention_with_lse, available_backends, backends_common  # noqa: E402


def case_inputs(lens: list[int], heads: int, dq: int, dv: int) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(sum(lens))
    T = sum(lens)
    q, k = (torch.randn(T, heads, dq, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    v = torch.randn(T, heads, dv, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    host = ([0] + torch.tensor(lens).cumsum(0).tolist(),) * 2
    return q, k, v, cu, host


def bench_case(lens: list[int], args: argparse.Namespace, backends: list[str]) -> list[dict]:
    q, k, v, cu, host = case_inputs(lens, args.heads, args.qk_head_dim, args.v_head_dim)
    scale = args.qk_head_dim ** -0.5
    pairs = sum(n * (n + 1) // 2 for n in lens)
    flops = 2 * args.heads * (args.qk_head_dim + args.v_head_dim) * pairs
    dv = args.v_head_dim
    v_pad = F.pad(v, (0, args.qk_head_dim - dv))

    def call(name: str, mode: str):
        if mode == "native":
            return lambda: attention_with_lse(q, k, v, cu, cu, True, scale, backend=name, host_cu_seqlens=host)[0]
        if mode == "padded":
            return lambda: attention_with_lse(q, k, F.pad(v, (0, args.qk_head_dim - dv)), cu, cu, True, scale,
                                              backend=name, host_cu_seqlens=host)[0][..., :dv].contiguous()
        return lambda: attention_with_lse(q, k, v_pad, cu, cu, True, scale, backend=name, host_cu_seqlens=host)[0]

    rows, first = [], None
    for name in backends:
        for mode in ("native", "padded", "equal_dims"):
            fn = call(name, mode)
            try:
                out = fn()
                ms = time_ms(fn, warmup=2, reps=args.reps)
            except Exception as e:  # noqa: BLE001  (a backend that refuses the shape: recorded, not fatal)
                rows.append({"lens": lens, "backend": name, "mode": mode, "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            out = out[..., :dv].float()
            first = out if first is None else first
            rows.append({"lens": lens, "backend": name, "mode": mode, "ms": ms, "tflops": flops / ms / 1e9,
                         "native_v_dim": dict(backends_common._NATIVE_V_DIM) if mode == "native" else None,
                         "rel_diff": ((out - first).norm() / first.norm()).item()})
    del q, k, v, v_pad
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768], help="single causal prompts")
    p.add_argument("--batch-cases", nargs="*", default=["4x4096"], help="BATCHxTOKENS packed causal prompts")
    p.add_argument("--heads", type=int, default=16, help="DeepSeek-V2-Lite: 16")
    p.add_argument("--qk-head-dim", type=int, default=192)
    p.add_argument("--v-head-dim", type=int, default=128)
    p.add_argument("--backends", nargs="+", default=None, help="default: every CUDA backend available")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    require_cuda()
    backends = args.backends or [b for b in ("cuda", "te", "cudnn", "flash") if b in available_backends("cuda")]
    cases = [[t] for t in args.tokens] + [[int(t)] * int(b) for b, t in (c.split("x") for c in args.batch_cases)]
    rows = [r for lens in cases for r in bench_case(lens, args, backends)]
    result = {"benchmark": "prefill_mla", "env": environment(),
              "shape": {"heads": args.heads, "qk_head_dim": args.qk_head_dim, "v_head_dim": args.v_head_dim,
                        "dtype": "bfloat16", "causal": True},
              "native_v_dim": dict(backends_common._NATIVE_V_DIM), "results": rows}
    emit(result, args.json_out)
    print("lens            backend mode        ms      TFLOP/s  rel_diff", flush=True)
    for r in rows:
        what = (f"{r['ms']:9.3f} {r['tflops']:8.1f}  {r['rel_diff']:.1e}" if "ms" in r else r["error"][:70])
        print(f"{str(r['lens'])[:15]:15} {r['backend']:7} {r['mode']:10} {what}", flush=True)
    print(f"native V head dim: {backends_common._NATIVE_V_DIM}", flush=True)
    return result


if __name__ == "__main__":
    main()
