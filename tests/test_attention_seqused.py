"""attention_with_lse with ``seqused_k``: key ranges by start and length, overlapping (pure CPU).

The PCP split (DESIGN §3) gives each rank a head and a tail chunk that attend, bottom-right causal, to two prefixes
of the same gathered K/V. With ``seqused_k`` both chunks run in ONE call over that K/V (no per-chunk copy); these
tests hold it to the layout it replaced (each chunk's prefix copied out, cumulative offsets), to two separate calls,
and to a float64 single-device causal attention over the whole prompt.
"""

from __future__ import annotations

import pytest
import torch

from megacp.ops import attention as attn_mod
from megacp.ops import backends_cpu
from megacp.ops import AttentionBackend, attention_with_lse, per_sequence
from megacp.layers import pcp_split_positions

from tests.test_attention_ops import _assert_close, _ref_varlen

BACKENDS = ["torch", "sdpa_cpu"]
D = 8


def _qkv(T, hq, hk, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(T, h, D, generator=g).to(dtype) for h in (hq, hk, hk))


def _split(T, pcp, r):
    """Rank r's head and tail chunk of a T-token prompt: (query positions [2c], key prefix lengths [2])."""
    c = T // (2 * pcp)
    pos = pcp_split_positions(T, pcp, r)
    return pos, [(r + 1) * c, (2 * pcp - r) * c]


def _shared_call(q, k, v, T, pcp, r, backend, host=True):
    """One call: both chunks' queries, keys = prefixes of the one K/V (cu_seqlens_k = starts, seqused_k = lengths)."""
    pos, lens = _split(T, pcp, r)
    c = T // (2 * pcp)
    cu_q, cu_k = [0, c, 2 * c], [0, 0, T]
    t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return attention_with_lse(q[pos], k, v, t(cu_q), t(cu_k), True, 0.3, backend=backend,
                              host_cu_seqlens=(cu_q, cu_k, lens) if host else None, seqused_k=t(lens))


def _copied_call(q, k, v, T, pcp, r, backend):
    """The layout before seqused_k: each chunk's key prefix copied out one after another, cumulative offsets."""
    pos, lens = _split(T, pcp, r)
    c = T // (2 * pcp)
    ks, vs = torch.cat([k[:n] for n in lens]), torch.cat([v[:n] for n in lens])
    cu_q, cu_k = [0, c, 2 * c], [0, lens[0], lens[0] + lens[1]]
    t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return attention_with_lse(q[pos], ks, vs, t(cu_q), t(cu_k), True, 0.3, backend=backend,
                              host_cu_seqlens=(cu_q, cu_k))


def _two_calls(q, k, v, T, pcp, r, backend):
    """Each chunk on its own call."""
    pos, lens = _split(T, pcp, r)
    c = T // (2 * pcp)
    outs, lses = [], []
    for i, n in enumerate(lens):
        cu_q, cu_k = torch.tensor([0, c], dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32)
        o, l = attention_with_lse(q[pos[i * c:(i + 1) * c]], k[:n], v[:n], cu_q, cu_k, True, 0.3, backend=backend)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pcp", [1, 2, 4])
@pytest.mark.parametrize("hq,hk", [(4, 4), (6, 2)])
def test_pcp_chunks_in_one_call_equal_two_calls_and_single_device(backend, dtype, pcp, hq, hk):
    T = 48
    q, k, v = _qkv(T, hq, hk, dtype)
    ref_out, ref_lse = _ref_varlen(q, k, v, [(T, T)], True, 0.3)  # float64, the whole prompt on one device
    # the LSE is float32 whatever the inputs; float64 outputs agree to rounding
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    out_tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else tol
    for r in range(pcp):
        pos, _ = _split(T, pcp, r)
        one = _shared_call(q, k, v, T, pcp, r, backend)
        _assert_close(*one, ref_out[pos], ref_lse[pos], **tol)
        torch.testing.assert_close(one[0].double(), ref_out[pos], **out_tol)
        for other in (_copied_call(q, k, v, T, pcp, r, backend), _two_calls(q, k, v, T, pcp, r, backend),
                      _shared_call(q, k, v, T, pcp, r, backend, host=False)):
            torch.testing.assert_close(one[0], other[0], **out_tol)
            torch.testing.assert_close(one[1], other[1], **tol)


def test_sdpa_cpu_runs_the_two_chunks_as_one_kernel_call(monkeypatch):
    """The shared-K call is one aten kernel call per rank; the copied layout (negative control of the counter) makes
    three (the tail chunk is a prefix + square pair)."""
    calls = []
    real = backends_cpu._CPU_FLASH_OP

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(backends_cpu, "_CPU_FLASH_OP", counting)
    q, k, v = _qkv(32, 4, 2, torch.float32)
    _shared_call(q, k, v, 32, 2, 0, "sdpa_cpu")
    assert len(calls) == 1
    calls.clear()
    _copied_call(q, k, v, 32, 2, 0, "sdpa_cpu")
    assert len(calls) == 3


def test_wrong_key_lengths_change_the_result():
    """Negative control: swapping the chunks' key counts must not pass for the right answer."""
    q, k, v = _qkv(32, 4, 2, torch.float64)
    pos, lens = _split(32, 2, 0)
    ref_out, _ = _ref_varlen(q, k, v, [(32, 32)], True, 0.3)
    cu_q, cu_k, t = [0, 8, 16], [0, 0, 32], (lambda x: torch.tensor(x, dtype=torch.int32))
    out, _ = attention_with_lse(q[pos], k, v, t(cu_q), t(cu_k), True, 0.3, backend="sdpa_cpu",
                                seqused_k=t(lens[::-1]))
    assert (out.double() - ref_out[pos]).abs().max() > 1e-2


# Arbitrary (start, length) key ranges, overlapping or not, with lq > lk, lk = 0 and lq = 0 among them.
RANGES = [((3, 0, 7), False), ((2, 0, 4), False), ((5, 2, 3), True), ((0, 1, 5), False), ((2, 9, 0), False),
          ((4, 9, 0), True), ((1, 4, 6), True)]


class _NoSeqused:
    """A backend without ``takes_seqused_k`` (registered for one test): attention_with_lse lays the key ranges out
    one after another first."""

    name = "test_no_seqused"


@pytest.mark.parametrize("backend", BACKENDS + [_NoSeqused.name])
@pytest.mark.parametrize("causal", [True, False])
def test_arbitrary_key_ranges_match_the_reference(backend, causal, monkeypatch):
    monkeypatch.setitem(attn_mod._BACKENDS, _NoSeqused.name, AttentionBackend(
        _NoSeqused.name, per_sequence(backends_cpu._torch_seq), lambda d: True, -1, takes_host_cu_seqlens=True))
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(12, 2, D, generator=g), torch.randn(12, 2, D, generator=g)
    spec = [r for r, _ in RANGES]
    q = torch.randn(sum(lq for lq, _, _ in spec), 4, D, generator=g)
    cu_q = [0]
    for lq, _, _ in spec:
        cu_q.append(cu_q[-1] + lq)
    starts, lens = [s for _, s, _ in spec], [n for _, _, n in spec]
    ks = torch.cat([k[s:s + n] for s, n in zip(starts, lens)])
    vs = torch.cat([v[s:s + n] for s, n in zip(starts, lens)])
    ref = _ref_varlen(q, ks, vs, [(lq, n) for lq, _, n in spec], causal, 0.5)
    t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    out = attention_with_lse(q, k, v, t(cu_q), t(starts + [12]), causal, 0.5, backend=backend,
                             host_cu_seqlens=(cu_q, starts + [12], lens), seqused_k=t(lens))
    _assert_close(*out, *ref)


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_cpu_one_call_gradients_match_torch_backend(causal):
    """The masked one-call path keeps exact gradients of output and LSE (float64, GQA)."""
    def grads(backend):
        q, k, v = _qkv(32, 4, 2, torch.float64, seed=5)
        q = q[pcp_split_positions(32, 2, 1)]
        for x in (q, k, v):
            x.requires_grad_(True)
        t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
        out, lse = attention_with_lse(q, k, v, t([0, 8, 16]), t([0, 0, 32]), causal, 0.3, backend=backend,
                                      host_cu_seqlens=([0, 8, 16], [0, 0, 32], [16, 24]), seqused_k=t([16, 24]))
        w = torch.Generator().manual_seed(2)
        (out * torch.randn(out.shape, generator=w, dtype=out.dtype)).sum().add(
            (lse * torch.randn(lse.shape, generator=w)).sum()).backward()
        return q.grad, k.grad, v.grad

    for a, b in zip(grads("torch"), grads("sdpa_cpu")):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_sdpa_cpu_gradients_of_two_requests_use_each_requests_mask():
    """Two requests, each a head and a tail chunk over its own keys: two masked groups of different shapes. The
    backward replays each group with its own mask (it once replayed both with the loop's last one: a shape error,
    or with equal shapes wrong gradients). float64 against the torch backend."""
    pos_a, pos_b = pcp_split_positions(32, 2, 1), pcp_split_positions(16, 2, 1)
    cu_q, cu_k, used = [0, 8, 16, 20, 24], [0, 0, 32, 32, 48], [16, 24, 8, 12]
    t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731

    def grads(backend):
        q, k, v = _qkv(48, 4, 2, torch.float64, seed=7)
        for x in (q, k, v):
            x.requires_grad_(True)
        q_rows = torch.cat([q[pos_a], q[32 + pos_b]])
        out, lse = attention_with_lse(q_rows, k, v, t(cu_q), t(cu_k), True, 0.3, backend=backend,
                                      host_cu_seqlens=(cu_q, cu_k, used), seqused_k=t(used))
        w = torch.Generator().manual_seed(3)
        (out * torch.randn(out.shape, generator=w, dtype=out.dtype)).sum().add(
            (lse * torch.randn(lse.shape, generator=w)).sum()).backward()
        return q.grad, k.grad, v.grad

    for a, b in zip(grads("torch"), grads("sdpa_cpu")):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_seqused_k_errors_name_the_argument():
    q, k, v = _qkv(8, 2, 2, torch.float32)
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"seqused_k \(3,\) must be \[B\] = \[2\]"):
        attention_with_lse(q, k, v, cu, cu, True, 1.0, seqused_k=torch.tensor([4, 4, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="host_cu_seqlens has 2 entries"):
        attention_with_lse(q, k, v, cu, cu, True, 1.0, host_cu_seqlens=([0, 4, 8], [0, 4, 8]),
                           seqused_k=torch.tensor([4, 4], dtype=torch.int32))
