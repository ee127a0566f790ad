"""DeepSeek MoE blocks loaded from tiny checkpoints saved by transformers (per-expert, fused, sharded, with an MTP
layer), through ``megacp.models.loader.load_weights`` and ``moe_weight_loaders``; outputs vs the saved model's own
MoE blocks read back by transformers.

The attention and dense tensors belong to the DeepSeek model (``megacp/models/deepseek.py``); here a stand-in model
holds only the MoE blocks and accepts every other tensor name, so the loader's name checks (missing / unexpected,
the MTP layer) run on the real checkpoint names.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from megacp.models.config import load_model_config
from megacp.models.llama import HFWeight, moe_weight_loaders
from megacp.models.loader import checkpoint_files, load_weights, mtp_tensor_names
from megacp.moe import DeepseekMoE, MoEParallelConfig
from tests.deepseek_tiny import load_tiny_reference, save_tiny_deepseek


class _MoEBlocksOnly(nn.Module):
    """The MoE blocks of a DeepSeek checkpoint (each rank's share under ``parallel_config``); every other expected
    tensor name is accepted and recorded in ``others``."""

    def __init__(self, model_dir: str, parallel_config: MoEParallelConfig | None = None, placement="linear"):
        super().__init__()
        self.config = load_model_config(model_dir)
        self.blocks = nn.ModuleDict({str(i): DeepseekMoE.from_config(self.config, parallel_config, placement=placement)
                                     for i in self.config.moe_layers})
        self._names = [n for names in checkpoint_files(model_dir).values() for n in names
                       if ".mlp.experts." not in n and ".mlp.gate." not in n and ".mlp.shared_experts." not in n]
        self.others: list[str] = []

    def hf_weight_loaders(self, fused_experts: bool = False) -> dict[str, HFWeight]:
        loaders = {n: HFWeight((), lambda t, n=n: self.others.append(n)) for n in self._names
                   if not mtp_tensor_names({n}, self.config)}
        for i, block in self.blocks.items():
            loaders.update(moe_weight_loaders(block, f"model.layers.{i}.mlp.", self.config, fused_experts))
        return loaders


def _load(path: str, **kw) -> _MoEBlocksOnly:
    model = _MoEBlocksOnly(path, **kw)
    load_weights(model, path)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek")
    return {
        "v3": save_tiny_deepseek(str(root / "v3"), 3),
        "v3_fused": save_tiny_deepseek(str(root / "v3_fused"), 3, fused=True),
        "v3_sharded": save_tiny_deepseek(str(root / "v3_sharded"), 3, max_shard_size="40KB"),
        "v3_mtp": save_tiny_deepseek(str(root / "v3_mtp"), 3, mtp=True),
        "v2_lite": save_tiny_deepseek(str(root / "v2_lite"), 2, q_lora_rank=None, topk_method="greedy", n_group=None,
                                      topk_group=None),
        "v2": save_tiny_deepseek(str(root / "v2"), 2),
    }


def _hidden(seed: int = 0, n: int = 40) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["v3", "v3_fused", "v3_sharded", "v3_mtp", "v2", "v2_lite"])
def test_moe_blocks_load_and_match_transformers(checkpoints, kind):
    path = checkpoints[kind]
    if kind == "v3_sharded":
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
        assert len(checkpoint_files(path)) > 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _load(path)
    mtp_warnings = [w for w in caught if "multi-token-prediction" in str(w.message)]
    assert len(mtp_warnings) == (1 if kind == "v3_mtp" else 0), [str(w.message) for w in caught]
    if kind == "v3_mtp":
        assert "model.layers.3.*" in str(mtp_warnings[0].message)
    assert all(not n.startswith("model.layers.3.") for n in model.others)
    assert "model.layers.0.mlp.gate_proj.weight" in model.others  # the dense first layer is not an MoE block
    ref = load_tiny_reference(path)
    x = _hidden()
    assert model.config.moe_layers == [1, 2]
    for i in model.config.moe_layers:
        with torch.no_grad():
            expected = ref.model.layers[i].mlp(x[None])[0]
            out = model.blocks[str(i)](x)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(out, expected, rtol=0, atol=2e-5, msg=f"{kind} layer {i}")
    if kind.startswith("v3"):
        bias = ref.model.layers[1].mlp.gate.e_score_correction_bias
        assert bias.abs().min() > 0 and torch.equal(model.blocks["1"].e_score_correction_bias, bias)


@pytest.mark.parametrize("use_ep,placement", [(False, "linear"), (True, "linear"), (True, "round_robin")])
def test_rank_shares_from_the_checkpoint_sum_to_the_block(checkpoints, use_ep, placement):
    """Three simulated ranks (tp 1, pcp 3) read their shares from the sharded checkpoint; their partial sums add up
    to transformers' block (with EP, 8 experts over 3 ranks: 3/3/2)."""
    path = checkpoints["v3_sharded"]
    ref = load_tiny_reference(path)
    x = _hidden(1)
    totals = {i: torch.zeros_like(x) for i in (1, 2)}
    for rank in range(3):
        cfg = MoEParallelConfig.make(1, 3, 1, use_ep, tp_rank=0, pcp_rank=rank, dp_rank=0)
        model = _load(path, parallel_config=cfg, placement=placement)
        for i in (1, 2):
            block = model.blocks[str(i)]
            if use_ep:
                assert block.num_local_experts == (3, 3, 2)[rank]
            with torch.no_grad():
                totals[i] += block.partial_forward(x, block.router_logits(x))
    for i in (1, 2):
        with torch.no_grad():
            expected = ref.model.layers[i].mlp(x[None])[0]
        torch.testing.assert_close(totals[i], expected, rtol=0, atol=2e-5)


def test_mtp_names_and_unexpected_layers(checkpoints, tmp_path):
    config = load_model_config(checkpoints["v3_mtp"])
    names = {n for ns in checkpoint_files(checkpoints["v3_mtp"]).values() for n in ns}
    mtp = mtp_tensor_names(names, config)
    assert mtp and all(n.startswith("model.layers.3.") for n in mtp)
    assert "model.layers.3.eh_proj.weight" in mtp and "model.layers.3.mlp.gate.e_score_correction_bias" in mtp
    # Without num_nextn_predict_layers an extra layer is a mismatch, not something to ignore silently.
    from tests.deepseek_tiny import copy_with_config

    bad = copy_with_config(checkpoints["v3_mtp"], str(tmp_path / "no_mtp_field"), num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="unexpected tensors: model.layers.3."):
        _load(bad)


def test_from_config_refuses_other_architectures(checkpoints):
    from dataclasses import replace

    config = load_model_config(checkpoints["v3"])
    with pytest.raises(ValueError, match="model_type 'qwen2_moe' is not a DeepSeek model"):
        DeepseekMoE.from_config(replace(config, model_type="qwen2_moe"))
