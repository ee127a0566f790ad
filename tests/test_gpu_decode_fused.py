"""The fused decode kernels (megacp/ops/decode_fused.py) on a GPU: bitwise equal to the eager ops they replace,
captured in a CUDA graph, and the engine's greedy ids unchanged with them on or off (``MEGACP_FUSED_DECODE``).

The CPU runs the same kernels under Triton's interpreter (tests/triton_interpreter_checks.py), whose bf16 casts
truncate; here the roundings are the GPU's, so equality is exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megacp.kv import PagedKVCache
from megacp.layers.rotary import apply_rotary_tables, compute_inv_freq, rotary_tables
from megacp.ops import decode_fused

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or decode_fused.triton is None,
                                 reason="needs a CUDA device and triton")]


def _case(dtype, B=5, hq=32, hkv=8, D=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(B, (hq + 2 * hkv) * D, device="cuda", generator=g).to(dtype)
    positions = torch.tensor([0, 1, 517, 8191, 131000][:B], device="cuda")
    tables = rotary_tables(positions, compute_inv_freq(D, 500000.0, {"rope_type": "llama3", "factor": 8.0,
                                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                     "original_max_position_embeddings": 8192}),
                           dtype)
    return qkv, tables


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_and_cache_write_is_bitwise_the_eager_path(dtype):
    hq, hkv, D = 32, 8, 128
    qkv, tables = _case(dtype)
    mine, ref = (PagedKVCache(8, 16, hkv, D, dtype=dtype, device="cuda") for _ in range(2))
    for a, b in zip(mine.storage, ref.storage):
        a.normal_()
        b.copy_(a)
    slots = torch.tensor([17, mine.null_slot, 3, 127, 64], device="cuda")
    q = decode_fused.rope_and_cache_write(qkv, tables.cos, tables.sin_signed, *mine.storage, slots, hq, hkv)
    qk = apply_rotary_tables(qkv[:, : (hq + hkv) * D].view(-1, hq + hkv, D), tables)
    ref.write_rows(qk[:, hq:], qkv[:, (hq + hkv) * D:].view(-1, hkv, D), None, slots)
    assert torch.equal(q, qk[:, :hq])
    assert torch.equal(mine.storage[0], ref.storage[0]) and torch.equal(mine.storage[1], ref.storage[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T", [1, 64])
def test_silu_mul_is_bitwise_the_eager_path(dtype, T):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(T, 2 * 14336, device="cuda", generator=g) * 3).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(decode_fused.silu_mul(x), F.silu(gate) * up)


def test_fused_kernels_replay_in_a_cuda_graph():
    qkv, tables = _case(torch.bfloat16, B=2)
    cache = PagedKVCache(4, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    slots = torch.tensor([5, 9], device="cuda")
    gate_up = torch.randn(2, 2 * 256, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # warm-up compiles outside the capture
        decode_fused.rope_and_cache_write(qkv, tables.cos, tables.sin_signed, *cache.storage, slots, 32, 8)
        decode_fused.silu_mul(gate_up)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q = decode_fused.rope_and_cache_write(qkv, tables.cos, tables.sin_signed, *cache.storage, slots, 32, 8)
        h = decode_fused.silu_mul(gate_up)
    qkv.normal_(), gate_up.normal_(), slots.copy_(torch.tensor([1, 2], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    want_q = apply_rotary_tables(qkv[:, : 40 * 128].view(2, 40, 128), tables)
    assert torch.equal(q, want_q[:, :32])
    assert torch.equal(cache.storage[0].view(-1, 8, 128)[1:3], want_q[:, 32:])
    assert torch.equal(h, F.silu(gate_up[:, :256]) * gate_up[:, 256:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_engine_ids_equal_with_fused_kernels_on_and_off(dtype, monkeypatch):
    """Graph decode with the fused kernels == eager decode without them (same weights, greedy, batch 3)."""
    from megacp.engine import LLMEngine
    from megacp.sampling import SamplingParams
    from tests.dist_pool import model_parallel
    from tests.test_no_host_sync import _tiny_model

    prompts = [[3, 14, 15, 92, 65], [27, 18, 28], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    ids = {}
    with model_parallel(backend="gloo"):
        for fused, eager in ((True, False), (False, True)):
            monkeypatch.setenv(decode_fused.ENV_FUSED, "1" if fused else "0")  # read when the layers are built
            model = _tiny_model(dtype, "cuda")  # head dim 64, seeded: the same weights both times
            engine = LLMEngine(model, num_kv_blocks=64, block_size=16, enforce_eager=eager)
            outs = engine.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
            ids[fused] = [o.output_ids for o in outs]
            if not eager:
                assert engine.stats.graph_replays > 0, engine.stats.cuda_graphs  # the fused run replays graphs
            del engine
    assert ids[True] == ids[False]


@pytest.mark.parametrize("M", [1, 7, 16, 33, 64])
def test_gemv_error_is_within_twice_cublas(M):
    """The decode GEMV (megacp.ops.gemv) in bf16 against a float64 reference: its error at most twice cuBLAS's (plus
    one bf16 ulp of the largest output), on an aligned and a ragged shape, with the chosen and another tiling."""
    from megacp.ops import gemv

    g = torch.Generator(device="cuda").manual_seed(M)
    for N, K in ((4096, 4096), (1000, 1000)):
        x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
        w = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).bfloat16()
        assert gemv.applies(x, w)
        ref = x.double() @ w.double().T
        cublas_err = (F.linear(x, w).double() - ref).abs().max().item()
        ulp = ref.abs().max().item() * 2 ** -8
        for config in (None, gemv.GemvConfig(64, 128)):
            got = gemv.linear(x, w, config=config)
            err = (got.double() - ref).abs().max().item()
            assert err <= 2 * cublas_err + ulp, (N, K, config, err, cublas_err)


def test_pdl_chain_replays_in_a_cuda_graph():
    """norm → GEMV → SiLU·mul → GEMV, the norm and SiLU·mul launched with PDL (each waits for its predecessor's
    writes), captured and replayed on new inputs: the replay equals the same calls made eagerly."""
    from megacp.ops import gemv, rms_norm

    g = torch.Generator(device="cuda").manual_seed(3)
    x, res = (torch.randn(4, 4096, device="cuda", generator=g).bfloat16() for _ in range(2))
    norm_w = torch.rand(4096, device="cuda", generator=g).bfloat16()
    w_up = (torch.randn(2 * 2048, 4096, device="cuda", generator=g) * 0.02).bfloat16()
    w_down = (torch.randn(4096, 2048, device="cuda", generator=g) * 0.02).bfloat16()

    def chain():
        h, _ = rms_norm.fused_add_rms_norm(x, res, norm_w, 1e-5)
        return gemv.linear(decode_fused.silu_mul(gemv.linear(h, w_up)), w_down)

    assert decode_fused.pdl_options(x), "an sm_90+ GPU launches with PDL"
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        chain()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    x.normal_(), res.normal_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, chain())


def test_engine_graph_ids_equal_eager_with_every_projection_on_the_gemv(monkeypatch):
    """``MEGACP_DECODE_GEMV=all``: graph decode == eager decode (greedy, batch 3, bf16), graphs replayed."""
    from megacp.engine import LLMEngine
    from megacp.ops import gemv
    from megacp.sampling import SamplingParams
    from tests.dist_pool import model_parallel
    from tests.test_no_host_sync import _tiny_model

    monkeypatch.setenv(gemv.ENV_ROLES, "all")
    prompts = [[3, 14, 15, 92, 65], [27, 18, 28], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    ids = {}
    with model_parallel(backend="gloo"):
        for eager in (False, True):
            model = _tiny_model(torch.bfloat16, "cuda")
            assert all(m.decode_gemv for m in model.modules() if hasattr(m, "decode_gemv"))
            engine = LLMEngine(model, num_kv_blocks=64, block_size=16, enforce_eager=eager)
            ids[eager] = [o.output_ids for o in engine.generate(prompts, SamplingParams(max_new_tokens=12,
                                                                                         ignore_eos=True))]
            if not eager:
                assert engine.stats.graph_replays > 0, engine.stats.cuda_graphs
            del engine
    assert ids[True] == ids[False]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_kernel_equals_argmax_and_replays_in_a_graph(dtype):
    """megacp.ops.greedy on a 128k vocabulary equals ``where(isfinite.all, argmax, -1)`` (ties inside and across
    programs: the lowest id; NaN and inf rows flagged), the same after a CUDA-graph capture replayed on new logits,
    and what ``sampling.sample`` returns at temperature 0."""
    from megacp.ops import greedy
    from megacp.sampling import NONFINITE_TOKEN, sample

    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(64, 128256, device="cuda", generator=g).to(dtype)
    x[1, [128000, 70000, 4095]] = 99.0
    x[2, [4096, 4097]] = 99.0
    x[3, 17] = float("nan")
    x[4, 128255] = float("inf")
    x[5] = 0.0

    def want(t):
        return torch.where(torch.isfinite(t).all(-1), t.argmax(-1), NONFINITE_TOKEN)

    assert torch.equal(greedy.greedy_tokens(x, NONFINITE_TOKEN), want(x))
    assert want(x)[1:6].tolist() == [4095, 4096, -1, -1, 0]
    assert torch.equal(sample(x, 0.0, 1.0, None), want(x))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = greedy.greedy_tokens(x, NONFINITE_TOKEN)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, device="cuda", generator=g).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want(x))
