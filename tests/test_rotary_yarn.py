"""YaRN rope math and DeepSeek's rotary pairing against transformers' own functions (no processes).

References: ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["yarn"]`` (inverse frequencies and the cos/sin
``attention_scaling``), ``DeepseekV3RotaryEmbedding`` + ``apply_rotary_pos_emb_interleave`` / ``apply_rotary_pos_emb``
(rope_interleave true / false), ``DeepseekV2RotaryEmbedding`` + ``apply_rotary_emb`` (complex numbers, pairs kept in
place) and the DeepSeek attention's ``scaling`` (``yarn_apply_mscale``).
"""

from __future__ import annotations

import math

import pytest
import torch

from megacp.layers.rotary import (
    RotaryEmbedding,
    apply_rotary_tables,
    compute_inv_freq,
    rope_attention_factor,
    yarn_mscale,
)
from megacp.models.config import model_config_from_dict

ROPE_DIM = 16
# Unsorted positions past original_max_position_embeddings (64), as after a PCP split.
POSITIONS = torch.tensor([0, 1, 7, 3, 250, 63, 64, 65, 200, 2, 129])

YARN_CASES = {
    "deepseek_v3": dict(factor=40.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1, mscale=1.0,
                        mscale_all_dim=1.0),
    "deepseek_v2": dict(factor=40.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1, mscale=0.707,
                        mscale_all_dim=0.707),
    "mscale_ne": dict(factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1, mscale=1.0,
                      mscale_all_dim=0.8),
    "no_mscale": dict(factor=8.0, original_max_position_embeddings=32, beta_fast=16, beta_slow=2),
    "attention_factor": dict(factor=4.0, original_max_position_embeddings=64, attention_factor=0.9, truncate=False),
    "only_mscale_all_dim": dict(factor=4.0, original_max_position_embeddings=64, mscale_all_dim=0.5),
}


def rope_deinterleave_index(dim: int) -> torch.Tensor:
    """``[0, 2, 4, …, 1, 3, 5, …]``: ``x[..., index]`` turns interleaved pairs into halves."""
    return torch.cat((torch.arange(0, dim, 2), torch.arange(1, dim, 2)))


def _hf_config(version: int, rope: dict, interleave: bool = True):
    from transformers import DeepseekV2Config, DeepseekV3Config

    kw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, qk_rope_head_dim=ROPE_DIM,
              qk_nope_head_dim=8, v_head_dim=8, kv_lora_rank=16, max_position_embeddings=256, num_experts_per_tok=2,
              rope_parameters=dict(rope, rope_type="yarn", rope_theta=10000.0))
    if version == 2:
        return DeepseekV2Config(**kw)
    return DeepseekV3Config(**kw, rope_interleave=interleave)


def _ours(rope: dict, interleave: bool) -> RotaryEmbedding:
    return RotaryEmbedding(ROPE_DIM, 10000.0, dict(rope, rope_type="yarn"), interleave=interleave)


@pytest.mark.parametrize("case", sorted(YARN_CASES))
def test_yarn_inv_freq_and_attention_factor_equal_transformers(case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = YARN_CASES[case]
    inv_ref, factor_ref = ROPE_INIT_FUNCTIONS["yarn"](_hf_config(3, rope))
    ours = _ours(rope, True)
    assert torch.equal(ours.inv_freq, inv_ref.float())  # same operations: bitwise
    assert ours.attention_factor == pytest.approx(factor_ref, rel=1e-12, abs=0)
    # YaRN really moves the frequencies (negative control: plain RoPE differs in the interpolated band).
    assert not torch.allclose(compute_inv_freq(ROPE_DIM, 10000.0, None), ours.inv_freq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("case", ["mscale_ne", "deepseek_v3", "attention_factor"])
def test_deepseek_v3_rotation_equals_transformers(case, interleave, dtype):
    """q_pe [T, H, D] and k_pe [T, 1, D] rotated by our tables equal DeepseekV3RotaryEmbedding + its apply
    function, bitwise (cos/sin made in float32 and cast, as transformers does)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3RotaryEmbedding,
        apply_rotary_pos_emb,
        apply_rotary_pos_emb_interleave,
    )

    rope = YARN_CASES[case]
    torch.manual_seed(0)
    q = torch.randn(len(POSITIONS), 4, ROPE_DIM, dtype=dtype)
    k = torch.randn(len(POSITIONS), 1, ROPE_DIM, dtype=dtype)
    hf_rope = DeepseekV3RotaryEmbedding(_hf_config(3, rope, interleave))
    cos, sin = hf_rope(q, POSITIONS[None])
    apply = apply_rotary_pos_emb_interleave if interleave else apply_rotary_pos_emb
    q_ref, k_ref = apply(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)  # HF: [B, H, T, D]
    q_ours, k_ours = _ours(rope, interleave)(POSITIONS, q, k)
    assert torch.equal(q_ours, q_ref[0].transpose(0, 1)) and torch.equal(k_ours, k_ref[0].transpose(0, 1))
    # Negative controls: the other pairing, and the tables without the cos/sin factor, give other numbers.
    q_other, _ = _ours(rope, not interleave)(POSITIONS, q, k)
    assert (q_other - q_ours).abs().max() > 0.1
    if hf_rope.attention_scaling != 1.0:
        unscaled = RotaryEmbedding(ROPE_DIM, 10000.0, dict(rope, rope_type="yarn", attention_factor=1.0), interleave)
        assert (unscaled(POSITIONS, q, k)[0] - q_ours).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["deepseek_v2", "mscale_ne"])
def test_deepseek_v2_complex_rotation_equals_ours_up_to_pair_order(case, dtype):
    """V2 rotates (x_2i, x_2i+1) as complex numbers and keeps pairs in place; ours returns the halves order: the
    same numbers after ``rope_deinterleave_index`` (complex multiply rounds differently: float32 tolerance)."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RotaryEmbedding, apply_rotary_emb

    rope = YARN_CASES[case]
    torch.manual_seed(1)
    q = torch.randn(len(POSITIONS), 4, ROPE_DIM, dtype=dtype)
    k = torch.randn(len(POSITIONS), 1, ROPE_DIM, dtype=dtype)
    freqs_cis = DeepseekV2RotaryEmbedding(_hf_config(2, rope))(q, POSITIONS[None])
    q_ref, k_ref = apply_rotary_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], freqs_cis)
    q_ours, k_ours = _ours(rope, True)(POSITIONS, q, k)
    index = rope_deinterleave_index(ROPE_DIM)
    torch.testing.assert_close(q_ours, q_ref[0].transpose(0, 1)[..., index], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(k_ours, k_ref[0].transpose(0, 1)[..., index], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["deepseek_v2", "mscale_ne"])
def test_deepseek_v2_bf16_rotation_is_bitwise_transformers(case):
    """In bf16, DeepSeek-V2's MLA rotation (``rope_float32``: float32 tables, ``MLAAttention._rotate`` rotates in float32
    and rounds once) is bit for bit transformers' complex-number ``apply_rotary_emb`` up to the pair order; the
    activation-dtype tables (Llama's and V3's form, V2's before) differ in a good part of the elements (negative
    control)."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RotaryEmbedding, apply_rotary_emb

    from megacp.layers.mla_attention import MLAAttention

    rope = YARN_CASES[case]
    g = torch.Generator().manual_seed(2)
    positions = torch.arange(300) * 37
    q = torch.randn(len(positions), 4, ROPE_DIM, generator=g).bfloat16()
    k = torch.randn(len(positions), 1, ROPE_DIM, generator=g).bfloat16()
    freqs_cis = DeepseekV2RotaryEmbedding(_hf_config(2, rope))(q, positions[None])
    q_ref, k_ref = apply_rotary_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], freqs_cis)
    index = rope_deinterleave_index(ROPE_DIM)
    ours = _ours(rope, True)
    attn = MLAAttention(64, 4, 16, 8, ROPE_DIM, 8, q_lora_rank=None, rope_interleave=True,
                        params_dtype=torch.bfloat16)
    for x, ref in ((q, q_ref), (k, k_ref)):
        want = ref[0].transpose(0, 1)[..., index]
        got = attn._rotate(x, ours.tables(positions, torch.float32))
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
        narrow = attn._rotate(x, ours.tables(positions, torch.bfloat16))
        assert (narrow != want).float().mean() > 0.1


def test_deinterleave_index_folds_into_weights():
    """Rotating x (pairs) with interleave=True equals rotating x[..., index] as plain halves: the permutation can be
    applied to a projection's output rows once instead of every step."""
    torch.manual_seed(2)
    x = torch.randn(len(POSITIONS), 3, ROPE_DIM)
    rope = _ours(YARN_CASES["mscale_ne"], True)
    tables = rope.tables(POSITIONS, x.dtype)
    index = rope_deinterleave_index(ROPE_DIM)
    assert index.tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15]
    assert torch.equal(apply_rotary_tables(x, tables, interleave=True), apply_rotary_tables(x[..., index], tables))


@pytest.mark.parametrize("case", sorted(YARN_CASES))
@pytest.mark.parametrize("version", [2, 3])
def test_mla_softmax_scale_equals_transformers_attention(case, version):
    """ModelConfig.attention_scale == the DeepSeek attention module's ``scaling`` (qk_head_dim^-0.5 · mscale²)."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    hf = _hf_config(version, YARN_CASES[case])
    attn = (DeepseekV2Attention if version == 2 else DeepseekV3Attention)(hf, 0)
    ours = model_config_from_dict(hf.to_dict())
    assert ours.attention_scale == pytest.approx(attn.scaling, rel=1e-12, abs=0)
    mad = YARN_CASES[case].get("mscale_all_dim")
    if mad:  # negative control: without the mscale² correction the scale is wrong
        assert abs(ours.qk_head_dim**-0.5 - attn.scaling) > 1e-3
        f = YARN_CASES[case]["factor"]
        assert attn.scaling == pytest.approx(ours.qk_head_dim**-0.5 * (0.1 * mad * math.log(f) + 1) ** 2)


def test_yarn_mscale_and_attention_factor_rules():
    assert yarn_mscale(1.0, 5.0) == 1.0 and yarn_mscale(0.5) == 1.0
    assert yarn_mscale(40.0, 1.0) == pytest.approx(0.1 * math.log(40.0) + 1)
    assert rope_attention_factor(None) == 1.0
    assert rope_attention_factor({"rope_type": "linear", "factor": 4.0}) == 1.0
    assert rope_attention_factor(dict(YARN_CASES["deepseek_v3"], rope_type="yarn")) == 1.0
    assert rope_attention_factor(dict(YARN_CASES["no_mscale"], rope_type="yarn")) == yarn_mscale(8.0)
