"""KVSession (blocks, rows, cached lengths, out-of-cache errors that change nothing) and the metadata helpers a model
of its own uses: ``local_tokens`` (per-token tensors -> this rank's rows) and ``gather_hidden`` (every position's
hidden state in caller order), checked for every PCP rank of mixed steps by simulating the PCP all-gather."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megacp.kv import BlockTable, KVCacheFullError
from megacp.session import KVSession
from megacp.layers.metadata_builder import AttentionMetadataBuilder
from megacp.parallel_state import ParallelGroup
from tests.references import layout_context

BLOCK = 4


def _session(**kwargs) -> KVSession:
    return KVSession(num_layers=2, num_kv_heads=2, head_dim=4, **{"num_kv_blocks": 6, "block_size": BLOCK, **kwargs})


# ------------------------------------------------------------------------------------------------ the session
def test_step_allocates_as_needed_and_advances_cached_lengths():
    s = _session()
    meta = s.step([("a", [1, 2, 3]), (7, torch.tensor([4, 5, 6, 7, 8]))])  # any hashable id, lists or tensors
    assert meta.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8] and meta.num_tokens == 8
    assert (s.num_cached("a"), s.num_cached(7), s.num_cached("new")) == (3, 5, 0)
    assert s.allocator.num_free == 6 - 1 - 2 and s.tokens_stored() == 8
    meta = s.step([("a", [9]), (7, [10, 11, 12, 13])])  # a decode ("a" fills its block) and a chunk (a third block)
    assert meta.num_decodes == 1 and meta.context is not None and s.allocator.num_free == 2
    assert s.block_table.row_host(0).numel() == 1 and s.block_table.row_host(1).numel() == 3
    s.free("a")
    assert "a" not in s and s.allocator.num_free == 3 and s.block_table.row_host(0).numel() == 0
    assert s.step([("b", 2)]).input_ids is None  # counts only: the caller brings its own inputs
    assert s.block_table.row_host(0).numel() == 1  # "b" took the freed row


def test_out_of_cache_raises_before_anything_changes():
    s = _session(max_num_seqs=2)
    s.step([("a", list(range(10)))])
    free, cached = s.allocator.num_free, s.num_cached("a")
    with pytest.raises(KVCacheFullError, match=r"needs 4 more blocks and 1 more request rows, 3 of 6 blocks"):
        s.step([("a", [1, 2]), ("b", list(range(13)))])
    with pytest.raises(KVCacheFullError, match="rows"):
        s.step([("b", [1]), ("c", [1])])  # two new requests, one free row
    with pytest.raises(KVCacheFullError, match="larger max_seq_len or num_kv_blocks"):
        s.step([("b", list(range(25)))])  # longer than the whole cache
    assert (s.allocator.num_free, s.num_cached("a"), "b" in s) == (free, cached, False)
    assert not s.can_reserve("b", 13) and s.can_reserve("b", 12)
    s.reserve("b", 12)
    assert s.allocator.num_free == 0 and s.num_cached("b") == 0
    s.step([("b", list(range(12)))])  # reserved: nothing more to allocate
    assert s.allocator.num_free == 0


def test_step_rejects_bad_requests():
    s = _session()
    with pytest.raises(ValueError, match="appears twice"):
        s.step([("a", [1]), ("a", [2])])
    with pytest.raises(ValueError, match="no new tokens"):
        s.step([("a", [])])
    with pytest.raises(ValueError, match="as ids, or every request's count"):
        s.step([("a", [1]), ("b", 2)])
    with pytest.raises(ValueError, match=r"\(request_id, new_token_ids\)"):
        s.step([[1, 2, 3]])
    with pytest.raises(ValueError, match="not in this session"):
        s.free("nobody")
    with pytest.raises(ValueError, match=r"KVSession\(num_kv_blocks\) must be an integer >= 1, got 0"):
        _session(num_kv_blocks=0)
    assert s.allocator.num_free == 6 and not s._seqs


def test_step_checks_token_ids_against_the_vocabulary():
    s = _session(vocab_size=10)
    for bad, needle in (([3, 10], r"\[0\]\[1\] = 10 is outside the model's vocabulary \[0, 10\)"),
                        ([-1], r"= -1 is outside"), ([2.5], "non-integer token id"),
                        (torch.tensor([4, 12]), r"= 12 is outside")):
        with pytest.raises(ValueError, match=needle):
            s.step([("a", bad)])
        assert s.allocator.num_free == 6 and not s._seqs  # rejected before anything changed
    meta = s.step([("a", torch.tensor([1, 9])), ("b", [0])])
    assert meta.input_ids.tolist() == [1, 9, 0] and s.num_cached("a") == 2


def _session_task() -> dict:
    """Under pcp 2 (interleave 2): the session's layout comes from parallel_state, each rank stores its share, and
    running out of blocks says the same on every rank."""
    s = _session(max_seq_len=40)
    s.step([("a", list(range(11)))])
    with pytest.raises(KVCacheFullError) as err:
        s.step([("b", list(range(40)))])
    return {"layout": (s.cp_world_size, s.cp_rank, s.interleave_size), "stored": s.tokens_stored(),
            "error": str(err.value), "capacity": s.capacity_tokens}


def test_session_reads_the_layout_from_parallel_state(dist_pool_2):
    from tests.dist_pool import run_with_model_parallel

    res = dist_pool_2.run(run_with_model_parallel, dict(prefill_context_parallel_size=2, cp_kv_cache_interleave_size=2),
                          _session_task)
    assert [r["layout"] for r in res] == [(2, 0, 2), (2, 1, 2)]
    assert [r["stored"] for r in res] == [6, 5]  # 11 tokens in runs of 2: positions 0,1,4,5,8,9 on rank 0
    assert res[0]["error"] == res[1]["error"] and res[0]["capacity"] == 6 * BLOCK * 2


# ------------------------------------------------------------------------------------------------ metadata helpers
class _Gathered:
    """A PCP group stand-in whose all_gather returns every rank's (already known) local rows."""

    def __init__(self, parts: list[torch.Tensor]) -> None:
        self.parts = parts

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return torch.cat(self.parts, dim=dim)


class _GatheredPCP(ParallelGroup):
    """PCP rank ``rank`` of ``pcp`` (sizes only) whose all_gather is ``gathered``'s."""

    def __init__(self, gathered: _Gathered, pcp: int, rank: int) -> None:
        super().__init__("pcp", list(range(pcp)), None, rank)
        self.gathered = gathered

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return self.gathered.all_gather(x, dim)


def _metas(pcp: int, computed: list[int], new: list[int], group: _Gathered | None = None, **build):
    metas = []
    for r in range(pcp):
        table = BlockTable(BLOCK, len(new), 8, cp_world_size=pcp, cp_rank=r)
        for i in range(len(new)):
            table.set_row(i, [3 * i, 3 * i + 1, 3 * i + 2])
        ctx = layout_context(pcp, 1, r, 0)
        if group is not None:
            ctx = dataclasses.replace(ctx, pcp=_GatheredPCP(group, pcp, r))
        builder = AttentionMetadataBuilder(table, max_num_reqs=4, null_slot=0, parallel_context=ctx)
        metas.append(builder.build(list(range(len(new))), computed, new, **build))
    return metas


@pytest.mark.parametrize("pcp", [1, 2, 3])
@pytest.mark.parametrize("computed,new", [
    ([0, 0], [5, 1]),                 # prefills (one of a single token)
    ([5, 0, 3, 9], [1, 7, 4, 1]),     # decode, prefill, chunk over context, decode: caller order interleaves them
    ([2, 6], [1, 1]),                 # pure decode
])
def test_local_tokens_and_gather_hidden_round_trip(pcp, computed, new):
    N = sum(new)
    values = torch.arange(N, dtype=torch.float32).unsqueeze(1) * torch.tensor([1.0, -1.0]) + 100  # [N, 2]
    group = _Gathered([])
    metas = _metas(pcp, computed, new, group)
    for meta in metas:
        local = meta.local_tokens(values, fill=-7)
        real = meta.token_index_host >= 0
        assert torch.equal(local[real], values[meta.token_index_host[real]])
        assert bool((local[~real] == -7).all())
        labels = meta.local_tokens(torch.arange(N), fill=-100)  # integer tensors too
        assert labels.dtype == torch.long and torch.equal(labels[real], meta.token_index_host[real])
        group.parts.append(local)
    assert sum(int((m.token_index_host >= 0).sum()) for m in metas) == N + (pcp - 1) * sum(
        1 for c, n in zip(computed, new) if c > 0 and n == 1)  # decodes are on every PCP rank
    for r, meta in enumerate(metas):
        assert torch.equal(meta.gather_hidden(group.parts[r]), values)
    with pytest.raises(ValueError, match=f"the step has {N} new tokens"):
        metas[0].local_tokens(values[:-1])


def test_helpers_on_a_padded_decode_step():
    (meta,) = _metas(1, [3, 4], [1, 1], pad_decodes_to=4, token_ids=[11, 12])
    assert meta.num_local_tokens == 4 and meta.num_tokens == 2
    assert meta.local_tokens(torch.tensor([5, 6]), fill=-1).tolist() == [5, 6, -1, -1]
    assert meta.gather_hidden(torch.arange(4.0).unsqueeze(1)).flatten().tolist() == [0.0, 1.0]


# ------------------------------------------------------------------------------------------------ decode_step
def _metadata_diff(a, b, path: str = "meta") -> list[str]:
    """The fields (dotted paths) where two metadata objects differ: tensors by dtype, shape and values, nested
    metadata field by field, everything else by ``==`` (groups by identity)."""
    if dataclasses.is_dataclass(a) and not isinstance(a, ParallelGroup):
        if type(a) is not type(b):
            return [path]
        return [d for f in dataclasses.fields(a) for d in _metadata_diff(getattr(a, f.name), getattr(b, f.name),
                                                                         f"{path}.{f.name}")]
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [path]
    if isinstance(a, ParallelGroup):
        return [] if a is b else [path]
    return [] if a == b else [path]


def _layout(pcp: int, dcp: int, rank: int, interleave: int):
    from megacp.config import ParallelConfig
    from megacp.parallel_state import ParallelContext

    config = ParallelConfig(tensor_model_parallel_size=dcp, prefill_context_parallel_size=pcp,
                            decode_context_parallel_size=dcp, cp_kv_cache_interleave_size=interleave)
    return ParallelContext.from_layout(config, rank)


def _random_run(ctx, seed: int, steps: int = 40) -> tuple[int, list[str]]:
    """Drive two sessions through the same random schedule (new prompts, chunks, decodes crossing blocks, frees;
    pure-decode steps in random order, padded or not): one only by ``step``, the other by ``decode_step`` for the
    pure-decode steps. Returns the number of pure-decode steps and every metadata/state difference found."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(num_kv_blocks=40, max_num_seqs=6, vocab_size=50, parallel_context=ctx)
    ref, fast = _session(**kw), _session(**kw)
    held, next_id, n_decode, diffs = [], 0, 0, []

    def rand(n: int) -> int:
        return int(torch.randint(n, (1,), generator=g))

    for k in range(steps):
        if held and rand(4) == 0:  # a finished request
            rid = held.pop(rand(len(held)))
            ref.free(rid)
            fast.free(rid)
        decodes = [held[i] for i in torch.randperm(len(held), generator=g).tolist()][: 1 + rand(max(1, len(held)))]
        if not decodes or (len(held) < 6 and rand(3) == 0):  # a mixed step: a new prompt (and a chunk) too
            items = [(rid, [rand(50)]) for rid in decodes] + [(f"r{next_id}", [rand(50) for _ in range(1 + rand(9))])]
            held.append(f"r{next_id}")
            next_id += 1
            if len(decodes) > 1:
                items[0] = (decodes[0], [rand(50) for _ in range(2 + rand(5))])  # a chunk over cached context
            for s in (ref, fast):
                s.step(items)
            continue
        ids = torch.randint(50, (len(decodes),), generator=g)
        pad = None if rand(2) else len(decodes) + rand(7 - len(decodes))
        a = ref.step([(rid, [int(t)]) for rid, t in zip(decodes, ids)], pad_decodes_to=pad)
        b = fast.decode_step(decodes, ids if rand(2) else ids.tolist(), pad_decodes_to=pad)
        n_decode += 1
        diffs += [f"step {k}: {d}" for d in _metadata_diff(a, b)]
        if [ref.num_cached(r) for r in held] != [fast.num_cached(r) for r in held] \
                or ref.tokens_stored() != fast.tokens_stored() \
                or not torch.equal(ref.block_table.table, fast.block_table.table):
            diffs.append(f"step {k}: session state")
    return n_decode, diffs


@pytest.mark.parametrize("pcp,dcp", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)])
@pytest.mark.parametrize("interleave", [1, 2])
def test_decode_step_equals_step_on_random_schedules(pcp, dcp, interleave):
    """``decode_step`` (tensor ops over the per-row state) gives exactly ``step``'s metadata, every field, on every
    CP rank, and leaves the same session state."""
    for rank in range(pcp * dcp):
        n_decode, diffs = _random_run(_layout(pcp, dcp, rank, interleave), seed=10 * rank + interleave)
        assert n_decode >= 15 and not diffs, (rank, diffs[:5])


def test_decode_step_comparison_catches_a_wrong_position():
    """Negative control: the comparison of the test above finds a decode whose position is off by one, and
    ``decode_step`` refuses what ``step`` would build differently (unknown requests, prompts, bad ids)."""
    kw = dict(num_kv_blocks=12, max_num_seqs=4, vocab_size=50)
    ref, fast = _session(**kw), _session(**kw)
    ref.step([("a", [1, 2, 3]), ("b", [4, 5])])
    fast.step([("a", [1, 2, 3]), ("b", [4, 5, 6])])  # "b" one token ahead
    diffs = _metadata_diff(ref.step([("a", [7]), ("b", [8])]), fast.decode_step(["a", "b"], [7, 8]))
    assert "meta.positions" in diffs and "meta.decode.seq_lens_host" in diffs
    with pytest.raises(ValueError, match="not in this session"):
        fast.decode_step(["c"], [1])
    with pytest.raises(ValueError, match="appears twice"):
        fast.decode_step(["a", "a"], [1, 2])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fast.decode_step(["a"], [50])
    with pytest.raises(ValueError, match="integer ids"):
        fast.decode_step(["a"], torch.tensor([1.0]))
    fast.reserve("c", 4)
    with pytest.raises(ValueError, match="needs cached tokens"):
        fast.decode_step(["c"], [1])
    assert fast.num_cached("a") == 4 and fast.num_cached("c") == 0  # the refused steps changed nothing
