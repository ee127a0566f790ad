"""Mixtral and Qwen2-MoE end to end: megacp's engine against ``transformers`` on tiny random checkpoints.

Greedy output ids must equal transformers' greedy ``generate`` (fp32, 16 new tokens, prompts of 6, 23 and 41
tokens) for (tp, pcp, dcp) in {(1,1,1), (2,1,1), (1,2,1), (2,2,1), (2,2,2)}, each with and without expert
parallelism, for both checkpoint layouts (per-expert as published / as ``save_pretrained`` writes, and the fused
v5 ``experts.gate_up_proj``). Every layout with more than one rank runs in one task of the shared gloo pool of its
world size (dp = 1: MoE forbids dp > 1, checked too); (1,1,1) runs in this process. Also checked: expert
parameter bytes per rank (EP: 1/N of the total ± one expert per layer, every expert on exactly one rank; TP:
1/N of every expert), that an EP rank reads only its experts' tensors (or rows of the fused ones), config
parsing, and one real ``torchrun examples/infer_llama.py --enable-expert-parallel -tp 2 -pcp 2``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from tests import hf_models, hf_moe_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW = 16
PROMPT_LENS = (6, 23, 41)
KINDS = hf_moe_models.KINDS


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(4321)
    return [torch.randint(3, hf_models.VOCAB_SIZE, (n,), generator=g).tolist() for n in PROMPT_LENS]


@functools.cache
def _reference(kind: str) -> list[list[int]]:
    return hf_models.greedy_reference(hf_moe_models.model_dir(kind), _prompts(), MAX_NEW)


def _runs(layouts: list[tuple[int, int, int]]) -> list[tuple[str, str, int, int, int, bool]]:
    """(kind, checkpoint dir, tp, pcp, dcp, ep) for every kind × layout × ep; the two checkpoint layouts alternate
    so each of them meets both EP modes and several parallel layouts."""
    runs = []
    for kind in KINDS:
        for i, (tp, pcp, dcp) in enumerate(layouts):
            for ep in (False, True):
                fused = (i + ep + KINDS.index(kind)) % 2 == 1
                path = hf_moe_models.model_dir(kind + "_fused" if fused else kind)
                runs.append((kind, path, tp, pcp, dcp, ep))
    return runs


# ----------------------------------------------------------------------------- run on every rank
def _expert_report(model: torch.nn.Module) -> dict:
    """Per MoE layer: this rank's routed-expert parameter bytes and global expert ids."""
    from megacp.moe import MoELayer

    moes = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoELayer)]
    return {
        "bytes": [sum(p.numel() * p.element_size() for p in (m.w13, m.w2)) for m in moes],
        "experts": [list(m.local_expert_ids) for m in moes],
    }


def _generate_all(runs: list[tuple[str, str, int, int, int, bool]], prompts: list[list[int]], max_new: int
                  ) -> list[dict]:
    """Task: for each run, init model parallel → load → generate → destroy; outputs and expert report per run."""
    from megacp import parallel_state as ps
    from megacp.engine import LLMEngine
    from megacp.models import load_model
    from megacp.sampling import SamplingParams

    results = []
    for _, path, tp, pcp, dcp, ep in runs:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, prefill_context_parallel_size=pcp,
                                     decode_context_parallel_size=dcp, enable_expert_parallel=ep)
        try:
            model = load_model(path, torch.float32, torch.device("cpu"))
            engine = LLMEngine(model, num_kv_blocks=8, block_size=16)
            outs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new, ignore_eos=True))
            results.append({"outputs": [o.output_ids for o in outs], **_expert_report(model)})
        finally:
            ps.destroy_model_parallel()
    return results


def _dp_error(path: str) -> str:
    from megacp.models import load_model
    from tests.dist_pool import model_parallel

    with model_parallel(data_parallel_size=2, enable_expert_parallel=True):
        try:
            load_model(path)
        except ValueError as e:
            return str(e)
    return "no error"


# ----------------------------------------------------------------------------- checks
def _check(runs, per_rank: list[list[dict]]) -> None:
    world = len(per_rank)
    for j, (kind, path, tp, pcp, dcp, ep) in enumerate(runs):
        what = f"{os.path.basename(path)} tp={tp} pcp={pcp} dcp={dcp} ep={ep}"
        results = [rank_results[j] for rank_results in per_rank]
        assert all(r["outputs"] == results[0]["outputs"] for r in results), f"{what}: ranks disagree"
        assert results[0]["outputs"] == _reference(kind), f"{what}: output ids differ from transformers"
        _check_expert_bytes(path, ep, world, results, what)


def _check_expert_bytes(path: str, ep: bool, world: int, results: list[dict], what: str) -> None:
    from megacp.models.config import load_model_config

    config = load_model_config(path)
    num_experts, hidden = config.num_experts, config.hidden_size
    per_expert = 3 * config.moe_intermediate_size * hidden * 4  # gate, up and down rows of one expert, fp32
    share = num_experts * per_expert / world
    assert len(results[0]["bytes"]) == len(config.moe_layers)
    for layer in range(len(config.moe_layers)):
        got = [r["bytes"][layer] for r in results]
        assert sum(got) == num_experts * per_expert, f"{what}: expert bytes {got} do not add up to one copy"
        if ep:  # whole experts: 1/N of them per rank (± one), every expert on exactly one rank
            owners = sorted(e for r in results for e in r["experts"][layer])
            assert owners == list(range(num_experts)), f"{what}: experts not placed exactly once: {owners}"
            assert all(abs(b - share) <= per_expert for b in got), f"{what}: expert bytes per rank {got}"
        else:  # every rank holds 1/N of every expert's intermediate rows (± one row per expert)
            assert all(r["experts"][layer] == list(range(num_experts)) for r in results)
            assert all(abs(b - share) <= num_experts * 3 * hidden * 4 for b in got), f"{what}: {got}"


def test_checkpoint_layouts_and_config():
    """Both expert layouts really are on disk, and config.json parses to the right MoE fields."""
    from megacp.models.config import load_model_config

    def names(kind):
        with safe_open(os.path.join(hf_moe_models.model_dir(kind), "model.safetensors"), "pt") as f:
            return set(f.keys())

    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in names("mixtral")
    assert "model.layers.2.mlp.experts.5.up_proj.weight" in names("qwen2_moe")
    for kind in KINDS:
        assert not any("gate_up_proj" in n for n in names(kind))
        fused = names(kind + "_fused")
        assert "model.layers.0.mlp.experts.gate_up_proj" in fused and not any(".experts.0." in n for n in fused)

    mixtral = load_model_config(hf_moe_models.model_dir("mixtral"))
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.moe_intermediate_size) == (4, 2, 48)
    assert mixtral.norm_topk_prob and mixtral.moe_layers == [0, 1] and mixtral.expert_proj_names == ("w1", "w3", "w2")
    qwen = load_model_config(hf_moe_models.model_dir("qwen2_moe"))
    assert (qwen.num_experts, qwen.moe_intermediate_size, qwen.shared_expert_intermediate_size) == (6, 24, 40)
    assert qwen.moe_layers == [0, 2] and qwen.qkv_bias and not qwen.norm_topk_prob and qwen.intermediate_size == 64


def test_qwen2_moe_sparse_layer_rule():
    """decoder_sparse_step / mlp_only_layers pick the sparse layers exactly as transformers does."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from megacp.models.config import model_config_from_dict

    hf = Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=8, moe_intermediate_size=4,
                        shared_expert_intermediate_size=4, num_hidden_layers=6, num_attention_heads=2,
                        num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2,
                        mlp_only_layers=[3])
    expected = [i for i, layer in enumerate(Qwen2MoeForCausalLM(hf).model.layers) if hasattr(layer.mlp, "experts")]
    assert expected == [1, 5]
    assert model_config_from_dict(hf.to_dict()).moe_layers == expected
    with pytest.raises(ValueError, match="num_experts_per_tok=5"):
        model_config_from_dict({**hf.to_dict(), "num_experts_per_tok": 5})


def test_single_rank_matches_transformers():
    """(1,1,1) with and without EP (EP on one rank holds every expert), both layouts, in this process."""
    import torch.distributed as dist

    runs = _runs([(1, 1, 1)])
    owns_world = not dist.is_initialized()
    if owns_world:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        per_rank = [_generate_all(runs, _prompts(), MAX_NEW)]
    finally:
        if owns_world:
            dist.destroy_process_group()
    _check(runs, per_rank)


class _RecordingSlice:
    """Stands in for a safetensors lazy slice: records every index read from it."""

    def __init__(self, name: str, tensor: torch.Tensor, reads: list):
        self.name, self.tensor, self.reads = name, tensor, reads

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index):
        self.reads.append((self.name, index))
        return self.tensor[index]


@pytest.mark.parametrize("fused", [False, True])
def test_expert_parallel_rank_reads_only_its_experts(fused):
    """EP rank 1 of 2 (linear placement: experts 3..5 of Qwen2-MoE's 6) reads no other expert's tensor or rows."""
    import torch.distributed as dist

    from megacp import parallel_state as ps
    from megacp.models.config import load_model_config
    from megacp.models.llama import LlamaForCausalLM
    from megacp.moe import MoEParallelConfig

    path = hf_moe_models.model_dir("qwen2_moe_fused" if fused else "qwen2_moe")
    config = load_model_config(path)
    owns_world = not dist.is_initialized()
    if owns_world:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ps.initialize_model_parallel()
    try:  # the dense layers see one rank; the experts are told they are EP rank 1 of 2
        moe_config = MoEParallelConfig.make(1, 2, 1, use_ep=True, tp_rank=0, pcp_rank=1, dp_rank=0)
        model = LlamaForCausalLM(config, torch.float32, moe_config)
    finally:
        ps.destroy_model_parallel()
        if owns_world:
            dist.destroy_process_group()
    reads: list = []
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        for name, loader in model.hf_weight_loaders(fused_experts=fused).items():
            loader(_RecordingSlice(name, f.get_tensor(name), reads))
    expert_reads = [(n, i) for n, i in reads if ".experts." in n]
    if fused:  # every read of a fused tensor selects one local expert's row
        assert expert_reads and {i[0].start for _, i in expert_reads} == {3, 4, 5}
        assert all(i[0].stop == i[0].start + 1 for _, i in expert_reads)
    else:
        assert {int(n.split(".experts.")[1].split(".")[0]) for n, _ in expert_reads} == {3, 4, 5}
    layer = model.layers[0].mlp
    assert layer.local_expert_ids == [3, 4, 5] and layer.w13.shape[0] == 3
    with safe_open(os.path.join(hf_moe_models.model_dir("qwen2_moe"), "model.safetensors"), "pt") as f:
        p = "model.layers.0.mlp.experts.4."
        w13 = torch.cat([f.get_tensor(p + "gate_proj.weight"), f.get_tensor(p + "up_proj.weight")])
        assert torch.equal(layer.w13[1], w13) and torch.equal(layer.w2[1], f.get_tensor(p + "down_proj.weight"))


@pytest.mark.slow
def test_two_ranks_match_transformers(dist_pool_2):
    runs = _runs([(2, 1, 1), (1, 2, 1)])
    _check(runs, dist_pool_2.run(_generate_all, runs, _prompts(), MAX_NEW, timeout=300))
    errors = dist_pool_2.run(_dp_error, hf_moe_models.model_dir("mixtral"))
    assert all("data_parallel_size=2 is not supported" in e and "data_parallel_size=1" in e for e in errors), errors


@pytest.mark.slow
def test_four_ranks_match_transformers(dist_pool_4):
    runs = _runs([(2, 2, 1), (2, 2, 2)])
    _check(runs, dist_pool_4.run(_generate_all, runs, _prompts(), MAX_NEW, timeout=300))


@pytest.mark.slow
def test_torchrun_expert_parallel(tmp_path):
    """The example CLI with --enable-expert-parallel -tp 2 -pcp 2 on the per-expert Qwen2-MoE checkpoint."""
    out = tmp_path / "out.json"
    argv = ["--model", hf_moe_models.model_dir("qwen2_moe"), "--enable-expert-parallel", "-tp", "2", "-pcp", "2",
            "--temperature", "0", "--max-new-tokens", str(MAX_NEW), "--ignore-eos", "--dtype", "float32",
            "--device", "cpu", "--json-out", str(out)]
    for ids in _prompts():
        argv += ["--prompt-ids", ",".join(map(str, ids))]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
           os.path.join(REPO, "examples", "infer_llama.py"), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr}"
    with open(out) as f:
        result = json.load(f)
    assert [o["prompt_ids"] for o in result["outputs"]] == _prompts()
    assert [o["output_ids"] for o in result["outputs"]] == _reference("qwen2_moe")
