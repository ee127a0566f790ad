"""ParallelGroup's host staging (gloo group + CUDA tensor -> collective on CPU copies), checked without a GPU.

The decision and the copy-in/copy-out are pure and tested directly with a fake collective; then a 2-rank gloo pool
forces staging on for CPU tensors (the predicate is patched) and checks that every ParallelGroup collective goes
through the staged path and still gives the right numbers, keyword arguments (``src``, ``op``) included.
"""

from __future__ import annotations

import torch

from megacp import parallel_state as ps
from tests.dist_pool import model_parallel


def test_only_gloo_with_a_device_tensor_is_staged():
    assert ps.stages_through_host("gloo", torch.device("cuda", 0))
    assert not ps.stages_through_host("gloo", torch.device("cpu"))
    assert not ps.stages_through_host("nccl", torch.device("cuda", 0))
    assert not ps.stages_through_host(None, torch.device("cuda", 0))


def _fake_all_gather(out: torch.Tensor, inp: torch.Tensor, group=None, seen=None) -> None:
    """Two 'ranks' with the same input; records which tensors it was handed."""
    seen.extend([out, inp])
    out.copy_(torch.cat([inp, inp + 10]))


def test_staged_collective_runs_on_copies_and_writes_back():
    out, inp = torch.zeros(4), torch.arange(2.0)
    seen: list[torch.Tensor] = []
    ps.run_collective(_fake_all_gather, (out, inp), stage=True, group="g", seen=seen)
    assert torch.equal(out, torch.tensor([0.0, 1.0, 10.0, 11.0]))  # the result reached the caller's output
    assert torch.equal(inp, torch.arange(2.0))
    assert all(s.device.type == "cpu" for s in seen)
    assert seen[0].data_ptr() != out.data_ptr() and seen[1].data_ptr() != inp.data_ptr()  # worked on copies

    out2, seen2 = torch.zeros(4), []
    ps.run_collective(_fake_all_gather, (out2, inp), stage=False, group="g", seen=seen2)
    assert torch.equal(out2, out) and seen2[0] is out2 and seen2[1] is inp  # unstaged: the tensors themselves


def _staged_collectives_task() -> dict:
    staged = []
    real_run = ps.run_collective

    def counting_run(collective, tensors, stage, **kwargs):
        staged.append(stage)
        return real_run(collective, tensors, stage, **kwargs)

    saved = ps.stages_through_host, ps.run_collective
    ps.stages_through_host = lambda backend, device: backend == "gloo"  # stage CPU tensors too
    ps.run_collective = counting_run
    try:
        with model_parallel(tensor_model_parallel_size=2):
            g = ps.get_tp_group()
            r = g.rank_in_group
            x = torch.tensor([[1.0, 2.0]]) + 10 * r  # [1, 2]
            out = {
                "all_gather": g.all_gather(x, dim=1).tolist(),
                "reduce_scatter": g.reduce_scatter(torch.tensor([1.0, 2.0]) * (r + 1)).tolist(),
                "all_reduce": g.all_reduce(x.clone()).tolist(),
                "all_to_all": g.all_to_all(torch.tensor([[1.0, 2.0], [3.0, 4.0]]) + 10 * r, 0, 1).tolist(),
                "broadcast": g.broadcast(x.clone(), src=1).tolist(),
            }
            leaf = x.clone().requires_grad_(True)
            g.all_gather(leaf, dim=0).sum().backward()  # autograd path: all_gather forward, reduce_scatter backward
            out["grad"] = leaf.grad.tolist()
    finally:
        ps.stages_through_host, ps.run_collective = saved
    out["staged"] = staged
    return out


def test_every_collective_goes_through_the_staged_path(dist_pool_2):
    r0, r1 = dist_pool_2.run(_staged_collectives_task)
    assert r0["staged"] == r1["staged"] == [True] * 7  # 5 collectives + the autograd pair
    assert r0["all_gather"] == r1["all_gather"] == [[1.0, 2.0, 11.0, 12.0]]
    assert (r0["reduce_scatter"], r1["reduce_scatter"]) == ([3.0], [6.0])  # [1,2]·1 + [1,2]·2, split
    assert r0["all_reduce"] == r1["all_reduce"] == [[12.0, 14.0]]
    # rank r receives row r of every rank's [2, 2], concatenated along dim 1
    assert (r0["all_to_all"], r1["all_to_all"]) == ([[1.0, 2.0, 11.0, 12.0]], [[3.0, 4.0, 13.0, 14.0]])
    assert r0["broadcast"] == r1["broadcast"] == [[11.0, 12.0]]
    assert r0["grad"] == r1["grad"] == [[2.0, 2.0]]  # d(sum of the gather)/dx summed over both ranks


def _rank_order_sum_task() -> dict:
    """A staged bfloat16 all_reduce of the same rows in a 17-row and a 24-row tensor (the eager batch and its graph
    bucket), and gloo's own all_reduce of them for comparison."""
    saved = ps.stages_through_host
    ps.stages_through_host = lambda backend, device: backend == "gloo"  # stage CPU tensors too
    try:
        with model_parallel(tensor_model_parallel_size=4):
            g = ps.get_tp_group()
            rows = torch.randn(24, 512, generator=torch.Generator().manual_seed(g.rank_in_group)).bfloat16()
            small, big = g.all_reduce(rows[:17].clone()), g.all_reduce(rows.clone())
            gathered = g.all_gather(rows.unsqueeze(0), dim=0)  # [4, 24, 512], exact
        ps.stages_through_host = saved
        with model_parallel(tensor_model_parallel_size=4):
            g = ps.get_tp_group()
            gloo_small, gloo_big = g.all_reduce(rows[:17].clone()), g.all_reduce(rows.clone())
    finally:
        ps.stages_through_host = saved
    return {"small": small, "big": big, "gathered": gathered, "gloo_small": gloo_small, "gloo_big": gloo_big}


def test_staged_all_reduce_rounds_a_row_the_same_in_any_batch(dist_pool_4):
    results = dist_pool_4.run(_rank_order_sum_task)
    r0 = results[0]
    want = r0["gathered"].float()
    want = (((want[0] + want[1]) + want[2]) + want[3]).bfloat16()  # rank order, float32, one rounding
    for r in results:
        assert torch.equal(r["big"], want) and torch.equal(r["small"], want[:17])
    # the reason it exists: gloo's ring rounds the same rows differently when the tensor is longer
    assert not torch.equal(r0["gloo_small"], r0["gloo_big"][:17])


def _cut_task() -> dict:
    """Inside ``cut_graphs_at_host_collectives`` a staged collective is handed to the callback instead of running;
    running the handed-over closure later performs it into the same output (what ``PiecewiseGraph`` replays)."""
    saved = ps.stages_through_host
    ps.stages_through_host = lambda backend, device: backend == "gloo"  # stage CPU tensors too
    handed = []
    try:
        with model_parallel(tensor_model_parallel_size=2):
            g = ps.get_tp_group()
            x = torch.tensor([1.0, 2.0]) * (g.rank_in_group + 1)
            with ps.cut_graphs_at_host_collectives(handed.append):
                y = g.all_reduce(x)  # in place, deferred
                before = y.tolist()
            inside_only = ps._host_collective_cut is None  # the hook is gone after the block
            handed[0]()
            after, again = y.tolist(), None
            x.copy_(torch.tensor([1.0, 1.0]))
            handed[0]()  # a replay: the same collective on the tensor's new contents
            again = y.tolist()
    finally:
        ps.stages_through_host = saved
    return {"n": len(handed), "before": before, "after": after, "again": again, "reset": inside_only}


def test_staged_collectives_are_handed_to_the_graph_cut(dist_pool_2):
    for r, res in enumerate(dist_pool_2.run(_cut_task)):
        assert res["n"] == 1 and res["reset"]
        assert res["before"] == [1.0 * (r + 1), 2.0 * (r + 1)]  # not run yet
        assert res["after"] == [3.0, 6.0] and res["again"] == [2.0, 2.0]
