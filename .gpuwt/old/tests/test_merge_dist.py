"""dcp_merge / a PCP merge (tests/references.py) and cp_merge_gathered across real gloo processes equal unsplit decode attention.

One task per parallel configuration, all on the shared 4-rank pool. Every rank builds the same full K/V, keeps the
tokens its CP rank owns (token p on CP rank (p // I) % W, DESIGN §2), attends all the DCP group's query heads to its
shard, merges over DCP (reduce-scatter over heads) then over PCP (all-reduce), and compares with a float64
reference over the full K/V (incl. ranks with empty shards). The one-collective ``cp_merge_gathered`` (what decode
uses) merges the same partial and must equal both the reference and that two-stage composition.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_pool import model_parallel

D = 8
SEQ_LENS = [1, 2, 3, 11, 6]  # lengths 1..3 leave some CP ranks with empty shards when W = 4


def _reference(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor], scale: float):
    """float64 softmax attention, one query per sequence.  # q [B, H, D], ks[b]/vs[b] [L_b, Hk, D]"""
    outs, lses = [], []
    for b, (k, v) in enumerate(zip(ks, vs)):
        g = q.shape[1] // k.shape[1]
        kk = k.double().repeat_interleave(g, dim=1)  # [L, H, D]
        vv = v.double().repeat_interleave(g, dim=1)
        s = torch.einsum("hd,lhd->hl", q[b].double(), kk) * scale  # [H, L]
        outs.append(torch.einsum("hl,lhd->hd", torch.softmax(s, dim=-1), vv))
        lses.append(torch.logsumexp(s, dim=-1))
    return torch.stack(outs), torch.stack(lses)


def _check_decode_merge(sizes: dict, interleave: int, dtype_name: str = "float32") -> dict:
    from megacp.ops import attention_with_lse, cp_merge_gathered, dcp_merge
    from megacp.parallel_state import get_pcp_group
    from tests.references import pcp_merge

    dtype = getattr(torch, dtype_name)
    with model_parallel(cp_kv_cache_interleave_size=interleave, **sizes) as ps:
        dcp, pcp = ps.get_dcp_group(), ps.get_pcp_group()
        w, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        assert w == dcp.world_size * pcp.world_size
        assert cp_rank == pcp.rank_in_group * dcp.world_size + dcp.rank_in_group
        hq_local, hk, scale = 2, 1, 0.35
        hq = hq_local * dcp.world_size  # the DCP group's heads, after all-gathering q over DCP
        g = torch.Generator().manual_seed(1234)  # same data on every rank
        q = torch.randn(len(SEQ_LENS), hq, D, generator=g)
        ks = [torch.randn(n, hk, D, generator=g) for n in SEQ_LENS]
        vs = [torch.randn(n, hk, D, generator=g) for n in SEQ_LENS]
        ref_out, ref_lse = _reference(q, ks, vs, scale)

        mine = [torch.arange(n)[(torch.arange(n) // interleave) % w == cp_rank] for n in SEQ_LENS]
        local_lens = [len(p) for p in mine]
        cu_k = torch.tensor([0] + torch.tensor(local_lens).cumsum(0).tolist(), dtype=torch.int32)
        cu_q = torch.arange(len(SEQ_LENS) + 1, dtype=torch.int32)
        k_loc = torch.cat([k[p] for k, p in zip(ks, mine)]).to(dtype)
        v_loc = torch.cat([v[p] for v, p in zip(vs, mine)]).to(dtype)
        out, lse = attention_with_lse(q.to(dtype), k_loc, v_loc, cu_q, cu_k, causal=False, scale=scale)

        one_out, one_lse = cp_merge_gathered(out, lse, dcp.world_size)  # default group: get_cp_group()
        out, lse = dcp_merge(out, lse, dcp)
        assert out.shape == (len(SEQ_LENS), hq_local, D) and lse.shape == (len(SEQ_LENS), hq_local)
        out, lse = pcp_merge(out, lse, get_pcp_group())
        heads = slice(dcp.rank_in_group * hq_local, (dcp.rank_in_group + 1) * hq_local)
        return {
            "empty_shard": min(local_lens) == 0,
            "nan": bool(torch.isnan(out).any() or torch.isnan(lse).any()),
            "dtype": (str(out.dtype), str(lse.dtype)),
            "out_err": (out.double() - ref_out[:, heads]).abs().max().item(),
            "lse_err": (lse.double() - ref_lse[:, heads]).abs().max().item(),
            "one_nan": bool(torch.isnan(one_out).any() or torch.isnan(one_lse).any()),
            "one_dtype": (str(one_out.dtype), str(one_lse.dtype)),
            "one_out_err": (one_out.double() - ref_out[:, heads]).abs().max().item(),
            "one_lse_err": (one_lse.double() - ref_lse[:, heads]).abs().max().item(),
            "one_vs_two": max((one_out.double() - out.double()).abs().max().item(),
                              (one_lse.double() - lse.double()).abs().max().item()),
        }


def _check_all_empty_rows() -> dict:
    """A sequence no rank holds (length 0 everywhere) merges to out 0 / lse -inf, not NaN."""
    from megacp.ops import cp_merge_gathered, dcp_merge
    from megacp.parallel_state import get_pcp_group
    from tests.references import pcp_merge

    sizes = {"tensor_model_parallel_size": 2, "prefill_context_parallel_size": 2, "decode_context_parallel_size": 2}
    with model_parallel(**sizes) as ps:
        rank = ps.get_context_parallel_rank()
        out = torch.randn(2, 4, D)
        lse = torch.full((2, 4), float("-inf"))
        lse[1] = float(rank)  # row 1 non-empty on every rank
        out[0] = 0.0
        o1, l1 = cp_merge_gathered(out, lse, 2)
        o, l = dcp_merge(out, lse)
        o, l = pcp_merge(o, l, get_pcp_group())
        results = {}
        for name, (oo, ll) in {"": (o, l), "one_": (o1, l1)}.items():
            results.update({
                f"{name}row0_zero": bool((oo[0] == 0).all()),
                f"{name}row0_neginf": bool(torch.isneginf(ll[0]).all()),
                f"{name}row1_lse_err": (ll[1] - torch.logsumexp(torch.arange(4.0), 0)).abs().max().item(),
                f"{name}nan": bool(torch.isnan(oo).any() or torch.isnan(ll).any()),
            })
        results["one_vs_two_row1"] = (o1[1] - o[1]).abs().max().item()
        return results


CONFIGS = [
    # (sizes, interleave): pure DCP over 4, pure PCP over 4, PCP x DCP, two DCP groups of 2
    ({"tensor_model_parallel_size": 4, "decode_context_parallel_size": 4}, 1),
    ({"prefill_context_parallel_size": 4}, 2),
    ({"tensor_model_parallel_size": 2, "prefill_context_parallel_size": 2, "decode_context_parallel_size": 2}, 1),
    ({"tensor_model_parallel_size": 2, "prefill_context_parallel_size": 2, "decode_context_parallel_size": 2}, 2),
    ({"tensor_model_parallel_size": 4, "decode_context_parallel_size": 2}, 2),
]


def test_dcp_pcp_merge_equal_unsplit_attention(dist_pool_4):
    for sizes, interleave in CONFIGS:
        results = dist_pool_4.run(_check_decode_merge, sizes, interleave)
        for rank, r in enumerate(results):
            where = f"{sizes} I={interleave} rank {rank}"
            assert not r["nan"], where
            assert r["dtype"] == ("torch.float32", "torch.float32"), where
            assert r["out_err"] < 1e-5 and r["lse_err"] < 1e-5, (where, r)
            assert not r["one_nan"] and r["one_dtype"] == ("torch.float32", "torch.float32"), where
            assert r["one_out_err"] < 1e-5 and r["one_lse_err"] < 1e-5, (where, r)
            assert r["one_vs_two"] < 1e-6, (where, r)
        assert any(r["empty_shard"] for r in results), sizes  # the scenario really has empty shards


def test_dcp_pcp_merge_bf16_keeps_dtype(dist_pool_4):
    sizes = {"tensor_model_parallel_size": 2, "prefill_context_parallel_size": 2, "decode_context_parallel_size": 2}
    for r in dist_pool_4.run(_check_decode_merge, sizes, 1, "bfloat16"):
        assert r["dtype"] == ("torch.bfloat16", "torch.float32") and not r["nan"]
        assert r["out_err"] < 3e-2 and r["lse_err"] < 3e-2, r
        # one rounding to bf16 (the partials travel in float32) instead of one per merge stage
        assert r["one_dtype"] == ("torch.bfloat16", "torch.float32") and not r["one_nan"]
        assert r["one_out_err"] < 1e-2 and r["one_lse_err"] < 3e-2, r


def test_merge_rows_empty_on_every_rank(dist_pool_4):
    for r in dist_pool_4.run(_check_all_empty_rows):
        for name in ("", "one_"):  # dcp_merge∘pcp_merge, cp_merge_gathered
            assert r[f"{name}row0_zero"] and r[f"{name}row0_neginf"] and not r[f"{name}nan"], (name, r)
            assert r[f"{name}row1_lse_err"] < 1e-5, (name, r)
        assert r["one_vs_two_row1"] < 1e-6, r


class _FakeCP:
    """A CP group that must not be reached: argument errors come before any collective."""

    name, world_size, rank_in_group = "cp", 4, 1

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        raise AssertionError("cp_merge_gathered talked to the group before checking its arguments")


def test_cp_merge_gathered_rejects_bad_dcp_size():
    from megacp.ops import cp_merge_gathered

    out, lse = torch.zeros(2, 6, D), torch.zeros(2, 6)
    for dcp_size in (0, 3):  # 3 divides the heads (6) but not the CP group (4)
        with pytest.raises(ValueError, match="dcp_size"):
            cp_merge_gathered(out, lse, dcp_size, _FakeCP())
    with pytest.raises(ValueError, match="dcp_size"):
        cp_merge_gathered(torch.zeros(2, 3, D), torch.zeros(2, 3), 2, _FakeCP())  # 2 does not divide 3 heads
    with pytest.raises(ValueError, match="out \\[B, H, D\\]"):
        cp_merge_gathered(out, lse[:, :5], 2, _FakeCP())
