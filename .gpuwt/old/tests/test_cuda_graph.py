"""CUDA-graph decode: buckets and support rules (CPU), and on a GPU, graph replays give exactly the eager tokens.

The GPU tests run the seeded tiny Llama (head dim 64) on one device, once eagerly (``enforce_eager=True``) and once
with graphs, for batches that hit several buckets (1, 3 -> 4, 8, 17 -> 24, 64) in float32 and bfloat16, and require
identical greedy ids and that every pure-decode step really was a replay (a graph
path that silently fell back to eager would pass the token check but fail the replay count).
"""

from __future__ import annotations

import pytest
import torch

from megacp.cuda_graph import batch_buckets, graph_support
from tests.dist_pool import model_parallel
from tests.test_no_host_sync import _tiny_model


def test_batch_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(1) == [1]
    assert batch_buckets(200) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 200]


def test_graphs_are_off_on_cpu_and_with_enforce_eager():
    from megacp.engine import LLMEngine

    with model_parallel(backend="gloo"):
        model = _tiny_model(torch.float32, "cpu")
        assert "CUDA" in graph_support(model, torch.device("cpu"))
        engine = LLMEngine(model, num_kv_blocks=8, block_size=16, enforce_eager=True)
        assert engine.graphs_off_reason == "enforce_eager=True"


def _run(engine, batch: int, dtype: torch.dtype):
    from megacp.sampling import SamplingParams

    g = torch.Generator().manual_seed(batch)
    vocab = engine.model.config.vocab_size
    prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 40, (batch,), generator=g)]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    return [o.output_ids for o in outs], engine.stats


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decode_equals_eager(dtype):
    from megacp.engine import LLMEngine
    from megacp.sampling import SamplingParams

    with model_parallel(backend="gloo"):
        model = _tiny_model(dtype, "cuda")
        eager = LLMEngine(model, num_kv_blocks=256, block_size=16, max_num_seqs=64, enforce_eager=True)
        graphs = LLMEngine(model, num_kv_blocks=256, block_size=16, max_num_seqs=64)
        assert graphs.graphs_off_reason is None
        for batch in (1, 3, 8, 17, 64):
            want, s_eager = _run(eager, batch, dtype)
            got, s_graph = _run(graphs, batch, dtype)
            assert got == want, f"batch {batch} {dtype}: graph decode tokens differ from eager"
            # 6 new tokens: the first comes from the prefill step, the other 5 from pure-decode steps
            assert s_graph.graph_replays == 5 and s_eager.graph_replays == 0, (batch, s_graph, s_eager)
            assert s_graph.cuda_graphs == "on" and s_eager.cuda_graphs == "enforce_eager=True"
        assert graphs.graph_runner is not None and graphs.graph_runner.num_replays == 25
        assert graphs.stats.graph_capture_bytes >= 0 and graphs.stats.graph_capture_s > 0
        print(f"capture {graphs.stats.graph_capture_s:.2f} s, {graphs.stats.graph_capture_bytes / 2**20:.1f} MiB "
              f"for buckets {graphs.graph_runner.buckets}")
    # leaving model_parallel destroyed the groups: the graphs were released first (pytorch#115388) and the engine
    # refuses to run instead of replaying them
    assert graphs.graph_runner.graphs == {}
    with pytest.raises(RuntimeError, match="destroy_model_parallel"):
        graphs.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_graph_decode_equals_eager(dtype):
    """A dense DeepSeek (latent cache, Triton paged MLA decode): graph-replayed decode gives the eager tokens."""
    from megacp.engine import LLMEngine
    from tests.test_no_host_sync import _tiny_deepseek

    with model_parallel(backend="gloo"):
        model = _tiny_deepseek(dtype, "cuda")
        eager = LLMEngine(model, num_kv_blocks=64, block_size=16, max_num_seqs=17, enforce_eager=True)
        graphs = LLMEngine(model, num_kv_blocks=64, block_size=16, max_num_seqs=17)
        assert graphs.graphs_off_reason is None
        for batch in (1, 3, 17):
            want, _ = _run(eager, batch, dtype)
            got, s_graph = _run(graphs, batch, dtype)
            assert got == want, f"batch {batch} {dtype}: MLA graph decode tokens differ from eager"
            assert s_graph.graph_replays == 5, s_graph


def test_moe_blocks_say_whether_a_graph_can_record_them():
    """A one-rank expert group on the sync-free grouped path is recorded whole; otherwise (several ranks, or a case
    without a sync-free grouped GEMM) the block asks to run between graph pieces. MoE models get graphs either way."""
    from megacp.models.config import model_config_from_dict
    from megacp.models.deepseek import DeepseekForCausalLM
    from tests.deepseek_tiny import tiny_deepseek_config

    with model_parallel():
        model = DeepseekForCausalLM(model_config_from_dict(tiny_deepseek_config(3).to_dict()))
        assert graph_support(model, torch.device("cuda")) is None
        moe = [m for m in model.modules() if hasattr(m, "capturable")]
        assert len(moe) == 2
        x = torch.randn(3, 64)
        with torch.inference_mode():
            assert all(m.capturable(x) for m in moe)
        assert not moe[0].capturable(x.requires_grad_(True))  # training: the autograd loop


def test_moe_block_runs_between_pieces_while_a_graph_is_captured():
    """While a capture's cut callback is set, a non-capturable MoE block hands its eager run to it, and that run
    writes the same numbers the block computes directly (collectives inside it run directly: the hook is off)."""
    from megacp import parallel_state as ps
    from megacp.moe import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(32, 24, 8, 2, renormalize=True)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(5, 32)
    runs = []

    def cut(run):
        assert ps.graph_capture_cut() is cut
        with ps.cut_graphs_at_host_collectives(None):
            run()
        runs.append(run)

    with torch.no_grad():
        direct = layer(x)
        layer.capturable = lambda hidden: False  # as on a GPU without a sync-free grouped GEMM
        with ps.cut_graphs_at_host_collectives(cut):
            out = layer(x)
        assert ps.graph_capture_cut() is None
        torch.testing.assert_close(out, direct, rtol=0, atol=0)
        out.zero_()
        runs[0]()  # a replay runs it again into the same tensor
        torch.testing.assert_close(out, direct, rtol=0, atol=0)
    assert len(runs) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_graph_decode_equals_eager(dtype):
    """A DeepSeek MoE: bf16 records the MoE blocks in the graph (one piece), fp32 runs them between pieces (PyTorch's
    fp32 grouped GEMM reads the offsets on the host); either way the replayed decode gives the eager tokens."""
    from megacp.engine import LLMEngine
    from tests.test_no_host_sync import _tiny_deepseek

    with model_parallel(backend="gloo"):
        model = _tiny_deepseek(dtype, "cuda", moe=True)
        eager = LLMEngine(model, num_kv_blocks=64, block_size=16, max_num_seqs=17, enforce_eager=True)
        graphs = LLMEngine(model, num_kv_blocks=64, block_size=16, max_num_seqs=17)
        assert graphs.graphs_off_reason is None
        for batch in (1, 3, 17):
            want, _ = _run(eager, batch, dtype)
            got, s_graph = _run(graphs, batch, dtype)
            assert got == want, f"batch {batch} {dtype}: MoE graph decode tokens differ from eager"
            assert s_graph.graph_replays == 5, s_graph
        pieces = {len(g.graph.pieces) for g in graphs.graph_runner.graphs.values()}
        assert pieces == ({1} if dtype == torch.bfloat16 else {3}), pieces  # 2 MoE blocks: 2 cuts, 3 pieces


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_piecewise_graph_decode_equals_eager_in_every_layout(tmp_path):
    """scripts/gpu_graph_matrix.py: 8 gloo ranks on one GPU, every (tp, pcp, dcp), graphs cut at gloo collectives."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "gpu_graph_matrix.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "8",
           os.path.join(repo, "scripts", "gpu_graph_matrix.py"), "--json-out", str(out)]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    summary = json.loads(out.read_text())
    assert summary["cases"] == 10 * 2 and summary["failed"] == 0
    assert all(max(r["graph_pieces"]) > 1 for r in summary["rows"] if (r["tp"], r["pcp"], r["dcp"]) != (1, 1, 1))
