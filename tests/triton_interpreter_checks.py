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
from megacp.kv import PagedKVCache
from megacp.layers.rotary import apply_rotary_tables, compute_inv_freq, rotary_tables
from megacp.ops import decode_fused, moe_combine, paged_decode, paged_mla_decode, rms_norm, rope_inplace
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


def check_merge_into() -> None:
    """``merge_attn_states_into`` on 2, 3 and 4 strided partials through the Triton kernel (``merge_into``) against
    ``merge_attn_states_n``: float32 and bf16 partials, empty partials and an all-empty row, head count not a
    multiple of the head block, in-place views of a larger output."""
    from megacp.ops.merge_kernel import merge_into

    g = torch.Generator().manual_seed(11)
    for n, dtype in ((2, torch.float32), (3, torch.bfloat16), (4, torch.float32)):
        R, H, D = 5, 20, 24
        base = torch.randn(n, R + 2, H, D + 8, generator=g).to(dtype)
        outs = [base[i, 1:R + 1, :, :D] for i in range(n)]  # strided views
        lses = [torch.randn(R, H, generator=g) * 3 for _ in range(n)]
        lses[0][0] = float("-inf")  # an empty partial
        for s in lses:
            s[2, 3] = float("-inf")  # a row with none
        want_o, want_l = merge_attn_states_n(torch.stack([o.float() for o in outs]), torch.stack(lses))
        big = torch.full((R + 1, H, D), float("nan"), dtype=dtype)
        out, lse = big[1:], torch.empty(R, H)
        calls = []
        real = merge_mod.merge_into
        merge_mod.merge_into = lambda *a: (calls.append(1), real(*a))
        try:
            merge_mod.merge_attn_states_into(outs, lses, out, lse)
        finally:
            merge_mod.merge_into = real
        assert calls, "merge_attn_states_into did not take the kernel"
        ulp = float(want_o.abs().max()) * 2 ** -7  # one bf16 ulp at the largest value: the two roundings may differ
        _close(out, want_o.to(dtype), 1e-5 if dtype == torch.float32 else ulp, f"merge_into n={n} {dtype}")
        _lse_close(lse, want_l, 1e-5, f"merge_into n={n}")
        assert torch.isnan(big[0]).all() and out[2, 3].abs().max() == 0
    try:
        merge_into([outs[0]], [lses[0]], out, lse)
    except ValueError as e:
        assert "2..4" in str(e)
    else:
        raise AssertionError("merge_into accepted one partial")


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


def _bitwise_or_one_bf16_ulp(dtype: torch.dtype):
    """float32: bitwise equality. bfloat16: within one bf16 ulp of each value plus one of the tensor's largest,
    because the interpreter's float32 -> bf16 cast truncates where the GPU (and PyTorch) round to nearest, three
    times per value here; the GPU test holds bf16 to bitwise equality."""
    if dtype != torch.bfloat16:
        return torch.equal
    return lambda a, b: bool(((a.float() - b.float()).abs()
                              <= (b.float().abs() + b.float().abs().max()) * 2 ** -7).all())


def check_rope_and_cache_write(dtype: torch.dtype, head_dim: int, device: str = "cpu") -> None:
    """One kernel for RoPE of q and k, the k and v cache writes, equals ``apply_rotary_tables`` +
    ``PagedKVCache.write_rows`` (bit for bit in float32, see ``_bitwise_or_one_bf16_ulp``): GQA, slots out of
    order, a row to the null slot, an odd head dim
    (non-power-of-two, masked), untouched slots stay untouched."""
    g = torch.Generator().manual_seed(7)
    B, hq, hkv, D = 3, 4, 2, head_dim
    qkv = torch.randn(B, (hq + 2 * hkv) * D, generator=g).to(device=device, dtype=dtype)
    tables = rotary_tables(torch.tensor([5, 0, 130], device=device), compute_inv_freq(D, 10000.0), dtype)
    mine, ref = (PagedKVCache(4, 4, hkv, D, dtype=dtype, device=device) for _ in range(2))
    for c in (mine, ref):  # garbage everywhere, so a write to the wrong place or a missed one shows
        for t in c.storage:
            t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    ref.storage[0].copy_(mine.storage[0]), ref.storage[1].copy_(mine.storage[1])
    slots = torch.tensor([9, mine.null_slot, 2], device=device)
    q = decode_fused.rope_and_cache_write(qkv, tables.cos, tables.sin_signed, *mine.storage, slots, hq, hkv)
    qk = apply_rotary_tables(qkv[:, : (hq + hkv) * D].view(B, hq + hkv, D), tables)
    ref.write_rows(qk[:, hq:], qkv[:, (hq + hkv) * D:].view(B, hkv, D), None, slots)
    what = f"rope_and_cache_write {dtype} D={D}"
    same = _bitwise_or_one_bf16_ulp(dtype)
    assert same(q, qk[:, :hq]), f"{what}: q differs"
    assert same(mine.storage[0], ref.storage[0]), f"{what}: the k cache differs"
    assert torch.equal(mine.storage[1], ref.storage[1]), f"{what}: the v cache differs"  # v is copied, never rounded
    # negative control: the other half-rotation convention (interleaved pairs) must not pass
    wrong = (qkv[:, : hq * D].view(B, hq, D) * tables.cos + qkv[:, : hq * D].view(B, hq, D) * tables.sin_signed)
    assert not torch.equal(q, wrong.to(dtype)), f"{what}: the check cannot tell rotations apart"


def check_silu_mul(dtype: torch.dtype, device: str = "cpu") -> None:
    """``silu(gate)·up`` in one kernel against ``F.silu(gate) * up``: within a few ulps of the dtype (here numpy's exp
    meets CPU PyTorch's vectorised one; the GPU test compares libdevice's with CUDA's bitwise); a row wider than one
    block (two column blocks, masked tail)."""
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(3, 2 * 1100, generator=g) * 4).to(device=device, dtype=dtype)
    got = decode_fused.silu_mul(x)
    gate, up = x.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    err = ((got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-30)).max().item()
    # float32: ~8 ulps; bf16: two ulps of its 8-bit significand (the interpreter truncates both roundings)
    limit = 1e-6 if dtype == torch.float32 else 2 ** -6
    assert err <= limit, f"silu_mul {dtype}: relative error {err:.3g} > {limit:g}"
    if dtype == torch.float32:  # not rounded to bf16 anywhere
        assert not torch.equal(got, (torch.nn.functional.silu(gate.bfloat16()) * up.bfloat16()).float())


def combine_in_order(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The MoE combine's contract spelled out: pairs j = 0..k-1 in order from +0.0, each float32 product rounded
    before its add; a pair with pos -1 adds exactly 0 (its row is never used)."""
    acc = torch.zeros(pos.shape[0], y.shape[1], dtype=torch.float32, device=y.device)
    for j in range(pos.shape[1]):
        rows = y[pos[:, j].clamp(min=0)].float()
        acc = acc + torch.where((pos[:, j] >= 0)[:, None], weights[:, j, None].float() * rows, 0.0)
    return acc.to(out_dtype)


def moe_combine_case(n: int, k: int, h: int, dtype: torch.dtype, seed: int, device: str = "cpu"):
    """Expert rows ``y`` [n·k + 3, h] with the pairs' rows shuffled, about a third of the pairs non-local (pos -1,
    their rows NaN), the 3 rows past the pairs NaN (the grouped GEMM's junk), token 0 with no local pair at all."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n * k + 3, h, generator=g)
    pos = torch.randperm(n * k, generator=g).view(n, k)
    off = torch.rand(n, k, generator=g) < 0.35
    if n:
        off[0] = True
    y[pos[off]] = float("nan")
    y[n * k:] = float("nan")
    pos = torch.where(off, -1, pos)
    weights = torch.rand(n, k, generator=g)
    return y.to(device=device, dtype=dtype), pos.to(device), weights.to(device)


def check_moe_combine(device: str = "cpu") -> None:
    """The one-kernel MoE combine: bitwise the in-order float32 sum (float32 output), within float32 rounding of the
    PyTorch path (torch's own sum order), no NaN from junk or non-local rows, a token without local pairs exactly
    0; k = 1 and 6 (DeepSeek-V2), a row wider than one block (1100: two column blocks, masked tail), N = 0."""
    for n, k, h, dtype in ((7, 6, 40, torch.float32), (9, 6, 48, torch.bfloat16), (5, 1, 1100, torch.bfloat16),
                           (4, 6, 1100, torch.float32), (0, 6, 16, torch.bfloat16)):
        y, pos, weights = moe_combine_case(n, k, h, dtype, seed=n * 10 + k, device=device)
        what = f"moe combine n={n} k={k} h={h} {dtype}"
        got = moe_combine.combine_rows_fused(y, pos, weights, torch.float32)
        assert got.shape == (n, h) and bool(torch.isfinite(got).all()), f"{what}: shape or a NaN leaked"
        assert torch.equal(got, combine_in_order(y, pos, weights, torch.float32)), f"{what}: not the in-order sum"
        torch_path = moe_combine.combine_rows(y, pos, weights, torch.float32)
        _close(got, torch_path, 4 * 2 ** -24 * k * float(torch_path.abs().max()) if n else 0.0, what + " vs torch")
        if n:
            assert torch.equal(got[0], torch.zeros(h)), f"{what}: a token without local pairs is not 0"
            # negative control: the same rows combined with the pairs of two tokens swapped differ
            swapped = moe_combine.combine_rows_fused(y, pos[[1, 0] + list(range(2, n))], weights, torch.float32)
            assert not torch.equal(swapped, got), f"{what}: the check cannot tell tokens apart"
        in_dtype = moe_combine.combine_rows_fused(y, pos, weights, dtype)
        assert in_dtype.dtype == dtype and in_dtype.shape == (n, h)
        if not n:
            continue
        # bf16 out: the interpreter's float32 -> bf16 cast truncates where the GPU rounds to nearest (one ulp)
        same = _bitwise_or_one_bf16_ulp(dtype)
        assert same(in_dtype, got.to(dtype)), f"{what}: output in {dtype} differs"


def check_moe_grouped_wiring() -> None:
    """``expert_forward_grouped`` with its Triton SiLU·mul and combine switched on (what CUDA runs; interpreted on
    CPU tensors) equals the PyTorch ops, with and without an expert map (non-local pairs), k = 1 and 3."""
    from megacp.moe import determine_expert_map
    from megacp.moe.layer import expert_forward_grouped

    g = torch.Generator().manual_seed(12)
    E, H, I, n = 6, 16, 12, 11
    x = torch.randn(n, H, generator=g)
    w13, w2 = torch.randn(E, 2 * I, H, generator=g) * 0.3, torch.randn(E, H, I, generator=g) * 0.3
    _, emap = determine_expert_map(2, 1, 2 * E, "round_robin")  # E local experts of 2·E
    saved = decode_fused.available, moe_combine.available
    for k, expert_map in ((3, None), (1, None), (3, emap)):
        experts = E if expert_map is None else 2 * E
        ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n)])
        weights = torch.rand(n, k, generator=g)
        want = expert_forward_grouped(x, w13, w2, weights, ids, expert_map, False)
        calls = []
        decode_fused.available = moe_combine.available = lambda t: calls.append(1) or True
        try:
            got = expert_forward_grouped(x, w13, w2, weights, ids, expert_map, True)
        finally:
            decode_fused.available, moe_combine.available = saved
        assert len(calls) == 2, "the fused kernels were not used"
        _close(got, want, 1e-5 * float(want.abs().max()), f"grouped experts fused vs eager k={k} map={expert_map}")


def check_rope_inplace(dtype: torch.dtype, rope_dim: int, interleave: bool, device: str = "cpu",
                       tables_dtype: torch.dtype | None = None) -> None:
    """In-place RoPE of the rope part of a wider row (MLA's q_pe inside [q_nope | q_pe]) equals
    ``apply_rotary_tables`` (bit for bit in float32, see ``_bitwise_or_one_bf16_ulp``), the other columns untouched;
    interleaved pairs and halves, a non-power-of-two dim (masked). ``tables_dtype`` float32 for a bf16 ``x``
    (DeepSeek-V2's ``rope_float32``): equals the float32 rotation rounded once."""
    g = torch.Generator().manual_seed(rope_dim)
    T, H, nope = 5, 3, 7
    q = torch.randn(T, H, nope + rope_dim, generator=g).to(device=device, dtype=dtype)
    tables = rotary_tables(torch.tensor([3, 0, 77, 1000, 5], device=device), compute_inv_freq(rope_dim, 10000.0),
                           tables_dtype or dtype)
    want = apply_rotary_tables(q[..., nope:].to(tables.cos.dtype), tables, interleave=interleave).to(dtype)
    got = q.clone()
    out = rope_inplace.rotate_(got[..., nope:], tables.cos, tables.sin_signed, interleave)
    what = f"rope_inplace {dtype} D={rope_dim} interleave={interleave} tables {tables.cos.dtype}"
    assert out.data_ptr() == got[..., nope:].data_ptr(), f"{what}: not in place"
    assert torch.equal(got[..., :nope], q[..., :nope]), f"{what}: the other columns changed"
    assert _bitwise_or_one_bf16_ulp(dtype)(got[..., nope:], want), f"{what}: differs from apply_rotary_tables"
    other = apply_rotary_tables(q[..., nope:], tables, interleave=not interleave)
    assert not torch.equal(got[..., nope:], other), f"{what}: the check cannot tell the pairings apart"


def check_mla_rope_wiring() -> None:
    """MLAAttention with the in-place RoPE switched on (what CUDA runs; interpreted on CPU tensors) gives the eager
    path's output, float32, interleaved pairs (bitwise: the same roundings)."""
    from megacp.layers.metadata_builder import build_attention_metadata
    from megacp.layers.mla_attention import MLAAttention

    torch.manual_seed(4)
    attn = MLAAttention(32, 4, 16, 8, 8, 6, q_lora_rank=None, rope_interleave=True)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    meta = build_attention_metadata([0, 1], [0, 0], [4, 3], None)  # two prompts, a training-style prefill
    hidden = torch.randn(meta.num_local_tokens, 32)
    tables = rotary_tables(meta.positions, compute_inv_freq(8, 10000.0), torch.float32)
    saved = rope_inplace.available
    with torch.no_grad():
        want = attn(hidden, meta, None, tables)
        calls = []
        rope_inplace.available = lambda x: calls.append(1) or True
        try:
            got = attn(hidden, meta, None, tables)
        finally:
            rope_inplace.available = saved
    assert calls and torch.equal(got, want), "MLA in-place rope vs eager"


def check_llama_decode_wiring() -> None:
    """The tiny seeded Llama with the fused kernels and the decode GEMV of every projection switched on (what CUDA
    runs; here interpreted on CPU tensors) gives the eager model's logits over a prefill and three pure-decode steps;
    each decode step calls the RoPE + cache kernel once per layer (prefills keep the eager RoPE), SiLU·mul is fused
    in every step and every projection of every step is a GEMV call (rows ≤ gemv.MAX_ROWS); with it off, none."""
    from megacp.kv import BlockTable
    from megacp.layers.metadata_builder import build_attention_metadata
    from megacp.models.config import build_tiny_llama_config
    from megacp.models.llama import LlamaForCausalLM
    from megacp.models.loader import seeded_hf_weights
    from megacp.ops import gemv

    saved_roles = os.environ.get(gemv.ENV_ROLES)
    os.environ[gemv.ENV_ROLES] = "all"
    try:
        model = LlamaForCausalLM(build_tiny_llama_config(), params_dtype=torch.float32)
    finally:
        os.environ.pop(gemv.ENV_ROLES) if saved_roles is None else os.environ.__setitem__(gemv.ENV_ROLES, saved_roles)
    projections = [m for m in model.modules() if hasattr(m, "decode_gemv")]
    assert projections and all(m.decode_gemv for m in projections)
    loaders = model.hf_weight_loaders()
    for name, tensor in seeded_hf_weights(model, 0).items():
        loaders[name](tensor)
    layers = model.config.num_hidden_layers
    seqs = [[3, 14, 15, 92, 65, 35, 89, 7, 8, 9], [27, 18, 28, 18, 28, 9, 10, 11, 12]]
    steps = [([0, 1], [0, 0], [6, 5])] + [([0, 1], [6 + i, 5 + i], [1, 1]) for i in range(3)]
    calls = {"rope": 0, "silu": 0, "gemv": 0}
    real = decode_fused.rope_and_cache_write, decode_fused.silu_mul, gemv.linear, gemv.applies

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    def run(fused: bool, use_gemv: bool = True) -> list[torch.Tensor]:
        table = BlockTable(4, 2, 4, 1, 0, 1)
        table.set_row(0, [0, 1, 2, 3]), table.set_row(1, [4, 5, 6, 7])
        caches = [PagedKVCache(8, 4, model.num_local_kv_heads, model.head_dim) for _ in range(layers)]
        saved = decode_fused.available
        decode_fused.available = (lambda x: True) if fused else (lambda x: False)
        gemv.applies = (lambda x, w, b=None: fused and use_gemv and x.shape[0] <= gemv.MAX_ROWS)
        try:
            logits = []
            for rows, computed, new in steps:
                meta = build_attention_metadata(rows, computed, new, table, device="cpu", null_slot=caches[0].null_slot)
                flat = torch.tensor([t for r, c, n in zip(rows, computed, new) for t in seqs[r][c:c + n]])
                with torch.no_grad():
                    hidden = model(flat[meta.token_index.clamp(min=0)], meta, caches)
                    logits.append(model.compute_logits(meta.select_logits_hidden(hidden)))
            return logits
        finally:
            decode_fused.available = saved
            gemv.applies = real[3]

    decode_fused.rope_and_cache_write, decode_fused.silu_mul = counted("rope", real[0]), counted("silu", real[1])
    gemv.linear = counted("gemv", real[2])
    try:
        fused = run(True)
        assert calls == {"rope": 3 * layers, "silu": 4 * layers, "gemv": 4 * 4 * layers}, calls
        calls.update(rope=0, silu=0, gemv=0)
        no_gemv = run(True, use_gemv=False)
        assert calls == {"rope": 3 * layers, "silu": 4 * layers, "gemv": 0}, calls
    finally:
        decode_fused.rope_and_cache_write, decode_fused.silu_mul = real[:2]
        gemv.linear = real[2]
    for i, (a, b, c) in enumerate(zip(fused, no_gemv, run(False))):
        _close(a, c, 1e-5 * float(c.abs().max()), f"llama step {i} fused + gemv vs eager logits")
        _close(b, c, 1e-5 * float(c.abs().max()), f"llama step {i} fused vs eager logits")


def check_gemv() -> None:
    """megacp.ops.gemv's decode GEMV against ``x @ w.T``: rows below, at and above one 16-row tile, ragged N and K,
    two tilings. float32: the interpreter's bf16 ``tl.dot`` returns garbage (Triton 3.9), so bf16 is checked on the
    GPU (tests/test_gpu_decode_fused.py)."""
    from megacp.ops import gemv

    g = torch.Generator().manual_seed(9)
    for M in (1, 5, 20):
        x, w = torch.randn(M, 300, generator=g), torch.randn(70, 300, generator=g)
        for config in (gemv.GemvConfig(32, 128), gemv.GemvConfig(16, 64)):
            _close(gemv.linear(x, w, config=config), x @ w.T, 2e-4, f"gemv M={M} {config}")


def check_greedy_tokens() -> None:
    """megacp.ops.greedy's kernel equals ``where(isfinite.all, argmax, -1)``: rows spanning 1-3 programs, the max
    tied inside a program and across programs (the lowest id wins: the check tells first from last), NaN and inf
    rows, float32 and bfloat16, the same launch twice (its arrival counters reset)."""
    from megacp.ops import greedy

    g = torch.Generator().manual_seed(5)
    V = 2 * greedy._BLOCK + 37
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(6, V, generator=g).to(dtype)
        x[1, [8200, 5000, 100]] = 50.0  # ties across programs
        x[2, [7, 3]] = 50.0  # ties inside one
        x[3, 4100] = float("nan")
        x[4, V - 1] = float("-inf")
        x[5, :] = 0.0  # all tied
        want = torch.where(torch.isfinite(x).all(-1), x.argmax(-1), -1)
        assert want[1:3].tolist() == [100, 3] and want[5] == 0, "reference tie-breaking"
        assert torch.flip(x, [1]).argmax(-1)[1] != V - 1 - 100, "negative control: the last max differs"
        for _ in range(2):
            got = greedy.greedy_tokens(x, -1)
            assert got.dtype == torch.long and torch.equal(got, want), f"greedy {dtype}: {got} vs {want}"
        assert torch.equal(greedy.greedy_tokens(x[:, :100], -1), torch.where(torch.isfinite(x[:, :100]).all(-1),
                                                                              x[:, :100].argmax(-1), -1))
    counters = paged_decode._COUNTERS[torch.device("cpu")]
    assert all(int(c.abs().sum()) == 0 for c in counters), "greedy left its arrival counters non-zero"


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
    check_merge_into()
    check_cp_merge_gathered(dtype=torch.float32)
    check_cp_merge_gathered(dtype=torch.bfloat16)
    check_rms_norm()
    for dtype in (torch.float32, torch.bfloat16):
        check_rope_and_cache_write(dtype, 16)
        check_silu_mul(dtype)
    check_rope_and_cache_write(torch.float32, 12)
    check_llama_decode_wiring()
    check_moe_combine()
    for dtype in (torch.float32, torch.bfloat16):
        for interleave in (True, False):
            check_rope_inplace(dtype, 16, interleave)
    check_rope_inplace(torch.float32, 12, True)
    check_rope_inplace(torch.bfloat16, 16, True, tables_dtype=torch.float32)
    check_mla_rope_wiring()
    check_moe_grouped_wiring()
    check_gemv()
    check_greedy_tokens()
    print("triton interpreter checks: ok")


if __name__ == "__main__":
    main()
