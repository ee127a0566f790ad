"""Correctness under a real torchrun world (NCCL on GPUs, gloo on CPU): CP attention matrix + end-to-end greedy.

    torchrun --nproc-per-node 2 scripts/nccl_check.py --device cuda --json-out nccl_check.json
    torchrun --nproc-per-node 2 scripts/nccl_check.py --device cpu      # the same checks on gloo (dry run)

**attention**: for every (tp, pcp, dcp) that fits the world (dp fills the rest), in float32 and bfloat16, and for
KV interleave sizes 1, 4 and the block size: ``ContextParallelAttention`` runs a step sequence (a packed prefill of
prompts of 1, 3, 2·pcp−1, 37 and 300 tokens; a mixed step with chunked prefills over cached context, a decode and a
fresh prompt; five decode steps of every request) and every real output row is compared with single-device causal
attention over the request's whole sequence in float64. Tolerance, as in FlashAttention's tests: the largest error
over all rows of the step sequence must be at most twice that of plain ``scaled_dot_product_attention`` on the same
device in the same dtype (plus 1e-5 for float32, whose reference error can be ~0). The rows picked by ``select_logits_hidden`` are checked the same way, and
at the end every rank's paged cache must hold exactly its share of every sequence (DESIGN §2 slot formula, written
out here independently).

**e2e**: ``examples/infer_llama.py``'s ``main`` (the CLI, in process, so the NCCL world is set up once) for the
layouts of ``E2E_RUNS`` with tp·pcp = world (2 ranks: (tp, pcp, dcp) = (1,2,1), (2,1,1), (2,1,2); more for 4 and 8)
on tiny float32 checkpoints (Llama with 1 KV head, Qwen2 with 2 KV heads where dcp = 1, Mixtral MoE with 1 KV head,
also with expert parallelism); greedy ids must equal ``transformers``' greedy ``generate`` (float32, CPU).

Prints one line per check and a JSON summary (rank 0); exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacp import parallel_state as ps  # noqa: E402

NUM_HEADS = 8
HEAD_DIM = 128
BLOCK = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FP32_FLOOR = 1e-5


def layouts(world: int) -> list[tuple[int, int, int]]:
    """Every (tp, pcp, dcp) with tp·pcp | world and dcp | tp (dp = world / (tp·pcp) fills the rest)."""
    out = []
    for tp in (1, 2, 4, 8):
        for pcp in (1, 2, 4, 8):
            if world % (tp * pcp):
                continue
            out += [(tp, pcp, dcp) for dcp in (1, 2, 4, 8) if tp % dcp == 0]
    return out


def _num_kv_heads(tp: int, dcp: int) -> int:
    # dcp > 1 needs each DCP group to share one replicated KV head (tp / num_kv_heads == dcp); else 2 KV heads (GQA).
    return 2 if dcp == 1 else tp // dcp


def _head_slices(tp: int, tp_rank: int, num_kv: int) -> tuple[slice, slice]:
    hq = NUM_HEADS // tp
    if tp > num_kv:  # each KV head replicated on tp / num_kv adjacent ranks
        kv = tp_rank // (tp // num_kv)
        return slice(tp_rank * hq, (tp_rank + 1) * hq), slice(kv, kv + 1)
    hkv = num_kv // tp
    return slice(tp_rank * hq, (tp_rank + 1) * hq), slice(tp_rank * hkv, (tp_rank + 1) * hkv)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over one whole sequence. # q [L, Hq, D], k/v [L, Hkv, D] -> [L, Hq, D]"""
    group = q.shape[1] // k.shape[1]
    qt, kt, vt = (t.transpose(0, 1) for t in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=1 / math.sqrt(HEAD_DIM)).transpose(0, 1)


def _attention_case(tp: int, pcp: int, dcp: int, dtype: torch.dtype, interleave: int, device: torch.device) -> dict:
    """One step sequence through the layer on this rank; errors vs float64 and vs same-dtype single-device SDPA."""
    from megacp.kv import BlockTable, PagedKVCache
    from megacp.layers.cp_attention import ContextParallelAttention, build_step_metadata

    W, R = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    num_kv = _num_kv_heads(tp, dcp)
    hs, kvs = _head_slices(tp, ps.get_tensor_model_parallel_rank(), num_kv)
    prompts = [1, 3, 2 * pcp - 1, 37, 300]
    steps = [list(enumerate(prompts)), [(0, 5), (1, 2), (3, 11), (4, 1), (5, 2 * pcp + 1)]]
    steps += [[(i, 1) for i in range(6)] for _ in range(5)]
    final = [sum(n for step in steps for i, n in step if i == r) for r in range(6)]
    seqs = []  # per request: full-head float32 (q [L, Hq, D], k [L, Hkv, D], v), identical on every rank
    for i, L in enumerate(final):
        g = torch.Generator().manual_seed(100 + i)
        seqs.append(tuple(torch.randn(L, h, HEAD_DIM, generator=g) for h in (NUM_HEADS, num_kv, num_kv)))
    exact = [_sdpa(*(t.double() for t in s))[:, hs] for s in seqs]  # float64 on the CPU
    same = [_sdpa(*(t.to(device, dtype) for t in s))[:, hs].double().cpu() for s in seqs]  # the kernel to beat

    per_req = [-(-L // (BLOCK * W)) for L in final]
    ids = torch.randperm(sum(per_req), generator=torch.Generator().manual_seed(3)).tolist()
    rows = [ids[sum(per_req[:i]):sum(per_req[:i + 1])] for i in range(6)]
    bt = BlockTable(BLOCK, 6, max(per_req), cp_world_size=W, cp_rank=R, interleave_size=interleave)
    for i, row in enumerate(rows):
        bt.set_row(i, row)
    cache = PagedKVCache(sum(per_req), BLOCK, kvs.stop - kvs.start, HEAD_DIM, dtype, device)
    layer = ContextParallelAttention(NUM_HEADS, num_kv, HEAD_DIM, 1 / math.sqrt(HEAD_DIM))

    done = [0] * 6
    err = ref_err = 0.0
    fails: list[str] = []
    for s, step in enumerate(steps):
        req_ids, new = [i for i, _ in step], [n for _, n in step]
        computed = [done[i] for i in req_ids]
        meta = build_step_metadata(req_ids, computed, new, bt, device=device)
        # which request / position each local row holds (padding rows: -1)
        ti = meta.token_index.cpu()
        real = ti >= 0
        owner = torch.repeat_interleave(torch.arange(len(step)), torch.tensor(new))[ti.clamp(min=0)]
        offset = torch.cat([torch.arange(n) for n in new])[ti.clamp(min=0)]
        req_of_row = torch.tensor(req_ids)[owner]
        pos_of_row = torch.tensor(computed)[owner] + offset
        g = torch.Generator().manual_seed(7 + s)
        qkv = []
        for j, heads in enumerate((hs, kvs, kvs)):
            rows_j = torch.stack([seqs[int(r)][j][int(p), heads] for r, p in zip(req_of_row, pos_of_row)])
            garbage = 1e3 * torch.randn(rows_j.shape, generator=g)  # padding must never leak into attention
            qkv.append(torch.where(real.view(-1, 1, 1), rows_j, garbage).to(device, dtype))
        out_dev = layer(*qkv, meta, cache)
        out = out_dev.double().cpu()
        want = torch.stack([exact[int(r)][int(p)] for r, p in zip(req_of_row, pos_of_row)])
        base = torch.stack([same[int(r)][int(p)] for r, p in zip(req_of_row, pos_of_row)])
        e, b = (out[real] - want[real]).abs().max().item(), (base[real] - want[real]).abs().max().item()
        picked = meta.select_logits_hidden(out_dev.flatten(1))
        last = torch.stack([exact[i][done[i] + n - 1].flatten() for i, n in step])
        last_base = torch.stack([same[i][done[i] + n - 1].flatten() for i, n in step])
        le = (picked.double().cpu() - last).abs().max().item()
        lb = (last_base - last).abs().max().item()
        if not bool((out[~real] == 0).all()):
            fails.append(f"step {s}: padding rows are not zero")
        err, ref_err = max(err, e, le), max(ref_err, b, lb)
        for i, n in step:
            done[i] += n

    # FlashAttention's rule over the whole output of the case (every step's rows): per step, a decode step's few
    # rows make the maxima too noisy (bf16 partials of the DCP merge add up to one more rounding there).
    floor = FP32_FLOOR if dtype == torch.float32 else 0.0
    if not err <= 2 * ref_err + floor:
        fails.append(f"max error {err:.3g} > 2 x single-device {ref_err:.3g}")

    # the cache holds exactly this rank's share of every sequence, nothing else
    flat_k, flat_v = cache.k.flatten(0, 1).cpu(), cache.v.flatten(0, 1).cpu()
    written = torch.zeros(flat_k.shape[0], dtype=torch.bool)
    for i, L in enumerate(final):
        p = torch.arange(L)
        off = p % (BLOCK * W)
        mine = (off // interleave) % W == R
        block_id = torch.tensor(rows[i])[p // (BLOCK * W)]
        slot = (block_id * BLOCK + (off // (W * interleave)) * interleave + off % interleave)[mine]
        if not (torch.equal(flat_k[slot], seqs[i][1][p[mine]][:, kvs].to(dtype))
                and torch.equal(flat_v[slot], seqs[i][2][p[mine]][:, kvs].to(dtype))):
            fails.append(f"request {i}: cached K/V differ from the rank's share")
        written[slot] = True
    if bool(((flat_k[~written] != 0).any(dim=(1, 2)) | (flat_v[~written] != 0).any(dim=(1, 2))).any()):
        fails.append("the cache holds tokens this rank does not own")
    return {"max_err": err, "single_device_err": ref_err, "owned": int(written.sum()), "fails": fails}


def check_attention(world: int, device: torch.device, dtypes: list[str], log) -> list[dict]:
    results = []
    for tp, pcp, dcp in layouts(world):
        ps.initialize_model_parallel(tp, pcp, dcp, world // (tp * pcp))
        try:
            for name in dtypes:
                for interleave in (1, 4, BLOCK):
                    r = _attention_case(tp, pcp, dcp, DTYPES[name], interleave, device)
                    gathered: list = [None] * world
                    dist.all_gather_object(gathered, r)
                    owned = sum(g["owned"] for g in gathered)
                    expect = (1 + 5 + 5) + (3 + 2 + 5) + (2 * pcp - 1 + 5) + (37 + 11 + 5) + (300 + 1 + 5) \
                        + (2 * pcp + 1 + 5)
                    fails = [f"rank {k}: {f}" for k, g in enumerate(gathered) for f in g["fails"]]
                    if owned != expect * (world // (pcp * dcp)):  # each (dp, kv-head) replica stores every token once
                        fails.append(f"ranks own {owned} tokens in all, expected {expect * (world // (pcp * dcp))}")
                    row = {"tp": tp, "pcp": pcp, "dcp": dcp, "dp": world // (tp * pcp), "dtype": name,
                           "interleave": interleave, "num_kv_heads": _num_kv_heads(tp, dcp),
                           "max_err": max(g["max_err"] for g in gathered),
                           "single_device_err": max(g["single_device_err"] for g in gathered),
                           "passed": not fails, "fails": fails}
                    results.append(row)
                    log(f"attention tp={tp} pcp={pcp} dcp={dcp} dp={row['dp']} {name:8s} interleave={interleave:2d}: "
                        f"max err {row['max_err']:.2e} (single-device {row['single_device_err']:.2e}) "
                        f"{'PASS' if not fails else 'FAIL ' + '; '.join(fails[:3])}")
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
    p.add_argument("--parts", nargs="+", choices=["attention", "e2e"], default=["attention", "e2e"])
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
    if "attention" in args.parts:
        summary["attention"] = check_attention(world, device, args.dtypes, log)
    if "e2e" in args.parts:
        summary["e2e"] = check_e2e(world, device, log)
    failed = sum(not r["passed"] for part in ("attention", "e2e") for r in summary.get(part, []))
    summary["failed"] = failed
    if rank == 0:
        log(f"nccl_check: {failed} failed of {sum(len(summary.get(k, [])) for k in ('attention', 'e2e'))}")
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
