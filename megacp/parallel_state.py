"""Process groups for TP / PCP / DCP / CP / DP / EP and their getters (Megatron style, one global state).

Rank layout (DESIGN §1): ``world = dp·pcp·tp`` ranks laid out as ``arange(world).reshape(dp, pcp, tp)``, TP innermost.
DCP groups are contiguous runs of ``dcp`` ranks inside a TP group; the CP group of a sequence's KV cache is the
``pcp·dcp`` ranks with the same dp index and the same ``tp_rank // dcp``, ordered by ``cp_rank = pcp_rank·dcp + dcp_rank``.

``rank_layout`` is the pure description of that layout; ``initialize_model_parallel`` turns it into torch process
groups wrapped in ``ParallelGroup`` (the collectives the layers use; a gloo group stages CUDA tensors through the
host; defined in ``megacp.parallel_group`` and re-exported here with its collective helpers and ``CollectiveError``). All state lives in the single ``_STATE``; ``destroy_model_parallel`` destroys its groups and resets it, so a
later initialisation with other sizes works.

One rank's layout is a frozen ``ParallelContext`` (its groups, sizes, ranks, KV interleave, EP switch), made once by
``initialize_model_parallel`` and kept by every object built from it (``parallel_context=`` in each constructor;
``resolve_parallel_context`` is the one default: the given one, else the global one, else ``ParallelContext.single()``,
the one-rank layout that runs before ``initialize_model_parallel``, whose collectives return their input). The
Megatron-style getters (``get_tp_group()``, ...) read the global one.

Training: every parameter a megacp layer creates carries ``grad_reduce_groups``, the names of the groups its
gradient must be summed over after ``backward``, and ``allreduce_grads(model)`` does those sums (see there).
"""

from __future__ import annotations

import os
import socket
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from megacp import symm_gather
from megacp.config import ParallelConfig, launched_by_torchrun
from megacp.parallel_group import (  # noqa: F401  (re-exported: megacp.parallel_state.ParallelGroup, ... stay public)
    CollectiveError,
    ParallelGroup,
    collective_error,
    cut_graphs_at_host_collectives,
    graph_capture_cut,
    rank_order_sum,
    run_collective,
    stages_through_host,
)

GROUP_NAMES = ("tp", "pcp", "dcp", "cp", "dp", "ep")

# Gradient reduction groups (``param.grad_reduce_groups``, summed over by ``allreduce_grads``):
# a parameter that every rank of a PCP and of a DP group holds alike (whole, or the same TP shard) saw only this
# rank's tokens, and tokens are split over PCP and over DP: its gradient is the sum over both. TP ranks hold the
# same tokens and Megatron's conjugate collectives already make the gradients of TP-replicated activations whole,
# so norms and row-parallel biases need no TP sum.
DENSE_GRAD_GROUPS = ("pcp", "dp")
# MoE parameters replicated on every rank but applied to only part of the tokens or experts on each (the router
# sees each token on the one rank that contributed it, the shared-expert gate scales this rank's partial output).
EXPERT_GROUP_GRAD_GROUPS = ("ep",)
# Parameters whose gradient is already complete on every rank (MoE experts: each rank runs its shard on every token).
NO_GRAD_GROUPS: tuple[str, ...] = ()


def rank_layout(
    world_size: int,
    tensor_model_parallel_size: int = 1,
    prefill_context_parallel_size: int = 1,
    decode_context_parallel_size: int = 1,
    data_parallel_size: int = 1,
) -> dict[str, list[list[int]]]:
    """Every group of every kind: ``{"tp"|"pcp"|"dcp"|"cp"|"dp"|"ep": [group ranks in group order, ...]}``.

    Raises ``ValueError`` when ``world_size != dp·pcp·tp``, ``tp % dcp != 0`` or a size is < 1.
    """
    config = ParallelConfig(tensor_model_parallel_size, prefill_context_parallel_size, decode_context_parallel_size,
                            data_parallel_size)
    config.check_world_size(world_size)
    return _layout_of(config)


def _layout_of(config: ParallelConfig) -> dict[str, list[list[int]]]:
    """``rank_layout`` of a validated config (its world is ``dp·pcp·tp``)."""
    tp, pcp = config.tensor_model_parallel_size, config.prefill_context_parallel_size
    dcp, dp = config.decode_context_parallel_size, config.data_parallel_size

    def rank(d: int, p: int, t: int) -> int:
        return (d * pcp + p) * tp + t

    heads = tp // dcp  # DCP groups per TP group
    return {
        "tp": [[rank(d, p, t) for t in range(tp)] for d in range(dp) for p in range(pcp)],
        "dcp": [
            [rank(d, p, h * dcp + i) for i in range(dcp)] for d in range(dp) for p in range(pcp) for h in range(heads)
        ],
        "pcp": [[rank(d, p, t) for p in range(pcp)] for d in range(dp) for t in range(tp)],
        "cp": [
            [rank(d, p, h * dcp + i) for p in range(pcp) for i in range(dcp)] for d in range(dp) for h in range(heads)
        ],
        "dp": [[rank(d, p, t) for d in range(dp)] for p in range(pcp) for t in range(tp)],
        "ep": [list(range(config.world_size))],
    }


# ------------------------------------------------------------------------------------------------ parallel context
@dataclass(frozen=True)
class ParallelContext:
    """One rank's parallel layout: its TP / PCP / DCP / CP / DP / EP groups and the validated ``ParallelConfig``.

    Made once, by ``initialize_model_parallel`` (``get_parallel_context()`` returns it), or as
    ``ParallelContext.single()`` for a one-rank run. Every megacp constructor that needs the layout (the model, its
    layers, ``KVSession``, the metadata builder, ``MoELayer``, ``LLMEngine``, ``DecodeGraphRunner``) takes it as
    ``parallel_context=`` and keeps it; ``resolve_parallel_context`` is the one place a default is chosen. Frozen:
    objects built from it can rely on it not changing under them. Sizes and ranks are read off the groups, so they
    cannot disagree with them.
    """

    tp: ParallelGroup
    pcp: ParallelGroup
    dcp: ParallelGroup
    cp: ParallelGroup
    dp: ParallelGroup
    ep: ParallelGroup
    world: ParallelGroup
    config: ParallelConfig

    @classmethod
    def from_layout(
        cls,
        config: ParallelConfig,
        rank: int,
        new_group: Callable[[list[int]], dist.ProcessGroup | None] | None = None,
        world_group: dist.ProcessGroup | None = None,
        timeout: timedelta | None = None,
        symmetric_memory: bool = False,
    ) -> ParallelContext:
        """The context of global ``rank`` in ``config``'s layout of ``dp·pcp·tp`` ranks (DESIGN §1).

        ``new_group(ranks)`` makes the process group of every group of more than one rank, called for each in the
        same order on every rank (``torch.distributed.new_group`` is collective over the world, so every rank makes
        every group, its own or not). ``new_group=None`` gives the layout without communicators: sizes and ranks for
        host-side planning (a metadata builder of rank ``rank``); a collective of a group of more than one rank then
        raises. ``symmetric_memory``: NCCL groups may gather small CUDA tensors through symmetric memory
        (``megacp.symm_gather``; every rank must pass the same value).
        """
        world_size = config.world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside the layout's {world_size} ranks (dp·pcp·tp)")
        layout = _layout_of(config)
        groups: dict[str, ParallelGroup] = {}
        for name in GROUP_NAMES:
            for ranks in layout[name]:
                pg = new_group(ranks) if new_group is not None and len(ranks) > 1 else None
                if rank in ranks:
                    groups[name] = ParallelGroup(name, ranks, pg, rank, timeout, symmetric_memory)
        world = ParallelGroup("world", list(range(world_size)), world_group, rank, timeout, symmetric_memory)
        return cls(**groups, world=world, config=config)

    @classmethod
    def single(cls, interleave_size: int = 1) -> ParallelContext:
        """One rank alone (every group of size 1, collectives return their input): what runs before
        ``initialize_model_parallel``. ``interleave_size``: the KV interleave (``cp_kv_cache_interleave_size``)."""
        return cls.from_layout(ParallelConfig(cp_kv_cache_interleave_size=interleave_size), 0)

    def group(self, name: str) -> ParallelGroup:
        """The group called ``name``: one of ``GROUP_NAMES`` or ``"world"``."""
        if name not in (*GROUP_NAMES, "world"):
            raise ValueError(f"unknown group name {name!r}; use one of {(*GROUP_NAMES, 'world')}")
        return getattr(self, name)

    def is_live(self) -> bool:
        """Whether this context's groups can still run collectives: a context without communicators (one rank, a
        layout) always; the one ``initialize_model_parallel`` made until ``destroy_model_parallel``."""
        return self.world.device_group is None or (_STATE is not None and _STATE.context is self)

    @property
    def tp_size(self) -> int:
        return self.tp.world_size

    @property
    def tp_rank(self) -> int:
        return self.tp.rank_in_group

    @property
    def pcp_size(self) -> int:
        return self.pcp.world_size

    @property
    def pcp_rank(self) -> int:
        return self.pcp.rank_in_group

    @property
    def dcp_size(self) -> int:
        return self.dcp.world_size

    @property
    def dcp_rank(self) -> int:
        return self.dcp.rank_in_group

    @property
    def dp_size(self) -> int:
        return self.dp.world_size

    @property
    def dp_rank(self) -> int:
        return self.dp.rank_in_group

    @property
    def ep_size(self) -> int:
        return self.ep.world_size

    @property
    def ep_rank(self) -> int:
        return self.ep.rank_in_group

    @property
    def cp_world_size(self) -> int:
        """``pcp·dcp``: how many ranks share (and shard) one sequence's KV cache."""
        return self.cp.world_size

    @property
    def cp_rank(self) -> int:
        """``pcp_rank·dcp + dcp_rank`` (this rank's position in the CP group)."""
        return self.pcp_rank * self.dcp_size + self.dcp_rank

    @property
    def interleave_size(self) -> int:
        """``cp_kv_cache_interleave_size``: tokens dealt to one CP rank in a run (DESIGN §2)."""
        return self.config.cp_kv_cache_interleave_size

    @property
    def enable_expert_parallel(self) -> bool:
        return self.config.enable_expert_parallel


# ------------------------------------------------------------------------------------------------ global state
@dataclass
class ParallelState:
    context: ParallelContext
    # weak references to release callbacks of objects that captured these groups' collectives (CUDA graphs)
    before_destroy: list[weakref.ref] = field(default_factory=list)

    @property
    def owned_groups(self) -> list[dist.ProcessGroup]:
        """The process groups ``initialize_model_parallel`` made that hold this rank (destroyed by
        ``destroy_model_parallel``)."""
        c = self.context
        return [g.device_group for g in (c.tp, c.pcp, c.dcp, c.cp, c.dp, c.ep) if g.device_group is not None]


_STATE: ParallelState | None = None


def _init_distributed_from_env(backend: str | None, timeout: timedelta | None) -> None:
    """torchrun sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; a plain ``python script.py`` gets a 1-rank world."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {} if timeout is None else {"timeout": timeout}
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if launched_by_torchrun():
        dist.init_process_group(backend, **kwargs)
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, **kwargs)


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    prefill_context_parallel_size: int = 1,
    decode_context_parallel_size: int = 1,
    data_parallel_size: int = 1,
    enable_expert_parallel: bool = False,
    cp_kv_cache_interleave_size: int = 1,
    backend: str | None = None,
    timeout: timedelta | None = None,
) -> ParallelContext:
    """Create the TP/PCP/DCP/CP/DP/EP groups of DESIGN §1 on every rank (a collective: all ranks must call it).

    Initialises ``torch.distributed`` from torchrun's environment if needed (``backend=None``: nccl with CUDA, else
    gloo). The sizes are validated before any collective, so a bad configuration raises ``ValueError`` everywhere.
    Returns this rank's ``ParallelContext`` (also ``get_parallel_context()``).
    """
    global _STATE
    if _STATE is not None:
        raise RuntimeError(
            "model parallel is already initialized; call megacp.parallel_state.destroy_model_parallel() first"
        )
    config = ParallelConfig(  # every check that needs no world size, before torch.distributed is touched
        tensor_model_parallel_size, prefill_context_parallel_size, decode_context_parallel_size, data_parallel_size,
        enable_expert_parallel, cp_kv_cache_interleave_size,
    )
    if not dist.is_initialized():
        if not launched_by_torchrun():  # a plain python process is a world of one: say so before creating it
            config.check_world_size(1, launched=False)
        _init_distributed_from_env(backend, timeout)
    config.check_world_size(dist.get_world_size())
    context = ParallelContext.from_layout(
        config, dist.get_rank(), new_group=lambda ranks: dist.new_group(ranks, timeout=timeout, backend=backend),
        world_group=dist.group.WORLD, timeout=timeout, symmetric_memory=_agreed_symmetric_memory(),
    )
    _STATE = ParallelState(context)
    return context


def _agreed_symmetric_memory() -> bool:
    """``MEGACP_SYMM_MEM`` read once, here, and agreed over the world (a MIN all-reduce) when the world is NCCL: a rank
    whose environment differs must not take another path than its peers (the gathers are collectives). Other worlds
    never take the path (``symm_gather.applies`` needs NCCL), so they read it without a collective."""
    wanted = symm_gather.enabled_by_env()
    if dist.get_backend() != "nccl":
        return wanted
    flag = torch.tensor([int(wanted)], dtype=torch.int32, device="cuda")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def model_parallel_is_initialized() -> bool:
    return _STATE is not None


def release_before_destroy(release: Callable[[], None]) -> None:
    """Have ``destroy_model_parallel`` call the bound method ``release`` (held weakly) before it destroys the groups.

    For objects that recorded these groups' NCCL collectives in CUDA graphs: ``ncclCommDestroy`` blocks for ever
    while such a graph is alive (pytorch#115388), so the graphs must go first, whoever still holds their owner.
    """
    _state().before_destroy.append(weakref.WeakMethod(release))


def destroy_model_parallel() -> None:
    """Destroy every group created by ``initialize_model_parallel`` and forget all state (the default group stays).

    First calls what ``release_before_destroy`` registered (an engine's CUDA graphs are dropped)."""
    global _STATE
    state, _STATE = _STATE, None
    if state is None:
        return
    for ref in state.before_destroy:
        release = ref()
        if release is not None:
            release()
    c = state.context
    for group in (c.tp, c.pcp, c.dcp, c.cp, c.dp, c.ep, c.world):
        group.release_symmetric_buffers()
    if not dist.is_initialized():
        return
    for pg in state.owned_groups:
        dist.destroy_process_group(pg)


def get_parallel_context() -> ParallelContext:
    """This rank's ``ParallelContext``, made by ``initialize_model_parallel``."""
    return _state().context


def resolve_parallel_context(given: ParallelContext | None = None) -> ParallelContext:
    """The context a constructor uses: ``given`` when not None, else the initialised global one, else a single rank.

    The one place a default layout is chosen; every megacp constructor calls it once and keeps the result.
    """
    if given is not None:
        if not isinstance(given, ParallelContext):
            raise ValueError(f"parallel_context must be a megacp.parallel_state.ParallelContext or None, got "
                             f"{type(given).__name__}")
        return given
    return _STATE.context if _STATE is not None else ParallelContext.single()


def _state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError(
            "megacp model parallel is not initialized: call "
            "megacp.parallel_state.initialize_model_parallel(tensor_model_parallel_size=..., ...) first"
        )
    return _STATE


# ------------------------------------------------------------------------------------------------ getters
def get_world_group() -> ParallelGroup:
    return _state().context.world


def first_error_across_ranks(error: str | None) -> str | None:
    """``get_world_group().first_error(error)``: the first rank's error message on every rank, or None."""
    return get_world_group().first_error(error)


def get_tp_group() -> ParallelGroup:
    return _state().context.tp


def get_pcp_group() -> ParallelGroup:
    return _state().context.pcp


def get_dcp_group() -> ParallelGroup:
    return _state().context.dcp


def get_cp_group() -> ParallelGroup:
    """The ``pcp·dcp`` ranks sharing one sequence's KV cache, in ``cp_rank`` order."""
    return _state().context.cp


def get_dp_group() -> ParallelGroup:
    return _state().context.dp


def get_ep_group() -> ParallelGroup:
    """All ``dp·pcp·tp`` ranks; whether MoE experts are split over them is ``expert_parallel_enabled()``."""
    return _state().context.ep


def get_tensor_model_parallel_rank() -> int:
    return get_parallel_context().tp_rank


def get_tensor_model_parallel_world_size() -> int:
    return get_parallel_context().tp_size


def get_prefill_context_parallel_rank() -> int:
    return get_parallel_context().pcp_rank


def get_prefill_context_parallel_world_size() -> int:
    return get_parallel_context().pcp_size


def get_decode_context_parallel_rank() -> int:
    return get_parallel_context().dcp_rank


def get_decode_context_parallel_world_size() -> int:
    return get_parallel_context().dcp_size


def get_context_parallel_rank() -> int:
    """``cp_rank = pcp_rank·dcp + dcp_rank`` (equals the rank's position in the CP group)."""
    return get_parallel_context().cp_rank


def get_context_parallel_world_size() -> int:
    """``pcp·dcp``: how many ranks share (and shard) one sequence's KV cache."""
    return get_parallel_context().cp_world_size


def get_data_parallel_rank() -> int:
    return get_parallel_context().dp_rank


def get_data_parallel_world_size() -> int:
    return get_parallel_context().dp_size


def get_expert_parallel_rank() -> int:
    return get_parallel_context().ep_rank


def get_expert_parallel_world_size() -> int:
    return get_parallel_context().ep_size


def expert_parallel_enabled() -> bool:
    return get_parallel_context().enable_expert_parallel


def get_cp_kv_cache_interleave_size() -> int:
    return get_parallel_context().interleave_size


def get_parallel_config() -> ParallelConfig:
    """The validated layout ``initialize_model_parallel`` was given."""
    return get_parallel_context().config


# ------------------------------------------------------------------------------------------------ training
def allreduce_grads(model: "torch.nn.Module | Iterable[torch.nn.Parameter]",
                    parallel_context: ParallelContext | None = None) -> None:
    """Make every gradient of ``model`` whole: sum it over the groups named by its parameter's ``grad_reduce_groups``.

    Call it on every rank after ``loss.backward()`` (a collective). Gradients are *summed*: with each rank's loss
    being the sum over its own tokens, the result is the gradient of the global sum (divide the loss by the global
    token count for a mean). Every megacp layer marks its parameters (``DENSE_GRAD_GROUPS``, ``EXPERT_GROUP_GRAD_GROUPS``,
    ``NO_GRAD_GROUPS``); a parameter without the attribute (a module of your own) is taken as replicated like a
    norm weight, ``DENSE_GRAD_GROUPS``: mark it otherwise if it is applied to TP-split activations. A parameter may
    also carry ``grad_reduce_hook(param)``, run first, for sums only its layer knows (QKV rows of a KV head that
    several TP ranks hold). Parameters that require grad but got none (unused on this rank) count as zeros, so all
    ranks run the same collectives. Before ``initialize_model_parallel`` every group has one rank: nothing to sum.
    ``parallel_context``: the context the model was built with (``resolve_parallel_context``'s default).
    """
    context = resolve_parallel_context(parallel_context)
    params = list(model.parameters()) if hasattr(model, "parameters") else list(model)
    buckets: dict[tuple, list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    for p in params:
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        hook = getattr(p, "grad_reduce_hook", None)
        if hook is not None:
            hook(p)
        names = tuple(getattr(p, "grad_reduce_groups", DENSE_GRAD_GROUPS))
        groups = [context.group(n) for n in names]
        names = tuple(g.name for g in groups if g.world_size > 1)
        if names:
            buckets.setdefault((names, str(p.grad.dtype), str(p.grad.device)), []).append(p)
    # Same bucket order on every rank: all ranks built the same model, so the keys and parameter order agree.
    for (names, _, _), members in sorted(buckets.items(), key=lambda kv: kv[0]):
        flat = torch.cat([p.grad.reshape(-1) for p in members])
        for name in names:
            context.group(name).all_reduce(flat)
        offset = 0
        for p in members:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n
