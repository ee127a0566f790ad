"""How many collectives one decode step of the model makes, per group: guards the cut from regressing.

Decode is latency-bound: on 2 H100s each small NCCL call cost ~0.2–0.3 ms of host time (docs/benchmarks.md, DCP
decode), so the count per layer is what DCP's per-token latency follows. Per layer a decode step may make at most

- one all-gather of the query heads over DCP (when dcp > 1),
- one all-gather of the packed partial results over the CP group (when pcp·dcp > 1, ``cp_merge_gathered``),
- the two TP all-reduces of the row-parallel projections (o_proj, down_proj; when tp > 1),

plus one TP all-reduce of the vocab-parallel embedding per step. (Before ``cp_merge_gathered`` the merge alone made
four per layer at pcp = dcp = 2: all-gather + reduce-scatter over DCP, all-gather + all-reduce over PCP.)

Every collective of a ``ParallelGroup`` goes through ``ParallelGroup._collective``; the counter wraps it while the
model's forward runs (the steps of tests/test_no_host_sync.py, whose logits are checked against a cache-free
reference too, so a step that skipped a needed collective would fail there).
"""

from __future__ import annotations

from collections import Counter

import torch

from tests.dist_pool import model_parallel
from tests.test_no_host_sync import _run_steps

_KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "broadcast")


class CollectiveCounter:
    """Context manager: ``.reads`` lists ``"<group>.<kind>"`` for every collective a ParallelGroup runs inside."""

    def __enter__(self):
        from megacp import parallel_state

        self.reads: list[str] = []
        self._cls = parallel_state.ParallelGroup
        self._original = self._cls._collective
        original, reads = self._original, self.reads

        def counting(group, collective, *tensors, **kwargs):
            name = getattr(collective, "__name__", str(collective))
            kind = next((k for k in _KINDS if k in name), name)  # all_gather_single / _into_tensor -> all_gather
            reads.append(f"{group.name}.{kind}")
            return original(group, collective, *tensors, **kwargs)

        self._cls._collective = counting
        return self

    def __exit__(self, *exc):
        self._cls._collective = self._original
        return False


def _expected_decode(layers: int, tp: int, pcp: int, dcp: int) -> Counter:
    expected = Counter()
    if dcp > 1:
        expected["dcp.all_gather"] = layers
    if pcp * dcp > 1:
        expected["cp.all_gather"] = layers
    if tp > 1:
        expected["tp.all_reduce"] = 2 * layers + 1
    return expected


def _count_task(layouts: list[tuple[int, int, int]]) -> list[dict]:
    """For each (tp, pcp, dcp): the collectives of the pure decode step (step 2 of _run_steps) and the logits error."""
    from megacp.models import load_model

    results = []
    for tp, pcp, dcp in layouts:
        with model_parallel(tensor_model_parallel_size=tp, prefill_context_parallel_size=pcp,
                            decode_context_parallel_size=dcp, cp_kv_cache_interleave_size=2) as ps:
            model = load_model(None, torch.float32, "cpu")
            steps, err = _run_steps(model, ps.get_context_parallel_world_size(), ps.get_context_parallel_rank(), 2,
                                    guard=CollectiveCounter)
            results.append({"layout": (tp, pcp, dcp), "layers": model.config.num_hidden_layers,
                            "decode": Counter(steps[1]), "err": err})
    return results


def _check(results_per_rank: list[list[dict]]) -> None:
    for results in results_per_rank:
        for r in results:
            expected = _expected_decode(r["layers"], *r["layout"])
            assert r["decode"] == expected, (r["layout"], dict(r["decode"]), dict(expected))
            assert r["err"] < 1e-4, r


def test_decode_step_collectives_two_ranks(dist_pool_2):
    # tp=2, dcp=2: the layout of the DCP decode benchmark (2 per layer: Q heads over DCP, packed merge over CP);
    # pcp=2 alone (1: the packed merge); tp=2 alone (none in attention)
    _check(dist_pool_2.run(_count_task, [(2, 1, 2), (1, 2, 1), (2, 1, 1)]))


def test_decode_step_collectives_tp2_pcp2_dcp2(dist_pool_4):
    _check(dist_pool_4.run(_count_task, [(2, 2, 2)]))
