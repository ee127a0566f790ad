"""Probe: small all-gathers / all-reduces through PyTorch symmetric memory vs NCCL, inside CUDA graphs.

    torchrun --nproc-per-node 2 scripts/symm_mem_probe.py [--json-out probe.json]

Decode moves tiny tensors (a few KiB per collective, two or three per layer), so each collective costs its latency.
This measures, per call inside a captured graph of back-to-back calls: NCCL ``all_gather_into_tensor`` and
``all_reduce`` against ``torch.ops.symm_mem.one_shot_all_reduce`` on a symmetric buffer (an all-gather is a sum of
buffers that are zero except the sender's row), and checks that the results are identical.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist


def timed_in_graph(fn, calls: int = 50, replays: int = 20) -> float:
    """Microseconds per call of ``fn`` captured ``calls`` times back to back in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * replays)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", device_id=dev)
    W = dist.get_world_size()
    import torch.distributed._symmetric_memory as symm_mem

    name = dist.group.WORLD.group_name
    if hasattr(symm_mem, "enable_symm_mem_for_group"):
        try:
            symm_mem.enable_symm_mem_for_group(name)
        except Exception as e:  # noqa: BLE001
            print("enable_symm_mem_for_group:", e)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for numel in (2048, 4128, 16512, 65536):
            buf = symm_mem.empty(W * numel, dtype=dtype, device=dev)
            buf.zero_()
            symm_mem.rendezvous(buf, name)
            x = (torch.randn(numel, device=dev) * (rank + 1)).to(dtype)
            x[0] = float("-inf")
            mine = buf.view(W, numel)[rank]
            nccl_out = torch.empty(W * numel, dtype=dtype, device=dev)

            def ag_symm():
                mine.copy_(x)
                return torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", name)

            def ag_nccl():
                dist.all_gather_into_tensor(nccl_out, x)
                return nccl_out

            same = torch.equal(ag_symm(), ag_nccl())
            red = torch.randn(numel, device=dev).to(dtype)
            rbuf = symm_mem.empty(numel, dtype=dtype, device=dev)
            symm_mem.rendezvous(rbuf, name)

            def ar_symm():
                rbuf.copy_(red)
                return torch.ops.symm_mem.one_shot_all_reduce(rbuf, "sum", name)

            def ar_nccl():
                y = red.clone()
                dist.all_reduce(y)
                return y

            ar_err = (ar_symm().float() - ar_nccl().float()).abs().max().item()
            row = {"dtype": str(dtype), "bytes": numel * x.element_size(), "all_gather_identical": same,
                   "all_reduce_max_diff": ar_err,
                   "nccl_all_gather_us": timed_in_graph(ag_nccl), "symm_all_gather_us": timed_in_graph(ag_symm),
                   "nccl_all_reduce_us": timed_in_graph(ar_nccl), "symm_all_reduce_us": timed_in_graph(ar_symm)}
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank == 0 and args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"world": W, "torch": torch.__version__, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
