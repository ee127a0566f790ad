"""Async scheduling (``LLMEngine(async_scheduling=True)``): the same ids as the synchronous engine, step for step.

On the CPU (one rank in-process, and tp 2 · pcp 2 · dcp 2 on 4 gloo ranks in one pool task) the seeded tiny Llama
runs 7 prompts of different lengths with ``max_num_seqs=3`` (requests wait, and are admitted while others decode) and a
token budget of 16 (long prompts prefilled in chunks next to decodes), synchronously and asynchronously:

- greedy without EOS: equal ids, equal step counts (every stop is by length, known ahead), steps really launched
  ahead (``stats.async_steps``), every KV block free at the end;
- greedy with EOS ids the synchronous run produces mid-generation (so a request stops inside a pipelined run, and
  its row computed ahead must be discarded): equal ids and finish reasons, which are the no-EOS ids cut at the EOS;
- temperature 0.8: equal ids, no step launched ahead (sampling falls back to synchronous steps);
- negative control: the same async engine fed the in-flight ids off by one (+1) gives different ids, so the
  comparison does see the device-fed ids.

On a GPU (``gpu`` marker): the same with CUDA graphs, float32 and bfloat16, batches 1 and 16, with at most one host
sync per step.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_pool import model_parallel

MAX_NEW = 12
PROMPT_LENS = (5, 23, 2, 40, 9, 17, 3)


def _prompts(vocab: int, lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def _engine(model, asynchronous: bool, eos: list[int] | None = None, sabotage: bool = False, **engine):
    """An engine over ``model`` that stops at ``eos`` (None: none). ``sabotage``: the ids it feeds from the
    in-flight step are off by one (the negative control)."""
    from megacp.engine import LLMEngine

    model.config.eos_token_ids = list(eos or [])
    kw = dict(num_kv_blocks=64, block_size=4, max_num_batched_tokens=16, max_num_seqs=3)
    e = LLMEngine(model, **{**kw, **engine}, async_scheduling=asynchronous)
    if sabotage:
        vocab = model.config.vocab_size
        e._fed_ids = lambda sched, feed: (LLMEngine._fed_ids(e, sched, feed) + 1) % vocab
    return e


def _generate(e, prompts, **sampling):
    """(ids, finish reasons, stats, KV blocks free at the end) of one ``generate`` (ignore_eos without EOS ids)."""
    from megacp.sampling import SamplingParams

    outs = e.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=not e.eos_token_ids, **sampling))
    return [o.output_ids for o in outs], [o.finish_reason for o in outs], e.stats, e.session.allocator.num_free


def _eos_choices(ids: list[list[int]]) -> list[list[int]]:
    """EOS sets that stop some request in the middle of its pure-decode run (first produced at output 3..8)."""
    firsts = [(r.index(t), t) for r in ids for t in r if 3 <= r.index(t) <= 8]
    singles = sorted(set(t for _, t in sorted(firsts)))
    assert len(singles) >= 2, ids
    return [[singles[0]], singles[1:3]]


def _truncate(ids: list[int], eos: list[int]) -> list[int]:
    cut = next((i for i, t in enumerate(ids) if t in eos), None)
    return ids if cut is None else ids[: cut + 1]


def _scenarios(sizes: dict) -> dict:
    """Every comparison of the module docstring on this rank: the numbers for the test to check."""
    from megacp.models import load_model

    with model_parallel(**sizes):
        model = load_model(None, torch.float32, torch.device("cpu"))
        prompts = _prompts(model.config.vocab_size)
        out: dict = {}
        s_ids, _, s_st, _ = _generate(_engine(model, False), prompts)
        a_ids, _, a_st, a_free = _generate(_engine(model, True), prompts)
        out["plain"] = (s_ids, a_ids, s_st.num_steps, a_st.num_steps, a_st.async_steps, s_st.async_steps,
                        a_st.async_scheduling, a_free)
        out["eos"] = []
        for eos in _eos_choices(s_ids):
            s = _generate(_engine(model, False, eos), prompts)
            a = _generate(_engine(model, True, eos), prompts)
            out["eos"].append((eos, s[0], s[1], a[0], a[1], a[2].async_steps, a[3], [_truncate(r, eos) for r in s_ids]))
        hot = dict(temperature=0.8, top_p=0.9, seed=5)
        s = _generate(_engine(model, False), prompts, **hot)
        a = _generate(_engine(model, True), prompts, **hot)
        out["sampled"] = (s[0], a[0], a[2].async_steps)
        out["sabotaged"] = _generate(_engine(model, True, sabotage=True), prompts)[0]
        return out


def _check(out: dict) -> None:
    s_ids, a_ids, s_steps, a_steps, async_steps, sync_async_steps, flag, free = out["plain"]
    assert a_ids == s_ids
    assert a_steps == s_steps  # no EOS: every stop is known ahead, so the schedule is the synchronous one
    assert async_steps > MAX_NEW and sync_async_steps == 0 and flag is True
    assert free == 64  # every block back, rows computed ahead included
    reasons_seen = set()
    for eos, s_ids_e, s_reasons, a_ids_e, a_reasons, a_async, a_free, truncated in out["eos"]:
        assert a_ids_e == s_ids_e, f"eos {eos}"
        assert a_reasons == s_reasons, f"eos {eos}"
        assert s_ids_e == truncated  # EOS cuts the no-EOS ids: the ids fed after a stop never leak into an output
        assert a_async > 0 and a_free == 64
        reasons_seen |= set(a_reasons)
    assert reasons_seen == {"eos", "length"}
    s_hot, a_hot, hot_async = out["sampled"]
    assert a_hot == s_hot and hot_async == 0
    assert s_hot != s_ids  # really sampled
    # negative control: feeding the in-flight ids off by one changes the outputs after the first launched-ahead step
    assert out["sabotaged"] != s_ids
    assert [r[:2] for r in out["sabotaged"]] == [r[:2] for r in s_ids]


def test_async_equals_sync_one_rank():
    _check(_scenarios({}))


def test_async_equals_sync_tp2_pcp2_dcp2(dist_pool_4):
    """4 gloo ranks: every rank takes the same decisions (the broadcast in each step is a collective) and gets the
    one-rank ids."""
    sizes = dict(tensor_model_parallel_size=2, prefill_context_parallel_size=2, decode_context_parallel_size=2)
    per_rank = dist_pool_4.run(_scenarios, sizes)
    assert all(r == per_rank[0] for r in per_rank), "ranks disagree"
    _check(per_rank[0])
    one_rank = _scenarios({})
    assert per_rank[0]["plain"][0] == one_rank["plain"][0]


def test_async_scheduling_is_checked():
    from megacp.engine import LLMEngine
    from megacp.models import load_model

    with model_parallel():
        model = load_model(None, torch.float32, torch.device("cpu"))
        with pytest.raises(ValueError, match="async_scheduling"):
            LLMEngine(model, num_kv_blocks=8, async_scheduling=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_async_equals_sync_with_cuda_graphs(dtype):
    """CUDA graphs on: async ids == sync ids (batch 1 and 16, with and without EOS mid-generation), pure-decode steps
    replayed and launched ahead, and at most one host sync per step (the fed ids cross over without one)."""
    import warnings

    from tests.test_no_host_sync import _tiny_model

    with model_parallel(backend="gloo"):
        model = _tiny_model(dtype, "cuda")
        engine = dict(num_kv_blocks=256, block_size=16, max_num_batched_tokens=512, max_num_seqs=16)
        eos_cases = 0
        for batch in (1, 16):
            g = torch.Generator().manual_seed(batch)
            lens = torch.randint(1, 40, (batch,), generator=g).tolist()
            prompts = _prompts(model.config.vocab_size, lens, seed=batch)
            s_ids, _, s_st, _ = _generate(_engine(model, False, **engine), prompts)
            assert s_st.cuda_graphs == "on" and s_st.graph_replays > 0
            fast = _engine(model, True, **engine)
            a_ids, _, a_st, _ = _generate(fast, prompts)
            assert a_ids == s_ids, f"batch {batch} {dtype}: async ids differ from sync"
            assert a_st.async_steps > 0 and a_st.num_steps == s_st.num_steps, (a_st, s_st)
            assert a_st.graph_replays == s_st.graph_replays, (a_st, s_st)
            # EOS ids first produced at outputs 3..8 (a token produced earlier would stop the request before any
            # pure-decode step, leaving nothing to pipeline). A tiny random model often repeats a short cycle from
            # its first tokens (batch 1 may have none): the EOS case is required of at least one batch.
            eos = sorted({t for r in s_ids for t in r if 3 <= r.index(t) <= 8})[:2]
            if eos:
                s_e = _generate(_engine(model, False, eos, **engine), prompts)
                a_e = _generate(_engine(model, True, eos, **engine), prompts)
                assert (a_e[0], a_e[1]) == (s_e[0], s_e[1]), f"batch {batch} {dtype} eos {eos}"
                assert "eos" in a_e[1] and a_e[3] == 256 and a_e[2].async_steps > 0
                eos_cases += 1
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:  # the graphs were captured by the first run
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    again, _, st, _ = _generate(fast, prompts)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
            assert again == s_ids and st.async_steps == a_st.async_steps
            assert len(syncs) <= st.num_steps, [str(w.message) for w in syncs[:5]]
        assert eos_cases > 0, "no batch produced an EOS candidate"


def test_example_flag(dist_pool_4):
    """examples/infer_llama.py: async scheduling (the default, and --async-scheduling) gives --no-async-scheduling's
    ids, and the JSON says what ran."""
    from tests.test_engine_e2e import _main_task

    base = ["-tp", "2", "-pcp", "2", "-dcp", "2", "--max-new-tokens", "8", "--max-num-seqs", "2",
            "--max-num-batched-tokens", "16", "--dtype", "float32", "--device", "cpu"]
    for ids in _prompts(256, (3, 30, 7)):
        base += ["--prompt-ids", ",".join(map(str, ids))]
    sync = dist_pool_4.run(_main_task, [*base, "--no-async-scheduling"])[0]
    fast = dist_pool_4.run(_main_task, [*base, "--async-scheduling"])[0]
    default = dist_pool_4.run(_main_task, base)[0]
    assert default["timings"]["async_scheduling"] is True
    assert [o["output_ids"] for o in default["outputs"]] == [o["output_ids"] for o in fast["outputs"]]
    assert [o["output_ids"] for o in fast["outputs"]] == [o["output_ids"] for o in sync["outputs"]]
    assert fast["timings"]["async_scheduling"] is True and fast["timings"]["async_steps"] > 0
    assert sync["timings"]["async_scheduling"] is False and sync["timings"]["async_steps"] == 0
