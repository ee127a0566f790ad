"""parallel_state: the pure rank layout against a brute-force construction, then real gloo groups in 2/4/8-rank pools.

Each multi-process test is one task per pool that initialises several configurations in a row
(init -> checks -> destroy -> init other sizes), so the whole file spawns each pool size once.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megacp import parallel_state as ps
from tests.dist_pool import model_parallel

# (world, tp, pcp, dcp, dp)
LAYOUT_CASES = [
    (1, 1, 1, 1, 1),
    (2, 2, 1, 2, 1),
    (2, 1, 2, 1, 1),
    (2, 1, 1, 1, 2),
    (4, 4, 1, 2, 1),
    (4, 2, 2, 2, 1),
    (4, 1, 2, 1, 2),
    (6, 3, 2, 3, 1),
    (6, 2, 3, 1, 1),
    (8, 4, 2, 2, 1),
    (8, 2, 2, 2, 2),
    (8, 8, 1, 4, 1),
    (12, 2, 3, 2, 2),
    (12, 6, 2, 3, 1),
    (16, 4, 2, 4, 2),
    (16, 8, 2, 2, 1),
    (16, 2, 4, 1, 2),
]


def _coords(rank: int, tp: int, pcp: int) -> tuple[int, int, int]:
    """(dp index, pcp rank, tp rank) of a global rank in arange(world).reshape(dp, pcp, tp)."""
    return rank // (tp * pcp), (rank // tp) % pcp, rank % tp


def _brute_force_layout(world: int, tp: int, pcp: int, dcp: int, dp: int) -> dict[str, list[list[int]]]:
    """Group ranks by the DESIGN §1 table's "same ..." keys, order members by their in-group rank."""
    keys = {  # name -> (which group, position inside the group), from (d, p, t)
        "tp": (lambda d, p, t: (d, p), lambda d, p, t: t),
        "dcp": (lambda d, p, t: (d, p, t // dcp), lambda d, p, t: t % dcp),
        "pcp": (lambda d, p, t: (d, t), lambda d, p, t: p),
        "dp": (lambda d, p, t: (p, t), lambda d, p, t: d),
        "cp": (lambda d, p, t: (d, t // dcp), lambda d, p, t: p * dcp + t % dcp),
        "ep": (lambda d, p, t: 0, lambda d, p, t: (d * pcp + p) * tp + t),
    }
    layout = {}
    for name, (group_key, order_key) in keys.items():
        groups: dict[object, list[tuple[int, int]]] = {}
        for r in range(world):
            c = _coords(r, tp, pcp)
            groups.setdefault(group_key(*c), []).append((order_key(*c), r))
        layout[name] = sorted([r for _, r in sorted(members)] for members in groups.values())
    return layout


@pytest.mark.parametrize("world,tp,pcp,dcp,dp", LAYOUT_CASES)
def test_rank_layout_matches_brute_force(world, tp, pcp, dcp, dp):
    got = ps.rank_layout(world, tp, pcp, dcp, dp)
    want = _brute_force_layout(world, tp, pcp, dcp, dp)
    assert set(got) == {"tp", "pcp", "dcp", "cp", "dp", "ep"}
    for name in want:
        assert sorted(got[name]) == want[name], name
    sizes = {"tp": tp, "pcp": pcp, "dcp": dcp, "cp": pcp * dcp, "dp": dp, "ep": world}
    for name, groups in got.items():
        assert all(len(g) == sizes[name] for g in groups), name
        assert sorted(r for g in groups for r in g) == list(range(world)), f"{name} groups must partition the world"


def test_rank_layout_design_worked_example():
    layout = ps.rank_layout(8, tensor_model_parallel_size=4, prefill_context_parallel_size=2, decode_context_parallel_size=2)
    assert layout["tp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout["dcp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout["pcp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout["cp"] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert layout["dp"] == [[r] for r in range(8)]
    assert layout["ep"] == [list(range(8))]
    cp_rank = {r: g.index(r) for g in layout["cp"] for r in g}
    assert [cp_rank[r] for r in range(8)] == [0, 1, 0, 1, 2, 3, 2, 3]


@pytest.mark.parametrize(
    "args,flag",
    [
        ((6, 2, 2, 1, 1), "launch with world_size=4"),  # world 6 != 1·2·2
        ((4, 4, 1, 3, 1), "decode_context_parallel_size=3 must divide tensor_model_parallel_size=4"),  # tp % dcp
        ((4, 0, 1, 1, 1), "tensor_model_parallel_size must be an integer >= 1"),
    ],
)
def test_rank_layout_rejects_bad_sizes(args, flag):
    with pytest.raises(ValueError, match=flag):
        ps.rank_layout(*args)


def test_size_one_group_returns_inputs_without_distributed():
    g = ps.ParallelGroup("tp", [3], None, 3)
    x = torch.randn(2, 3, requires_grad=True)
    assert g.all_gather(x, 1) is x and g.reduce_scatter(x, 1) is x and g.all_reduce(x) is x
    assert g.all_to_all(x, 1, 0) is x and g.broadcast(x) is x
    g.barrier()


def test_resolve_parallel_context_prefers_the_given_context():
    """The one default every constructor and merge uses: a given context wins; none gives the one-rank context
    before initialisation; an unknown group name is refused either way."""
    given = ps.ParallelContext.from_layout(ps.ParallelConfig(tensor_model_parallel_size=2,
                                                             decode_context_parallel_size=2), 1)
    assert ps.resolve_parallel_context(given) is given
    assert (given.dcp.ranks, given.dcp.rank_in_group, given.cp_rank, given.cp_world_size) == ([0, 1], 1, 1, 2)
    alone = ps.resolve_parallel_context().dcp
    assert alone.world_size == 1 and alone.name == "dcp"
    with pytest.raises(ValueError, match="unknown group name 'dpc'"):
        given.group("dpc")
    with pytest.raises(RuntimeError, match="describes a layout only"):  # no communicators: never a silent no-op
        given.dcp.all_reduce(torch.ones(2))


def test_getters_raise_before_initialization():
    assert not ps.model_parallel_is_initialized()
    with pytest.raises(RuntimeError, match="initialize_model_parallel"):
        ps.get_tp_group()


# ------------------------------------------------------------------------------------------------ worker tasks
_GETTERS = {
    "tp": ps.get_tp_group,
    "pcp": ps.get_pcp_group,
    "dcp": ps.get_dcp_group,
    "cp": ps.get_cp_group,
    "dp": ps.get_dp_group,
    "ep": ps.get_ep_group,
}


def _check_collectives(name: str, g: ps.ParallelGroup, members: list[int]) -> None:
    """Numbers each collective must produce on group ``g`` whose global ranks are ``members``."""
    r, W, i = dist.get_rank(), len(members), members.index(dist.get_rank())
    where = f"group {name} {members} on rank {r}"

    total = g.all_reduce(torch.tensor([r], dtype=torch.int64))
    assert total.item() == sum(members), where

    def block(q: int) -> torch.Tensor:  # what rank q contributes
        return 100.0 * q + torch.arange(6.0).reshape(2, 3)

    assert torch.equal(g.all_gather(block(r), 0), torch.cat([block(q) for q in members], 0)), where
    assert torch.equal(g.all_gather(block(r), 1), torch.cat([block(q) for q in members], 1)), where
    assert torch.equal(g.all_gather(block(r), -1), torch.cat([block(q) for q in members], 1)), where

    base0 = torch.arange(W * 2 * 3.0).reshape(W * 2, 3)
    out = g.reduce_scatter((r + 1) * base0, 0)
    assert torch.equal(out, sum(q + 1 for q in members) * base0[2 * i : 2 * i + 2]), where
    base1 = torch.arange(2 * W * 3.0).reshape(2, W * 3)
    out = g.reduce_scatter((r + 1) * base1, 1)
    assert torch.equal(out, sum(q + 1 for q in members) * base1[:, 3 * i : 3 * i + 3]), where

    def a2a_in(q: int, shape: tuple[int, int]) -> torch.Tensor:
        return 1000.0 * q + torch.arange(float(shape[0] * shape[1])).reshape(shape)

    out = g.all_to_all(a2a_in(r, (2 * W, 3)), scatter_dim=0, gather_dim=0)
    assert torch.equal(out, torch.cat([a2a_in(q, (2 * W, 3))[2 * i : 2 * i + 2] for q in members], 0)), where
    out = g.all_to_all(a2a_in(r, (2, 3 * W)), scatter_dim=1, gather_dim=0)
    assert torch.equal(out, torch.cat([a2a_in(q, (2, 3 * W))[:, 3 * i : 3 * i + 3] for q in members], 0)), where
    out = g.all_to_all(a2a_in(r, (2 * W, 3)), scatter_dim=0, gather_dim=1)
    assert torch.equal(out, torch.cat([a2a_in(q, (2 * W, 3))[2 * i : 2 * i + 2] for q in members], 1)), where

    x = torch.tensor([float(r)])
    assert g.broadcast(x, src=W - 1).item() == members[-1], where
    g.barrier()

    # Autograd: every rank's loss is summed, so d(total)/dx is a sum over ranks of the conjugate collective.
    w = torch.arange(2 * 3 * W, dtype=torch.float64).reshape(2, 3 * W)
    x = torch.full((2, 3), float(r + 1), dtype=torch.float64, requires_grad=True)
    (g.all_gather(x, 1) * w).sum().backward()
    assert torch.equal(x.grad, W * w[:, 3 * i : 3 * i + 3]), where
    x = torch.ones(2 * W, 3, dtype=torch.float64, requires_grad=True)
    ((r + 1) * g.reduce_scatter(x, 0)).sum().backward()
    assert torch.equal(x.grad, torch.tensor(members, dtype=torch.float64).add(1).repeat_interleave(2)[:, None].expand(2 * W, 3)), where
    x = torch.full((3,), float(r), dtype=torch.float64, requires_grad=True)
    y = g.all_reduce(x)
    ((r + 1) * y).sum().backward()
    assert torch.equal(y.detach(), torch.full((3,), float(sum(members)), dtype=torch.float64)), where
    assert torch.equal(x.detach(), torch.full((3,), float(r), dtype=torch.float64)), "grad all_reduce must not be in place"
    assert torch.equal(x.grad, torch.full((3,), float(sum(q + 1 for q in members)), dtype=torch.float64)), where


def _check_config(sizes: dict) -> dict:
    """Runs in every worker: init, check groups against rank_layout and the collectives, destroy, check clean."""
    world, r = dist.get_world_size(), dist.get_rank()
    layout = ps.rank_layout(
        world,
        sizes.get("tensor_model_parallel_size", 1),
        sizes.get("prefill_context_parallel_size", 1),
        sizes.get("decode_context_parallel_size", 1),
        sizes.get("data_parallel_size", 1),
    )
    with model_parallel(**sizes):
        assert ps.model_parallel_is_initialized()
        with pytest.raises(RuntimeError, match="already initialized"):
            ps.initialize_model_parallel(**sizes)
        for name, getter in _GETTERS.items():
            g = getter()
            members = next(m for m in layout[name] if r in m)
            assert (g.name, g.ranks, g.rank_in_group, g.world_size) == (name, members, members.index(r), len(members))
            assert (g.device_group is None) == (len(members) == 1)
            _check_collectives(name, g, members)
        world_group = ps.get_world_group()
        assert world_group.ranks == list(range(world))
        _check_collectives("world", world_group, list(range(world)))
        seen = {
            "tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
            "pcp": (ps.get_prefill_context_parallel_rank(), ps.get_prefill_context_parallel_world_size()),
            "dcp": (ps.get_decode_context_parallel_rank(), ps.get_decode_context_parallel_world_size()),
            "cp": (ps.get_context_parallel_rank(), ps.get_context_parallel_world_size()),
            "dp": (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()),
            "ep": (ps.get_expert_parallel_rank(), ps.get_expert_parallel_world_size()),
            "interleave": ps.get_cp_kv_cache_interleave_size(),
            "use_ep": ps.expert_parallel_enabled(),
        }
        assert seen["cp"][0] == ps.get_cp_group().rank_in_group
    assert not ps.model_parallel_is_initialized()
    for getter in [*_GETTERS.values(), ps.get_world_group, ps.get_context_parallel_rank, ps.get_cp_kv_cache_interleave_size]:
        with pytest.raises(RuntimeError, match="not initialized"):
            getter()
    return seen


def _check_configs(configs: list[dict]) -> list[dict]:
    # A bad configuration fails on every rank before any collective and leaves nothing behind.
    with pytest.raises(ValueError, match="launch with world_size="):
        ps.initialize_model_parallel(tensor_model_parallel_size=3 * dist.get_world_size())
    assert not ps.model_parallel_is_initialized()
    return [_check_config(sizes) for sizes in configs]


def _expected_getters(rank: int, sizes: dict) -> dict:
    tp = sizes.get("tensor_model_parallel_size", 1)
    pcp = sizes.get("prefill_context_parallel_size", 1)
    dcp = sizes.get("decode_context_parallel_size", 1)
    dp = sizes.get("data_parallel_size", 1)
    d, p, t = _coords(rank, tp, pcp)
    return {
        "tp": (t, tp),
        "pcp": (p, pcp),
        "dcp": (t % dcp, dcp),
        "cp": (p * dcp + t % dcp, pcp * dcp),
        "dp": (d, dp),
        "ep": (rank, dp * pcp * tp),
        "interleave": sizes.get("cp_kv_cache_interleave_size", 1),
        "use_ep": sizes.get("enable_expert_parallel", False),
    }


def _sizes(tp=1, pcp=1, dcp=1, dp=1, **extra) -> dict:
    return dict(
        tensor_model_parallel_size=tp,
        prefill_context_parallel_size=pcp,
        decode_context_parallel_size=dcp,
        data_parallel_size=dp,
        **extra,
    )


POOL_CONFIGS = {
    2: [_sizes(tp=2), _sizes(tp=2, dcp=2, cp_kv_cache_interleave_size=4), _sizes(pcp=2), _sizes(dp=2)],
    4: [
        _sizes(tp=2, pcp=2, dcp=2),
        _sizes(tp=4, dcp=2, enable_expert_parallel=True),
        _sizes(pcp=4),
        _sizes(tp=2, dp=2),
        _sizes(pcp=2, dp=2),
        _sizes(tp=4, dcp=4),
    ],
    8: [
        _sizes(tp=4, pcp=2, dcp=2),
        _sizes(tp=2, pcp=2, dcp=2, dp=2),
        _sizes(tp=8, dcp=4),
        _sizes(pcp=8),
        _sizes(tp=2, pcp=4),
    ],
}


@pytest.mark.parametrize("world", [2, 4, 8])
def test_initialize_groups_collectives_destroy(world, request):
    pool = request.getfixturevalue(f"dist_pool_{world}")
    configs = POOL_CONFIGS[world]
    per_rank = pool.run(_check_configs, configs)
    for rank, seen_per_config in enumerate(per_rank):
        for sizes, seen in zip(configs, seen_per_config):
            assert seen == _expected_getters(rank, sizes), (rank, sizes)
    if world == 8:  # DESIGN's worked example, literally
        assert [seen[0]["cp"][0] for seen in per_rank] == [0, 1, 0, 1, 2, 3, 2, 3]


class _GraphOwner:
    """Stands in for a CUDA-graph runner: records when ``release`` ran relative to the groups' destruction."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def release(self) -> None:
        self.events.append("release")


def _release_before_destroy_task() -> list[str]:
    events: list[str] = []
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    alive, gone = _GraphOwner(events), _GraphOwner(events)
    ps.release_before_destroy(alive.release)
    ps.release_before_destroy(gone.release)
    del gone  # held weakly: a collected owner is skipped, not kept alive by the registration
    real_destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda pg=None: (events.append("destroy group"), real_destroy(pg))[1]
    try:
        ps.destroy_model_parallel()
    finally:
        dist.destroy_process_group = real_destroy
    ps.destroy_model_parallel()  # a second call finds nothing to release or destroy
    return events


def test_destroy_releases_registered_graph_owners_before_the_groups(dist_pool_2):
    """``destroy_model_parallel`` calls what ``release_before_destroy`` registered (live owners only) before it
    destroys any group: ncclCommDestroy blocks for ever while a graph that recorded the group's collectives lives."""
    for events in dist_pool_2.run(_release_before_destroy_task):
        assert events[0] == "release" and events.count("release") == 1, events
        assert events.count("destroy group") >= 1 and "release" not in events[1:], events


def test_symmetric_gather_applies_only_to_small_cuda_nccl_gathers(monkeypatch):
    """The symmetric-memory path (megacp/symm_gather.py) is chosen from the group and the shape alone, so every rank
    of a group makes the same choice; elsewhere (gloo, CPU, large or odd-typed tensors, the env switch) NCCL/gloo."""
    from megacp import symm_gather

    class FakeCuda:  # only the attributes ``applies`` reads
        is_cuda, dtype = True, torch.bfloat16

        def __init__(self, numel):
            self._numel = numel

        def numel(self):
            return self._numel

        def element_size(self):
            return 2

    assert symm_gather.applies("nccl", FakeCuda(4096), 2)
    assert not symm_gather.applies("gloo", FakeCuda(4096), 2)
    assert not symm_gather.applies("nccl", FakeCuda(symm_gather.MAX_BYTES), 2)  # 2 bytes each: over the limit
    assert not symm_gather.applies("nccl", FakeCuda(4096), 1)
    assert not symm_gather.applies("nccl", FakeCuda(4096), 16)
    assert not symm_gather.applies("nccl", torch.zeros(8), 2)  # a CPU tensor
    monkeypatch.setenv(symm_gather.ENV, "0")
    assert not symm_gather.applies("nccl", FakeCuda(4096), 2)


def test_symmetric_gather_turns_off_for_the_group_when_a_rank_cannot_make_buffers():
    """A rank that cannot make a symmetric buffer votes no; the agreed verdict turns the path off on every rank and
    the caller falls back (gather returns None), never a rank on each path."""
    from megacp.symm_gather import SymmetricGather

    votes = []
    sg = SymmetricGather("g", 2, 0, lambda ok: votes.append(ok) or False)
    assert sg.gather(torch.ones(4)) is None  # CPU: symmetric memory refuses it here
    assert votes == [False] and not sg.enabled and sg.num_gathers == 0
    assert sg.gather(torch.ones(4)) is None and votes == [False]  # decided once
