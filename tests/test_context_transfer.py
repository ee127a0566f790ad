"""Pass-Q and pass-KV for the prefill over cached context (issue 24 item 3), on 8 gloo ranks.

For (pcp, dcp) in (2, 1), (1, 2), (2, 2) (tp = dcp, dp filling the world) and KV interleave 1 and 2, one task runs the
same schedule three times, the GQA layer forced to ``pass_q``, to ``pass_kv`` and left on ``auto``:

1. fresh prompts of 12, 6 and 30 tokens;
2. a chunked prefill (28 more of request 0) and two second turns (3 and 2 tokens) over contexts of 12, 6 and 30;
3. 4 new tokens over a context of 32 (few new tokens over a long context: the rule says pass-Q);
4. 40 new tokens over a context of 9 (a long chunk over a short context: the rule says pass-KV).

Every real output row must equal plain causal SDPA over the whole sequence (float64), both methods must equal each
other, ``auto`` must take the rule's verdict (``choose_context_transfer``, recomputed here from the metadata) and
take both over the steps. Negative control: pass-KV with the gathered context rows in the wrong order (reversed
across requests) must miss the reference by far.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.dist_pool import model_parallel
from tests.test_cp_attention_dist import (BLOCK, HEAD_DIM, NUM_HEADS, _head_slices, _local_inputs, _num_kv_heads,
                                          _reference, _sequences)

ATOL = 1e-5
STEPS = [[(0, 12), (1, 6), (2, 30)], [(0, 28), (1, 3), (2, 2)], [(2, 4)], [(1, 40)]]
EXPECTED_WAY = {2: "pass_q", 3: "pass_kv"}
LAYOUTS = [(2, 1), (1, 2), (2, 2)]


def _run(way: str, tp: int, pcp: int, dcp: int, interleave: int) -> dict:
    """The schedule through one layer forced to ``way``; per step the outputs, the way taken and the rule's."""
    from megacp import parallel_state as ps
    from megacp.kv import BlockTable, PagedKVCache
    from megacp.layers.context_transfer import choose_context_transfer
    from megacp.layers.cp_attention import ContextParallelAttention
    from megacp.layers.metadata_builder import build_attention_metadata

    W, R = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    num_kv = _num_kv_heads(tp, dcp)
    hs, kvs = _head_slices(tp, ps.get_tensor_model_parallel_rank(), num_kv)
    final = [0] * 3
    for step in STEPS:
        for i, n in step:
            final[i] += n
    seqs = _sequences(final, num_kv, seed=200)
    refs = [_reference(*s) for s in seqs]
    per_req = [-(-L // (BLOCK * W)) for L in final]
    ids = torch.randperm(sum(per_req), generator=torch.Generator().manual_seed(5)).tolist()
    bt = BlockTable(BLOCK, 3, max(per_req), cp_world_size=W, cp_rank=R, interleave_size=interleave)
    start = 0
    for i, n in enumerate(per_req):
        bt.set_row(i, ids[start:start + n])
        start += n
    cache = PagedKVCache(sum(per_req), BLOCK, kvs.stop - kvs.start, HEAD_DIM)
    layer = ContextParallelAttention(NUM_HEADS, num_kv, HEAD_DIM, 1 / math.sqrt(HEAD_DIM), context_transfer=way)
    H, Hkv = layer.num_local_heads, layer.num_local_kv_heads
    done, result = [0] * 3, {"outs": [], "ways": [], "rule": [], "max_err": 0.0, "control_err": None}
    for s, step in enumerate(STEPS):
        req_ids, new = [i for i, _ in step], [n for _, n in step]
        computed = [done[i] for i in req_ids]
        meta = build_attention_metadata(req_ids, computed, new, bt, null_slot=cache.null_slot)
        qkv, real, req_of_row, pos_of_row = _local_inputs(meta, req_ids, hs, kvs, seqs, computed, new)
        out = layer(*qkv, meta, cache)
        expected = torch.stack([refs[int(r)][int(p), hs] for r, p in zip(req_of_row, pos_of_row)]).float()
        err = (out[real] - expected[real]).abs().max().item()
        assert err <= ATOL, f"{way} step {s} (pcp={pcp} dcp={dcp} interleave={interleave}): error {err:.3g}"
        result["max_err"] = max(result["max_err"], err)
        result["outs"].append(out[real])
        ctx = meta.context
        if ctx is not None:
            result["ways"].append(layer.context_way(ctx, out.dtype))
            result["rule"].append(choose_context_transfer(ctx.num_rows, ctx.gather_pad, H, HEAD_DIM, HEAD_DIM,
                                                          2 * Hkv * HEAD_DIM, W, 4)[0])
        if way == "pass_kv" and s == 1:  # negative control: contexts of different requests swapped about
            bad = dataclasses.replace(meta, context=dataclasses.replace(ctx, gather_rows=ctx.gather_rows.flip(0)))
            result["control_err"] = (layer(*qkv, bad, cache)[real] - expected[real]).abs().max().item()
        for i, n in step:
            done[i] += n
    return result


def _layout_task(pcp: int, dcp: int) -> list[dict]:
    tp = dcp
    with model_parallel(tensor_model_parallel_size=tp, prefill_context_parallel_size=pcp,
                        decode_context_parallel_size=dcp, data_parallel_size=8 // (pcp * tp)):
        return [{way: _run(way, tp, pcp, dcp, interleave) for way in ("pass_q", "pass_kv", "auto")}
                for interleave in (1, 2)]


@pytest.mark.parametrize("pcp,dcp", LAYOUTS, ids=[f"pcp{p}-dcp{d}" for p, d in LAYOUTS])
def test_pass_q_and_pass_kv_agree_with_single_device(dist_pool_8, pcp, dcp):
    for rank_results in dist_pool_8.run(_layout_task, pcp, dcp):
        for by_way in rank_results:
            q_run, kv_run, auto = by_way["pass_q"], by_way["pass_kv"], by_way["auto"]
            assert q_run["ways"] == ["pass_q"] * 3 and kv_run["ways"] == ["pass_kv"] * 3  # the override holds
            for a, b in zip(q_run["outs"], kv_run["outs"]):
                assert (a - b).abs().max().item() <= ATOL  # both methods give the same numbers
            assert auto["ways"] == auto["rule"]
            assert auto["ways"][1:] == [EXPECTED_WAY[2], EXPECTED_WAY[3]]  # each picked where the rule says
            assert kv_run["control_err"] > 100 * ATOL, "reordering the gathered context must break pass-KV"


def test_rule_picks_pass_q_for_few_new_tokens_and_pass_kv_for_many():
    from megacp.layers.context_transfer import PASS_KV_CROSSOVER, choose_context_transfer

    # Llama-3-8B per rank at tp = 1 over 2 CP ranks, bfloat16: 32 heads of 128, 8 KV heads
    def way(new: int, context: int, crossover: float = PASS_KV_CROSSOVER) -> tuple[str, dict]:
        return choose_context_transfer(new // 2, context // 2, 32, 128, 128, 2 * 8 * 128, 2, 2, crossover)

    few, moved = way(2048, 128 * 1024)
    assert few == "pass_q"
    assert moved == {"pass_q": 1024 * 32 * (128 * 2 + (2 + 128) * 4), "pass_kv": 64 * 1024 * 2 * 8 * 128 * 2}
    assert way(64 * 1024, 128 * 1024)[0] == "pass_kv"
    assert way(2048, 128 * 1024, crossover=20.0)[0] == "pass_kv"  # a calibrated crossover moves the verdict
    assert choose_context_transfer(8, 8, 4, 4, 4, 8, 1, 4) == ("pass_q", {"pass_q": 0, "pass_kv": 0})


def test_models_and_load_model_take_a_context_transfer(tmp_path):
    """``load_model(..., context_transfer=)`` (the CLI's ``--context-transfer``) sets every attention layer's way, MLA
    models' included; ``set_context_transfer`` changes it later; a bad value fails before any layer changes."""
    from megacp.layers.cp_attention import ContextParallelAttention
    from megacp.models import load_model
    from megacp.parallel_state import ParallelContext
    from tests.deepseek_tiny import save_tiny_deepseek

    one = ParallelContext.single()
    ways = {}
    for name in ("llama", "deepseek"):
        path = None if name == "llama" else save_tiny_deepseek(str(tmp_path), version=2)
        model = load_model(path, parallel_context=one, context_transfer="pass_kv")
        layers = [m for m in model.modules() if isinstance(m, ContextParallelAttention)]
        assert len(layers) == model.config.num_hidden_layers
        assert {m.context_transfer for m in layers} == {"pass_kv"}
        model.set_context_transfer("pass_q")
        with pytest.raises(ValueError, match=r"context_transfer='ring'.*'auto', 'pass_q', 'pass_kv'"):
            model.set_context_transfer("ring")
        ways[name] = {m.context_transfer for m in layers}
    assert ways == {"llama": {"pass_q"}, "deepseek": {"pass_q"}}
    with pytest.raises(ValueError, match=r"context_transfer='ring'"):
        load_model(None, parallel_context=one, context_transfer="ring")


def test_unknown_context_transfer_is_rejected_naming_the_choices():
    from megacp.layers.cp_attention import ContextParallelAttention

    with pytest.raises(ValueError, match=r"context_transfer='ring'.*'auto', 'pass_q', 'pass_kv'"):
        ContextParallelAttention(4, 2, HEAD_DIM, 0.5, context_transfer="ring")


def test_context_prefill_bench_runs_on_cpu(tmp_path):
    """bench/context_prefill.py's smoke run (2 gloo ranks, tiny shapes): both rows, every way timed, auto's verdict."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "context_prefill.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "bench/context_prefill.py", "--device", "cpu", "--tiny", "--dtype", "float32", "--reps", "1",
                    "--json-out", str(out)], cwd=root, env=env, check=True, timeout=120, capture_output=True)
    result = json.loads(out.read_text())
    assert [r["row"] for r in result["rows"]] == ["256 context + 8 new", "64 chunks over 256"]
    assert [len(r["chunks"]) for r in result["rows"]] == [1, 3]
    for chunk in (c for r in result["rows"] for c in r["chunks"]):
        assert set(chunk["ms"]) == {"pass_q", "pass_kv", "auto"} and min(chunk["ms"].values()) > 0
        ratio = chunk["bytes"]["pass_kv"] / chunk["bytes"]["pass_q"]
        assert chunk["auto_way"] == ("pass_kv" if ratio < result["crossover"] else "pass_q")
