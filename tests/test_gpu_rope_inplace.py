"""In-place RoPE (megacp/ops/rope_inplace.py) on a GPU: bitwise ``apply_rotary_tables`` at DeepSeek-V2-Lite's
prefill shapes (q_pe inside [q_nope | q_pe], k_pe inside the latent down-projection), captured in a CUDA graph, and
MLAAttention's output unchanged with it on or off.

The CPU runs the kernel under Triton's interpreter (tests/triton_interpreter_checks.py), whose bf16 casts truncate;
here the roundings are the GPU's, so equality is exact.
"""

from __future__ import annotations

import pytest
import torch

from megacp.layers.rotary import apply_rotary_tables, compute_inv_freq, rotary_tables
from megacp.ops import rope_inplace

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or rope_inplace.triton is None,
                                 reason="needs a CUDA device and triton")]


@pytest.mark.parametrize("tables_dtype", [torch.bfloat16, torch.float32])  # float32: DeepSeek-V2's rope_float32
@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("T", [1, 8192])
def test_rotate_in_place_is_bitwise_the_eager_path(T, interleave, tables_dtype):
    g = torch.Generator(device="cuda").manual_seed(T)
    q = torch.randn(T, 16, 192, device="cuda", generator=g).bfloat16()
    kv = torch.randn(T, 576, device="cuda", generator=g).bfloat16()
    tables = rotary_tables(torch.randperm(T, device="cuda") * 3, compute_inv_freq(64, 10000.0), tables_dtype)
    want_q = apply_rotary_tables(q[..., 128:].to(tables_dtype), tables, interleave).bfloat16()
    want_k = apply_rotary_tables(kv[:, None, 512:].to(tables_dtype), tables, interleave).bfloat16()
    q_before, kv_before = q.clone(), kv.clone()
    rope_inplace.rotate_(q[..., 128:], tables.cos, tables.sin_signed, interleave)
    rope_inplace.rotate_(kv[:, None, 512:], tables.cos, tables.sin_signed, interleave)
    assert torch.equal(q[..., 128:], want_q) and torch.equal(kv[:, None, 512:], want_k)
    assert torch.equal(q[..., :128], q_before[..., :128]) and torch.equal(kv[:, :512], kv_before[:, :512])


def test_rotate_in_place_replays_in_a_cuda_graph():
    q = torch.randn(64, 16, 192, device="cuda").bfloat16()
    tables = rotary_tables(torch.arange(64, device="cuda"), compute_inv_freq(64, 10000.0), torch.bfloat16)
    want = apply_rotary_tables(q[..., 128:], tables, True)
    source = q.clone()
    rope_inplace.rotate_(q.clone()[..., 128:], tables.cos, tables.sin_signed, True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rope_inplace.rotate_(q[..., 128:], tables.cos, tables.sin_signed, True)
    q.copy_(source)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(q[..., 128:], want)


@pytest.mark.parametrize("tables_dtype", [torch.bfloat16, torch.float32])
def test_mla_attention_output_is_unchanged_by_the_kernel(tables_dtype):
    from megacp.layers.metadata_builder import build_attention_metadata
    from megacp.layers.mla_attention import MLAAttention

    torch.manual_seed(0)
    attn = MLAAttention(2048, 16, 512, 128, 64, 128, q_lora_rank=None, rope_interleave=True,
                        params_dtype=torch.bfloat16).cuda()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.02)
    meta = build_attention_metadata([0], [0], [1000], None, device="cuda")
    hidden = torch.randn(meta.num_local_tokens, 2048, device="cuda").bfloat16()
    tables = rotary_tables(meta.positions, compute_inv_freq(64, 10000.0), tables_dtype)
    with torch.inference_mode():
        fused = attn(hidden, meta, None, tables)
        attn.fused_decode = False
        eager = attn(hidden, meta, None, tables)
    assert torch.equal(fused, eager)
