"""The decode kernels' switches, read when a model is built: ``MEGACP_DECODE_GEMV`` (which projections take the
Triton GEMV) and ``MEGACP_PDL`` (programmatic dependent launch). CPU: parsing, errors, and that neither applies
off CUDA (the layers then run ``F.linear`` and plain launches)."""

from __future__ import annotations

import pytest
import torch

from megacp.ops import decode_fused, gemv


@pytest.mark.parametrize("value,want", [
    (None, set(gemv.DEFAULT_ROLES)), ("all", set(gemv.ROLES)), ("none", set()), ("0", set()),
    ("o, down", {"o", "down"}), ("qkv,gate_up", {"qkv", "gate_up"}),
])
def test_gemv_roles(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv(gemv.ENV_ROLES, raising=False)
    else:
        monkeypatch.setenv(gemv.ENV_ROLES, value)
    assert gemv.roles() == want


def test_an_unknown_role_names_the_valid_ones(monkeypatch):
    monkeypatch.setenv(gemv.ENV_ROLES, "o,mlp")
    with pytest.raises(ValueError, match=r"MEGACP_DECODE_GEMV='o,mlp': unknown projection\(s\) \['mlp'\]; use .*qkv, o, "
                                         r"gate_up, down"):
        gemv.roles()


def test_llama_layers_take_the_roles_when_built(monkeypatch):
    from megacp.models.config import build_tiny_llama_config
    from megacp.models.llama import LlamaForCausalLM

    monkeypatch.setenv(gemv.ENV_ROLES, "o,gate_up")
    model = LlamaForCausalLM(build_tiny_llama_config(num_hidden_layers=1), params_dtype=torch.float32)
    layer = model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    assert (attn.qkv_proj.decode_gemv, attn.o_proj.decode_gemv) == (False, True)
    assert (mlp.gate_up_proj.decode_gemv, mlp.down_proj.decode_gemv) == (True, False)
    x = torch.randn(3, attn.o_proj.input_size)
    torch.nn.init.normal_(attn.o_proj.weight.data)  # the model is built with uninitialised (torch.empty) weights
    assert not gemv.applies(x, attn.o_proj.weight)  # CPU: F.linear, the same numbers as without the switch
    assert torch.equal(attn.o_proj(x), torch.nn.functional.linear(x, attn.o_proj.weight))


def test_pdl_is_off_the_gpu():
    assert decode_fused.pdl_options(torch.zeros(2)) == {}
