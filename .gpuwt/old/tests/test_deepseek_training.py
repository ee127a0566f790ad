"""Gradients through DeepSeek (MLA attention, dense first layer, DeepSeek MoE) match transformers.

As tests/test_training_dist.py does for the Llama family: a float64 tiny ``DeepseekV3ForCausalLM``
(tests/deepseek_tiny.py: q-LoRA, interleaved rope, YaRN, a dense layer then MoE layers with the biased sigmoid
router) gives the reference gradients of the summed cross-entropy over two prompts; megacp's ``DeepseekForCausalLM``
runs the same prompts as a cache-free prefill, split over PCP, its parameters sharded over TP (experts over all
ranks, with and without EP), and after ``allreduce_grads`` every parameter's gradient must match. The routers run
in float32 in both models (DeepSeek keeps them so), hence a relative bar of 5e-6. Negative control: the first
layer's input norm without its PCP sum must miss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.dist_pool import model_parallel

SEQ_LENS = [21, 10]
REL_TOL = 5e-6  # the float32 routing weights (~6e-8 each) scale every expert gradient
LAYOUTS = [  # (tp, pcp, ep) on 4 ranks (MoE needs dp = 1)
    (2, 2, False),
    (2, 2, True),
    (4, 1, True),
]


def _reference() -> dict:
    from tests.deepseek_tiny import build_tiny_deepseek

    model = build_tiny_deepseek(3, attn_implementation="eager", experts_implementation="eager").double()
    g = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    ids = [torch.randint(0, vocab, (n,), generator=g) for n in SEQ_LENS]
    labels = [torch.randint(0, vocab, (n,), generator=g) for n in SEQ_LENS]
    loss = sum(F.cross_entropy(model(i[None]).logits[0].double(), lab, reduction="sum") for i, lab in zip(ids, labels))
    loss.backward()
    return {
        "config": model.config.to_dict(),
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
        "ids": ids,
        "labels": labels,
    }


def _load(model, tensors: dict[str, torch.Tensor]) -> None:
    """Full HF-named tensors (transformers' in-memory layout: fused experts) into ``model``'s shards."""
    for name, loader in model.hf_weight_loaders(fused_experts=True).items():
        loader(tensors[name])


def _relative_errors(model, expected) -> dict[str, float]:
    errs = {}
    for (name, p), (_, e) in zip(model.named_parameters(), expected.named_parameters()):
        errs[name] = (p.grad.double() - e.detach()).abs().max().item() / (e.detach().abs().max().item() or 1.0)
    return errs


def _train_task(ref: dict) -> list[dict]:
    from megacp.layers.metadata_builder import build_attention_metadata
    from megacp.models.config import model_config_from_dict
    from megacp.models.deepseek import DeepseekForCausalLM

    results = []
    for tp, pcp, ep in LAYOUTS:
        with model_parallel(tensor_model_parallel_size=tp, prefill_context_parallel_size=pcp,
                            enable_expert_parallel=ep) as ps:
            config = model_config_from_dict(ref["config"])
            model = DeepseekForCausalLM(config, params_dtype=torch.float64)
            expected = DeepseekForCausalLM(config, params_dtype=torch.float64)
            _load(model, ref["state"])
            with torch.no_grad():
                _load(expected, {**ref["state"], **ref["grads"]})  # buffers (the router bias) take no gradient
            meta = build_attention_metadata([0, 1], [0, 0], SEQ_LENS, None)
            ids, labels = torch.cat(ref["ids"]), torch.cat(ref["labels"])
            hidden = model(meta.local_tokens(ids), meta)
            real = meta.token_index >= 0
            logits = model.compute_logits(hidden[real]).double()
            F.cross_entropy(logits, labels[meta.token_index[real]], reduction="sum").backward()
            unused = [n for n, p in model.named_parameters() if p.grad is None]
            local = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            ps.allreduce_grads(model)
            errs = _relative_errors(model, expected)
            for n, p in model.named_parameters():
                p.grad = local[n].clone() if n in local else None
            model.layers[0].input_layernorm.weight.grad_reduce_groups = ("dp",)  # its PCP sum left out
            ps.allreduce_grads(model)
            control = max(_relative_errors(model, expected).values())
            results.append({"layout": (tp, pcp, ep), "errs": errs, "unused": unused, "control": control})
    return results


def test_deepseek_gradients_match_transformers(dist_pool_4):
    for rank, results in enumerate(dist_pool_4.run(_train_task, _reference(), timeout=300)):
        for r in results:
            label = f"rank {rank} (tp, pcp, ep)={r['layout']}"
            assert not r["unused"], f"{label}: parameters without a gradient: {r['unused']}"
            worst = max(r["errs"], key=r["errs"].get)
            assert r["errs"][worst] <= REL_TOL, f"{label}: gradient of {worst} off by {r['errs'][worst]:.3g}"
            if r["layout"][1] > 1:
                assert r["control"] > 100 * REL_TOL, f"{label}: the norm without its PCP sum still matched"
