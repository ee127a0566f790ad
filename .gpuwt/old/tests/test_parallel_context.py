"""Two models with different parallel contexts in one process: each keeps the layout it was built with.

On 2 gloo ranks: a one-rank reference (``ParallelContext.single()``: every rank alone, whole weights) and a model on
the initialised tp-2 context generate the same tokens with the same prompt logits; the reference outlives
``destroy_model_parallel`` and agrees just as well with a model built after re-initialising as pcp 2, while the
engine of the destroyed layout refuses to run. A model of other weights is the negative control.
"""

from __future__ import annotations

import torch

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]


def _generate(model, **engine_kwargs):
    from megacp.engine import LLMEngine
    from megacp.sampling import SamplingParams

    engine = LLMEngine(model, num_kv_blocks=16, block_size=4, **engine_kwargs)
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, ignore_eos=True), return_prompt_logits=True)
    return engine, [o.output_ids for o in outs], torch.stack([o.prompt_logits for o in outs])


def _two_contexts_task() -> dict:
    from megacp import parallel_state as ps
    from megacp.models.loader import load_model

    single = ps.ParallelContext.single()
    res: dict = {}
    tp2 = ps.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        ref = load_model(None, parallel_context=single)  # built while tp 2 is initialised: still one rank
        model = load_model(None)  # the global context
        other = load_model(None, seed=1, parallel_context=single)
        res["contexts"] = (ref.parallel_context is single, model.parallel_context is tp2, tp2.tp_size)
        res["q_heads"] = (ref.layers[0].self_attn.qkv_proj.num_heads, model.layers[0].self_attn.qkv_proj.num_heads)
        ref_engine, res["ref_ids"], ref_logits = _generate(ref)
        tp_engine, res["tp_ids"], tp_logits = _generate(model)
        res["tp_err"] = float((tp_logits - ref_logits).abs().max())
        res["other_err"] = float((_generate(other)[2] - ref_logits).abs().max())
    finally:
        ps.destroy_model_parallel()
    try:
        _generate(model)
        res["stale"] = "ran"
    except RuntimeError as e:
        res["stale"] = str(e)
    res["ref_after_destroy"] = _generate(ref)[1]  # a one-rank context has no groups to lose
    pcp2 = ps.initialize_model_parallel(prefill_context_parallel_size=2)
    try:
        model = load_model(None)
        res["pcp"] = (model.parallel_context is pcp2, pcp2.pcp_size, pcp2.pcp_rank)
        _, res["pcp_ids"], pcp_logits = _generate(model)
        res["pcp_err"] = float((pcp_logits - ref_logits).abs().max())
    finally:
        ps.destroy_model_parallel()
    return res


def test_two_models_with_different_contexts_in_one_process(dist_pool_2):
    results = dist_pool_2.run(_two_contexts_task)
    for rank, res in enumerate(results):
        assert res["contexts"] == (True, True, 2)
        ref_heads, tp_heads = res["q_heads"]
        assert ref_heads == 2 * tp_heads  # the tp-2 model holds half of the query heads, the reference all of them
        assert res["tp_ids"] == res["ref_ids"] and res["tp_err"] < 1e-4, rank
        assert res["other_err"] > 1e-2  # negative control: other weights give other logits
        assert "destroy" in res["stale"]
        assert res["ref_after_destroy"] == res["ref_ids"]
        assert res["pcp"][:2] == (True, 2) and res["pcp"][2] == rank
        assert res["pcp_ids"] == res["ref_ids"] and res["pcp_err"] < 1e-4, rank
