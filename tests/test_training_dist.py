"""Training through megacp's layers: every parameter's gradient equals the unsharded transformers reference.

Each scenario (one pool task) builds a tiny float64 Llama or Qwen2-MoE (qkv bias, routed experts, gated shared
expert, a dense layer) on this layout, runs the cache-free prefill of prompts of 512 and 333 tokens (PCP padding,
DP replicas holding different prompts), a summed cross-entropy loss, ``backward`` and
``parallel_state.allreduce_grads``, and compares every parameter's gradient with the gradient transformers computes
on one process for the same weights and tokens (sharded the way the weights are, by loading the reference
gradients through the model's own weight loaders). Then, as a negative control, it repeats the reduction with one
reduction left out and checks that the comparison fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.dist_pool import model_parallel

SEQ_LENS = [512, 333]  # a long prompt, and one that leaves PCP padding (333 is not a multiple of 2·pcp)
VOCAB = 67  # not a multiple of tp: the vocab-parallel layers pad
REL_TOL = 1e-6


# ------------------------------------------------------------------------------------------------ reference
def _hf_model(kind: str, num_kv_heads: int, tied: bool, head_dim: int = 8):
    """A tiny float64 transformers model (4 heads of ``head_dim``) with every parameter random (HF zero-inits
    biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    hidden = 4 * head_dim
    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_attention_heads=4, num_key_value_heads=num_kv_heads,
                  head_dim=head_dim, num_hidden_layers=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                  tie_word_embeddings=tied, attn_implementation="eager", experts_implementation="eager")
    torch.manual_seed(7)
    if kind == "dense":
        model = LlamaForCausalLM(LlamaConfig(intermediate_size=6 * head_dim, **common))
    else:  # layer 0 sparse (6 experts, top-2, shared expert), layer 1 dense
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
            intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6,
            num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1],
            use_sliding_window=False, **common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.normal_(0.0, 0.2 * (32 / hidden) ** 0.5)
            else:
                p.normal_(0.0, 0.1)
    return model.double()


def _loss(model, ids: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy of a transformers model over every prompt (logits upcast to float32 at least)."""
    dev = next(model.parameters()).device
    return sum(F.cross_entropy(model(i[None].to(dev)).logits[0].to(torch.promote_types(model.dtype, torch.float32)),
                               lab.to(dev), reduction="sum") for i, lab in zip(ids, labels))


def _reference(kind: str, num_kv_heads: int = 1, tied: bool = False, head_dim: int = 8) -> dict:
    """Weights, tokens, labels and the reference gradients of the summed cross-entropy over all prompts."""
    model = _hf_model(kind, num_kv_heads, tied, head_dim)
    g = torch.Generator().manual_seed(11)
    ids = [torch.randint(0, VOCAB, (n,), generator=g) for n in SEQ_LENS]
    labels = [torch.randint(0, VOCAB, (n,), generator=g) for n in SEQ_LENS]
    _loss(model, ids, labels).backward()
    return {
        "config": model.config.to_dict(),
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
        "ids": ids,
        "labels": labels,
    }


# ------------------------------------------------------------------------------------------------ worker side
def _training_metadata(seq_lens: list[int], device: str = "cpu"):
    """Step metadata of a cache-free prefill of ``seq_lens`` (the one place this test builds metadata)."""
    from megacp.layers.metadata_builder import build_attention_metadata

    return build_attention_metadata(list(range(len(seq_lens))), [0] * len(seq_lens), seq_lens, None, device=device)


def _load(model, tensors: dict[str, torch.Tensor]) -> None:
    """Shard full HF-named tensors (weights, or their gradients) into ``model`` with its own weight loaders."""
    loaders = model.hf_weight_loaders(fused_experts=any(n.endswith("experts.gate_up_proj") for n in tensors))
    missing = set(loaders) - set(tensors)
    assert not missing, f"reference lacks {sorted(missing)}"
    for name, loader in loaders.items():
        loader(tensors[name])


def _compare(model, expected) -> dict[str, float]:
    """Relative error of every parameter's gradient: max |g - g_ref| / max |g_ref|."""
    errs = {}
    for (name, p), (_, e) in zip(model.named_parameters(), expected.named_parameters()):
        scale = e.detach().abs().max().item()
        errs[name] = (p.grad.double().cpu() - e.detach()).abs().max().item() / (scale or 1.0)
    return errs


def _skip_one_reduction(model, ps) -> str:
    """Leave one reduction out (a parameter this layout must reduce); returns which, for the message."""
    norm = model.layers[0].input_layernorm.weight
    router = getattr(model.layers[0].mlp, "router_weight", None)
    qkv = model.layers[0].self_attn.qkv_proj
    if ps.get_prefill_context_parallel_world_size() > 1:
        norm.grad_reduce_groups = ("dp",)
        return "input_layernorm without its PCP sum"
    if ps.get_data_parallel_world_size() > 1:
        norm.grad_reduce_groups = ("pcp",)
        return "input_layernorm without its DP sum"
    if router is not None and model.layers[0].mlp.parallel_config.flat_size > 1:
        router.grad_reduce_groups = ()
        return "router without its expert-group sum"
    if hasattr(qkv.weight, "grad_reduce_hook"):
        del qkv.weight.grad_reduce_hook
        return "qkv without the sum over the TP ranks sharing a KV head"
    raise AssertionError("this layout has no reduction to leave out; pick another scenario")


def _forward_backward(model, ref: dict, ps, device: str = "cpu") -> int:
    """This DP replica's prompts, split over PCP by the metadata, through ``model``; the summed cross-entropy's
    backward (each TP rank computes the same loss). Returns the number of real local tokens."""
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = [i for i in range(len(SEQ_LENS)) if i % dp == dp_rank]
    meta = _training_metadata([SEQ_LENS[i] for i in mine], device)
    ids = torch.cat([ref["ids"][i] for i in mine]).to(device)
    labels = torch.cat([ref["labels"][i] for i in mine]).to(device)
    index = meta.token_index
    real = index >= 0
    hidden = model(ids[index.clamp(min=0)], meta)  # [T_local, hidden], PCP padding rows included
    logits = model.lm_head.compute_logits(hidden[real])  # in the model's dtype (the model's compute_logits: fp32)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    F.cross_entropy(logits, labels[index[real]], reduction="sum").backward()
    return int(real.sum())


def _train_task(sizes: dict, ref: dict) -> dict:
    from megacp.models.config import model_config_from_dict
    from megacp.models.llama import LlamaForCausalLM

    with model_parallel(**sizes) as ps:
        config = model_config_from_dict(ref["config"])
        model = LlamaForCausalLM(config, params_dtype=torch.float64)  # experts: MoEParallelConfig.make() defaults
        expected = LlamaForCausalLM(config, params_dtype=torch.float64)
        _load(model, ref["state"])
        with torch.no_grad():
            _load(expected, ref["grads"])
        assert all(p.requires_grad for p in model.parameters()), "megacp parameters must be trainable by default"
        local_tokens = _forward_backward(model, ref, ps)

        unused = [n for n, p in model.named_parameters() if p.grad is None]
        local = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        ps.allreduce_grads(model)
        errs = _compare(model, expected)

        # Negative control: the same local gradients, one reduction left out.
        for n, p in model.named_parameters():
            p.grad = local[n].clone() if n in local else None
        skipped = _skip_one_reduction(model, ps)
        ps.allreduce_grads(model)
        control = max(_compare(model, expected).values())
        return {"errs": errs, "unused": unused, "skipped": skipped, "control": control,
                "local_tokens": local_tokens}


def _check(results: list[dict], label: str) -> None:
    assert sum(r["local_tokens"] for r in results) > 0
    for rank, r in enumerate(results):
        assert not r["unused"], f"{label} rank {rank}: parameters without a gradient: {r['unused']}"
        worst = max(r["errs"], key=r["errs"].get)
        assert r["errs"][worst] <= REL_TOL, (
            f"{label} rank {rank}: gradient of {worst} differs from transformers by {r['errs'][worst]:.3g} "
            f"(relative; bar {REL_TOL})")
    assert max(r["control"] for r in results) > 100 * REL_TOL, (
        f"{label}: the negative control ({results[0]['skipped']}) still matched the reference")


def _sizes(tp: int = 1, pcp: int = 1, dp: int = 1, ep: bool = False) -> dict:
    return {"tensor_model_parallel_size": tp, "prefill_context_parallel_size": pcp, "data_parallel_size": dp,
            "enable_expert_parallel": ep}


# (label, reference args, sizes): tp ∈ {1, 2} × pcp ∈ {1, 2}, dense and MoE, EP on and off, DP, tied embeddings,
# KV heads replicated over TP ranks (tp > num_kv_heads) and split.
SCENARIOS_2 = [
    ("dense tp1 pcp2 tied", ("dense", 2, True), _sizes(pcp=2)),
    ("dense tp2 pcp1 replicated-kv", ("dense", 1, False), _sizes(tp=2)),
    ("dense tp1 pcp1 dp2", ("dense", 2, False), _sizes(dp=2)),
    ("moe tp1 pcp2", ("moe",), _sizes(pcp=2)),
    ("moe tp2 pcp1 ep", ("moe",), _sizes(tp=2, ep=True)),
]
SCENARIOS_4 = [
    ("dense tp2 pcp2", ("dense", 2, False), _sizes(tp=2, pcp=2)),
    ("moe tp2 pcp2", ("moe",), _sizes(tp=2, pcp=2)),
    ("moe tp2 pcp2 ep", ("moe",), _sizes(tp=2, pcp=2, ep=True)),
    ("moe tp1 pcp2 dp2 ep", ("moe",), _sizes(pcp=2, dp=2, ep=True)),
]


@pytest.mark.parametrize("label,ref_args,sizes", SCENARIOS_2, ids=[s[0] for s in SCENARIOS_2])
def test_gradients_match_transformers_2_ranks(dist_pool_2, label, ref_args, sizes):
    _check(dist_pool_2.run(_train_task, sizes, _reference(*ref_args)), label)


@pytest.mark.parametrize("label,ref_args,sizes", SCENARIOS_4, ids=[s[0] for s in SCENARIOS_4])
def test_gradients_match_transformers_4_ranks(dist_pool_4, label, ref_args, sizes):
    _check(dist_pool_4.run(_train_task, sizes, _reference(*ref_args), timeout=300), label)


# ------------------------------------------------------------------------------------------------ GPU (bf16)
def _gpu_train_task(sizes: dict, ref: dict, backend: str) -> dict:
    """The same training step on cuda:0 in bfloat16 with attention ``backend``: gradient errors vs float64, and how
    often the backend fell back to the "torch" reference (it must not: bf16 and head dim 64 suit the fused kernels)."""
    import os

    from megacp.models.config import model_config_from_dict
    from megacp.models.llama import LlamaForCausalLM
    from megacp.ops import backends_common

    previous_env, reference = os.environ.get("MEGACP_ATTN_BACKEND"), backends_common._reference
    fallbacks = []

    def counted_reference(*args, **kwargs):
        fallbacks.append(1)
        return reference(*args, **kwargs)

    os.environ["MEGACP_ATTN_BACKEND"] = backend
    backends_common._reference = counted_reference  # looked up at call time by the fused backends' wrapper
    try:
        with model_parallel(**sizes) as ps:
            config = model_config_from_dict(ref["config"])
            with torch.device("cuda"):
                model = LlamaForCausalLM(config, params_dtype=torch.bfloat16)
            expected = LlamaForCausalLM(config, params_dtype=torch.float64)
            _load(model, ref["state"])
            with torch.no_grad():
                _load(expected, ref["grads"])
            _forward_backward(model, ref, ps, "cuda")
            ps.allreduce_grads(model)
            return {"errs": _compare(model, expected), "fallbacks": len(fallbacks)}
    finally:
        backends_common._reference = reference
        if previous_env is None:
            os.environ.pop("MEGACP_ATTN_BACKEND", None)
        else:
            os.environ["MEGACP_ATTN_BACKEND"] = previous_env


def _bf16_reference_errors(ref: dict, kind: str, num_kv_heads: int, head_dim: int) -> dict[str, float]:
    """transformers in bfloat16 on cuda:0 (eager attention), same weights and tokens: its gradient errors vs float64."""
    model = _hf_model(kind, num_kv_heads, False, head_dim)
    model.load_state_dict(ref["state"])
    model = model.to("cuda", torch.bfloat16)
    _loss(model, ref["ids"], ref["labels"]).backward()
    errs = {}
    for name, p in model.named_parameters():
        truth = ref["grads"][name]
        errs[name] = (p.grad.double().cpu() - truth).abs().max().item() / (truth.abs().max().item() or 1.0)
    return errs


GPU_SCENARIOS = [("tp1 pcp2", _sizes(pcp=2)), ("tp2 pcp1", _sizes(tp=2))]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["te", "cudnn"])
@pytest.mark.parametrize("label,sizes", GPU_SCENARIOS, ids=[s[0] for s in GPU_SCENARIOS])
def test_gradients_on_gpu_within_twice_bf16_reference(dist_pool_2, backend, label, sizes):
    """Two gloo ranks sharing cuda:0, bfloat16 weights, the fused attention kernels' backward: every gradient's error
    against float64 is at most twice that of transformers itself in bfloat16 (worst parameter against worst)."""
    from megacp.ops import available_backends
    from megacp.ops.backends_cuda import te_unavailable_reason

    if backend not in available_backends("cuda"):
        import os

        if backend == "te" and os.environ.get("MEGACP_REQUIRE_TE") == "1":
            pytest.fail(f"MEGACP_REQUIRE_TE=1 but backend 'te' is unavailable: {te_unavailable_reason()}")
        pytest.skip(f"backend {backend!r} is not available")
    ref = _reference("dense", 2, False, head_dim=64)
    bar = 2 * max(_bf16_reference_errors(ref, "dense", 2, 64).values())
    results = dist_pool_2.run(_gpu_train_task, sizes, ref, backend, timeout=300)
    for rank, r in enumerate(results):
        assert r["fallbacks"] == 0, f"{label} rank {rank}: {backend} fell back to the torch reference"
        worst = max(r["errs"], key=r["errs"].get)
        assert r["errs"][worst] <= bar, (
            f"{backend} {label} rank {rank}: gradient of {worst} has relative error {r['errs'][worst]:.3g}, more "
            f"than twice transformers' own bfloat16 error ({bar / 2:.3g})")
