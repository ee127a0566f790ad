"""The Triton paged MLA decode kernel on a GPU (``gpu``-marked; ``scripts/gpu_session.sh mla`` runs this file).

Every case lays sequences out over CP ranks with the real §2 code (``tests/mla_decode_cases.sharded_case``), runs
the kernel on each rank's shard, merges the ranks by LSE and compares with float64 attention of the unsharded
sequences: the bf16 kernel's error must stay within 2× a bf16 reference's (flash-attention's rule), float32 within
1e-5; empty shards must give out 0 and lse -inf; a CUDA graph replay must equal the eager call.
"""

from __future__ import annotations

import pytest
import torch

from megacp.ops import paged_decode, paged_mla_decode as mla
from tests.mla_decode_cases import bf16_reference, dense_reference, merge_ranks, sharded_case

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA or paged_decode.triton is None,
                                                  reason="needs a CUDA device and triton")]
SCALE = 192 ** -0.5  # DeepSeek-V2's qk_head_dim (nope 128 + rope 64)

# Plans beyond the chosen one: one split, uneven, fused (two sizes), 32-head blocks, other tiles/warps/stages.
PLANS = [mla.MLADecodePlan(1), mla.MLADecodePlan(5, block_n=16), mla.MLADecodePlan(3, fused_merge=True),
         mla.MLADecodePlan(8, block_n=16, fused_merge=True), mla.MLADecodePlan(24, block_h=32, num_warps=8),
         mla.MLADecodePlan(12, block_n=64, num_warps=8, num_stages=1), mla.MLADecodePlan(2, num_stages=4),
         mla.MLADecodePlan(7, block_n=16, num_warps=2, num_stages=5, fused_merge=False)]


def _run_ranks(case: dict, plan=None, dtype=None) -> tuple[list, list]:
    q = case["q"] if dtype is None else case["q"].to(dtype)
    outs, lses = [], []
    for r in case["ranks"]:
        cache = r["cache"] if dtype is None else r["cache"].to(dtype)
        out, lse = mla.paged_mla_decode_kernel(q, cache, r["block_table"], r["lens"], SCALE, case["v_head_dim"],
                                               plan=plan)
        empty = (r["lens"] == 0).cpu()
        assert bool((out.cpu()[empty] == 0).all()) and bool(torch.isneginf(lse.cpu()[empty]).all()), \
            f"{plan}: an empty shard must give out 0 and lse -inf"
        outs.append(out)
        lses.append(lse)
    return outs, lses


def _err(out: torch.Tensor, want: torch.Tensor) -> float:
    return (out.double().cpu() - want).abs().max().item()


@pytest.mark.parametrize("lens,heads,world,interleave", [
    ([1024], 16, 1, 1),
    ([131072], 16, 1, 1),  # batch 1, a 128k shard: many splits
    ([2048] * 64, 16, 1, 1),  # batch 64
    ([16384] * 16, 16, 2, 1),  # batch 16, 16k contexts over two ranks: 8k-token shards
    ([0, 5, 1000, 33000, 65536], 16, 2, 16),  # empty shards, short sequences, interleave 16
    ([3, 70000, 4096, 17], 128, 4, 8),  # 128 heads (DeepSeek-V3 under DCP): head blocks; ranks > 0 empty for 3
])
def test_mla_kernel_within_twice_the_bf16_reference(lens, heads, world, interleave):
    case = sharded_case(lens, heads=heads, kv_lora_rank=512, rope=64, block_size=64, world=world,
                        interleave=interleave, dtype=torch.bfloat16, device="cuda", seed=len(lens))
    want, want_lse = dense_reference(case["q"], case["rows"], SCALE, 512)
    bf16_err = _err(bf16_reference(case["q"], case["rows"], SCALE, 512), want)
    got, got_lse = merge_ranks(*_run_ranks(case))
    err = _err(got, want)
    assert err <= 2 * bf16_err + 1e-6, f"error vs float64 {err:.3g} > 2 x the bf16 reference's {bf16_err:.3g}"
    fin = torch.isfinite(want_lse)
    assert torch.equal(fin, torch.isfinite(got_lse)) and (got_lse[fin] - want_lse[fin]).abs().max() < 1e-3
    # float32 caches: no tf32, tight
    got32, _ = merge_ranks(*_run_ranks(case, dtype=torch.float32))
    assert _err(got32, want) < 1e-5


def test_every_plan_within_twice_the_bf16_reference():
    case = sharded_case([0, 700, 5000, 20000], heads=16, kv_lora_rank=512, rope=64, block_size=64, world=2,
                        interleave=4, dtype=torch.bfloat16, device="cuda", seed=3)
    want, _ = dense_reference(case["q"], case["rows"], SCALE, 512)
    bf16_err = _err(bf16_reference(case["q"], case["rows"], SCALE, 512), want)
    for plan in PLANS + PLANS[2:4]:  # fused plans twice: their arrival counters must have reset
        err = _err(merge_ranks(*_run_ranks(case, plan))[0], want)
        assert err <= 2 * bf16_err + 1e-6, f"{plan}: error {err:.3g} > 2 x bf16 reference's {bf16_err:.3g}"
    assert all(int(c.abs().sum()) == 0 for c in paged_decode._COUNTERS[torch.device("cuda", 0)])


def test_op_on_cuda_is_the_kernel_and_writes_a_strided_packed_buffer():
    case = sharded_case([300, 0, 4000], heads=16, kv_lora_rank=512, rope=64, block_size=64, world=2, interleave=1,
                        dtype=torch.bfloat16, device="cuda", seed=5)
    r = case["ranks"][1]
    q = case["q"]
    want_out, want_lse = mla.paged_mla_decode_kernel(q, r["cache"], r["block_table"], r["lens"], SCALE, 512)
    out, lse = mla.paged_mla_decode_with_lse(q, r["cache"], r["block_table"], r["lens"], SCALE, 512)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    packed = torch.full((3, 16, 513), 7.0, device="cuda")
    got, got_lse = mla.paged_mla_decode_with_lse(q, r["cache"], r["block_table"], r["lens"], SCALE, 512,
                                                 out=packed[..., :512], lse=packed[..., 512])
    assert got.data_ptr() == packed.data_ptr()
    ref_out, ref_lse = mla.paged_mla_decode_reference(q, r["cache"], r["block_table"], r["lens"], SCALE, 512)
    assert (packed[..., :512] - ref_out.float()).abs().max() < 2e-2
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(packed[..., 512]), fin)
    assert (packed[..., 512][fin] - ref_lse[fin]).abs().max() < 1e-3


def test_the_interpreter_checks_hold_on_cuda():
    from tests import triton_interpreter_checks as checks

    checks.check_paged_mla_decode("cuda", torch.float32)
    checks.check_paged_mla_decode("cuda", torch.bfloat16)
    checks.check_paged_mla_decode("cuda", torch.float32, heads=20, plans=checks.mla_plans()[3:5])


@pytest.mark.parametrize("plan", [None, mla.MLADecodePlan(4, fused_merge=True), mla.MLADecodePlan(16)])
def test_graph_replay_equals_eager(plan):
    """Captured once (sized by the block table's capacity), replayed on new query contents and new lengths (an
    empty shard included) with eager launches in between: bitwise the eager result."""
    case = sharded_case([1000, 700, 3000], heads=16, kv_lora_rank=512, rope=64, block_size=64, world=1, interleave=1,
                        dtype=torch.bfloat16, device="cuda", seed=7, spare_blocks=4)
    r, q = case["ranks"][0], case["q"]
    lens = r["lens"]
    run = lambda: mla.paged_mla_decode_kernel(q, r["cache"], r["block_table"], lens, SCALE, 512, plan=plan)  # noqa
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up: compiles and allocates the counters outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = run()
    g = torch.Generator(device="cuda").manual_seed(1)
    for new in ([5, 0, 2999], [1000, 700, 3000], [999, 64, 65]):  # within each row's blocks
        q.copy_(torch.randn(q.shape, generator=g, device="cuda", dtype=q.dtype))
        lens.copy_(torch.tensor(new, dtype=lens.dtype))
        graph.replay()
        e_out, e_lse = run()
        assert torch.equal(g_out, e_out) and torch.equal(g_lse, e_lse), (plan, new)
    torch.cuda.synchronize()
    assert all(int(c.abs().sum()) == 0 for c in paged_decode._COUNTERS[q.device])
