"""megacp's Triton kernels against PyTorch references: on the CPU under Triton's interpreter (and on a GPU).

    TRITON_INTERPRET=1 python -m tests.triton_interpreter_checks      (tests/test_triton_kernels_cpu.py runs it)

The interpreter executes a kernel's Python body program by program with numpy, so a CPU machine checks the kernels'
logic (index math, masks, the split plan, the split merge, the fused merge's arrival counters, the LSE merge of
gathered CP partials, the fused residual-add + RMSNorm) with no GPU. It does not check what only a GPU shows
(compilation for a GPU, memory ordering between programs, speed): ``test_triton_kernels_cpu`` compiles the kernels
for sm_90 separately and the GPU-marked tests run them, ``check_merge_partials`` and ``check_cp_merge_gathered``
with ``device="cuda"``. Shapes are tiny: the interpreter is slow.
Exits 0 after printing ``triton interpreter checks: ok``; an assertion names the failing case.
"""

from __future__ import annotations

import math
import os

import torch

from megacp.ops import cp_merge_gathered, cp_merge_packed, merge_attn_states_n, paged_attention_with_lse
from megacp.ops import merge as merge_mod
from megacp.ops import paged_decode, paged_mla_decode, rms_norm
from megacp.ops.merge_kernel import merge_partials
from tests.mla_decode_cases import bf16_reference, dense_reference, merge_ranks, sharded_case


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:g}"


def _lse_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{what}: -inf LSE rows differ"
    finite = torch.isfinite(want)
    _close(got[finite], want[finite], tol, what + " lse")


def check_paged_decode() -> None:
    """Every launch plan (one split, uneven splits, more splits than tiles, split merge by kernel and in-kernel
    merge by arrival counters, twice so the counters must have reset) equals the PyTorch gather path, with a
    ``randperm`` block table, GQA and an empty sequence."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, bs, nb = 3, 4, 2, 16, 4, 40
    k = torch.randn(nb, bs, Hkv, D, generator=g)
    v = torch.randn(nb, bs, Hkv, D, generator=g)
    bt = torch.stack([torch.randperm(nb, generator=g)[:10] for _ in range(B)]).int()
    lens = torch.tensor([37, 5, 0])
    q = torch.randn(B, Hq, D, generator=g)
    want_out, want_lse = paged_attention_with_lse(q, k, v, bt, lens, 0.25, backend="torch")
    plans = [paged_decode.DecodePlan(1, block_n=16), paged_decode.DecodePlan(3, block_n=16),
             paged_decode.DecodePlan(7, block_n=16), paged_decode.DecodePlan(2, block_n=32, fused_merge=True),
             paged_decode.DecodePlan(3, block_n=16, fused_merge=True)]
    for plan in plans + plans[-2:]:
        out, lse = paged_decode.paged_decode_with_lse(q, k, v, bt, lens, 0.25, plan=plan)
        _close(out, want_out, 1e-5, f"paged decode {plan}")
        _lse_close(lse, want_lse, 1e-5, f"paged decode {plan}")
        assert bool((out[2] == 0).all()), f"paged decode {plan}: an empty sequence must give out 0"
        # written into the two views of a packed [out | lse] buffer (what DCP decode sends): same numbers, and
        # nothing else in the buffer touched
        packed = torch.full((B, Hq, D + 1), 7.0)
        got_out, got_lse = paged_decode.paged_decode_with_lse(q, k, v, bt, lens, 0.25, plan=plan,
                                                              out=packed[..., :D], lse=packed[..., D])
        assert got_out.data_ptr() == packed.data_ptr(), f"paged decode {plan}: out= was not written in place"
        assert torch.equal(packed[..., :D], out) and torch.equal(packed[..., D], lse), f"packed paged decode {plan}"
    counters = paged_decode._COUNTERS[torch.device("cpu")]
    assert all(int(c.abs().sum()) == 0 for c in counters), "fused merge left its arrival counters non-zero"
    out, lse = paged_decode.paged_decode_with_lse(q, k, v, bt, lens, 0.25)  # choose_plan's own plan
    _close(out, want_out, 1e-5, "paged decode, chosen plan")


def mla_plans() -> list:
    """MLA launch plans covering one split, uneven splits, more splits than tiles, the merge kernel, the fused
    merge (listed twice: its counters must reset), two head blocks and every block_n."""
    P = paged_mla_decode.MLADecodePlan
    return [P(1, block_n=16), P(3, block_n=16), P(9, block_n=16), P(2, block_n=32, fused_merge=True),
            P(3, block_n=16, fused_merge=True), P(3, block_n=16, fused_merge=True), P(2, block_n=64, num_warps=8)]


def check_paged_mla_decode(device: str = "cpu", dtype: torch.dtype = torch.float32,
                           plans: list | None = None, heads: int = 3, block_size: int = 4,
                           seq_lens: tuple[int, ...] = (0, 2, 19, 45)) -> None:
    """The MLA kernel, for every plan, equals the PyTorch path on each CP rank's shard (world 2, interleave 2: an
    empty shard, lengths off every multiple; NaN in every unwritten slot), the merged ranks equal float64 attention
    of the unsharded sequences (half dtypes: error within 2x a bf16-rounding reference's; the interpreter's bf16
    ``tl.dot`` is wrong in triton 3.9, so the CPU tier runs float32 and the GPU test both), and a strided packed
    ``out=``/``lse=`` receives the same numbers. ``block_size`` a multiple of a plan's ``block_n``: the kernel reads
    each split's block ids before its tile loop (``_id_tiles``), else in it."""
    case = sharded_case(list(seq_lens), heads=heads, kv_lora_rank=24, rope=8, block_size=block_size, world=2,
                        interleave=2, dtype=dtype, device=device)
    q, dv, scale = case["q"], case["v_head_dim"], 0.13
    want_out, want_lse = dense_reference(q, case["rows"], scale, dv)
    refs = [paged_mla_decode.paged_mla_decode_reference(q, r["cache"], r["block_table"], r["lens"], scale, dv)
            for r in case["ranks"]]
    ref_err = (bf16_reference(q, case["rows"], scale, dv).double().cpu() - want_out).abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for plan in plans or mla_plans():
        outs, lses = [], []
        for rank, (r_out, r_lse) in zip(case["ranks"], refs):
            out, lse = paged_mla_decode.paged_mla_decode_kernel(q, rank["cache"], rank["block_table"], rank["lens"],
                                                                scale, dv, plan=plan)
            _close(out, r_out, tol, f"mla decode {plan} vs the PyTorch path")
            _lse_close(lse, r_lse, 1e-5 if dtype == torch.float32 else 1e-3, f"mla decode {plan}")
            empty = rank["lens"] == 0
            assert bool((out[empty] == 0).all()), f"mla decode {plan}: an empty shard must give out 0"
            B, H = lse.shape
            packed = torch.full((B, H, dv + 1), 7.0, device=device)
            got, _ = paged_mla_decode.paged_mla_decode_kernel(q, rank["cache"], rank["block_table"], rank["lens"],
                                                              scale, dv, plan=plan, out=packed[..., :dv],
                                                              lse=packed[..., dv])
            assert got.data_ptr() == packed.data_ptr(), f"mla decode {plan}: out= was not written in place"
            _close(packed[..., :dv], out, tol, f"packed mla decode {plan}")
            assert torch.equal(packed[..., dv].isinf(), lse.isinf()), f"packed mla decode {plan} lse"
            outs.append(out)
            lses.append(lse)
        err = (merge_ranks(outs, lses)[0] - want_out).abs().max().item()
        bound = 1e-5 if dtype == torch.float32 else 2 * ref_err + 1e-6
        assert err <= bound, f"mla decode {plan}: error vs float64 {err:.3g} > {bound:.3g} (bf16 ref {ref_err:.3g})"
    if device == "cpu" and paged_decode._COUNTERS.get(torch.device(device)):
        counters = paged_decode._COUNTERS[torch.device(device)]
        assert all(int(c.abs().sum()) == 0 for c in counters), "mla fused merge left its arrival counters non-zero"


def check_merge_partials(device: str = "cpu") -> None:
    """The LSE merge kernel on a strided slice of gathered partials equals ``merge_attn_states_n`` (an empty partial,
    an all-empty row), for float32 and bfloat16 outputs."""
    g = torch.Generator().manual_seed(1)
    W, B, H, D = 4, 3, 6, 24
    gathered = torch.randn(W, B, 2 * H, D + 1, generator=g)
    gathered[..., -1] *= 3
    gathered[1, 0, H + 2, -1] = -math.inf
    gathered[:, 2, H + 1, -1] = -math.inf
    mine = gathered.to(device)[:, :, H:]
    want_out, want_lse = merge_attn_states_n(mine[..., :-1], mine[..., -1])
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        out, lse = torch.empty(B, H, D, dtype=dtype, device=device), torch.empty(B, H, device=device)
        merge_partials(mine[..., :-1], mine[..., -1], out, lse)
        _close(out, want_out, tol, f"merge_partials {dtype}")
        _lse_close(lse, want_lse, 1e-5, f"merge_partials {dtype}")
        assert bool((out[2, 1] == 0).all()), "merge_partials: an all-empty row must give out 0"


class GatheredGroup:
    """A CP group seen from one rank: its all-gather returns every rank's packed partials (this rank's is the tensor
    it was given, so gradients flow as through a real all-gather)."""

    def __init__(self, packed: list[torch.Tensor], rank: int) -> None:
        self.packed, self.rank_in_group, self.world_size = packed, rank, len(packed)

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        assert dim == 0 and torch.equal(x[0], self.packed[self.rank_in_group])
        return torch.stack([x[0] if w == self.rank_in_group else p for w, p in enumerate(self.packed)])


def check_cp_merge_gathered(device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """Decode's CP merge (pcp 2 × dcp 2) takes the kernel and gives every rank the PyTorch merge of its heads (an
    empty shard for one row, a row and head no rank has keys for); a merge that needs gradients goes through
    PyTorch."""
    g = torch.Generator().manual_seed(2)
    W, dcp, B, H, D = 4, 2, 5, 3, 32
    outs = torch.randn(W, B, dcp * H, D, generator=g).to(device=device, dtype=dtype)
    lses = (3 * torch.randn(W, B, dcp * H, generator=g)).to(device)
    lses[1, 0, 2] = -math.inf
    lses[:, 4, H + 1] = -math.inf
    packed = [torch.cat([outs[w].float(), lses[w].unsqueeze(-1)], dim=-1) for w in range(W)]
    calls = []
    kernel = merge_mod.merge_partials
    merge_mod.merge_partials = lambda *a: (calls.append(1), kernel(*a))[1]
    try:
        for rank in range(W):
            heads = slice((rank % dcp) * H, (rank % dcp + 1) * H)
            want_out, want_lse = merge_attn_states_n(outs[:, :, heads].float(), lses[:, :, heads])
            with torch.inference_mode():
                out, lse = cp_merge_gathered(outs[rank], lses[rank], dcp, GatheredGroup(packed, rank))
            assert out.dtype == dtype and lse.dtype == torch.float32
            _close(out, want_out, 1e-5 if dtype == torch.float32 else 3e-2, f"cp_merge_gathered rank {rank} {dtype}")
            _lse_close(lse, want_lse, 1e-5, f"cp_merge_gathered rank {rank}")
            assert bool((out[torch.isinf(want_lse)] == 0).all()), "rows without keys must give out 0"
            with torch.inference_mode():  # the packed form decode uses: the same numbers
                p_out, p_lse = cp_merge_packed(packed[rank], dcp, GatheredGroup(packed, rank), dtype)
            assert p_out.dtype == dtype and torch.equal(p_out, out) and torch.equal(p_lse, lse), "cp_merge_packed"
        assert len(calls) == 2 * W, f"the CP merges used the kernel {len(calls)} times, not {2 * W}"
        leaf = outs[0].detach().float().requires_grad_()
        out, _ = cp_merge_gathered(leaf, lses[0], dcp, GatheredGroup([packed[0]] + packed[1:], 0))
        assert out.grad_fn is not None and len(calls) == 2 * W, "a merge needing gradients must use PyTorch"
    finally:
        merge_mod.merge_partials = kernel


def check_rms_norm() -> None:
    """The fused residual-add + RMSNorm equals PyTorch's add then ``rms_norm`` (float32)."""
    g = torch.Generator().manual_seed(3)
    x, r, w = torch.randn(5, 48, generator=g), torch.randn(5, 48, generator=g), torch.randn(48, generator=g)
    out, summed = rms_norm.fused_add_rms_norm(x, r, w, 1e-6)
    _close(summed, x + r, 1e-6, "fused add")
    _close(out, torch.nn.functional.rms_norm(x + r, (48,), w, 1e-6), 1e-5, "fused rms_norm")
    out, same = rms_norm.fused_add_rms_norm(x, None, w, 1e-6)
    assert same is x
    _close(out, torch.nn.functional.rms_norm(x, (48,), w, 1e-6), 1e-5, "fused rms_norm without residual")


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (set before triton is imported)")
    check_paged_decode()
    check_paged_mla_decode()
    check_paged_mla_decode(heads=20, plans=mla_plans()[3:5])  # two head blocks of 16
    P = paged_mla_decode.MLADecodePlan  # block ids read up front (block_n 16 | 16), 32 still in the loop
    check_paged_mla_decode(block_size=16, seq_lens=(0, 2, 37, 150), plans=[
        P(1, block_n=16, num_stages=4), P(3, block_n=16, num_stages=3), P(3, block_n=16, fused_merge=True),
        P(2, block_n=32)])
    check_merge_partials()
    check_cp_merge_gathered(dtype=torch.float32)
    check_cp_merge_gathered(dtype=torch.bfloat16)
    check_rms_norm()
    print("triton interpreter checks: ok")


if __name__ == "__main__":
    main()
