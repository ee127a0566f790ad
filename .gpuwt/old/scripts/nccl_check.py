"""Correctness under a real torchrun world (NCCL on GPUs, gloo on CPU): CP attention matrix + end-to-end greedy.

    torchrun --nproc-per-node 2 scripts/nccl_check.py --device cuda --json-out nccl_check.json
    torchrun --nproc-per-node 2 scripts/nccl_check.py --device cpu      # the same checks on gloo (dry run)

**attention**: ``tests/test_cp_attention_dist.py``'s ``_scenario`` (through ``scripts/gpu_cp_matrix.py``'s
``run_case``, 8 query heads of dim 128) for every (tp, pcp, dcp) that fits the world (dp fills the rest), in float32
and bfloat16, and for KV interleave sizes 1, 4 and the block size: ``ContextParallelAttention`` runs a step sequence
(a packed prefill, a mixed chunked-prefill/decode step, five decode steps) and every real output row and every
``select_logits_hidden`` row is compared with single-device causal attention over the request's whole sequence in
float64; padding rows must be zero and every rank's paged cache must hold exactly its share of every sequence.
Bars: float32 within the test's ``ATOL``; bfloat16 within twice the error of single-device SDPA in bfloat16 on the
same device (FlashAttention's tests' rule). A rank whose check fails mid-scenario prints why at once, and its peers
may then wait in a collective until the group times out.

**e2e**: ``examples/infer_llama.py``'s ``main`` (the CLI, in process, so the NCCL world is set up once) for the
layouts of ``E2E_RUNS`` with tp·pcp = world (2 ranks: (tp, pcp, dcp) = (1,2,1), (2,1,1), (2,1,2); more for 4 and 8)
on tiny float32 checkpoints (Llama with 1 KV head, Qwen2 with 2 KV heads where dcp = 1, Mixtral MoE with 1 KV head,
also with expert parallelism); greedy ids must equal ``transformers``' greedy ``generate`` (float32, CPU).

**gather**: ``ParallelGroup.all_gather`` of decode-sized tensors (float32 and bfloat16, ``-inf`` and NaN included,
along dims 0 and 1, eagerly and replayed in a CUDA graph with new data) is bit for bit NCCL's
``all_gather_into_tensor``, and on NCCL + CUDA it went through symmetric memory (``megacp/symm_gather.py``; the
check reports it when the path is off). The e2e and attention parts run it inside the model too.

**teardown**: ``destroy_model_parallel`` returns while an ``LLMEngine`` whose decode graphs recorded the groups'
collectives is still referenced (pytorch#115388: ``ncclCommDestroy`` blocks for ever on a live captured graph, so
megacp releases the graphs first); a hang ends the process after 120 s with its stack printed.

Prints one line per check and a JSON summary (rank 0); exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import faulthandler
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacp import parallel_state as ps  # noqa: E402
from scripts import gpu_cp_matrix  # noqa: E402
from tests import test_cp_attention_dist as matrix  # noqa: E402

NUM_HEADS = 8  # so that tp = 8 fits on 8 ranks
HEAD_DIM = 128
DTYPES = gpu_cp_matrix.DTYPES


def layouts(world: int) -> list[tuple[int, int, int]]:
    """Every (tp, pcp, dcp) with tp·pcp | world and dcp | tp (dp = world / (tp·pcp) fills the rest)."""
    out = []
    for tp in (1, 2, 4, 8):
        for pcp in (1, 2, 4, 8):
            if world % (tp * pcp):
                continue
            out += [(tp, pcp, dcp) for dcp in (1, 2, 4, 8) if tp % dcp == 0]
    return out


def check_attention(world: int, device: torch.device, dtypes: list[str], log) -> list[dict]:
    """One row per (layout, dtype, interleave), every rank's result gathered (``gpu_cp_matrix.run_case``'s keys)."""
    counts: collections.Counter = collections.Counter()  # which attention kernels each case ran
    gpu_cp_matrix.count_kernels(counts)
    results = []
    for tp, pcp, dcp in layouts(world):
        ps.initialize_model_parallel(tp, pcp, dcp, world // (tp * pcp))
        try:
            for dtype in dtypes:
                for interleave in matrix.INTERLEAVES:
                    row = gpu_cp_matrix.run_case(tp, pcp, dcp, dtype, interleave, device, HEAD_DIM, counts,
                                                 world=world, num_heads=NUM_HEADS)
                    results.append(row)
                    log(f"attention tp={tp} pcp={pcp} dcp={dcp} dp={row['dp']} {dtype:8s} interleave={interleave:2d}: "
                        f"max err {row['max_err']:.2e} (single-device {row['single_device_err']:.2e}) "
                        f"{'PASS' if row['passed'] else 'FAIL ' + '; '.join(row['fails'][:3])}")
        finally:
            ps.destroy_model_parallel()
    return results


E2E_RUNS = [  # (model kind, tp, pcp, dcp, expert parallel)
    ("llama", 1, 2, 1, False), ("llama", 2, 1, 1, False), ("llama", 2, 1, 2, False),
    ("qwen2", 1, 2, 1, False), ("qwen2", 2, 1, 1, False),
    ("mixtral", 1, 2, 1, False), ("mixtral", 2, 1, 1, False), ("mixtral", 2, 1, 2, False),
    ("mixtral", 2, 1, 1, True),
    # 4 ranks
    ("llama", 1, 4, 1, False), ("llama", 2, 2, 2, False), ("llama", 4, 1, 4, False), ("qwen2", 2, 2, 1, False),
    ("mixtral", 2, 2, 1, False), ("mixtral", 4, 1, 2, False), ("mixtral", 2, 2, 1, True),
    # 8 ranks
    ("llama", 1, 8, 1, False), ("llama", 2, 4, 2, False), ("llama", 4, 2, 4, False), ("llama", 8, 1, 8, False),
    ("mixtral", 2, 4, 1, False), ("mixtral", 4, 2, 2, False), ("mixtral", 4, 2, 1, True),
]
E2E_PROMPTS = [[1, 5, 9, 200, 17, 3], list(range(3, 26)), [(7 * i) % 300 + 3 for i in range(41)]]
E2E_NEW_TOKENS = 16


def check_e2e(world: int, device: torch.device, log) -> list[dict]:
    from examples import infer_llama
    from tests import hf_models, hf_moe_models

    # Rank 0 writes the checkpoints (transformers' save_pretrained skips parts of the job on other ranks of a
    # torch.distributed world) and computes the references; the others read its directories.
    kinds = sorted({kind for kind, tp, pcp, _, _ in E2E_RUNS if tp * pcp == world})
    paths: list = [None]
    refs: dict[str, list[list[int]]] = {}
    if dist.get_rank() == 0:
        paths = [{k: hf_moe_models.model_dir(k) if k in hf_moe_models.KINDS else hf_models.model_dir(k)
                  for k in kinds}]
        refs = {k: hf_models.greedy_reference(paths[0][k], E2E_PROMPTS, E2E_NEW_TOKENS) for k in kinds}
    dist.broadcast_object_list(paths, src=0)
    results = []
    for kind, tp, pcp, dcp, ep in E2E_RUNS:
        if tp * pcp != world:
            continue
        path = paths[0][kind]
        argv = ["--model", path, "-tp", str(tp), "-pcp", str(pcp), "-dcp", str(dcp), "--device", device.type,
                "--dtype", "float32", "--max-new-tokens", str(E2E_NEW_TOKENS), "--ignore-eos"]
        argv += [a for ids in E2E_PROMPTS for a in ("--prompt-ids", ",".join(map(str, ids)))]
        argv += ["--enable-expert-parallel"] if ep else []
        got = infer_llama.main(argv)
        if dist.get_rank() == 0:
            ids = [o["output_ids"] for o in got["outputs"]]
            passed = ids == refs[kind]
            results.append({"model": kind, "tp": tp, "pcp": pcp, "dcp": dcp, "expert_parallel": ep,
                            "passed": passed, "output_ids": ids, "reference_ids": refs[kind],
                            "timings": got["timings"], "kv": got["kv"]})
            log(f"e2e {kind:8s} tp={tp} pcp={pcp} dcp={dcp}{' ep' if ep else '   '}: "
                f"{'PASS' if passed else 'FAIL'} (greedy ids vs transformers, {len(ids)} prompts x {E2E_NEW_TOKENS})")
    return results


def check_gather(world: int, device: torch.device, log) -> list[dict]:
    ps.initialize_model_parallel(world, 1, 1, 1)
    group = ps.get_tp_group()
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for shape, dim in (((1, 2, 16, 128), 0), ((3, 8, 129), 1), ((5,), 0)):
            g = torch.Generator().manual_seed(7 + group.rank_in_group)
            x = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
            x.view(-1)[0], x.view(-1)[-1] = float("-inf"), float("nan")
            front = x.movedim(dim, 0).contiguous()
            want = torch.empty(world * front.shape[0], *front.shape[1:], dtype=dtype, device=device)
            dist.all_gather_into_tensor(want, front, group=group.device_group)
            want = want.movedim(0, dim)
            before = group.symmetric.num_gathers if group.symmetric is not None else 0
            eager = group.all_gather(x, dim)
            replayed = eager
            if device.type == "cuda":
                src = x.clone()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    group.all_gather(src, dim)  # warm-up, as the engine does before capturing
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side):
                    out = group.all_gather(src, dim)
                src.copy_(x)
                graph.replay()
                torch.cuda.synchronize()
                replayed = out
            used = (group.symmetric.num_gathers if group.symmetric is not None else 0) - before
            same = all(torch.equal(torch.nan_to_num(t.float(), nan=7.0), torch.nan_to_num(want.float(), nan=7.0))
                       for t in (eager, replayed))
            passed = same and (used > 0 or device.type != "cuda" or group.symmetric is None
                               or not group.symmetric.enabled)
            path = "symmetric memory" if used else "NCCL/gloo"
            log(f"gather {dtype} {shape} dim {dim}: {path} ({used} calls), equal to all_gather_into_tensor: "
                f"{same}: {'PASS' if passed else 'FAIL'}")
            results.append({"dtype": str(dtype), "shape": list(shape), "dim": dim, "symmetric_calls": used,
                            "symmetric_enabled": bool(group.symmetric and group.symmetric.enabled), "passed": passed})
    ps.destroy_model_parallel()
    return results


def check_teardown(world: int, device: torch.device, log) -> list[dict]:
    from megacp.engine import LLMEngine
    from megacp.sampling import SamplingParams
    from scripts.gpu_graph_matrix import tiny_model

    ps.initialize_model_parallel(world, 1, world, 1)  # tp = dcp = world: every decode collective in the graph
    engine = LLMEngine(tiny_model(torch.float32, device), num_kv_blocks=64, block_size=16, max_num_seqs=4)
    engine.generate([list(range(3, 20))], SamplingParams(max_new_tokens=4, ignore_eos=True))
    replays = engine.stats.graph_replays
    faulthandler.dump_traceback_later(120, exit=True)
    start = time.perf_counter()
    ps.destroy_model_parallel()  # ``engine`` (and its graphs' owner) is still alive here
    faulthandler.cancel_dump_traceback_later()
    seconds = time.perf_counter() - start
    released = engine.graph_runner is None or not engine.graph_runner.graphs
    want_replays = 3 if device.type == "cuda" else 0  # CPU runs eagerly
    passed = replays == want_replays and released
    log(f"teardown tp=dcp={world}: destroy_model_parallel took {seconds:.2f} s with the engine alive, graph replays "
        f"{replays} (want {want_replays}), graphs released {released}: {'PASS' if passed else 'FAIL'}")
    return [{"tp": world, "dcp": world, "destroy_s": seconds, "graph_replays": replays, "released": released,
             "passed": passed}]


def environment(device: torch.device) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "backend": dist.get_backend(), "world_size": dist.get_world_size(),
            "device": device.type}
    if device.type == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        info["cuda"] = torch.version.cuda
    return info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--parts", nargs="+", choices=["gather", "attention", "e2e", "teardown"],
                   default=["gather", "attention", "e2e", "teardown"])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    summary = {"env": environment(device)}
    if "gather" in args.parts:
        summary["gather"] = check_gather(world, device, log)
    if "attention" in args.parts:
        summary["attention"] = check_attention(world, device, args.dtypes, log)
    if "e2e" in args.parts:
        summary["e2e"] = check_e2e(world, device, log)
    if "teardown" in args.parts:
        summary["teardown"] = check_teardown(world, device, log)
    parts = ("gather", "attention", "e2e", "teardown")
    failed = sum(not r["passed"] for part in parts for r in summary.get(part, []))
    summary["failed"] = failed
    if rank == 0:
        log(f"nccl_check: {failed} failed of {sum(len(summary.get(k, [])) for k in parts)}")
        if args.json_out:
            os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
            with open(args.json_out, "w") as f:
                json.dump(summary, f, indent=1)
    flag = torch.tensor([failed], device=device)
    dist.all_reduce(flag)
    dist.destroy_process_group()
    return 1 if flag.item() else 0


if __name__ == "__main__":
    sys.exit(main())
