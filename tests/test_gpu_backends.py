"""CUDA attention backends ("te", "cudnn", "flash"), the Triton paged decode kernel, and the layer/engine on a GPU.

The ``gpu``-marked tests need CUDA (run them on the device machine: ``scripts/gpu_tests.sh``); each compares bf16 GPU
results with the float32 "torch" reference backend on the CPU (‖out − ref‖ / ‖ref‖ and |lse − ref|), or, end to end,
greedy ids with ``transformers``. Set ``MEGACP_REQUIRE_TE=1`` to make a missing Transformer Engine a failure instead
of a skip. The unmarked tests check the backends' pure helpers on the CPU (what CI runs).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from megacp.ops import attention_with_lse, available_backends, paged_attention_with_lse, select_backend
from megacp.ops import backends_common, backends_cuda, backends_te, paged_decode

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
FUSED = ("cuda", "te", "cudnn", "flash")


# ----------------------------------------------------------------------------------------------- helpers
def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def _lse_err(lse: torch.Tensor, ref: torch.Tensor) -> float:
    lse, ref = lse.float().cpu(), ref.float().cpu()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref)), "rows without keys must (only) have lse -inf"
    fin = torch.isfinite(ref)
    return (lse[fin] - ref[fin]).abs().max().item() if bool(fin.any()) else 0.0


def _cu(lens: list[int], device) -> torch.Tensor:
    return torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)


def _packed_inputs(lq, lk, hq, hk, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), hq, d, generator=g)
    k = torch.randn(sum(lk), hk, d, generator=g)
    v = torch.randn(sum(lk), hk, d, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _check_backend(name, lq, lk, causal, hq, hk, d, seed):
    q, k, v = _packed_inputs(lq, lk, hq, hk, d, torch.bfloat16, "cuda", seed)
    scale = 1 / math.sqrt(d)
    out, lse = attention_with_lse(q, k, v, _cu(lq, "cuda"), _cu(lk, "cuda"), causal, scale, backend=name)
    ref_out, ref_lse = attention_with_lse(
        q.float().cpu(), k.float().cpu(), v.float().cpu(), _cu(lq, "cpu"), _cu(lk, "cpu"), causal, scale,
        backend="torch")
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and lse.shape == (sum(lq), hq)
    rel, lerr = _rel(out.cpu(), ref_out), _lse_err(lse, ref_lse)
    assert rel < 1e-2, f"{name}: out relative error {rel:.2e} (lq={lq}, lk={lk}, causal={causal})"
    assert lerr < 2e-2, f"{name}: lse error {lerr:.2e} (lq={lq}, lk={lk}, causal={causal})"
    return rel, lerr


def _require(name: str) -> None:
    if name in available_backends("cuda"):
        return
    why = backends_cuda.te_unavailable_reason() if name == "te" else "not available"
    if name == "te" and os.environ.get("MEGACP_REQUIRE_TE") == "1":
        pytest.fail(f"MEGACP_REQUIRE_TE=1 but backend 'te' is unavailable: {why}")
    pytest.skip(f"backend {name!r}: {why}")


# ----------------------------------------------------------------------------------------------- CPU: pure helpers
def test_lse_rows_reads_every_layout():
    cu = [0, 3, 3, 7]  # sequences of 3, 0 and 4 query rows
    ref = torch.randn(7, 2)
    assert torch.equal(backends_cuda.lse_rows(ref.unsqueeze(-1), cu, 2), ref)  # TE THD stats [T, H, 1]
    assert torch.equal(backends_cuda.lse_rows(ref.t().contiguous(), cu, 2), ref)  # unpadded [H, T]
    padded = torch.full((3, 2, 8), 99.0)  # [B, H, max_q + padding]
    for b, (a, e) in enumerate(zip(cu[:-1], cu[1:])):
        padded[b, :, : e - a] = ref[a:e].t()
    assert torch.equal(backends_cuda.lse_rows(padded, cu, 2), ref)
    with pytest.raises(ValueError, match="unexpected LSE layout"):
        backends_cuda.lse_rows(torch.zeros(5, 5), cu, 2)


def test_packed_wrapper_drops_keyless_and_queryless_sequences():
    """The wrapper shared by "te" and "flash" must hand the kernel only non-empty sequences and refill the rest."""
    seen = []

    def kernel(q, k, v, cu_q, cu_k, causal, scale, dev_cu, used_k):
        assert used_k is None
        lens = [(b - a, d - c) for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:])]
        seen.append(lens)
        assert dev_cu[0].tolist() == cu_q and dev_cu[1].tolist() == cu_k  # device offsets match the host lists
        assert all(a > 0 and b > 0 for a, b in lens)
        return backends_common._reference(q, k, v, torch.tensor(cu_q), torch.tensor(cu_k), causal, scale)

    lq, lk = [3, 0, 2, 4, 1], [5, 6, 0, 4, 2]
    q, k, v = _packed_inputs(lq, lk, 4, 2, 8, torch.bfloat16, "cpu", seed=1)
    out, lse = backends_common._packed(kernel)(q, k, v, _cu(lq, "cpu"), _cu(lk, "cpu"), True, 0.3)
    assert seen == [[(3, 5), (4, 4), (1, 2)]]
    ref_out, ref_lse = attention_with_lse(q.float(), k.float(), v.float(), _cu(lq, "cpu"), _cu(lk, "cpu"), True, 0.3,
                                          backend="torch")
    assert _rel(out, ref_out) < 1e-2 and _lse_err(lse, ref_lse) < 1e-2
    assert bool((lse[3:5] == float("-inf")).all()) and bool((out[3:5] == 0).all())  # the sequence without keys


class _FakeTE:
    """Stand-ins for Transformer Engine 2.20's ``fused_attn_fwd`` / ``fused_attn_bwd`` with the real signatures
    (parameter names and order copied from transformer_engine/pytorch/cpp_extensions/fused_attn.py), computing
    attention with the "torch" reference; they assert the layout arguments shared/te-wheels/README.md requires."""

    def __init__(self):
        self.calls = {"fwd": 0, "bwd": 0}

    @staticmethod
    def _attend(q, k, v, cu_q, cu_k, mask, scale):
        causal = {"padding_causal_bottom_right": True, "padding": False}[mask]
        return attention_with_lse(q, k, v, cu_q, cu_k, causal, scale, backend="torch")

    def fwd(self, is_training, max_seqlen_q, max_seqlen_kv, cu_seqlens_q, cu_seqlens_kv, q, k, v, fake_dtype,
            fused_attention_backend, attn_bias=None, cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None,
            page_table_k=None, page_table_v=None, s_quantizer=None, o_quantizer=None, attn_scale=None, dropout=0.0,
            fast_zero_fill=True, qkv_layout="sbh3d", o_format="sbhd", qkv_scale_inv_format=None,
            attn_bias_type="no_bias", attn_mask_type="padding", softmax_type="vanilla", window_size=(-1, -1),
            bottom_right_diagonal=None, rng_gen=None, softmax_offset=None, return_max_logit=False, cuda_graph=False):
        assert is_training and qkv_layout == "thd_thd_thd" and o_format == "thd" and dropout == 0.0
        assert cu_seqlens_q_padded is cu_seqlens_q and cu_seqlens_kv_padded is cu_seqlens_kv and fake_dtype == q.dtype
        assert all(t.is_contiguous() for t in (q, k, v))
        assert window_size == ((-1, 0) if attn_mask_type == "padding_causal_bottom_right" else (-1, -1))
        self.calls["fwd"] += 1
        with torch.no_grad():
            out, lse = self._attend(q, k, v, cu_seqlens_q, cu_seqlens_kv, attn_mask_type, attn_scale)
        return out, [lse.unsqueeze(-1), torch.zeros(2, dtype=torch.int64)]  # stats [T, H, 1], rng_state

    def bwd(self, max_seqlen_q, max_seqlen_kv, cu_seqlens_q, cu_seqlens_kv, q, k, v, o, d_o, fake_dtype,
            aux_ctx_tensors, fused_attention_backend, cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None,
            s_quantizer=None, dp_quantizer=None, dqkv_quantizer=None, attn_scale=None, dropout=0.0,
            fast_zero_fill=True, qkv_layout="sbh3d", o_format="sbhd", do_format="sbhd", dqkv_layout="sbh3d",
            qkv_scale_inv_format=None, do_scale_inv_format=None, attn_bias_type="no_bias",
            attn_mask_type="padding", softmax_type="vanilla", window_size=(-1, -1), bottom_right_diagonal=None,
            deterministic=False, cuda_graph=False):
        assert (qkv_layout, o_format, do_format, dqkv_layout) == ("thd_thd_thd", "thd", "thd", "thd_thd_thd")
        assert d_o.shape == o.shape and d_o.dtype == o.dtype == fake_dtype and d_o.is_contiguous()
        assert isinstance(aux_ctx_tensors, list) and aux_ctx_tensors[0].shape == (*q.shape[:2], 1)
        self.calls["bwd"] += 1
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out, _ = self._attend(*leaves, cu_seqlens_q, cu_seqlens_kv, attn_mask_type, attn_scale)
            return list(torch.autograd.grad(out, leaves, d_o))


@pytest.mark.parametrize("causal", [True, False])
def test_te_backward_plumbing_with_te_signatures(monkeypatch, causal):
    """The "te" backend's training path (fused_attn_fwd + fused_attn_bwd, the LSE gradient through two more calls)
    on the CPU with signature-exact stand-ins: out and LSE gradients equal the reference backend's."""
    fake = _FakeTE()
    monkeypatch.setattr(backends_te, "_te_state", lambda: ((fake.fwd, fake.bwd, "F16_arbitrary_seqlen"), ""))
    lq, lk = [3, 4, 2], [7, 4, 5]
    grads = {}
    for name in ("te", "torch"):
        q, k, v = (t.requires_grad_(True) for t in _packed_inputs(lq, lk, 4, 2, 8, torch.float32, "cpu", seed=3))
        if name == "te":
            dev_cu = (_cu(lq, "cpu"), _cu(lk, "cpu"))
            out, lse = backends_te._te_kernel(q, k, v, [0, 3, 7, 9], [0, 7, 11, 16], causal, 0.3, dev_cu)
        else:
            out, lse = attention_with_lse(q, k, v, _cu(lq, "cpu"), _cu(lk, "cpu"), causal, 0.3, backend="torch")
        g = torch.Generator().manual_seed(9)
        ((out * torch.randn(out.shape, generator=g)).sum() + (lse * torch.randn(lse.shape, generator=g)).sum()
         ).backward()
        grads[name] = (out.detach(), lse.detach(), q.grad, k.grad, v.grad)
    for a, b in zip(grads["te"], grads["torch"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert fake.calls == {"fwd": 2, "bwd": 2}  # the output's backward; the LSE's extra forward and backward
    with torch.no_grad():  # inference: one forward, no graph
        q, k, v = _packed_inputs(lq, lk, 4, 2, 8, torch.float32, "cpu", seed=3)
        backends_te._te_kernel(q, k, v, [0, 3, 7, 9], [0, 7, 11, 16], causal, 0.3, (_cu(lq, "cpu"), _cu(lk, "cpu")))
    assert fake.calls == {"fwd": 3, "bwd": 2}


def test_te_takes_overlapping_key_ranges_in_one_launch(monkeypatch):
    """A PCP rank's two chunks over one K/V (seqused_k): TE gets them laid out per chunk, in ONE forward call."""
    fake = _FakeTE()
    monkeypatch.setattr(backends_te, "_te_state", lambda: ((fake.fwd, fake.bwd, "F16_arbitrary_seqlen"), ""))
    monkeypatch.setattr(backends_common, "fused_shapes_ok", lambda q, k, v: True)
    q, k, v = _packed_inputs([8], [16], 4, 2, 8, torch.float32, "cpu", seed=4)
    host = ([0, 4, 8], [0, 0, 16], [8, 16])
    t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    with torch.no_grad():
        out, lse = backends_common._packed(backends_te._te_kernel)(q, k, v, t(host[0]), t(host[1]), True, 0.3,
                                                                   host_cu_seqlens=host, seqused_k=t(host[2]))
    ref = attention_with_lse(q, torch.cat([k[:8], k]), torch.cat([v[:8], v]), t([0, 4, 8]), t([0, 8, 24]), True,
                             0.3, backend="torch")
    torch.testing.assert_close(out, ref[0])
    torch.testing.assert_close(lse, ref[1])
    assert fake.calls == {"fwd": 1, "bwd": 0}


def test_fused_shapes_ok_routes_float32_and_odd_head_dims_to_the_reference():
    x16 = torch.zeros(2, 2, 64, dtype=torch.bfloat16)
    assert backends_cuda.fused_shapes_ok(x16, x16, x16)
    assert not backends_cuda.fused_shapes_ok(x16.float(), x16.float(), x16.float())
    odd = torch.zeros(2, 2, 4, dtype=torch.bfloat16)
    assert not backends_cuda.fused_shapes_ok(odd, odd, odd)


def _ref_packed(q, k, v, cu_q, cu_k, causal, scale, dev_cu, used_k=None):
    assert used_k is None
    return attention_with_lse(q, k, v, dev_cu[0], dev_cu[1], causal, scale, backend="torch")


@pytest.mark.parametrize("dq,dv", [(24, 16), (16, 24)])
def test_padding_to_one_head_dim_is_exact(dq, dv):
    """MLA prefill shapes (V narrower than Q/K, and the other way): padding the narrower side with zeros and slicing
    the output gives the unpadded attention (float64, causal chunk with lq < lk, GQA)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(7, 4, dq, generator=g), torch.randn(9, 2, dq, generator=g), torch.randn(9, 2, dv, generator=g)
    q, k, v = q.double(), k.double(), v.double()
    cu_q, cu_k = [0, 3, 7], [0, 3, 9]
    dev_cu = (_cu([3, 4], "cpu"), _cu([3, 6], "cpu"))
    want = _ref_packed(q, k, v, cu_q, cu_k, True, 0.3, dev_cu)
    seen = []

    def equal_dims_only(q_, k_, v_, *rest):
        assert q_.shape[-1] == k_.shape[-1] == v_.shape[-1], "the padded call must have one head dim"
        seen.append(v_.shape[-1])
        return _ref_packed(q_, k_, v_, *rest)

    out, lse = backends_cuda.padded_v_dim(equal_dims_only, q, k, v, cu_q, cu_k, True, 0.3, dev_cu)
    assert seen == [max(dq, dv)] and out.shape == (7, 4, dv) and out.is_contiguous()
    assert torch.allclose(out, want[0], atol=1e-12) and torch.allclose(lse, want[1], atol=1e-6)


def test_v_head_dim_routing_native_then_padded(monkeypatch):
    """TE / cuDNN get a narrower V as it is until a call refuses it (then padding, remembered); FlashAttention is
    always padded; with gradients everything is padded; equal dims pass straight through."""
    monkeypatch.setattr(backends_common, "_NATIVE_V_DIM", {"te": None, "cudnn": None})
    calls = []

    def fake(refuses: bool):
        def kernel(q, k, v, cu_q, cu_k, causal, scale, dev_cu, used_k=None):
            calls.append((q.shape[-1], v.shape[-1]))
            if refuses and v.shape[-1] != q.shape[-1]:
                raise RuntimeError("cuDNN Frontend error: head dims")
            return _ref_packed(q, k, v, cu_q, cu_k, causal, scale, dev_cu)
        return kernel

    q, k, v = torch.randn(5, 2, 24), torch.randn(5, 2, 24), torch.randn(5, 2, 16)
    args = ([0, 5], [0, 5], True, 0.2, (_cu([5], "cpu"), _cu([5], "cpu")))
    want = _ref_packed(q, k, v, *args)[0]
    te = backends_common._any_v_dim("te", fake(refuses=False))
    cudnn = backends_common._any_v_dim("cudnn", fake(refuses=True))
    flash = backends_common._any_v_dim("flash", fake(refuses=True))
    for kernel, expect in ((te, [(24, 16)]), (cudnn, [(24, 16), (24, 24)]), (cudnn, [(24, 24)]),
                           (flash, [(24, 24)]), (te, [(24, 16)])):
        calls.clear()
        assert torch.allclose(kernel(q, k, v, *args)[0], want, atol=1e-5) and calls == expect, (calls, expect)
    assert backends_common._NATIVE_V_DIM == {"te": True, "cudnn": False}
    calls.clear()
    te(q.requires_grad_(), k, v, *args)
    assert calls == [(24, 24)], "with gradients the padded call runs (autograd through pad and slice)"
    calls.clear()
    cudnn(q, k, k, *args)
    assert calls == [(24, 24)]
    assert backends_cuda.fused_shapes_ok(*(t.bfloat16() for t in (q, k, v)))
    assert not backends_cuda.fused_shapes_ok(q.bfloat16(), k.bfloat16(), v[..., :12].bfloat16())


def test_cudnn_clash_is_detected_before_importing_te(monkeypatch, tmp_path):
    pip_dir = tmp_path / "nvidia" / "cudnn"
    pip_dir.mkdir(parents=True)
    fake = types.ModuleType("nvidia.cudnn")
    fake.__path__ = [str(pip_dir)]
    parent = types.ModuleType("nvidia")
    parent.__path__ = [str(pip_dir.parent)]
    parent.cudnn = fake
    monkeypatch.setitem(sys.modules, "nvidia", parent)
    monkeypatch.setitem(sys.modules, "nvidia.cudnn", fake)
    monkeypatch.setattr(backends_te.glob, "glob", lambda pattern: ["/lib/x86_64-linux-gnu/libcudnn.so.9"]
                        if pattern.startswith("/lib/x86_64-linux-gnu") else [])
    monkeypatch.delenv("CUDNN_HOME", raising=False)
    monkeypatch.delenv("CUDNN_PATH", raising=False)
    msg = backends_cuda.cudnn_clash()
    assert msg is not None and "CUDNN_PATH" in msg and str(pip_dir) in msg
    monkeypatch.setenv("CUDNN_PATH", str(pip_dir))
    assert backends_cuda.cudnn_clash() is None
    monkeypatch.setattr(backends_te.glob, "glob", lambda pattern: [])
    monkeypatch.delenv("CUDNN_PATH")
    assert backends_cuda.cudnn_clash() is None  # no system cuDNN: nothing to clash with


def test_forcing_an_unavailable_backend_names_the_reason(monkeypatch):
    from megacp.ops import attention

    te = attention._BACKENDS["te"]
    why = "a system cuDNN ... export CUDNN_PATH=..."
    monkeypatch.setitem(attention._BACKENDS, "te", dataclasses.replace(
        te, available=lambda device: False, unavailable_reason=lambda device: why))
    with pytest.raises(ValueError, match="system cuDNN .* export CUDNN_PATH"):
        select_backend("cuda", "te")


def test_cuda_backend_picks_kernels_by_shape(monkeypatch):
    for name in ("_cudnn_available", "_flash_available", "_te_available"):
        monkeypatch.setattr(backends_cuda, name, lambda device: True)
    dev = torch.device("cuda")
    choose = backends_cuda.choose_kernel
    assert choose(2, 131072, dev) == "cudnn"  # PCP chunks of a 128k prompt
    assert choose(2, 32768, dev) == "te" and choose(50, 131072, dev) == "te"
    assert choose(1, 32768, dev, one_call_each=True) == "cudnn"  # a whole prompt: one square causal call
    monkeypatch.setattr(backends_cuda, "_te_available", lambda device: False)
    assert choose(2, 32768, dev) == "cudnn" and choose(50, 1000, dev) == "flash"
    monkeypatch.setattr(backends_cuda, "_flash_available", lambda device: False)
    assert choose(50, 1000, dev) == "cudnn"


def test_decode_plan_refuses_bad_values():
    for kwargs, name in [({"num_splits": 0}, "num_splits"), ({"num_splits": 2, "block_n": 48}, "block_n"),
                         ({"num_splits": 2, "num_warps": 3}, "num_warps"), ({"num_splits": 2, "num_stages": 0},
                                                                               "num_stages"),
                         ({"num_splits": 2.0}, "num_splits")]:
        with pytest.raises(ValueError, match=rf"DecodePlan\({name}=.*use "):
            paged_decode.DecodePlan(**kwargs)
    assert paged_decode.DecodePlan(3, 32, 8, 1, True).block_n == 32


def test_choose_plan_stays_within_the_tiles():
    for batch, heads, tokens in [(1, 8, 131072), (64, 8, 8192), (1, 1, 1), (16, 8, 0), (3, 2, 1000), (16, 8, 2048)]:
        plan = paged_decode.choose_plan(batch, heads, tokens)
        tiles = max(1, -(-tokens // plan.block_n))
        assert 1 <= plan.num_splits <= min(tiles, 64), (batch, heads, tokens, plan)
        assert plan.block_n % 16 == 0 and plan.num_warps in (1, 2, 4, 8) and plan.num_stages >= 1


# ----------------------------------------------------------------------------------------------- GPU: backends
CASES = [  # (query lengths, key lengths): PCP head/tail chunks, a decode row, lq > lk, empty sequences
    ([128], [128]),
    ([64, 200, 1], [300, 200, 77]),
    ([5, 40, 3], [0, 17, 9]),
    ([256, 256], [512, 1024]),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("causal", [True, False])
def test_backend_matches_fp32_reference(name, causal):
    _require(name)
    for i, (lq, lk) in enumerate(CASES):
        _check_backend(name, lq, lk, causal, 32, 8, 128, seed=10 + i)
    _check_backend(name, [33, 70], [90, 70], causal, 4, 4, 64, seed=99)  # no GQA, head dim 64


@gpu
@needs_cuda
@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("causal", [True, False])
def test_backend_takes_mla_prefill_head_dims(name, causal):
    """qk_head_dim 192, v_head_dim 128 (DeepSeek MLA prefill), a chunk with lq < lk and a whole prompt: each backend
    (natively or by padding V, ``_NATIVE_V_DIM`` says which) matches the float32 reference like equal dims do."""
    _require(name)
    lq, lk = [300, 1000], [700, 1000]
    g = torch.Generator().manual_seed(11)
    q, k = torch.randn(sum(lq), 16, 192, generator=g), torch.randn(sum(lk), 16, 192, generator=g)
    v = torch.randn(sum(lk), 16, 128, generator=g)
    out, lse = attention_with_lse(*(t.to("cuda", torch.bfloat16) for t in (q, k, v)), _cu(lq, "cuda"),
                                  _cu(lk, "cuda"), causal, 192 ** -0.5, backend=name)
    ref_out, ref_lse = attention_with_lse(*(t.bfloat16().float() for t in (q, k, v)), _cu(lq, "cpu"), _cu(lk, "cpu"),
                                          causal, 192 ** -0.5, backend="torch")
    assert out.shape == (sum(lq), 16, 128)
    print(f"{name} causal={causal}: native V head dim {backends_common._NATIVE_V_DIM}, rel err "
          f"{_rel(out.cpu(), ref_out):.2e}")
    assert _rel(out.cpu(), ref_out) < 1e-2 and _lse_err(lse, ref_lse) < 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("name", FUSED)
def test_backend_pcp_chunk_equals_full_causal_rows(name):
    """A tail chunk (bottom-right causal against the prefix) must equal the same rows of the full causal call."""
    _require(name)
    T, c = 4096, 1024
    q, k, v = _packed_inputs([T], [T], 32, 8, 128, torch.bfloat16, "cuda", seed=5)
    full, full_lse = attention_with_lse(q, k, v, _cu([T], "cuda"), _cu([T], "cuda"), True, 0.088, backend=name)
    head = slice(0, c)
    tail = slice(T - 2 * c, T - c)
    qs = torch.cat([q[head], q[tail]])
    ks = torch.cat([k[: c], k[: T - c]])
    vs = torch.cat([v[: c], v[: T - c]])
    out, lse = attention_with_lse(qs, ks, vs, _cu([c, c], "cuda"), _cu([c, T - c], "cuda"), True, 0.088, backend=name)
    exp_out, exp_lse = torch.cat([full[head], full[tail]]), torch.cat([full_lse[head], full_lse[tail]])
    assert _rel(out, exp_out) < 1e-2
    assert (lse - exp_lse).abs().max().item() < 1e-2
    # the same two chunks in one call over the one K/V: keys by start and length (seqused_k), no copy
    i32 = dict(dtype=torch.int32, device="cuda")
    host = ([0, c, 2 * c], [0, 0, T], [c, T - c])
    one, one_lse = attention_with_lse(qs, k, v, torch.tensor(host[0], **i32), torch.tensor(host[1], **i32), True,
                                      0.088, backend=name, host_cu_seqlens=host, seqused_k=torch.tensor(host[2], **i32))
    assert _rel(one, exp_out) < 1e-2 and (one_lse - exp_lse).abs().max().item() < 1e-2
    # the same kernel on the same sums: equal to the copied layout's result up to bf16 rounding of the output
    assert _rel(one, out) < 4e-3 and (one_lse - lse).abs().max().item() < 1e-3


@gpu
@needs_cuda
def test_automatic_choice_on_cuda_is_the_per_shape_dispatcher():
    assert select_backend("cuda").name == "cuda"
    if os.environ.get("MEGACP_REQUIRE_TE") == "1":
        assert "te" in available_backends("cuda"), backends_cuda.te_unavailable_reason()


# ----------------------------------------------------------------------------------------------- GPU: backward
def _grad_loss_weights(out: torch.Tensor, lse: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)


def _bf16_attention_reference(q, k, v, lq, lk, causal, scale):
    """Single-device attention in bfloat16 on the GPU, sequence by sequence: SDPA (bottom-right boolean mask) for the
    output and logsumexp of the bfloat16 scores for the LSE; the same-precision reference of the gradient bar."""
    outs, lses = [], []
    group = q.shape[1] // k.shape[1]
    cq, ck = _cu(lq, "cpu").tolist(), _cu(lk, "cpu").tolist()
    for b in range(len(lq)):
        qs = q[cq[b]:cq[b + 1]].transpose(0, 1)
        ks, vs = (t[ck[b]:ck[b + 1]].repeat_interleave(group, 1).transpose(0, 1) for t in (k, v))
        mask = None
        if causal:
            i = torch.arange(lq[b], device=q.device)[:, None]
            mask = torch.arange(lk[b], device=q.device)[None, :] <= i + (lk[b] - lq[b])
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale).transpose(0, 1))
        scores = (qs @ ks.transpose(1, 2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        lses.append(torch.logsumexp(scores, -1).t())
    return torch.cat(outs), torch.cat(lses)


def _grads(fn, q, k, v, seed):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = fn(*leaves)
    w_out, w_lse = _grad_loss_weights(out, lse, seed)
    ((out.double() * w_out.to(out.device, torch.float64)).sum()
     + (lse.double() * w_lse.to(lse.device, torch.float64)).sum()).backward()
    return [t.grad.double().cpu() for t in leaves]


@gpu
@needs_cuda
@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("causal", [True, False])
def test_backend_gradients_within_twice_bf16_reference(name, causal):
    """Gradients of q, k, v for a loss on the output *and* the LSE (what an LSE merge passes back), bfloat16 on the
    GPU: relative error against float64 at most twice that of bfloat16 single-device attention. Whole prompts
    (lq = lk) and PCP chunks (lq < lk, cuDNN's prefix + square merge), GQA."""
    _require(name)
    for i, (lq, lk, hq, hk, d) in enumerate([([256, 384, 128], [256, 1024, 700], 8, 2, 64),
                                             ([512, 200], [512, 900], 4, 4, 128)]):
        q, k, v = _packed_inputs(lq, lk, hq, hk, d, torch.bfloat16, "cuda", seed=40 + i)
        scale = 1 / math.sqrt(d)
        cu_q, cu_k = _cu(lq, "cuda"), _cu(lk, "cuda")
        truth = _grads(lambda a, b, c: attention_with_lse(a, b, c, _cu(lq, "cpu"), _cu(lk, "cpu"), causal, scale,
                                                          backend="torch"),
                       *(t.double().cpu() for t in (q, k, v)), seed=i)
        ours = _grads(lambda a, b, c: attention_with_lse(a, b, c, cu_q, cu_k, causal, scale, backend=name), q, k, v, i)
        ref = _grads(lambda a, b, c: _bf16_attention_reference(a, b, c, lq, lk, causal, scale), q, k, v, i)
        err = max(_rel(a, t) for a, t in zip(ours, truth))
        bar = 2 * max(_rel(a, t) for a, t in zip(ref, truth))
        assert err <= bar, f"{name} causal={causal} case {i}: gradient error {err:.3g} > {bar:.3g} (2x bf16 SDPA)"


# ----------------------------------------------------------------------------------------------- GPU: paged decode
def _paged_case(B, hq, hkv, d, block, lens, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    per = [-(-n // block) for n in lens]
    width = max(per + [1]) + 2
    nb = sum(per) + 7
    kc = torch.randn(nb, block, hkv, d, generator=g).to(device="cuda", dtype=dtype)
    vc = torch.randn(nb, block, hkv, d, generator=g).to(device="cuda", dtype=dtype)
    ids = torch.randperm(nb, generator=g)
    bt = torch.full((B, width), -1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(per):
        bt[b, :n] = ids[start:start + n].int()
        start += n
    q = torch.randn(B, hq, d, generator=g).to(device="cuda", dtype=dtype)
    return q, kc, vc, bt.cuda(), torch.tensor(lens, dtype=torch.int32, device="cuda")


@gpu
@needs_cuda
@pytest.mark.skipif(paged_decode.triton is None, reason="needs triton")
@pytest.mark.parametrize("B,hq,hkv,d,block,lens", [
    (4, 32, 8, 128, 16, [0, 1, 300, 5000]),
    (2, 8, 1, 64, 5, [77, 1023]),  # block size that is not a power of two, MQA
    (1, 32, 8, 128, 16, [40000]),  # many splits
    (3, 4, 4, 128, 64, [64, 65, 128]),
])
def test_paged_decode_matches_reference(B, hq, hkv, d, block, lens):
    q, kc, vc, bt, sl = _paged_case(B, hq, hkv, d, block, lens, torch.bfloat16, seed=sum(lens))
    scale = 1 / math.sqrt(d)
    out, lse = paged_decode.paged_decode_with_lse(q, kc, vc, bt, sl, scale)
    ref_out, ref_lse = paged_attention_with_lse(q.float().cpu(), kc.float().cpu(), vc.float().cpu(), bt.cpu(),
                                                sl.cpu(), scale, backend="torch")
    assert _rel(out.cpu(), ref_out) < 1e-2
    assert _lse_err(lse, ref_lse) < 1e-2
    assert bool((out[sl == 0] == 0).all())
    # the public entry point on CUDA goes through the same kernel (no gather)
    auto_out, auto_lse = paged_attention_with_lse(q, kc, vc, bt, sl, scale)
    assert torch.equal(auto_out, out) and torch.equal(auto_lse, lse)
    # float32 caches stay in full precision (no tf32): tight tolerance
    out32, lse32 = paged_decode.paged_decode_with_lse(q.float(), kc.float(), vc.float(), bt, sl, scale)
    assert _rel(out32.cpu(), ref_out) < 1e-5 and _lse_err(lse32, ref_lse) < 1e-4
    # any launch plan gives the same result: one split (no merge kernel), uneven splits, more splits than a short
    # sequence has tiles (empty trailing splits), other tile sizes,
    # and the splits merged inside the split kernel (by the last program of each sequence and KV head)
    for plan in (paged_decode.DecodePlan(1), paged_decode.DecodePlan(3, 32, 8, 3), paged_decode.DecodePlan(64),
                 paged_decode.DecodePlan(5, 128, 8, 1), paged_decode.DecodePlan(3, fused_merge=True),
                 paged_decode.DecodePlan(8, 32, 4, 2, True)):
        p_out, p_lse = paged_decode.paged_decode_with_lse(q.float(), kc.float(), vc.float(), bt, sl, scale, plan=plan)
        assert _rel(p_out.cpu(), ref_out) < 1e-5 and _lse_err(p_lse, ref_lse) < 1e-4, plan
        assert bool((p_out[sl == 0] == 0).all()) and bool(torch.isinf(p_lse[sl == 0]).all()), plan
        b_out, b_lse = paged_decode.paged_decode_with_lse(q, kc, vc, bt, sl, scale, plan=plan)
        assert _rel(b_out.cpu(), ref_out) < 1e-2 and _lse_err(b_lse, ref_lse) < 1e-2, plan
    # the fused plans' persistent arrival counters are back at zero after every launch
    assert all(int(c.abs().sum()) == 0 for c in paged_decode._COUNTERS[q.device])


@gpu
@needs_cuda
@pytest.mark.skipif(paged_decode.triton is None, reason="needs triton")
def test_paged_decode_fused_merge_replays_in_a_cuda_graph():
    """A fused-merge launch captured in a CUDA graph (its counters are the persistent ones, reset by the kernel) gives
    the eager result on every replay, on new query and length contents, with eager launches in between."""
    q, kc, vc, bt, sl = _paged_case(3, 32, 8, 128, 16, [1000, 700, 3000], torch.bfloat16, seed=7)
    scale = 1 / math.sqrt(128)
    plan = paged_decode.DecodePlan(4, fused_merge=True)
    run = lambda: paged_decode.paged_decode_with_lse(q, kc, vc, bt, sl, scale, plan=plan)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up: compiles and allocates the counters outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = run()
    g = torch.Generator(device="cuda").manual_seed(1)
    for lens in ([5, 0, 2999], [1000, 700, 3000], [999, 64, 65]):  # within each row's blocks
        q.copy_(torch.randn(q.shape, generator=g, device="cuda", dtype=q.dtype))
        sl.copy_(torch.tensor(lens, dtype=sl.dtype))
        graph.replay()
        e_out, e_lse = run()
        assert torch.equal(g_out, e_out) and torch.equal(g_lse, e_lse), lens
    torch.cuda.synchronize()
    assert all(int(c.abs().sum()) == 0 for c in paged_decode._COUNTERS[q.device])


# ----------------------------------------------------------------------------------------------- GPU: layer + engine
@gpu
@needs_cuda
def test_cp_attention_layer_on_gpu_matches_causal_sdpa():
    """Single-GPU ContextParallelAttention over a paged cache: prefill, prefill over cached context, decodes."""
    from megacp.kv import BlockTable, PagedKVCache
    from megacp.layers.cp_attention import ContextParallelAttention
    from megacp.layers.metadata_builder import build_attention_metadata

    H, HKV, D, BLOCK = 32, 8, 128, 16
    steps = [[(0, 300), (1, 1), (2, 1000)], [(0, 1), (1, 64), (2, 1), (3, 7)]] + [[(i, 1) for i in range(4)]] * 3
    final = [0] * 4
    for step in steps:
        for i, n in step:
            final[i] += n
    g = torch.Generator().manual_seed(0)
    seqs = [[torch.randn(L, h, D, generator=g).cuda().bfloat16() for h in (H, HKV, HKV)] for L in final]
    refs = [F.scaled_dot_product_attention(*(t.float().transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                           enable_gqa=True).transpose(0, 1) for q, k, v in seqs]
    per = [-(-L // BLOCK) for L in final]
    bt = BlockTable(BLOCK, 4, max(per), device="cuda")
    start = 0
    for i, n in enumerate(per):
        bt.set_row(i, list(range(start, start + n)))
        start += n
    cache = PagedKVCache(sum(per), BLOCK, HKV, D, torch.bfloat16, "cuda")
    layer = ContextParallelAttention(H, HKV, D, 1 / math.sqrt(D))
    done = [0] * 4
    for step in steps:
        ids, new = [i for i, _ in step], [n for _, n in step]
        meta = build_attention_metadata(ids, [done[i] for i in ids], new, bt, device="cuda", null_slot=cache.null_slot)
        rows = [(i, done[i] + j) for i, n in step for j in range(n)]
        q, k, v = (torch.stack([seqs[i][t][p] for i, p in rows]) for t in range(3))
        real = meta.token_index >= 0
        idx = meta.token_index.clamp(min=0)
        out = layer(q[idx], k[idx], v[idx], meta, cache)
        expected = torch.stack([refs[i][p] for i, p in rows])[idx]
        assert _rel(out[real], expected[real]) < 1e-2
        for i, n in step:
            done[i] += n


@gpu
@needs_cuda
def test_engine_greedy_on_gpu_matches_transformers():
    """The engine on one GPU (float32, so ids must match exactly) against transformers' greedy generate."""
    import torch.distributed as dist

    from megacp import parallel_state as ps
    from megacp.engine import LLMEngine
    from megacp.models import load_model
    from megacp.sampling import SamplingParams
    from tests import hf_models

    g = torch.Generator().manual_seed(1234)
    prompts = [torch.randint(3, hf_models.VOCAB_SIZE, (n,), generator=g).tolist() for n in (7, 29, 53)]
    path = hf_models.model_dir("llama")
    expected = hf_models.greedy_reference(path, prompts, 20)
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ps.initialize_model_parallel(backend="gloo")
    try:
        model = load_model(path, torch.float32, torch.device("cuda"))
        engine = LLMEngine(model, num_kv_blocks=16, block_size=16, max_num_batched_tokens=32)
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=20, ignore_eos=True))
    finally:
        ps.destroy_model_parallel()
    assert [o.output_ids for o in outs] == expected



@gpu
@needs_cuda
@pytest.mark.skipif(paged_decode.triton is None, reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lse_merge_kernel_equals_the_pytorch_merge(dtype):
    """On CUDA the decode merge of gathered CP partials (and the paged decode's split merge) is one Triton kernel
    (merge_kernel); it gives the PyTorch merge's result (tests/triton_interpreter_checks.py runs the same checks on
    the CPU under Triton's interpreter)."""
    from tests import triton_interpreter_checks as checks

    checks.check_merge_partials("cuda")
    checks.check_cp_merge_gathered("cuda", dtype)
