"""The whole CP attention test matrix on ONE GPU: 8 gloo ranks sharing ``cuda:0`` (issue 6, GPU tests).

    PYTHONUNBUFFERED=1 torchrun --nproc-per-node 8 scripts/gpu_cp_matrix.py --json-out gpu_cp_matrix.json
    torchrun --nproc-per-node 8 scripts/gpu_cp_matrix.py --device cpu      # the same run on the CPU (a dry run)

NCCL will not put several ranks on one GPU, so every rank runs on ``cuda:0`` in gloo groups
(``initialize_model_parallel(..., backend="gloo")``); ``ParallelGroup`` stages the CUDA tensors of each collective
through host memory. The scenario is ``tests/test_cp_attention_dist.py``'s ``_scenario`` (a packed prefill, a mixed
chunked-prefill/decode step, five decode steps; every real output row and the ``select_logits_hidden`` rows checked
against causal SDPA over the request's whole sequence in float64; padding rows zero; each rank's paged cache holding
exactly its share), run for all 10 (tp, pcp, dcp) of that test with dp filling the 8 ranks, KV interleave sizes 1, 4
and the block size, in float32 and bfloat16, with the attention backend the device picks ("cuda" on a GPU: cuDNN /
FlashAttention / TE per shape, the Triton paged decode). Bars: float32 within the test's ``ATOL``; bfloat16 within
twice the error of single-device SDPA in bfloat16 on the same device (FlashAttention's tests' rule).

The fused prefill kernels take only half dtypes (``backends_cuda.fused_shapes_ok``), so in float32 prefill goes to the
"torch" reference on the GPU; decode runs the Triton paged kernel in every dtype (float32 without tf32). The summary
counts, per case, which kernels ran to show it.

Prints one line per case and, on rank 0, a JSON summary; exits 1 if any case failed. A rank whose check fails
mid-scenario prints why on stderr and leaves its peers waiting in a collective: they give up after
``--group-timeout-s`` and report it.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacp import parallel_state as ps  # noqa: E402
from megacp.ops import backends_common, backends_cuda, paged_decode  # noqa: E402
from tests import test_cp_attention_dist as matrix  # noqa: E402

WORLD = 8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def count_kernels(counts: collections.Counter) -> None:
    """Count the calls of each CUDA attention kernel in ``counts`` (names: "cudnn", "flash", "te", "torch fallback",
    "triton paged decode"). On the CPU nothing is counted: the "torch" backend is chosen directly."""

    def counted(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    # Module attributes looked up at call time: the "cuda" backend's per-shape dispatch table, its float32 fallback,
    # and the paged decode kernel.
    for name, fn in list(backends_cuda._KERNELS.items()):
        backends_cuda._KERNELS[name] = counted(name, fn)
    backends_common._reference = counted("torch fallback", backends_common._reference)
    paged_decode.paged_decode_with_lse = counted("triton paged decode", paged_decode.paged_decode_with_lse)


def run_case(tp: int, pcp: int, dcp: int, dtype: str, interleave: int, device: torch.device, head_dim: int,
             counts: collections.Counter, world: int = WORLD, num_heads: int = matrix.NUM_HEADS) -> dict:
    """One scenario on this rank, then every rank's result gathered into one row (the same on all ranks).

    Also ``scripts/nccl_check.py``'s attention case (its own world size, 8 heads so that tp = 8 fits).
    """
    counts.clear()
    start = time.perf_counter()
    try:
        mine = matrix._scenario(tp, pcp, dcp, interleave, device=device, dtype=DTYPES[dtype], head_dim=head_dim,
                                num_heads=num_heads)
        mine["error"] = None
    except Exception as exc:  # noqa: BLE001  (an assertion of the scenario, or a peer's collective timing out)
        mine = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        # now, on this rank: if the peers are left waiting in a collective, the gathered row may never come
        print(f"rank {dist.get_rank()} tp={tp} pcp={pcp} dcp={dcp} {dtype} interleave={interleave}: {mine['error']}",
              file=sys.stderr, flush=True)
    mine["kernels"] = dict(counts)
    mine["seconds"] = time.perf_counter() - start
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)

    fails = [f"rank {r}: {g['error']}" for r, g in enumerate(gathered) if g["error"]]
    ok = [g for g in gathered if not g["error"]]
    final_lengths = [1 + 5 + 5, 3 + 2 + 5, 2 * pcp - 1 + 5, 37 + 11 + 5, 100 + 1 + 5, 2 * pcp + 1 + 5]
    expect = sum(final_lengths) * (world // (pcp * dcp))  # each (dp, kv-head) replica's CP group stores every token once
    if not fails and sum(g["owned"] for g in ok) != expect:
        fails.append(f"ranks own {sum(g['owned'] for g in ok)} tokens in all, expected {expect}")
    kernels: collections.Counter = collections.Counter()
    for g in gathered:
        kernels.update(g["kernels"])
    single = max((g["single_device_err"] for g in ok), default=float("nan"))
    return {
        "tp": tp, "pcp": pcp, "dcp": dcp, "dp": world // (tp * pcp), "dtype": dtype, "interleave": interleave,
        "num_kv_heads": matrix._num_kv_heads(tp, dcp),
        "max_err": max((g["max_err"] for g in ok), default=float("nan")),
        "single_device_err": single,
        "bar": matrix.ATOL if dtype == "float32" else 2 * single,
        "kernels": dict(sorted(kernels.items())),
        "seconds": round(max(g["seconds"] for g in gathered), 2),
        "passed": not fails, "fails": fails,
    }


def environment(device: torch.device) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "device": str(device), "world_size": dist.get_world_size(),
            "backend": dist.get_backend()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), triton_paged_decode=paged_decode.available(device),
                    te=backends_cuda.te_unavailable_reason() or "ok")
    return info


def report(summary: dict, json_out: str | None) -> None:
    """Print the summary as JSON and write it to ``json_out`` (rank 0 calls it)."""
    print(json.dumps(summary, indent=1), flush=True)
    if json_out:
        os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
        with open(json_out, "w") as f:
            json.dump(summary, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--head-dim", type=int, default=128, help="a multiple of 8 up to 256 lets the fused kernels run")
    p.add_argument("--group-timeout-s", type=float, default=90.0,
                   help="how long a rank waits in a model-parallel collective before reporting a failure")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "0")) != WORLD:
        raise ValueError(f"the matrix needs {WORLD} ranks: run it as torchrun --nproc-per-node {WORLD} {sys.argv[0]}")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if args.device == "cuda":
        torch.cuda.set_device(0)  # every rank on the one GPU
        device = torch.device("cuda", 0)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    # The world group gathers the results, so it must outlive a stuck model-parallel collective.
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.group_timeout_s * 4))
    rank = dist.get_rank()
    counts: collections.Counter = collections.Counter()
    count_kernels(counts)

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    rows = []
    for tp, pcp, dcp in matrix.CONFIGS:
        ps.initialize_model_parallel(tp, pcp, dcp, WORLD // (tp * pcp), backend="gloo",
                                     timeout=timedelta(seconds=args.group_timeout_s))
        try:
            for dtype in args.dtypes:
                for interleave in matrix.INTERLEAVES:
                    row = run_case(tp, pcp, dcp, dtype, interleave, device, args.head_dim, counts)
                    rows.append(row)
                    log(f"tp={tp} pcp={pcp} dcp={dcp} dp={row['dp']} {dtype:8s} interleave={interleave}: max err "
                        f"{row['max_err']:.2e} (single-device {row['single_device_err']:.2e}, bar {row['bar']:.2e}) "
                        f"{row['seconds']:.1f}s {row['kernels']} "
                        f"{'PASS' if row['passed'] else 'FAIL ' + '; '.join(row['fails'][:2])}")
        finally:
            ps.destroy_model_parallel()

    failed = sum(not r["passed"] for r in rows)
    summary = {"env": environment(device), "head_dim": args.head_dim, "num_heads": matrix.NUM_HEADS,
               "cases": len(rows), "failed": failed, "result": "PASS" if not failed else "FAIL", "rows": rows}
    if rank == 0:
        report(summary, args.json_out)
        log(f"gpu_cp_matrix: {failed} failed of {len(rows)}")
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
