"""The "cudnn" kernel's nested-prefix decomposition (``backends_cuda._cudnn_pieces``) of PCP's packed chunks.

On the CPU a stand-in takes the place of ``aten::_scaled_dot_product_cudnn_attention`` with the contract the code
relies on: q/k/v ``[B, H, L, D]`` (strided, last dim contiguous), a top-left causal flag, returns out
``[B, Hq, Lq, Dv]`` in q's dtype and a float32 LSE ``[B, Hq, Lq, 1]`` that autograd does not differentiate (as the
real op declares it). Each PCP rank's call (head chunk r and tail chunk 2p-1-r over one K/V, keys by start and
length) is compared with the float64 "torch" reference backend and with a dense reference written here, the
stand-in's calls are counted (3 per rank r > 0, 2 for r = 0), gradients of out and LSE are checked (they go per sequence: the pieces are inference only), and negative
controls show the comparison catches a wrong alignment. The ``gpu`` test runs the real op.
"""

from __future__ import annotations

import math

import pytest
import torch

from megacp.ops import attention_with_lse, get_backend
from megacp.ops import backends_common, backends_cuda, cudnn_pieces
from megacp.ops.merge import merge_attn_states_into, merge_attn_states_n

CUDA = torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------- the stand-in
class FakeCudnnOp:
    """``aten::_scaled_dot_product_cudnn_attention`` as ``_cudnn_call`` / ``_cudnn_batch`` call it, in float64 math.

    ``gqa``: whether it takes fewer K/V heads than query heads (else a RuntimeError, as some cuDNN builds give);
    ``other_v_dim``: whether it takes a V head dim other than Q/K's. ``calls`` records (B, Lq, Lk, is_causal).
    """

    def __init__(self, gqa: bool = True, other_v_dim: bool = True) -> None:
        self.gqa, self.other_v_dim = gqa, other_v_dim
        self.calls: list[tuple[int, int, int, bool]] = []

    def __call__(self, query, key, value, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask,
                 scale=None):
        assert query.dim() == key.dim() == value.dim() == 4
        assert attn_bias is None and compute_log_sumexp and dropout_p == 0.0 and not return_debug_mask
        assert all(t.stride(-1) == 1 for t in (query, key, value)), "the op wants the last dim contiguous"
        (b, hq, lq, d), (bk, hk, lk, dk) = query.shape, key.shape
        assert b == bk == value.shape[0] and dk == d and value.shape[1:3] == (hk, lk) and hq % hk == 0
        if hk != hq and not self.gqa:
            raise RuntimeError("cuDNN Frontend error: equal head counts expected")
        if value.shape[-1] != d and not self.other_v_dim:
            raise RuntimeError("cuDNN Frontend error: head dims")
        self.calls.append((b, lq, lk, bool(is_causal)))
        group = hq // hk
        k = key.repeat_interleave(group, dim=1).double()
        v = value.repeat_interleave(group, dim=1).double()
        s = torch.einsum("bhqd,bhkd->bhqk", query.double(), k) * scale
        if is_causal:  # top-left: query i sees keys j <= i
            s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(1), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        out = torch.einsum("bhqk,bhkd->bhqd", torch.exp(s - lse.unsqueeze(-1)), v).to(query.dtype)
        return out, lse.float().detach().unsqueeze(-1), None, None, lq, lk, None, None, None


@pytest.fixture
def fake(monkeypatch):
    """The stand-in in place of the op, fresh GQA / V-dim memories, and half-only shapes lifted (float64 runs)."""
    op = FakeCudnnOp()
    monkeypatch.setattr(backends_cuda, "_CUDNN_OP", op)
    monkeypatch.setattr(backends_cuda, "_CUDNN_GQA", {"native": None})
    monkeypatch.setattr(backends_common, "_NATIVE_V_DIM", {"te": None, "cudnn": None})
    monkeypatch.setattr(backends_cuda, "CUDNN_PIECES", True)
    return op


def _exact_dtypes(monkeypatch):
    monkeypatch.setattr(backends_common, "fused_shapes_ok", lambda q, k, v: True)


# ----------------------------------------------------------------------------------------------- PCP inputs
def _qkv(T, hq, hk, d, dv, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(T, hq, d, generator=g), torch.randn(T, hk, d, generator=g), torch.randn(T, hk, dv, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _rank_call(q, k, v, T, pcp, r):
    """Rank r's packed head + tail chunk queries and the keyword arguments of its PCP call (layout "shared")."""
    c = T // (2 * pcp)
    head, tail = r, 2 * pcp - 1 - r
    qs = torch.cat([q[head * c:(head + 1) * c], q[tail * c:(tail + 1) * c]])
    host = ([0, c, 2 * c], [0, 0, T], [(head + 1) * c, (tail + 1) * c])
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=q.device)  # noqa: E731
    return qs, dict(k=k, v=v, cu_seqlens_q=i32(host[0]), cu_seqlens_k=i32(host[1]), host_cu_seqlens=host,
                    seqused_k=i32(host[2]), causal=True, scale=1 / math.sqrt(q.shape[-1]))


def _dense(q, k, v, cu_q, starts, lens, scale, shift=0):
    """Float64 dense reference: query i of sequence b sees keys j <= i + lk - lq + shift (shift 0: bottom-right)."""
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for b, (a, n) in enumerate(zip(starts, lens)):
        qs = q[cu_q[b]:cu_q[b + 1]].double()
        ks = k[a:a + n].double().repeat_interleave(group, 1)
        vs = v[a:a + n].double().repeat_interleave(group, 1)
        lq = qs.shape[0]
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        pos = torch.arange(max(n, lq), device=q.device)
        allowed = pos[None, :n] <= pos[:lq, None] + n - lq + shift
        s = s.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(s, -1)
        outs.append(torch.einsum("hqk,khd->qhd", torch.exp(s - lse.unsqueeze(-1)), vs))
        lses.append(lse.t())
    return torch.cat(outs), torch.cat(lses)


def _close(a, b, atol):
    return torch.allclose(a.double(), b.double(), atol=atol, rtol=0)


CUDNN = get_backend("cudnn")  # the registered backend object: attention_with_lse uses it as given


# ----------------------------------------------------------------------------------------------- the plan
def test_plan_of_a_pcp_rank():
    """PCP rank r of p (chunk c): piece A (both chunks vs keys [0, rc)), piece B (tail vs [rc, (2p-1-r)c)), and
    the two squares as one batch at offsets rc and (2p-1-r)c; rank 0 has no piece A."""
    c, p = 4, 4
    for r in range(p):
        tail = 2 * p - 1 - r
        plan = cudnn_pieces.nested_prefix_plan([0, c, 2 * c], [(0, (r + 1) * c), (0, (tail + 1) * c)])
        want_prefix = ([(0, 2 * c, 0, r * c)] if r else []) + [(c, 2 * c, r * c, tail * c)]
        assert plan.prefix == want_prefix
        assert plan.squares == [(0, 2, [r * c, tail * c])]
        assert plan.parts == ([[0], [0, 1]] if r else [[], [0]])


def test_plan_declines_what_it_does_not_cover():
    assert cudnn_pieces.nested_prefix_plan([0, 4, 8], [(0, 16), (0, 8)]) is None  # tail before head
    assert cudnn_pieces.nested_prefix_plan([0, 6], [(0, 4)]) is None  # more queries than keys
    assert cudnn_pieces.nested_prefix_plan([0, 8], [(0, 8)]) is None  # one whole prompt: its one call as it was
    assert cudnn_pieces.nested_prefix_plan([0, 3, 7], [(0, 5), (5, 9)]) is None  # no call saved (4 either way)
    plan = cudnn_pieces.nested_prefix_plan([0, 4, 8, 12], [(0, 4), (4, 8), (8, 12)])  # equal whole prompts
    assert plan.prefix == [] and plan.squares == [(0, 3, [0, 4, 8])]
    plan = cudnn_pieces.nested_prefix_plan([0, 3, 6], [(0, 5), (5, 10)])  # plain keys, equal lq: squares batched
    assert plan.prefix == [(0, 3, 0, 2), (3, 6, 5, 7)] and plan.squares == [(0, 2, [2, 7])]


def test_diagonal_blocks_are_views_when_evenly_spaced():
    x = torch.arange(40.0).reshape(20, 2, 1).expand(20, 2, 8).contiguous()
    view = cudnn_pieces.diagonal_blocks(x, [2, 9, 16], 3)
    assert view.shape == (3, 3, 2, 8) and view.data_ptr() == x[2].data_ptr()
    stacked = cudnn_pieces.diagonal_blocks(x, [2, 9, 12], 3)
    for blocks, offsets in ((view, [2, 9, 16]), (stacked, [2, 9, 12])):
        assert torch.equal(blocks, torch.stack([x[o:o + 3] for o in offsets]))


# ----------------------------------------------------------------------------------------------- exactness
def test_long_key_ranges_keep_the_per_sequence_calls(fake, monkeypatch):
    """Key ranges of ``PIECES_MAX_KEYS`` or more run per sequence (at 128k tokens the pieces measured no faster):
    4 calls for rank 1 of pcp 2 instead of 3, with the same result."""
    _exact_dtypes(monkeypatch)
    T, pcp = 16, 2
    q, k, v = _qkv(T, 4, 1, 16, 16, torch.float64, seed=5)
    qs, kw = _rank_call(q, k, v, T, pcp, 1)
    for limit, calls in ((13, 3), (12, 4)):  # the rank's longest key range: its tail chunk's 12 keys
        monkeypatch.setattr(backends_cuda, "PIECES_MAX_KEYS", limit)
        before = len(fake.calls)
        with torch.no_grad():
            out, lse = attention_with_lse(qs, backend=CUDNN, **kw)
            ref_out, ref_lse = attention_with_lse(qs, backend="torch", **kw)
        assert len(fake.calls) - before == calls, (limit, fake.calls[before:])
        assert _close(out, ref_out, 1e-5) and _close(lse, ref_lse, 1e-5)


@pytest.mark.parametrize("pcp", [1, 2, 4, 8])
@pytest.mark.parametrize("d,dv", [(128, 128), (192, 128)])
def test_pcp_ranks_match_the_reference(fake, monkeypatch, pcp, d, dv):
    """Every rank of p = 1, 2, 4, 8 (GQA 4:1; MLA's 192/128 head dims): out and LSE equal the float64 reference
    backend's; the stand-in ran 3 calls for r > 0 and 2 for r = 0."""
    _exact_dtypes(monkeypatch)
    c = 4
    T = 2 * pcp * c
    q, k, v = _qkv(T, 8, 2, d, dv, torch.float64, seed=pcp)
    for r in range(pcp):
        qs, kw = _rank_call(q, k, v, T, pcp, r)
        before = len(fake.calls)
        with torch.no_grad():
            out, lse = attention_with_lse(qs, backend=CUDNN, **kw)
            ref_out, ref_lse = attention_with_lse(qs, backend="torch", **kw)
        assert len(fake.calls) - before == (3 if r else 2), fake.calls[before:]
        assert out.shape == (2 * c, 8, dv) and lse.shape == (2 * c, 8) and lse.dtype == torch.float32
        assert _close(out, ref_out, 1e-5) and _close(lse, ref_lse, 1e-5)
        dense = _dense(qs, k, v, kw["host_cu_seqlens"][0], [0, 0], kw["host_cu_seqlens"][2], kw["scale"])
        assert _close(out, dense[0], 1e-5) and _close(lse, dense[1], 1e-5)


@pytest.mark.parametrize("gqa,other_v_dim", [(True, True), (False, False)])
def test_bf16_through_the_padded_and_repeated_paths(monkeypatch, gqa, other_v_dim):
    """bf16 as the real kernel gets it (fused_shapes_ok as is), with a stand-in that refuses GQA and a V head dim
    of its own (K/V repeated, V padded) or takes both: within bf16 rounding of the float64 reference."""
    op = FakeCudnnOp(gqa=gqa, other_v_dim=other_v_dim)
    monkeypatch.setattr(backends_cuda, "_CUDNN_OP", op)
    monkeypatch.setattr(backends_cuda, "_CUDNN_GQA", {"native": None})
    monkeypatch.setattr(backends_common, "_NATIVE_V_DIM", {"te": None, "cudnn": None})
    T, pcp = 64, 4
    q, k, v = _qkv(T, 8, 2, 192, 128, torch.bfloat16, seed=5)
    for r in range(pcp):
        qs, kw = _rank_call(q, k, v, T, pcp, r)
        with torch.no_grad():
            out, lse = attention_with_lse(qs, backend=CUDNN, **kw)
        ref = _dense(qs, k, v, kw["host_cu_seqlens"][0], [0, 0], kw["host_cu_seqlens"][2], kw["scale"])
        assert out.dtype == torch.bfloat16 and _close(out, ref[0], 2e-2) and _close(lse, ref[1], 1e-2)
    assert backends_cuda._CUDNN_GQA["native"] is gqa and backends_common._NATIVE_V_DIM["cudnn"] is other_v_dim


def test_two_requests_on_a_rank(fake, monkeypatch):
    """Rank 1 of 2 with two requests packed (one of equal chunk size, so four squares in one stacked call; one of
    another size, its own square call): equals the reference."""
    _exact_dtypes(monkeypatch)
    c1, c2, pcp, r = 4, 3, 2, 1
    T1, T2 = 4 * c1, 4 * c2
    for sizes in ((c1, c1), (c1, c2)):
        lens = [4 * s for s in sizes]
        q, k, v = _qkv(sum(lens), 8, 2, 64, 64, torch.float64, seed=7)
        qs, cu_q, starts, used, base = [], [0], [], [], 0
        for s, n in zip(sizes, lens):
            for chunk in (r, 2 * pcp - 1 - r):
                qs.append(q[base + chunk * s:base + (chunk + 1) * s])
                cu_q.append(cu_q[-1] + s)
                starts.append(base)
                used.append((chunk + 1) * s)
            base += n
        qs = torch.cat(qs)
        i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
        host = (cu_q, starts + [base], used)
        before = len(fake.calls)
        with torch.no_grad():
            out, lse = attention_with_lse(qs, k, v, i32(cu_q), i32(host[1]), True, 0.125, backend=CUDNN,
                                          host_cu_seqlens=host, seqused_k=i32(used))
        ref = _dense(qs, k, v, cu_q, starts, used, 0.125)
        assert _close(out, ref[0], 1e-5) and _close(lse, ref[1], 1e-5)
        batches = sorted(b for b, _, _, causal in fake.calls[before:] if causal)
        assert batches == ([4] if sizes[0] == sizes[1] else [2, 2]), fake.calls[before:]
    del T1, T2


def test_equal_whole_prompts_are_one_call(fake, monkeypatch):
    """Three causal prompts of one length (plain cumulative keys): one batched call, the diagonal blocks a view."""
    _exact_dtypes(monkeypatch)
    q, k, v = _qkv(24, 4, 2, 32, 32, torch.float64, seed=6)
    cu = torch.tensor([0, 8, 16, 24], dtype=torch.int32)
    with torch.no_grad():
        out, lse = attention_with_lse(q, k, v, cu, cu, True, 0.2, backend=CUDNN)
    ref = _dense(q, k, v, [0, 8, 16, 24], [0, 8, 16], [8, 8, 8], 0.2)
    assert _close(out, ref[0], 1e-5) and _close(lse, ref[1], 1e-5)
    assert fake.calls == [(3, 8, 8, True)]


def test_layouts_it_does_not_cover_fall_back_to_per_sequence(fake, monkeypatch):
    """Tail chunk packed before the head chunk (prefixes decreasing): the per-sequence path (two calls each)."""
    _exact_dtypes(monkeypatch)
    q, k, v = _qkv(16, 4, 1, 32, 32, torch.float64, seed=2)
    qs = torch.cat([q[12:16], q[4:8]])
    host = ([0, 4, 8], [0, 0, 16], [16, 8])
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    with torch.no_grad():
        out, lse = attention_with_lse(qs, k, v, i32(host[0]), i32(host[1]), True, 0.2, backend=CUDNN,
                                      host_cu_seqlens=host, seqused_k=i32(host[2]))
    ref = _dense(qs, k, v, host[0], [0, 0], host[2], 0.2)
    assert _close(out, ref[0], 1e-5) and _close(lse, ref[1], 1e-5)
    assert len(fake.calls) == 4


# ----------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("pieces", [True, False])
@pytest.mark.parametrize("r", [0, 1, 3])
def test_gradients_of_out_and_lse(fake, monkeypatch, pieces, r):
    """q/k/v gradients of a loss on out AND LSE (the merges need the LSE's) equal the reference backend's (GQA: K/V
    repeated under autograd), and with gradients the kernel runs per sequence even with the pieces on (they are
    inference only: the real op's backward through them was wrong on an H200)."""
    _exact_dtypes(monkeypatch)
    monkeypatch.setattr(backends_cuda, "CUDNN_PIECES", pieces)
    T, pcp = 32, 4
    grads = {}
    before = len(fake.calls)
    for name in ("cudnn", "torch"):
        q, k, v = (t.requires_grad_(True) for t in _qkv(T, 8, 2, 16, 16, torch.float64, seed=11))
        qs, kw = _rank_call(q, k, v, T, pcp, r)
        out, lse = attention_with_lse(qs, backend=CUDNN if name == "cudnn" else name, **kw)
        g = torch.Generator().manual_seed(3)
        w_out, w_lse = torch.randn(out.shape, generator=g, dtype=torch.float64), torch.randn(lse.shape, generator=g)
        ((out * w_out).sum() + (lse * w_lse).sum()).backward()
        grads[name] = (out.detach(), lse.detach(), q.grad, k.grad, v.grad)
    for a, b in zip(grads["cudnn"], grads["torch"]):
        assert _close(a, b, 1e-5), (a - b).abs().max()
    # per sequence: every call one sequence (the pieces would batch the two squares into one call of B = 2)
    assert fake.calls[before:] and all(b == 1 for b, *_ in fake.calls[before:]), fake.calls[before:]


# ----------------------------------------------------------------------------------------------- negative controls
def test_a_misplaced_square_fails_the_comparison(fake, monkeypatch):
    """Negative control: squares read one row too early (a wrong diagonal alignment) must not pass."""
    _exact_dtypes(monkeypatch)
    right = backends_cuda.nested_prefix_plan

    def off_by_one(cu_q, keys):
        plan = right(cu_q, keys)
        return plan._replace(squares=[(b0, b1, [o - 1 for o in offs]) for b0, b1, offs in plan.squares])

    monkeypatch.setattr(backends_cuda, "nested_prefix_plan", off_by_one)
    T, pcp = 32, 2
    q, k, v = _qkv(T, 4, 1, 32, 32, torch.float64, seed=1)
    qs, kw = _rank_call(q, k, v, T, pcp, 1)
    with torch.no_grad():
        out, lse = attention_with_lse(qs, backend=CUDNN, **kw)
        ref_out, ref_lse = attention_with_lse(qs, backend="torch", **kw)
    assert not _close(out, ref_out, 1e-3) and not _close(lse, ref_lse, 1e-3)


def test_top_left_alignment_differs_from_bottom_right():
    """Negative control of the references: a chunk with lq < lk aligned top-left (shift -(lk - lq)) or one key off
    is far from the bottom-right result, so the tolerances above tell the alignments apart."""
    q, k, v = _qkv(16, 4, 1, 32, 32, torch.float64, seed=4)
    right = _dense(q[8:12], k, v, [0, 4], [0], [12], 0.2)
    for shift in (-8, -1, 1):
        wrong = _dense(q[8:12], k, v, [0, 4], [0], [12], 0.2, shift=shift)
        assert not _close(right[0], wrong[0], 1e-3) and not _close(right[1], wrong[1], 1e-3)


# ----------------------------------------------------------------------------------------------- the merge
def test_merge_into_equals_the_stacked_merge():
    """``merge_attn_states_into`` (partials in separate tensors, one of them empty rows) == merge_attn_states_n."""
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(5, 3, 8, generator=g).to(torch.bfloat16) for _ in range(3)]
    lses = [torch.randn(5, 3, generator=g) for _ in range(3)]
    lses[1][2] = float("-inf")
    want_out, want_lse = merge_attn_states_n(torch.stack(outs), torch.stack(lses))
    out, lse = torch.empty(5, 3, 8, dtype=torch.bfloat16), torch.empty(5, 3)
    merge_attn_states_into(outs, lses, out, lse)
    assert torch.allclose(out.float(), want_out.float(), atol=1e-2) and torch.allclose(lse, want_lse)
    merge_attn_states_into(outs[:1], lses[:1], out, lse)
    assert torch.equal(out, outs[0]) and torch.equal(lse, lses[0])


# ----------------------------------------------------------------------------------------------- the real op
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or not backends_cuda._cudnn_available(torch.device("cuda" if CUDA else "cpu")),
                    reason="needs CUDA with cuDNN SDPA")
@pytest.mark.parametrize("pcp", [1, 2, 4, 8])
@pytest.mark.parametrize("d,dv", [(128, 128), (192, 128)])
def test_gpu_pieces_match_per_sequence_and_reference(monkeypatch, pcp, d, dv):
    """The real cuDNN op, bf16: pieces and per-sequence decompositions agree with each other and with the float64
    reference for every rank (strided diagonal-block batches included)."""
    T = 2 * pcp * 128
    q, k, v = _qkv(T, 16, 4, d, dv, torch.bfloat16, seed=pcp, device="cuda")
    for r in range(pcp):
        qs, kw = _rank_call(q, k, v, T, pcp, r)
        res = {}
        for pieces in (False, True):  # per-sequence first: it settles whether the op takes GQA and this V dim
            monkeypatch.setattr(backends_cuda, "CUDNN_PIECES", pieces)
            learnt = dict(backends_cuda._CUDNN_GQA), dict(backends_common._NATIVE_V_DIM)
            with torch.no_grad():
                res[pieces] = attention_with_lse(qs, backend=CUDNN, **kw)
            # the batched call on strided diagonal blocks must not be what makes the op refuse (and flip these)
            assert not pieces or (learnt == (backends_cuda._CUDNN_GQA, backends_common._NATIVE_V_DIM))
        ref = _dense(qs, k, v, kw["host_cu_seqlens"][0], [0, 0], kw["host_cu_seqlens"][2], kw["scale"])  # float64
        for out, lse in res.values():
            assert _close(out, ref[0], 3e-2) and _close(lse, ref[1], 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("n", [2, 3])
def test_gpu_merge_into_kernel_matches_the_pytorch_merge(n):
    """The pieces' LSE merge on the GPU (``merge_kernel.merge_into``, taken by ``merge_attn_states_into`` without
    gradients) against ``merge_attn_states_n`` in float32: bf16 partials as cuDNN returns them, row slices of them
    (the pieces' views), an empty partial and an all-empty row."""
    g = torch.Generator(device="cuda").manual_seed(n)
    R, H, D = 1000, 32, 128
    full = [torch.randn(R + 7, H, D, device="cuda", generator=g).bfloat16() for _ in range(n)]
    outs = [f[3:R + 3] for f in full]
    lses = [torch.randn(R + 7, H, device="cuda", generator=g)[3:R + 3] * 4 for _ in range(n)]
    lses[0][5] = float("-inf")
    for s in lses:
        s[9, 1] = float("-inf")
    out = torch.empty(R, H, D, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(R, H, device="cuda")
    merge_attn_states_into(outs, lses, out, lse)
    want_o, want_l = merge_attn_states_n(torch.stack([o.float() for o in outs]), torch.stack(lses))
    assert (out.float() - want_o).abs().max().item() <= want_o.abs().max().item() * 2 ** -8 + 1e-6
    finite = torch.isfinite(want_l)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite] - want_l[finite]).abs().max().item() <= 1e-5
    assert out[9, 1].abs().max().item() == 0
