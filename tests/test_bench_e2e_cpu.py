"""bench/e2e.py on the CPU with a tiny Llama: every engine runs, and the JSON's ratios are megacp / each peer.

transformers compiles the static-cache decode step only on CUDA, so here ``transformers-static`` is the static cache
uncompiled, and the JSON must say so (``compile_skipped``); the compiled run is the GPU session's (scripts/).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from bench import e2e  # noqa: E402

TINY = ["hidden_size=64", "intermediate_size=128", "num_attention_heads=4", "num_key_value_heads=2", "head_dim=16",
        "vocab_size=512"]


@pytest.fixture(autouse=True)
def parallel_state_left_clean():
    """bench/e2e.py's megacp engine initialises parallel_state for its run and must destroy it when done (even on an
    error), or every later in-process test that initialises it fails: checked after each test here, and undone
    anyway so that one leak fails here only."""
    from megacp import parallel_state as ps

    assert not ps.model_parallel_is_initialized(), "an earlier test left parallel_state initialised"
    yield
    leaked = ps.model_parallel_is_initialized()
    if leaked:
        ps.destroy_model_parallel()
    assert not leaked, "bench/e2e.py left parallel_state initialised (Megacp.close not called)"


def test_e2e_cpu_reports_every_peer(tmp_path):
    out = tmp_path / "e2e.json"
    result = e2e.main(["--device", "cpu", "--layers", "1", "--override", *TINY, "--prompt-lens", "24", "--batch", "2",
                       "--decode-prompt-len", "12", "--new-tokens", "5", "--reps", "1",
                       "--engines", "megacp", "megacp-sync", "transformers", "transformers-static", "--json-out",
                       str(out)])
    assert json.loads(out.read_text())["vs"].keys() == {"megacp-sync", "transformers", "transformers-static"}
    res = result["results"]
    assert res["megacp"]["async_scheduling"]["async_steps"] > 0 and "async_scheduling" not in res["megacp-sync"]
    assert result["vs"]["megacp-sync"]["greedy_agreement_first_8"] == 8  # async: the synchronous engine's ids
    for name in ("megacp", "transformers", "transformers-static"):
        assert res[name]["decode_tokens_per_s"][2] > 0 and res[name]["ttft_s"][24] > 0
    static = res["transformers-static"]
    assert static["compiled"] is False and "only on CUDA" in static["compile_skipped"]
    for peer in ("transformers", "transformers-static"):
        vs = result["vs"][peer]
        assert vs["decode_speedup"][2] == res["megacp"]["decode_tokens_per_s"][2] / res[peer]["decode_tokens_per_s"][2]
        assert vs["ttft_ratio"][24] == res["megacp"]["ttft_s"][24] / res[peer]["ttft_s"][24]
        # the same seeded weights: greedy ids agree (the static cache changes where K/V live, not the math)
        assert vs["greedy_agreement_first_8"] == 8
    assert result["decode_speedup"] == result["vs"]["transformers"]["decode_speedup"]


def test_static_peer_sizes_every_decode_call_alike(tmp_path):
    """The static cache of every decode call has the one size ``decode_cache_len`` (the compiled step is reused),
    whatever transformers remembered from a longer TTFT call before."""
    path = tmp_path / "ckpt"
    e2e.build_checkpoint(str(path), e2e.model_config("llama-3-8b", 1, 64, dict(e2e._parse_override(o) for o in TINY)),
                         "cpu")
    eng = e2e.HFStatic(str(path), "cpu", decode_cache_len=20)
    sizes = []
    real = eng.model._prepare_static_cache

    def spy(*args, **kwargs):
        cache = real(*args, **kwargs)
        sizes.append(eng.model._previous_max_cache_length)
        return cache

    eng.model._prepare_static_cache = spy
    eng.ttft(list(range(3, 43)))  # a 40-token prompt: cache of 41
    eng.generate([list(range(3, 15))] * 2, 4)
    eng.generate([list(range(3, 15))] * 2, 1)
    assert sizes == [41, 20, 20]


TINY_DEEPSEEK = ["hidden_size=64", "intermediate_size=96", "num_attention_heads=4", "num_key_value_heads=4",
                 "kv_lora_rank=32", "qk_rope_head_dim=16", "qk_nope_head_dim=16", "v_head_dim=16",
                 "n_routed_experts=8", "num_experts_per_tok=2", "moe_intermediate_size=32", "vocab_size=512"]


def test_e2e_cpu_deepseek_shape(tmp_path):
    """--model-shape deepseek-v2-lite shrunk: megacp (MLA, latent cache, DeepSeek MoE after the dense first layer)
    and transformers run the same checkpoint, greedy ids agree, and the JSON names the shape and the latent cache's
    bytes per token (one row of kv_lora_rank + rope per layer, bf16)."""
    result = e2e.main(["--device", "cpu", "--model-shape", "deepseek-v2-lite", "--layers", "2",
                       "--override", *TINY_DEEPSEEK, "--prompt-lens", "24", "--batch", "2",
                       "--decode-prompt-len", "12", "--new-tokens", "5", "--reps", "1",
                       "--json-out", str(tmp_path / "e2e.json")])
    model = json.loads((tmp_path / "e2e.json").read_text())["model"]
    assert model["shape"] == "deepseek-v2-lite" and model["kv_cache_bytes_per_token"] == 2 * (32 + 16) * 2
    assert result["vs"]["transformers"]["greedy_agreement_first_8"] == 8
    assert result["results"]["megacp"]["decode_tokens_per_s"][2] > 0


def test_decode_kernel_counts_runs_and_counts_per_step():
    """The kernel counter's bookkeeping on the CPU (there it counts top-level aten ops; the fused kernels are CUDA
    only, so both modes count the same): a positive per-step count that grows with the layers."""
    import torch

    from tests.dist_pool import model_parallel
    from tests.test_no_host_sync import _tiny_model

    counts = {}
    with model_parallel(backend="gloo"):
        for layers in (1, 2):
            model = _tiny_model(torch.float32, "cpu", num_hidden_layers=layers)
            counts[layers] = e2e.decode_kernel_counts(model, list(range(3, 20)), layers, steps=2)
    for c in counts.values():
        assert c["fused"]["counted"] == "top-level cpu aten ops" and c["fused"]["kernels_per_step"] > 0
        assert c["fused"]["kernels_per_step"] == c["unfused"]["kernels_per_step"]
        assert sum(c["fused"]["top"].values()) <= c["fused"]["kernels_per_step"]
    assert counts[2]["fused"]["kernels_per_step"] > counts[1]["fused"]["kernels_per_step"]
