"""CUDA-graph decode == eager decode for every (tp, pcp, dcp) layout, 8 gloo ranks sharing ONE GPU (issue 10).

    PYTHONUNBUFFERED=1 torchrun --nproc-per-node 8 scripts/gpu_graph_matrix.py --json-out gpu_graph_matrix.json

NCCL will not put several ranks on one GPU, so every rank runs on ``cuda:0`` in gloo groups. gloo's collectives go
through host memory and cannot be recorded in a CUDA graph: the engine captures each decode bucket in pieces cut at
those collectives (``megacp.cuda_graph.PiecewiseGraph``) and runs them eagerly between the pieces' replays.

For each layout of ``tests/test_cp_attention_dist.CONFIGS`` (dp fills the 8 ranks) and each dtype (float32,
bfloat16), a seeded tiny Llama (2 layers, 8 query heads of 64, one KV head) runs ``LLMEngine.generate`` on batches of 1, 3,
17 and 64 random prompts (6 new tokens each) twice: with ``enforce_eager=True`` and with graphs. Checks, on every rank:

- the greedy ids with graphs equal the eager ones exactly;
- every pure-decode step was a replay (5 per batch: the first new token comes from prefill), none in the eager run,
  and the graph really was cut at the gloo collectives when the layout has any (more than one piece);
- in float32, every layout's ids equal the single-rank layout's (the model's logits have clear argmax margins, so a
  wrong layout shows up as different tokens, not as rounding).

Prints one line per case and, on rank 0, a JSON summary; exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacp import parallel_state as ps  # noqa: E402
from scripts.gpu_cp_matrix import environment, report  # noqa: E402
from tests import test_cp_attention_dist as matrix  # noqa: E402
from tests.test_no_host_sync import _tiny_model  # noqa: E402

WORLD = 8
BATCHES = (1, 3, 17, 64)
MAX_NEW = 6
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tiny_model(dtype: torch.dtype, device: torch.device):
    """The seeded tiny Llama: 8 query heads of 64 and one KV head (so every dcp | tp is legal), 128 positions (the
    block table's capacity, which the graphs' decode plans by)."""
    return _tiny_model(dtype, device, hidden_size=512, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=1, max_position_embeddings=128)


def prompts(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (batch,), generator=g)]


def run_case(dtype: str, device: torch.device) -> dict:
    """This rank's eager and graph runs of one layout: ids per batch, replay counts, pieces per graph."""
    from megacp.engine import LLMEngine
    from megacp.sampling import SamplingParams

    model = tiny_model(DTYPES[dtype], device)
    kwargs = dict(num_kv_blocks=256, block_size=16, max_num_seqs=max(BATCHES))
    eager, graphs = LLMEngine(model, enforce_eager=True, **kwargs), LLMEngine(model, **kwargs)
    sampling = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    res: dict = {"eager": {}, "graph": {}, "eager_replays": {}, "graph_replays": {}, "errors": [],
                 "eager_repeatable": {}, "graph_repeatable": {}}
    if graphs.graphs_off_reason is not None:
        res["errors"].append(f"graphs are off: {graphs.graphs_off_reason}")
    for batch in BATCHES:
        p = prompts(batch, model.config.vocab_size)
        for name, engine in (("eager", eager), ("graph", graphs)):
            res[name][batch] = [o.output_ids for o in engine.generate(p, sampling)]
            res[f"{name}_replays"][batch] = engine.stats.graph_replays
        # diagnostic, not a check: does each engine repeat its own ids (a mismatch with the graph then points at a
        # difference between the paths, else at nondeterminism)?
        res["eager_repeatable"][batch] = [o.output_ids for o in eager.generate(p, sampling)] == res["eager"][batch]
        res["graph_repeatable"][batch] = [o.output_ids for o in graphs.generate(p, sampling)] == res["graph"][batch]
    runner = graphs.graph_runner
    res["pieces"] = {b: len(g.graph.pieces) for b, g in runner.graphs.items()} if runner else {}
    res["capture_s"], res["capture_bytes"] = graphs.stats.graph_capture_s, graphs.stats.graph_capture_bytes
    return res


def check(tp: int, pcp: int, dcp: int, dtype: str, gathered: list[dict], single_rank: dict | None) -> list[str]:
    fails = []
    for r, g in enumerate(gathered):
        fails += [f"rank {r}: {e}" for e in g["errors"]]
        for batch in BATCHES:
            if g["graph"].get(batch) != g["eager"].get(batch):
                fails.append(f"rank {r} batch {batch}: graph ids differ from eager")
            if g["graph_replays"].get(batch) != MAX_NEW - 1 or g["eager_replays"].get(batch) != 0:
                fails.append(f"rank {r} batch {batch}: replays graph {g['graph_replays'].get(batch)} "
                             f"(want {MAX_NEW - 1}), eager {g['eager_replays'].get(batch)} (want 0)")
            if single_rank is not None and dtype == "float32" and g["graph"].get(batch) != single_rank.get(batch):
                fails.append(f"rank {r} batch {batch}: float32 ids differ from the single-rank layout's")
        has_collectives = tp > 1 or pcp > 1 or dcp > 1
        if g["pieces"] and has_collectives and min(g["pieces"].values()) < 2:
            fails.append(f"rank {r}: a graph of a multi-rank layout was not cut at its gloo collectives")
    return fails


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--group-timeout-s", type=float, default=120.0)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "0")) != WORLD:
        raise ValueError(f"the matrix needs {WORLD} ranks: run it as torchrun --nproc-per-node {WORLD} {sys.argv[0]}")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_graph_matrix needs a CUDA GPU")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.cuda.set_device(0)  # every rank on the one GPU
    device = torch.device("cuda", 0)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.group_timeout_s * 4))
    rank = dist.get_rank()
    rows, single = [], {}
    for tp, pcp, dcp in matrix.CONFIGS:
        ps.initialize_model_parallel(tp, pcp, dcp, WORLD // (tp * pcp), backend="gloo",
                                     timeout=timedelta(seconds=args.group_timeout_s))
        try:
            for dtype in args.dtypes:
                start = time.perf_counter()
                try:
                    mine = run_case(dtype, device)
                except Exception as exc:  # noqa: BLE001  (reported in the row; peers may time out)
                    mine = {"errors": [f"{type(exc).__name__}: {exc}"[:400]], "eager": {}, "graph": {},
                            "eager_replays": {}, "graph_replays": {}, "pieces": {}}
                    print(f"rank {rank} tp={tp} pcp={pcp} dcp={dcp} {dtype}: {mine['errors'][0]}", file=sys.stderr,
                          flush=True)
                mine["seconds"] = time.perf_counter() - start
                gathered: list = [None] * WORLD
                dist.all_gather_object(gathered, mine)
                if (tp, pcp, dcp) == (1, 1, 1):
                    single[dtype] = gathered[0]["graph"]
                fails = check(tp, pcp, dcp, dtype, gathered, single.get(dtype))
                pieces = sorted({n for g in gathered for n in g["pieces"].values()})
                row = {"tp": tp, "pcp": pcp, "dcp": dcp, "dp": WORLD // (tp * pcp), "dtype": dtype,
                       "batches": list(BATCHES), "graph_pieces": pieces,
                       "replays_per_generate": sorted({n for g in gathered for n in g["graph_replays"].values()}),
                       "eager_repeatable": all(all(g.get("eager_repeatable", {}).values()) for g in gathered),
                       "graph_repeatable": all(all(g.get("graph_repeatable", {}).values()) for g in gathered),
                       "capture_s": round(max(g.get("capture_s", 0.0) for g in gathered), 2),
                       "capture_mib": round(max(g.get("capture_bytes", 0) for g in gathered) / 2**20, 1),
                       "seconds": round(max(g["seconds"] for g in gathered), 1), "passed": not fails,
                       "fails": fails[:32]}
                rows.append(row)
                if rank == 0:
                    print(f"tp={tp} pcp={pcp} dcp={dcp} dp={row['dp']} {dtype:8s}: pieces {pieces} replays "
                          f"{row['replays_per_generate']} capture {row['capture_s']} s {row['capture_mib']} MiB "
                          f"{row['seconds']} s repeatable eager {row['eager_repeatable']} graph {row['graph_repeatable']} "
                          f"{'PASS' if row['passed'] else 'FAIL ' + '; '.join(fails[:2])}",
                          flush=True)
        finally:
            ps.destroy_model_parallel()
    failed = sum(not r["passed"] for r in rows)
    summary = {"env": environment(device), "cases": len(rows), "failed": failed,
               "result": "PASS" if not failed else "FAIL", "rows": rows}
    if rank == 0:
        report(summary, args.json_out)
        print(f"gpu_graph_matrix: {failed} failed of {len(rows)}", flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
