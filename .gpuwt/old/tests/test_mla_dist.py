"""MLA attention (megacp.layers.mla_attention) against transformers' DeepseekV3Attention / DeepseekV2Attention.

One spawn on 4 gloo ranks runs every layout of the issue's acceptance list, (tp, pcp, dcp) in (1,1,1), (2,1,2),
(4,1,4), (1,2,1), (2,2,2), (2,2,1) (the rest of the 4 ranks are DP replicas), each with interleave 1 and 2, over a
KVSession(latent=True): step 1 prefills request A and the first chunk of B, step 2 decodes A while B's second chunk
attends to its cached context (pass-Q) and to itself, step 3 decodes both. Every new token's output must equal
transformers' attention over the whole sequence, and at the end each rank's latent cache must hold exactly its §2
share: the rows at its local slots equal transformers' own cached latents (``DynamicCache`` keeps ``c_kv`` after
``kv_a_layernorm`` and ``k_pe`` after RoPE), and no other slot was written. Negative control: the same layer with
the softmax scale off by a YaRN-sized factor must miss the reference. The prefill over cached context goes by
pass-KV for V3 (what the byte rule picks at these sizes when pcp·dcp > 1) and by pass-Q for V2 (forced).

Both attention variants are checked: V3 with q-LoRA and interleaved rope pairs, V2 with a plain q_proj (its
complex-number RoPE is interleaved too); ``v_head_dim`` differs from ``qk_nope_head_dim``.
"""

from __future__ import annotations

import torch

from tests.dist_pool import model_parallel

HIDDEN, HEADS, R, NOPE, ROPE, V = 32, 4, 16, 8, 4, 6
LENS = {"A": 11, "B": 7}
STEPS = [[("A", 11), ("B", 4)], [("A", 1), ("B", 2)], [("A", 1), ("B", 1)]]  # ends at A 13, B 7
LAYOUTS = [(1, 1, 1), (2, 1, 2), (4, 1, 4), (1, 2, 1), (2, 2, 2), (2, 2, 1)]
TOL = 2e-5


def _hf_attention(version: int):
    from transformers import DeepseekV2Config, DeepseekV3Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    common = dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=HEADS, kv_lora_rank=R,
                  qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V, vocab_size=50, num_hidden_layers=1)
    if version == 3:
        cfg = DeepseekV3Config(q_lora_rank=12, rope_interleave=True, **common)
        attn_cls = DeepseekV3Attention
    else:
        cfg = DeepseekV2Config(q_lora_rank=None, **common)
        attn_cls = DeepseekV2Attention
    cfg._attn_implementation = "eager"
    torch.manual_seed(version)
    attn = attn_cls(cfg, 0).float()
    with torch.no_grad():
        for name, p in attn.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    return cfg, attn


def _reference(version: int) -> dict:
    """Weights, inputs, transformers' outputs of every position and its cached latents, per request."""
    from transformers import DynamicCache
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RotaryEmbedding
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    cfg, attn = _hf_attention(version)
    rot = (DeepseekV3RotaryEmbedding if version == 3 else DeepseekV2RotaryEmbedding)(cfg)
    g = torch.Generator().manual_seed(10 + version)
    ref = {"state": {k: v.clone() for k, v in attn.state_dict().items()}, "scale": attn.scaling,
           "q_lora_rank": cfg.q_lora_rank, "theta": cfg.rope_parameters["rope_theta"], "x": {}, "out": {},
           "latent": {}, "context_transfer": "auto" if version == 3 else "pass_q"}
    for rid, n in (("A", 13), ("B", 7)):
        x = torch.randn(1, n, HIDDEN, generator=g)
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        cache = DynamicCache(config=cfg)
        with torch.no_grad():
            out, _ = attn(x, position_embeddings=rot(x, torch.arange(n)[None]), attention_mask=mask, cache=cache)
        c_kv, k_pe = cache.layers[0].keys[0, 0], cache.layers[0].values[0, 0]  # [n, R], [n, ROPE]
        ref["x"][rid], ref["out"][rid] = x[0], out[0]
        if version == 2:  # V2's complex rotation keeps the pairs interleaved; V3's interleaved form already halves them
            k_pe = torch.cat([k_pe[:, 0::2], k_pe[:, 1::2]], -1)
        ref["latent"][rid] = torch.cat([c_kv, k_pe], -1)  # megacp's layout: c_kv | k_pe (rope halves)
    return ref


def _layer(ref: dict, scale: float):
    from megacp.layers.mla_attention import MLAAttention

    layer = MLAAttention(HIDDEN, HEADS, R, NOPE, ROPE, V, q_lora_rank=ref["q_lora_rank"], scale=scale,
                         rope_interleave=True, context_transfer=ref["context_transfer"])
    for name, p in layer.named_parameters():  # megacp's names are transformers'
        p.weight_loader(p, ref["state"][name])
    return layer.requires_grad_(False)


def _run_steps(layer, ref: dict, ps) -> tuple[float, "object"]:
    """The three steps over a fresh latent session; worst |out - transformers| over every new token."""
    from megacp.session import KVSession
    from megacp.layers.rotary import RotaryEmbedding

    session = KVSession(1, 1, R + ROPE, num_kv_blocks=6, block_size=4, max_num_seqs=2, latent=True)
    W = ps.get_context_parallel_world_size()
    assert session.capacity_tokens == 6 * 4 * W  # ×pcp·dcp the unsharded cache
    rope = RotaryEmbedding(ROPE, ref["theta"])
    done = {"A": 0, "B": 0}
    worst = 0.0
    for step in STEPS:
        meta = session.step(step)
        values = torch.cat([ref["x"][rid][done[rid]:done[rid] + n] for rid, n in step])
        expect = torch.cat([ref["out"][rid][done[rid]:done[rid] + n] for rid, n in step])
        hidden = meta.local_tokens(values)
        out = layer(hidden, meta, session.kv_caches[0], rope.tables(meta.positions, hidden.dtype))
        got = meta.gather_hidden(out) if meta.prefill is not None else out[: meta.num_tokens]
        worst = max(worst, (got - expect).abs().max().item())
        for rid, n in step:
            done[rid] += n
    return worst, session


def _cache_check(session, ref: dict) -> float:
    """Worst |cache row - transformers' latent| over this rank's share; raises if any other slot was written."""
    from megacp.kv import cp_local_positions

    cache = session.kv_caches[0]
    worst, written = 0.0, torch.zeros(cache.num_tokens_capacity, dtype=torch.bool)
    for rid in ("A", "B"):
        slots = session.local_slots(rid)
        pos = cp_local_positions(session.num_cached(rid), session.cp_world_size, session.cp_rank,
                                 session.interleave_size)
        assert slots.numel() == pos.numel()
        worst = max(worst, (cache.rows(slots) - ref["latent"][rid][pos]).abs().max().item() if pos.numel() else 0.0)
        written[slots] = True
    stray = cache.latent.reshape(-1, R + ROPE)[~written].abs().amax().item()
    assert stray == 0.0, f"slots outside this rank's share were written (max |row| {stray})"
    return worst


def _layout_task(refs: dict) -> list[dict]:
    import torch.distributed as dist

    results = []
    for tp, pcp, dcp in LAYOUTS:
        for interleave in (1, 2):
            dp = dist.get_world_size() // (tp * pcp)
            with model_parallel(tensor_model_parallel_size=tp, prefill_context_parallel_size=pcp,
                                decode_context_parallel_size=dcp, data_parallel_size=dp,
                                cp_kv_cache_interleave_size=interleave) as ps:
                for version, ref in refs.items():
                    out_err, session = _run_steps(_layer(ref, ref["scale"]), ref, ps)
                    cache_err = _cache_check(session, ref)
                    wrong_scale, _ = _run_steps(_layer(ref, ref["scale"] * 1.2), ref, ps)
                    results.append({"layout": (tp, pcp, dcp, interleave), "version": version, "out": out_err,
                                    "cache": cache_err, "control": wrong_scale,
                                    "share": sum(session.local_slots(r).numel() for r in ("A", "B"))})
    return results


def test_mla_layer_matches_transformers_every_layout(dist_pool_4):
    refs = {3: _reference(3), 2: _reference(2)}
    per_rank = dist_pool_4.run(_layout_task, refs, timeout=600)
    for rank, results in enumerate(per_rank):
        for r in results:
            label = f"rank {rank} (tp, pcp, dcp, interleave)={r['layout']} V{r['version']}"
            assert r["out"] <= TOL, f"{label}: output differs from transformers by {r['out']:.3g}"
            assert r["cache"] <= TOL, f"{label}: cached latent differs from transformers' by {r['cache']:.3g}"
            assert r["control"] > 100 * TOL, f"{label}: a wrong softmax scale still matched ({r['control']:.3g})"
    # The CP group's ranks hold every token exactly once: shares sum to the tokens over each CP group.
    for i, r in enumerate(per_rank[0]):
        tp, pcp, dcp, _ = r["layout"]
        shares = [per_rank[rank][i]["share"] for rank in range(4)]
        replicas = 4 // (pcp * dcp)  # DP replicas and TP ranks outside the DCP group hold copies
        assert sum(shares) == replicas * sum(n for n in (13, 7)), f"{r['layout']}: shares {shares}"


def test_context_transfer_rule_counts_what_each_way_receives():
    from megacp.layers.context_transfer import context_transfer_bytes

    # DeepSeek-V3 widths (r = 512, D = 576), 16 local heads, 8 CP ranks, 512 new rows, bfloat16
    moved = context_transfer_bytes(512, 4096, 16, 576, 512, 576, 8, 2)
    assert moved == {"pass_q": 7 * 512 * 16 * (576 * 2 + (8 + 512) * 4), "pass_kv": 7 * 4096 * 576 * 2}
    assert moved["pass_kv"] < moved["pass_q"]  # a short context: gather it
    long_ctx = context_transfer_bytes(512, 64 * 1024, 16, 576, 512, 576, 8, 2)
    assert long_ctx["pass_kv"] > long_ctx["pass_q"]  # a long one: move the queries
    assert context_transfer_bytes(512, 4096, 16, 576, 512, 576, 1, 2) == {"pass_q": 0, "pass_kv": 0}


# ------------------------------------------------------------------------------------------------ gradients
GRAD_LENS = [9, 6]  # two prompts; pcp 2 pads both
GRAD_LAYOUTS = [(2, 2, 1), (4, 1, 1), (1, 2, 2), (2, 1, 2)]  # (tp, pcp, dp)
GRAD_TOL = 1e-6  # relative; float64, but the RMSNorms run in float32 (transformers and megacp alike)


def _grad_reference() -> dict:
    """float64 transformers attention: grads of sum(out · G) over both prompts w.r.t. every weight and the input."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    cfg, attn = _hf_attention(3)
    attn = attn.double()
    rot = DeepseekV3RotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(n, HIDDEN, generator=g, dtype=torch.float64, requires_grad=True) for n in GRAD_LENS]
    gs = [torch.randn(n, HIDDEN, generator=g, dtype=torch.float64) for n in GRAD_LENS]
    for x, w in zip(xs, gs):
        n = x.shape[0]
        mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)[None, None]
        cos, sin = rot(x[None], torch.arange(n)[None])
        out, _ = attn(x[None], position_embeddings=(cos.double(), sin.double()), attention_mask=mask)
        (out[0] * w).sum().backward()
    return {"state": {k: v.detach().clone() for k, v in attn.state_dict().items()}, "scale": attn.scaling,
            "q_lora_rank": cfg.q_lora_rank, "theta": cfg.rope_parameters["rope_theta"],
            "grads": {k: p.grad.clone() for k, p in attn.named_parameters()},
            "x": [x.detach() for x in xs], "x_grad": [x.grad.clone() for x in xs], "g": gs}


def _grad_task(ref: dict) -> list[dict]:
    import torch.distributed as dist

    from megacp.layers.metadata_builder import build_attention_metadata
    from megacp.layers.mla_attention import MLAAttention
    from megacp.layers.rotary import RotaryEmbedding

    results = []
    for tp, pcp, dp in GRAD_LAYOUTS:
        assert tp * pcp * dp == dist.get_world_size()
        with model_parallel(tensor_model_parallel_size=tp, prefill_context_parallel_size=pcp,
                            data_parallel_size=dp) as ps:
            layer = MLAAttention(HIDDEN, HEADS, R, NOPE, ROPE, V, q_lora_rank=ref["q_lora_rank"], scale=ref["scale"],
                                 rope_interleave=True, params_dtype=torch.float64)
            with torch.no_grad():
                for name, p in layer.named_parameters():
                    p.weight_loader(p, ref["state"][name])
            expected = MLAAttention(HIDDEN, HEADS, R, NOPE, ROPE, V, q_lora_rank=ref["q_lora_rank"],
                                    scale=ref["scale"], rope_interleave=True, params_dtype=torch.float64)
            with torch.no_grad():
                for name, p in expected.named_parameters():
                    p.weight_loader(p, ref["grads"][name])
            mine = [i for i in range(len(GRAD_LENS)) if i % dp == ps.get_data_parallel_rank()]
            meta = build_attention_metadata(list(range(len(mine))), [0] * len(mine), [GRAD_LENS[i] for i in mine],
                                            None)
            x = meta.local_tokens(torch.cat([ref["x"][i] for i in mine])).requires_grad_(True)
            w = meta.local_tokens(torch.cat([ref["g"][i] for i in mine]))
            rope = RotaryEmbedding(ROPE, ref["theta"]).tables(meta.positions, x.dtype)
            (layer(x, meta, None, rope) * w).sum().backward()
            x_expect = meta.local_tokens(torch.cat([ref["x_grad"][i] for i in mine]))
            x_err = (x.grad - x_expect).abs().max().item() / x_expect.abs().max().item()
            local = {n: p.grad.clone() for n, p in layer.named_parameters()}
            ps.allreduce_grads(layer)
            errs = {n: (p.grad - e).abs().max().item() / e.abs().max().item()
                    for (n, p), (_, e) in zip(layer.named_parameters(), expected.named_parameters())}
            # Negative control: the replicated kv_a_proj without its PCP/DP sum (or, at pcp = dp = 1, with it twice).
            for n, p in layer.named_parameters():
                p.grad = local[n].clone()
            layer.kv_a_proj_with_mqa.weight.grad_reduce_groups = () if pcp * dp > 1 else ("tp",)
            ps.allreduce_grads(layer)
            control = (layer.kv_a_proj_with_mqa.weight.grad - expected.kv_a_proj_with_mqa.weight).abs().max().item()
            results.append({"layout": (tp, pcp, dp), "errs": errs, "x_err": x_err, "control": control})
    return results


def test_mla_layer_gradients_match_transformers(dist_pool_4):
    for rank, results in enumerate(dist_pool_4.run(_grad_task, _grad_reference(), timeout=300)):
        for r in results:
            worst = max(r["errs"], key=r["errs"].get)
            label = f"rank {rank} (tp, pcp, dp)={r['layout']}"
            assert r["errs"][worst] <= GRAD_TOL, f"{label}: gradient of {worst} off by {r['errs'][worst]:.3g} (rel.)"
            assert r["x_err"] <= GRAD_TOL, f"{label}: input gradient off by {r['x_err']:.3g} (relative)"
            assert r["control"] > 100 * GRAD_TOL, f"{label}: kv_a_proj without its PCP/DP sum still matched"


def test_latent_cache_writes_skip_other_ranks_tokens_and_check_widths():
    import pytest

    from megacp.kv import LatentPagedCache

    cache = LatentPagedCache(num_blocks=2, block_size=4, latent_dim=3)
    rows = torch.arange(12, dtype=torch.float32).view(4, 3) + 1
    cache.write(rows, torch.tensor([5, -1, 0, -1]))  # tokens 1 and 3 belong to another CP rank
    assert torch.equal(cache.rows(torch.tensor([5, 0])), rows[[0, 2]])
    assert int((cache.latent.reshape(-1, 3).abs().sum(-1) > 0).sum()) == 2  # nothing else written
    cache.write_rows(rows[:1], None, torch.tensor([cache.null_slot]))  # the null slot takes a write, never read
    assert int((cache.latent.reshape(-1, 3).abs().sum(-1) > 0).sum()) == 2
    with pytest.raises(ValueError, match=r"\[T, 3\]"):
        cache.write(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside this cache"):
        cache.write(rows[:1], torch.tensor([8 + 1]))
