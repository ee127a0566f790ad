"""attention_with_lse backends, paged decode and LSE merges against an independent float64 SDPA reference (pure CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megacp.ops import attention as attn_mod
from megacp.ops import backends_cpu, varlen
from megacp.ops import (
    AttentionBackend,
    attention_with_lse,
    available_backends,
    merge_attn_states,
    merge_attn_states_n,
    paged_attention_with_lse,
    register_backend,
    select_backend,
)

from tests.references import attention_by_positions  # noqa: E402

BACKENDS = ["torch", "sdpa_cpu"]
TOL = dict(atol=1e-5, rtol=1e-5)
D = 8


# ------------------------------------------------------------------------------------------------ reference
def _ref_seq(q, k, v, allowed, scale):
    """float64 SDPA with an explicit boolean mask; lse = logsumexp of the masked scores.

    # q: [lq, Hq, D], k/v: [lk, Hk, D], allowed: bool [lq, lk] -> (out [lq, Hq, D], lse [lq, Hq]) float64
    """
    lq, hq, _ = q.shape
    if lq == 0:
        return torch.zeros(0, hq, v.shape[2], dtype=torch.float64), torch.zeros(0, hq, dtype=torch.float64)
    g = hq // k.shape[1]
    qh = q.double().transpose(0, 1)  # [Hq, lq, D]
    kh = k.double().repeat_interleave(g, dim=1).transpose(0, 1)
    vh = v.double().repeat_interleave(g, dim=1).transpose(0, 1)
    has_key = allowed.any(dim=1)  # [lq]
    scores = (qh @ kh.transpose(-1, -2)) * scale
    lse = scores.masked_fill(~allowed, float("-inf")).logsumexp(dim=-1)  # [Hq, lq]; -inf for empty rows
    if k.shape[0] == 0:
        out = torch.zeros(hq, lq, v.shape[2], dtype=torch.float64)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale)
        out = torch.where(has_key.view(1, -1, 1), out, torch.zeros_like(out))  # SDPA gives NaN there
    return out.transpose(0, 1), lse.transpose(0, 1)


def _ref_varlen(q, k, v, lens, causal, scale, q_pos=None, k_pos=None):
    """Packed reference; lens = [(lq, lk)]; masks are bottom-right causal, or by positions when given."""
    outs, lses, qo, ko = [], [], 0, 0
    for lq, lk in lens:
        if q_pos is not None:
            allowed = k_pos[ko : ko + lk].view(1, -1) <= q_pos[qo : qo + lq].view(-1, 1)
        elif causal:
            allowed = torch.tensor([[j <= i + lk - lq for j in range(lk)] for i in range(lq)], dtype=torch.bool)
        else:
            allowed = torch.ones(lq, lk, dtype=torch.bool)
        allowed = allowed.view(lq, lk)
        o, l = _ref_seq(q[qo : qo + lq], k[ko : ko + lk], v[ko : ko + lk], allowed, scale)
        outs.append(o)
        lses.append(l)
        qo, ko = qo + lq, ko + lk
    return torch.cat(outs), torch.cat(lses)


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


def _packed(lens, hq, hk, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(a for a, _ in lens), sum(b for _, b in lens)
    q = torch.randn(tq, hq, D, generator=g).to(dtype)
    k = torch.randn(tk, hk, D, generator=g).to(dtype)
    v = torch.randn(tk, hk, D, generator=g).to(dtype)
    return q, k, v, _cu([a for a, _ in lens]), _cu([b for _, b in lens])


def _assert_close(out, lse, ref_out, ref_lse, **tol):
    tol = tol or TOL
    assert lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(lse.double(), ref_lse, **tol)  # -inf must match -inf exactly
    torch.testing.assert_close(out.double(), ref_out, **tol)


# lq == 1, lq < lk, lq == lk, lq > lk, lk == 0, lq == 0, all in one packed batch
MIXED_LENS = [(1, 1), (3, 3), (2, 7), (1, 6), (5, 2), (3, 0), (0, 4), (4, 9)]


# ------------------------------------------------------------------------------------------------ backends
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (6, 1)])
def test_backend_matches_reference(backend, causal, hq, hk):
    q, k, v, cu_q, cu_k = _packed(MIXED_LENS, hq, hk)
    scale = 0.37
    out, lse = attention_with_lse(q, k, v, cu_q, cu_k, causal, scale, backend=backend)
    ref_out, ref_lse = _ref_varlen(q, k, v, MIXED_LENS, causal, scale)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == q.shape[:2]
    _assert_close(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_bf16_keeps_dtype_and_is_close(backend):
    q, k, v, cu_q, cu_k = _packed(MIXED_LENS, 4, 2, dtype=torch.bfloat16)
    out, lse = attention_with_lse(q, k, v, cu_q, cu_k, True, 1 / math.sqrt(D), backend=backend)
    ref_out, ref_lse = _ref_varlen(q, k, v, MIXED_LENS, True, 1 / math.sqrt(D))
    assert out.dtype == torch.bfloat16
    _assert_close(out, lse, ref_out, ref_lse, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    q, k, v, cu_q, cu_k = _packed([(0, 0), (0, 3)], 2, 2)
    out, lse = attention_with_lse(q, k, v, cu_q, cu_k, True, 1.0, backend=backend)
    assert out.shape == (0, 2, D) and lse.shape == (0, 2)


def _out_and_lse_grads(backend: str, lens, causal: bool, hq: int = 4, hk: int = 2, dtype=torch.float64):
    """Gradients of q, k, v for a loss that uses both the output and the LSE (rows without keys excluded)."""
    q, k, v, cu_q, cu_k = _packed(lens, hq, hk, dtype=dtype, seed=3)
    for t in (q, k, v):
        t.requires_grad_(True)
    out, lse = attention_with_lse(q, k, v, cu_q, cu_k, causal, 0.5, backend=backend)
    g = torch.Generator().manual_seed(4)
    w_out = torch.randn(out.shape, generator=g, dtype=dtype)
    w_lse = torch.randn(lse.shape, generator=g, dtype=torch.float32)
    ((out * w_out).sum() + torch.where(torch.isfinite(lse), lse * w_lse, 0.0).sum()).backward()
    return [t.grad for t in (q, k, v)]


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_cpu_gradients_of_out_and_lse_match_torch_backend(causal):
    """sdpa_cpu's kernel differentiates its output only; attention_grad adds the LSE, so the prefix + square
    decomposition of a chunk (lq < lk) merges with exact gradients. Empty and key-less sequences included."""
    lens = [(2, 5), (3, 3), (1, 4), (0, 2), (4, 2), (2, 0)]
    for a, b in zip(_out_and_lse_grads("torch", lens, causal), _out_and_lse_grads("sdpa_cpu", lens, causal)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)  # float64: both exact


def test_lse_differentiable_attention_matches_autograd_of_the_math():
    """The LSE gradient of attention_grad (one more attention with the keys as values, and its value gradient)
    against plain autograd of logsumexp over explicit scores: GQA, float64."""
    from megacp.ops.attention_grad import AutogradCall, lse_differentiable_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, D, generator=g, dtype=torch.float64) for n, h in ((5, 4), (7, 2), (7, 2)))
    w_out, w_lse = torch.randn(5, 4, D, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g)

    def call(q_, k_, v_):  # a kernel whose LSE autograd cannot see (detached), like the fused ones
        out, lse = backends_cpu._torch_seq(q_, k_, v_, False, 0.7)
        return out, lse.detach()

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = lse_differentiable_attention(AutogradCall(call), *leaves, 0.7)
    ((out * w_out).sum() + (lse * w_lse).sum()).backward()
    ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
    scores = torch.einsum("qhd,khd->hqk", ref[0], ref[1].repeat_interleave(2, 1)) * 0.7
    ref_out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), ref[2].repeat_interleave(2, 1))
    ((ref_out * w_out).sum() + (torch.logsumexp(scores, -1).t() * w_lse.double()).sum()).backward()
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12)


def test_a_backend_without_backward_is_refused_when_gradients_are_needed():
    forward_only = AttentionBackend("forward_only_test", varlen.per_sequence(backends_cpu._torch_seq),
                                    lambda device: True, priority=-1)
    register_backend(forward_only)
    try:
        q, k, v, cu_q, cu_k = _packed([(2, 3)], 2, 2)
        out, _ = attention_with_lse(q, k, v, cu_q, cu_k, True, 0.5, backend="forward_only_test")  # no grad: fine
        q.requires_grad_(True)
        with pytest.raises(ValueError, match="'forward_only_test' cannot compute gradients.*sdpa_cpu"):
            attention_with_lse(q, k, v, cu_q, cu_k, True, 0.5, backend="forward_only_test")
        with torch.no_grad():
            torch.testing.assert_close(attention_with_lse(q, k, v, cu_q, cu_k, True, 0.5,
                                                          backend="forward_only_test")[0], out)
    finally:
        attn_mod._BACKENDS.pop("forward_only_test")


def test_merge_is_differentiable_in_out_and_lse_with_empty_partials():
    """merge_attn_states_n w.r.t. both inputs (gradcheck, float64), with -inf partials and an all-empty row."""
    g = torch.Generator().manual_seed(1)
    o = torch.randn(3, 4, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    lse = torch.randn(3, 4, generator=g, dtype=torch.float64)
    lse[0, 1] = lse[:, 3] = float("-inf")
    lse.requires_grad_(True)

    def merged(o_, lse_):
        out, merged_lse = merge_attn_states_n(o_, lse_)
        return out, torch.where(torch.isfinite(merged_lse), merged_lse, 0.0)

    assert torch.autograd.gradcheck(merged, (o, lse))
    out, _ = merged(o, lse)
    out.sum().backward()
    assert torch.isfinite(o.grad).all() and torch.isfinite(lse.grad).all()
    assert (o.grad[:, 3] == 0).all() and (lse.grad[:, 3] == 0).all() and (o.grad[0, 1] == 0).all()


def test_paged_attention_with_grad_skips_the_paged_kernel():
    """A paged kernel reads the cache outside autograd: with q requiring grad the gather path runs instead."""
    import dataclasses

    calls = []

    def paged(*args):
        calls.append(1)
        return None  # "cannot take this call": the gather path follows either way

    register_backend(dataclasses.replace(select_backend("cpu", "torch"), name="paged_test", paged=paged))
    try:
        g = torch.Generator().manual_seed(2)
        k_cache, v_cache = torch.randn(4, 3, 2, D, generator=g), torch.randn(4, 3, 2, D, generator=g)
        table, lens = torch.tensor([[2, 0], [1, 3]]), torch.tensor([5, 2])
        q = torch.randn(2, 4, D, generator=g, dtype=torch.float32)
        paged_attention_with_lse(q, k_cache, v_cache, table, lens, 0.5, backend="paged_test")
        assert len(calls) == 1
        q.requires_grad_(True)
        out, _ = paged_attention_with_lse(q, k_cache, v_cache, table, lens, 0.5, backend="paged_test")
        assert len(calls) == 1
        (grad,) = torch.autograd.grad(out.sum(), q)
        keys = [k_cache[table[b]].flatten(0, 1)[: int(n)] for b, n in enumerate(lens)]
        vals = [v_cache[table[b]].flatten(0, 1)[: int(n)] for b, n in enumerate(lens)]
        q_ref = q.detach().clone().requires_grad_(True)
        ref_out, _ = _ref_varlen(q_ref, torch.cat(keys), torch.cat(vals), [(1, 5), (1, 2)], False, 0.5)
        (ref_grad,) = torch.autograd.grad(ref_out.sum(), q_ref)
        torch.testing.assert_close(grad, ref_grad, **TOL)
    finally:
        attn_mod._BACKENDS.pop("paged_test")


# ------------------------------------------------------------------------------------------------ empty-row handling
def test_kernel_lse_zero_and_nan_rows_are_normalised(monkeypatch):
    """A kernel returning lse 0 / NaN out for rows that see no key is normalised by attention_with_lse."""

    def sloppy(q, k, v, cu_q, cu_k, causal, scale):
        out, lse = varlen.per_sequence(backends_cpu._torch_seq)(q, k, v, cu_q, cu_k, causal, scale)
        empty = ~varlen.rows_with_keys(cu_q, cu_k, causal, q.shape[0])
        out[empty] = float("nan")
        lse[empty] = 0.0
        return out, lse

    monkeypatch.setattr(attn_mod, "_BACKENDS", dict(attn_mod._BACKENDS))
    register_backend(AttentionBackend("sloppy", sloppy, lambda d: True, priority=-1))
    q, k, v, cu_q, cu_k = _packed(MIXED_LENS, 2, 2)
    out, lse = attention_with_lse(q, k, v, cu_q, cu_k, True, 0.5, backend="sloppy")
    ref_out, ref_lse = _ref_varlen(q, k, v, MIXED_LENS, True, 0.5)
    assert torch.isinf(ref_lse).any()  # the case really has rows without keys
    _assert_close(out, lse, ref_out, ref_lse)


def test_rows_with_keys():
    cu_q, cu_k = _cu([2, 3, 1, 0]), _cu([1, 0, 4, 2])
    assert varlen.rows_with_keys(cu_q, cu_k, True, 6).tolist() == [False, True, False, False, False, True]
    assert varlen.rows_with_keys(cu_q, cu_k, False, 6).tolist() == [True, True, False, False, False, True]


def test_bottom_right_causal_mask():
    assert varlen.bottom_right_causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert varlen.bottom_right_causal_mask(3, 2).tolist() == [[False, False], [True, False], [True, True]]


# ------------------------------------------------------------------------------------------------ registry
def test_backend_selection(monkeypatch):
    assert available_backends("cpu")[:2] == ["sdpa_cpu", "torch"]
    monkeypatch.delenv(attn_mod.ENV_BACKEND, raising=False)
    assert select_backend("cpu").name == "sdpa_cpu"
    assert select_backend("cpu", backend="torch").name == "torch"
    monkeypatch.setenv(attn_mod.ENV_BACKEND, "torch")
    assert select_backend("cpu").name == "torch"
    monkeypatch.setenv(attn_mod.ENV_BACKEND, "nope")
    with pytest.raises(ValueError, match=r"'nope'.*unknown.*sdpa_cpu"):
        select_backend("cpu")
    monkeypatch.delenv(attn_mod.ENV_BACKEND)
    monkeypatch.setattr(attn_mod, "_BACKENDS", dict(attn_mod._BACKENDS))
    torch_varlen = varlen.per_sequence(backends_cpu._torch_seq)
    register_backend(AttentionBackend("gpu_only", torch_varlen, lambda d: d.type == "cuda", 99))
    assert select_backend("cpu").name == "sdpa_cpu"  # higher priority but unavailable on CPU
    with pytest.raises(ValueError, match=r"not available on cpu.*\['sdpa_cpu', 'torch'\]"):
        select_backend("cpu", backend="gpu_only")
    register_backend(AttentionBackend("mid", torch_varlen, lambda d: True, 50))
    assert select_backend("cpu").name == "mid"  # the highest available priority wins


def test_layer_keeps_the_backend_it_chose(monkeypatch):
    """ContextParallelAttention resolves its backend once (backend=, else $MEGACP_ATTN_BACKEND, else the best) and
    keeps it: a later change of the environment does not reach its steps; a new layer does read it."""
    from megacp.layers.cp_attention import ContextParallelAttention
    from megacp.layers.metadata_builder import build_attention_metadata

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(6, h, 8, generator=gen) for h in (4, 2, 2))
    meta = build_attention_metadata([0], [0], [6], None)
    monkeypatch.setenv(attn_mod.ENV_BACKEND, "torch")
    layer = ContextParallelAttention(4, 2, 8, 0.5)
    first = layer(q, k, v, meta, None)
    assert layer.attention_backend(q.device).name == "torch"
    monkeypatch.setenv(attn_mod.ENV_BACKEND, "nope")  # a lookup per call would now fail
    assert torch.equal(layer(q, k, v, meta, None), first) and layer.attention_backend(q.device).name == "torch"
    with pytest.raises(ValueError, match="'nope'"):  # negative control: a new layer reads the environment
        ContextParallelAttention(4, 2, 8, 0.5)(q, k, v, meta, None)
    explicit = ContextParallelAttention(4, 2, 8, 0.5, backend="sdpa_cpu")  # backend= wins over the environment
    torch.testing.assert_close(explicit(q, k, v, meta, None), first, rtol=1e-5, atol=1e-5)
    assert explicit.attention_backend(q.device).name == "sdpa_cpu"


def test_bad_shapes_raise():
    q, k, v, cu_q, cu_k = _packed([(2, 3)], 3, 2)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention_with_lse(q, k, v, cu_q, cu_k, True, 1.0)
    with pytest.raises(ValueError, match=r"\[B\+1\]"):
        attention_with_lse(q[:, :2], k, v, cu_q, cu_k[:1], True, 1.0)


# ------------------------------------------------------------------------------------------------ CP shards + merge
def _owner(p, w, i):
    return (p // i) % w


# (tokens already cached, new tokens): decode, single-token prompt, prefill, chunked prefill, long-ish prompt
CP_REQS = [(0, 1), (5, 1), (0, 6), (7, 4), (0, 13), (11, 1), (2, 9)]


@pytest.mark.parametrize("w", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("interleave", [1, 2, 4])
def test_cp_sharded_causal_attention_merges_to_unsplit(w, interleave):
    """Split K/V as the CP cache does (token p on shard (p // I) % W), attend per shard with the causal mask by
    absolute positions (tests/references.py), merge with merge_attn_states_n: equals unsplit causal attention."""
    hq, hk, scale = 4, 2, 0.41
    lens = [(new, done + new) for done, new in CP_REQS]
    q, k, v, cu_q, _ = _packed(lens, hq, hk, seed=w * 10 + interleave)
    q_pos = torch.cat([torch.arange(done, done + new) for done, new in CP_REQS])
    ref_out, ref_lse = _ref_varlen(q, k, v, lens, True, scale)

    k_seq = torch.split(k, [lk for _, lk in lens])
    v_seq = torch.split(v, [lk for _, lk in lens])
    outs, lses, saw_empty_shard = [], [], False
    for r in range(w):
        ks, vs, kp, shard_lens = [], [], [], []
        for (done, new), kk, vv in zip(CP_REQS, k_seq, v_seq):
            pos = torch.arange(done + new)
            mine = pos[_owner(pos, w, interleave) == r]
            saw_empty_shard |= mine.numel() == 0
            ks.append(kk[mine])
            vs.append(vv[mine])
            kp.append(mine)
            shard_lens.append(mine.numel())
        o, l = attention_by_positions(q, torch.cat(ks), torch.cat(vs), cu_q, _cu(shard_lens), q_pos, torch.cat(kp),
                                      scale)
        assert not torch.isnan(o).any() and not torch.isnan(l).any()
        outs.append(o)
        lses.append(l)
    assert saw_empty_shard == (w > 1)  # request (0, 1) has one token, so every other shard is empty for it
    out, lse = merge_attn_states_n(torch.stack(outs), torch.stack(lses))
    _assert_close(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w,interleave", [(1, 1), (2, 1), (3, 2), (4, 4), (8, 1)])
def test_cp_sharded_paged_decode_merges_to_unsplit(backend, w, interleave):
    """Decode: each CP shard's paged cache (random block ids) via paged_attention_with_lse, merged = unsplit decode."""
    hq, hk, block_size, scale = 4, 2, 4, 0.3
    seq_lens = [1, 2, 9, 17, 5]
    g = torch.Generator().manual_seed(w + 7 * interleave)
    q = torch.randn(len(seq_lens), hq, D, generator=g)
    k_full = [torch.randn(n, hk, D, generator=g) for n in seq_lens]
    v_full = [torch.randn(n, hk, D, generator=g) for n in seq_lens]
    ref_out, ref_lse = _ref_varlen(
        q, torch.cat(k_full), torch.cat(v_full), [(1, n) for n in seq_lens], False, scale
    )
    outs, lses = [], []
    for r in range(w):
        local = [torch.arange(n)[_owner(torch.arange(n), w, interleave) == r] for n in seq_lens]
        max_blocks = max(1, max(-(-len(p) // block_size) for p in local))
        num_blocks = len(seq_lens) * max_blocks
        block_table = torch.randperm(num_blocks, generator=g).view(len(seq_lens), max_blocks)
        k_cache = torch.full((num_blocks, block_size, hk, D), float("nan"))  # unused slots must never be read
        v_cache = torch.full_like(k_cache, float("nan"))
        for b, pos in enumerate(local):
            for j, p in enumerate(pos.tolist()):  # local slot j: local order is position order
                k_cache[block_table[b, j // block_size], j % block_size] = k_full[b][p]
                v_cache[block_table[b, j // block_size], j % block_size] = v_full[b][p]
        local_lens = torch.tensor([len(p) for p in local])
        o, l = paged_attention_with_lse(q, k_cache, v_cache, block_table, local_lens, scale, backend=backend)
        outs.append(o)
        lses.append(l)
    out, lse = merge_attn_states_n(torch.stack(outs), torch.stack(lses))
    _assert_close(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_attention_matches_contiguous(backend):
    hq, hk, block_size, scale = 6, 3, 3, 0.25
    seq_lens = torch.tensor([0, 1, 7, 3, 0, 12])
    g = torch.Generator().manual_seed(1)
    max_blocks = 5
    num_blocks = len(seq_lens) * max_blocks + 2
    block_table = torch.randperm(num_blocks, generator=g)[: len(seq_lens) * max_blocks].view(len(seq_lens), max_blocks)
    k_cache = torch.randn(num_blocks, block_size, hk, D, generator=g)
    v_cache = torch.randn(num_blocks, block_size, hk, D, generator=g)
    q = torch.randn(len(seq_lens), hq, D, generator=g)
    ks, vs = [], []
    for b, n in enumerate(seq_lens.tolist()):
        kb = k_cache[block_table[b]].flatten(0, 1)[:n]  # contiguous gather through the table
        vb = v_cache[block_table[b]].flatten(0, 1)[:n]
        ks.append(kb)
        vs.append(vb)
    out, lse = paged_attention_with_lse(q, k_cache, v_cache, block_table, seq_lens, scale, backend=backend)
    ref_out, ref_lse = _ref_varlen(q, torch.cat(ks), torch.cat(vs), [(1, n) for n in seq_lens.tolist()], False, scale)
    assert torch.isinf(lse[0]).all() and (out[0] == 0).all()
    _assert_close(out, lse, ref_out, ref_lse)


def test_paged_attention_writes_into_given_out_and_lse():
    """``out=``/``lse=`` (two views of one packed buffer, as DCP decode passes them) receive exactly the result; a
    lone or misshapen one is refused with both names; a paged hook that writes in place is given them."""
    import dataclasses

    g = torch.Generator().manual_seed(3)
    k_cache, v_cache = torch.randn(6, 3, 2, D, generator=g), torch.randn(6, 3, 2, D, generator=g)
    table, lens = torch.tensor([[2, 0], [1, 3], [4, 5]]), torch.tensor([5, 2, 0])
    q = torch.randn(3, 4, D, generator=g)
    want_out, want_lse = paged_attention_with_lse(q, k_cache, v_cache, table, lens, 0.5, backend="torch")
    keys = [k_cache[table[b]].flatten(0, 1)[: int(n)] for b, n in enumerate(lens)]
    vals = [v_cache[table[b]].flatten(0, 1)[: int(n)] for b, n in enumerate(lens)]
    ref_out, ref_lse = _ref_varlen(q, torch.cat(keys), torch.cat(vals), [(1, int(n)) for n in lens], False, 0.5)
    _assert_close(want_out, want_lse, ref_out, ref_lse)  # the result the views must receive is right to begin with
    for host in (None, lens.tolist()):  # the masked (graph) and the gather path
        packed = torch.full((3, 4, D + 1), 9.0)
        out, lse = paged_attention_with_lse(q, k_cache, v_cache, table, lens, 0.5, backend="torch",
                                            seq_lens_host=host, out=packed[..., :D], lse=packed[..., D])
        assert out.data_ptr() == packed.data_ptr() and lse.data_ptr() == packed[..., D].data_ptr()
        torch.testing.assert_close(packed[..., :D], want_out, **TOL)
        torch.testing.assert_close(packed[..., D], want_lse, **TOL)
    with pytest.raises(ValueError, match="out and lse go together"):
        paged_attention_with_lse(q, k_cache, v_cache, table, lens, 0.5, out=torch.empty(3, 4, D))
    with pytest.raises(ValueError, match="out and lse go together"):
        paged_attention_with_lse(q, k_cache, v_cache, table, lens, 0.5, out=torch.empty(3, 4, 2 * D)[..., ::2],
                                 lse=torch.empty(3, 4))

    seen = []

    def paged(q, k, v, bt, n, scale, out=None, lse=None):
        seen.append(out is not None)
        res = paged_attention_with_lse(q, k, v, bt, n, scale, backend="torch")
        if out is None:
            return res
        out.copy_(res[0])
        lse.copy_(res[1])
        return out, lse

    register_backend(dataclasses.replace(select_backend("cpu", "torch"), name="paged_out_test", paged=paged,
                                         paged_writes_out=True))
    packed = torch.zeros(3, 4, D + 1)
    paged_attention_with_lse(q, k_cache, v_cache, table, lens, 0.5, backend="paged_out_test", out=packed[..., :D],
                             lse=packed[..., D])
    paged_attention_with_lse(q, k_cache, v_cache, table, lens, 0.5, backend="paged_out_test")
    assert seen == [True, False]
    torch.testing.assert_close(packed[..., :D], want_out, **TOL)


# ------------------------------------------------------------------------------------------------ merges
def test_merge_two_halves_of_keys_equals_whole():
    q, k, v, cu_q, cu_k = _packed([(3, 10)], 4, 2)
    full_o, full_l = attention_with_lse(q, k, v, cu_q, cu_k, False, 0.5)
    o1, l1 = attention_with_lse(q, k[:4], v[:4], cu_q, _cu([4]), False, 0.5)
    o2, l2 = attention_with_lse(q, k[4:], v[4:], cu_q, _cu([6]), False, 0.5)
    o, l = merge_attn_states(o1, l1, o2, l2)
    torch.testing.assert_close(o, full_o, **TOL)
    torch.testing.assert_close(l, full_l, **TOL)


def test_merge_with_minus_inf_is_exact_and_nan_free():
    o = torch.randn(3, 2, 5, D)
    lse = torch.randn(3, 2, 5)
    lse[0, 0] = float("-inf")  # one empty partial: the other passes through unchanged
    lse[:, 1, :2] = float("-inf")  # all empty: out 0, lse -inf
    out, l = merge_attn_states_n(o, lse)
    assert not torch.isnan(out).any() and not torch.isnan(l).any()
    torch.testing.assert_close(l[0], torch.logsumexp(lse[1:, 0], dim=0))
    w = torch.softmax(lse[1:, 0], dim=0)
    torch.testing.assert_close(out[0], (w.unsqueeze(-1) * o[1:, 0]).sum(0))
    assert torch.isneginf(l[1, :2]).all() and (out[1, :2] == 0).all()
    torch.testing.assert_close(l[1, 2:], torch.logsumexp(lse[:, 1, 2:], dim=0))
    # a single -inf partial merged with a finite one returns the finite one exactly
    o2, l2 = merge_attn_states(o[0, 0], lse[0, 0], o[1, 0], lse[1, 0])
    torch.testing.assert_close(o2, o[1, 0])
    torch.testing.assert_close(l2, lse[1, 0])


def test_merge_dtype_and_fp32_compute():
    o = torch.randn(2, 4, D).to(torch.bfloat16)
    lse = torch.tensor([[0.0, 1.0, -2.0, float("-inf")], [1.0, float("-inf"), 3.0, float("-inf")]])
    out, l = merge_attn_states(o[0], lse[0], o[1], lse[1])
    assert out.dtype == torch.bfloat16 and l.dtype == torch.float32
    w = torch.softmax(lse[:, :3], dim=0)
    ref = (w.unsqueeze(-1) * o[:, :3].float()).sum(0)
    torch.testing.assert_close(out[:3].float(), ref, atol=1e-2, rtol=1e-2)
    assert (out[3] == 0).all() and torch.isneginf(l[3])


def test_paged_read_checks_block_ids_and_lengths_on_cpu():
    """A block id outside the cache or a length past its block-table row is a ValueError naming the entry (on CPU
    the check is free), on the gather and the masked (no ``seq_lens_host``) paths. Entries past a sequence's blocks
    are padding: ``-1`` there gives exactly the 0-padded result on both paths. Before: a raw IndexError, and a silent
    attention over the row's slots only."""
    from megacp.kv import PagedKVCache

    g = torch.Generator().manual_seed(5)
    k_cache, v_cache = torch.randn(4, 2, 1, D, generator=g), torch.randn(4, 2, 1, D, generator=g)
    q = torch.randn(2, 2, D, generator=g)
    lens = torch.tensor([3, 1])
    fine = torch.tensor([[1, 2], [3, 0]])  # row 1 reaches only its first block; 0 pads it (as BlockTable does)
    for host in (None, lens.tolist()):
        ref = paged_attention_with_lse(q, k_cache, v_cache, fine, lens, 0.5, backend="torch", seq_lens_host=host)
        padded = paged_attention_with_lse(q, k_cache, v_cache, torch.tensor([[1, 2], [3, -1]]), lens, 0.5,
                                          backend="torch", seq_lens_host=host)
        assert torch.equal(ref[0], padded[0]) and torch.equal(ref[1], padded[1])
        with pytest.raises(ValueError, match=r"block_table\[0, 1\] = 4 is not a block of the cache \(0 to 3\)"):
            paged_attention_with_lse(q, k_cache, v_cache, torch.tensor([[1, 4], [0, 0]]), lens, 0.5,
                                     backend="torch", seq_lens_host=host)
        with pytest.raises(ValueError, match=r"block_table\[1, 0\] = -1 is not a block"):
            paged_attention_with_lse(q, k_cache, v_cache, torch.tensor([[1, 2], [-1, 9]]), lens, 0.5,
                                     backend="torch", seq_lens_host=host)
    too_long = torch.tensor([5, 1])  # the row holds 2 blocks of 2 tokens
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 5 does not fit block_table's row of 2 blocks of 2"):
        paged_attention_with_lse(q, k_cache, v_cache, fine, too_long, 0.5, backend="torch")
    cache = PagedKVCache(num_blocks=4, block_size=2, num_kv_heads=1, head_dim=D)
    k = torch.randn(2, 1, D, generator=g)
    cache.write_rows(k, k, None, torch.tensor([7, cache.null_slot]))  # the last real slot and the null slot
    with pytest.raises(ValueError, match="slot 9 is outside this cache's 8 slots"):
        cache.write_rows(k, k, None, torch.tensor([0, 9]))
