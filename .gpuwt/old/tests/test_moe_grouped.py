"""The fixed-shape (graph-capturable) expert computation against the per-expert loop, without processes."""

from __future__ import annotations

import pytest
import torch

import megacp.moe.layer as moe_layer
from megacp.moe import MoELayer, determine_expert_map
from megacp.moe.layer import expert_forward, expert_forward_grouped, grouped_experts_usable

H, I, E, K = 32, 24, 8, 3


def _case(n, seed, dtype=torch.float32, skip_experts=(2, 5)):
    """Random tokens, weights and routing over E experts, never choosing ``skip_experts`` (empty groups)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * 0.3).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * 0.3).to(dtype)
    allowed = torch.tensor([e for e in range(E) if e not in skip_experts])
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(n)]) if n else \
        torch.zeros(0, K, dtype=torch.long)
    weights = torch.rand(n, K, generator=g)
    return x, w13, w2, weights, ids


def _fp64_reference(x, w13, w2, weights, ids, expert_map=None):
    """Token by token in float64: Σ_k w_k · down(silu(gate(x)) · up(x)) over the local experts."""
    x, w13, w2, weights = x.double(), w13.double(), w2.double(), weights.double()
    local = ids if expert_map is None else expert_map[ids]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(local[t, j])
            if e >= 0:
                gate, up = (w13[e] @ x[t]).chunk(2)
                out[t] += weights[t, j] * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("n", [0, 1, 5, 37])
def test_grouped_matches_the_loop_fp32(n):
    x, w13, w2, weights, ids = _case(n, seed=n)
    with torch.no_grad():
        got = expert_forward_grouped(x, w13, w2, weights, ids)
        ref = expert_forward(x, w13, w2, weights, ids)
    assert got.shape == ref.shape == (n, H) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
    if n:
        assert ref.abs().max() > 0.5  # not trivially zero


def test_grouped_bf16_error_within_twice_the_loops():
    x, w13, w2, weights, ids = _case(64, seed=7, dtype=torch.bfloat16)
    with torch.no_grad():
        exact = _fp64_reference(x, w13, w2, weights, ids)
        grouped = expert_forward_grouped(x, w13, w2, weights, ids).double()
        loop = expert_forward(x, w13, w2, weights, ids).double()
    loop_err, grouped_err = (loop - exact).abs().max(), (grouped - exact).abs().max()
    assert grouped_err <= 2 * loop_err + 1e-6, (grouped_err, loop_err)


@pytest.mark.parametrize("placement", ["linear", "round_robin"])
def test_grouped_with_expert_parallel_map(placement):
    """With EP, pairs of non-local experts contribute nothing; the ranks' shares add up to the whole."""
    x, w13, w2, weights, ids = _case(19, seed=3, skip_experts=())
    whole = _fp64_reference(x, w13, w2, weights, ids)
    total = torch.zeros_like(whole)
    for rank in range(2):
        num_local, expert_map = determine_expert_map(2, rank, E, placement)
        local = torch.nonzero(expert_map >= 0).flatten()
        order = torch.empty_like(local)
        order[expert_map[local]] = local  # global id of each local expert
        with torch.no_grad():
            share = expert_forward_grouped(x, w13[order], w2[order], weights, ids, expert_map)
        torch.testing.assert_close(share, expert_forward(x, w13[order], w2[order], weights, ids, expert_map),
                                   rtol=0, atol=2e-5)
        total += share.double()
    torch.testing.assert_close(total, whole, rtol=0, atol=5e-5)


def test_negative_control_swapped_routing_is_caught():
    """The comparison above would catch a pair sent back to the wrong token: swapping two tokens' routes must fail."""
    x, w13, w2, weights, ids = _case(6, seed=11)
    swapped = ids.clone()
    swapped[[0, 1]] = ids[[1, 0]]
    with torch.no_grad():
        bad = expert_forward_grouped(x, w13, w2, weights, swapped)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(bad, expert_forward(x, w13, w2, weights, ids), rtol=0, atol=2e-5)


def test_usable_rule():
    x, w13, w2, *_ = _case(4, seed=0)
    with torch.no_grad():
        assert grouped_experts_usable(x, w13, w2)
        odd = torch.randn(4, 30)  # 120-byte rows: not 16-byte aligned for the grouped GEMM
        assert not grouped_experts_usable(odd, torch.randn(E, 2 * I, 30), torch.randn(E, 30, I))
        assert not grouped_experts_usable(x.bfloat16(), w13, w2)  # mixed dtypes
    w13.requires_grad_(True)
    assert not grouped_experts_usable(x, w13, w2)  # training keeps the autograd loop
    with torch.inference_mode():
        assert grouped_experts_usable(x, w13, w2)


def test_layer_takes_the_grouped_path_in_inference_and_the_loop_in_training(monkeypatch):
    torch.manual_seed(0)
    layer = MoELayer(H, I, E, K, renormalize=True, shared_expert_intermediate_size=16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    calls = []
    real = moe_layer.expert_forward_grouped
    monkeypatch.setattr(moe_layer, "expert_forward_grouped", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(9, H)
    with torch.no_grad():
        inference = layer(x)
    assert calls == [1]
    trained = layer(x)  # grad enabled: the loop, with autograd
    assert calls == [1] and trained.requires_grad
    torch.testing.assert_close(inference, trained.detach(), rtol=0, atol=2e-5)
    trained.sum().backward()
    assert layer.w13.grad is not None and layer.w13.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n", [1, 6, 64, 3000])
def test_grouped_on_cuda_bf16_within_twice_the_loops_error(n):
    """The CUDA grouped GEMM (empty groups, non-local pairs under EP) against float64: at most twice the error of the
    per-expert loop in the same precision, and no host sync."""
    x, w13, w2, weights, ids = _case(n, seed=n, dtype=torch.bfloat16)
    _, expert_map = determine_expert_map(2, 1, E, "round_robin")
    for emap in (None, expert_map):
        local = torch.arange(E) if emap is None else torch.nonzero(emap >= 0).flatten()
        order = torch.empty_like(local)
        order[(emap[local] if emap is not None else local)] = local
        args = [t.cuda() for t in (x, w13[order], w2[order], weights, ids)]
        cuda_map = None if emap is None else emap.cuda()
        with torch.inference_mode():
            assert grouped_experts_usable(*args[:3])
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                grouped = expert_forward_grouped(*args, cuda_map)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            loop = expert_forward(*args, cuda_map)
        exact = _fp64_reference(x, w13[order], w2[order], weights, ids, emap)
        g_err = (grouped.double().cpu() - exact).abs().max()
        l_err = (loop.double().cpu() - exact).abs().max()
        assert g_err <= 2 * l_err + 1e-3, (n, emap is not None, g_err, l_err)
