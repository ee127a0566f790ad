"""The paged MLA decode op's PyTorch path (what CPU runs) against float64 attention of the unsharded sequences.

The Triton kernel's checks are in ``triton_interpreter_checks.check_paged_mla_decode`` (CPU, interpreter) and
``test_gpu_backends`` (CUDA).
"""

from __future__ import annotations

import pytest
import torch

from megacp.ops.paged_mla_decode import MLADecodePlan, choose_mla_plan, paged_mla_decode_with_lse
from tests.mla_decode_cases import dense_reference, merge_ranks, sharded_case

SCALE = 0.11


@pytest.mark.parametrize("world,interleave", [(1, 1), (2, 1), (2, 4), (3, 2)])
def test_sharded_decode_merges_to_dense_attention(world, interleave):
    # lengths: empty, shorter than one interleave round (ranks > 0 empty), not a multiple of anything, long
    case = sharded_case([0, 3, 29, 70], heads=4, kv_lora_rank=24, rope=8, block_size=4, world=world,
                        interleave=interleave, dtype=torch.float64)
    outs, lses = [], []
    for rank in case["ranks"]:
        out, lse = paged_mla_decode_with_lse(case["q"], rank["cache"], rank["block_table"], rank["lens"], SCALE, 24)
        assert out.shape == (4, 4, 24) and out.dtype == torch.float64 and lse.dtype == torch.float32
        empty = rank["lens"] == 0
        assert bool((out[empty] == 0).all()) and bool(torch.isneginf(lse[empty]).all()), "empty shard: out 0, -inf"
        assert bool(torch.isfinite(out).all()), "NaN from a slot past a length leaked in"
        outs.append(out)
        lses.append(lse)
    got_out, got_lse = merge_ranks(outs, lses)
    want_out, want_lse = dense_reference(case["q"], case["rows"], SCALE, 24)
    # float64 math; with world > 1 the merge weights come from the float32 LSEs (the op's contract)
    assert (got_out - want_out).abs().max() < (1e-12 if world == 1 else 1e-6)
    assert torch.equal(torch.isinf(got_lse), torch.isinf(want_lse))
    fin = torch.isfinite(want_lse)
    assert torch.allclose(got_lse[fin], want_lse[fin], atol=1e-5)  # lse is float32 by contract


def test_bf16_within_rounding_and_negative_control():
    case = sharded_case([50, 17], heads=3, kv_lora_rank=32, rope=16, block_size=8, world=1, interleave=1,
                        dtype=torch.bfloat16)
    rank = case["ranks"][0]
    out, lse = paged_mla_decode_with_lse(case["q"], rank["cache"], rank["block_table"], rank["lens"], SCALE, 32)
    want_out, want_lse = dense_reference(case["q"], case["rows"], SCALE, 32)
    assert out.dtype == torch.bfloat16
    assert (out.double() - want_out).abs().max() < 2e-2 and (lse.double() - want_lse).abs().max() < 1e-4
    # negative control: values taken from the rope part instead of c_kv must not pass the same check
    bad = dense_reference(case["q"], [r.flip(-1) for r in case["rows"]], SCALE, 32)[0]
    assert (bad - want_out).abs().max() > 5e-2


def test_out_and_lse_written_into_a_strided_packed_buffer():
    case = sharded_case([9, 0, 33], heads=2, kv_lora_rank=16, rope=8, block_size=4, world=2, interleave=2,
                        dtype=torch.bfloat16)
    rank = case["ranks"][1]
    want_out, want_lse = paged_mla_decode_with_lse(case["q"], rank["cache"], rank["block_table"], rank["lens"],
                                                   SCALE, 16)
    packed = torch.full((3, 2, 17), 7.0)
    got_out, got_lse = paged_mla_decode_with_lse(case["q"], rank["cache"], rank["block_table"], rank["lens"], SCALE,
                                                 16, out=packed[..., :16], lse=packed[..., 16])
    assert got_out.data_ptr() == packed.data_ptr()
    assert torch.equal(packed[..., :16], want_out.float()) and torch.equal(packed[..., 16], want_lse)


def test_errors_name_the_argument():
    q = torch.randn(2, 2, 24)
    cache = torch.randn(5, 4, 24)
    bt = torch.zeros(2, 3, dtype=torch.int32)
    lens = torch.tensor([3, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="v_head_dim"):
        paged_mla_decode_with_lse(q, cache, bt, lens, 1.0, 25)
    with pytest.raises(ValueError, match="latent_cache"):
        paged_mla_decode_with_lse(q, cache[..., :20], bt, lens, 1.0, 16)
    with pytest.raises(ValueError, match="block_table"):
        paged_mla_decode_with_lse(q, cache, bt[:1], lens, 1.0, 16)
    with pytest.raises(ValueError, match="out and lse go together"):
        paged_mla_decode_with_lse(q, cache, bt, lens, 1.0, 16, out=torch.empty(2, 2, 16))


def test_plans_are_validated_and_chosen_within_bounds():
    for bad in (dict(num_splits=0), dict(num_splits=2, block_h=24), dict(num_splits=2, block_h=8),
                dict(num_splits=2, block_n=48), dict(num_splits=2, num_warps=3)):
        with pytest.raises(ValueError, match="is not valid: use"):
            MLADecodePlan(**bad)
    for batch, heads, tokens in ((1, 16, 131072), (1, 16, 100), (16, 16, 8192), (64, 16, 2048), (4, 128, 65536)):
        plan = choose_mla_plan(batch, heads, tokens, num_sms=132)
        assert 1 <= plan.num_splits <= min(128, max(1, -(-tokens // 256), min(32, -(-tokens // 64))))
        assert plan.block_h == (16 if heads <= 16 else 32)
        assert not plan.fused_merge  # the merge kernel merges (the fused merge measured slower)
        programs = batch * -(-heads // plan.block_h) * plan.num_splits
        assert programs <= 2 * 132 * 1.5 or plan.num_splits == 1, (batch, heads, tokens, plan)
    assert choose_mla_plan(1, 16, 131072).num_splits == 128  # batch 1, long shard: many splits fill the GPU
    assert choose_mla_plan(64, 16, 2048).num_splits == 4
    # short shards (launch-bound): up to 32 splits of >= 64 tokens, merged by the merge kernel (the H200 sweep's best)
    assert [choose_mla_plan(b, 16, n).num_splits for b, n in ((1, 1024), (1, 2048), (16, 1024), (16, 2048))] == \
        [16, 32, 16, 16]
