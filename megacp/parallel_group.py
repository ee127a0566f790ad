"""One process group seen from this rank: ``ParallelGroup`` and the collectives the layers run through it.

``ParallelGroup`` wraps a torch ``ProcessGroup`` with its members and the collectives megacp needs (all_gather,
reduce_scatter, all_reduce, all_to_all, broadcast, barrier, all_gather_object, first_error); the first three are
differentiable through their conjugates (``_AllGather`` / ``_ReduceScatter`` / ``_AllReduce``). What every collective
goes through lives here too: host staging of a gloo group's CUDA tensors (``stages_through_host``, ``run_collective``,
``rank_order_sum``), the hand-over of staged collectives to a piecewise CUDA-graph capture
(``cut_graphs_at_host_collectives``) and the error a dead or stuck peer raises (``CollectiveError``).

Which groups exist and which one a rank is in is ``megacp.parallel_state``'s business (it re-exports these names).
"""

from __future__ import annotations

import pickle
import re
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megacp import symm_gather
from megacp.symm_gather import SymmetricGather

# torch >= 2.10 renamed the flat collectives (the old names still work but warn).
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def stages_through_host(backend: str | None, device: torch.device) -> bool:
    """Whether a collective of a ``backend`` group on a tensor on ``device`` must go through host memory.

    gloo's CUDA-tensor paths differ by collective and torch version (pytorch#149869 charts them; one silently
    corrupted results until pytorch#170812), so a gloo group always works on CPU copies. That is what lets several
    ranks share one GPU, which NCCL refuses (scripts/gpu_cp_matrix.py). NCCL groups and CPU tensors are untouched.
    """
    return backend == "gloo" and device.type != "cpu"


def run_collective(collective, tensors: tuple[torch.Tensor, ...], stage: bool, **kwargs) -> None:
    """``collective(*tensors, **kwargs)``, whose result lands in ``tensors[0]`` (the output, or the in-place tensor).

    With ``stage`` it runs on CPU copies of ``tensors`` and copies the result back into ``tensors[0]``; a summing
    ``all_reduce`` is then done as ``rank_order_sum``.
    """
    if not stage:
        collective(*tensors, **kwargs)
        return
    if collective is dist.all_reduce and kwargs.get("op", dist.ReduceOp.SUM) == dist.ReduceOp.SUM:
        tensors[0].copy_(rank_order_sum(tensors[0].to("cpu", copy=True), kwargs.get("group")))
        return
    host = [t.to("cpu", copy=True) for t in tensors]
    collective(*host, **kwargs)
    tensors[0].copy_(host[0])


# While ``megacp.cuda_graph`` captures a step, a collective staged through the host (gloo on CUDA tensors) cannot be
# recorded in the graph: it is handed to this callback instead, which ends the graph piece being captured, runs the
# collective eagerly and replays it between the pieces (``cut_graphs_at_host_collectives``).
_host_collective_cut: Callable[[Callable[[], None]], None] | None = None


@contextmanager
def cut_graphs_at_host_collectives(cut: Callable[[Callable[[], None]], None] | None) -> Iterator[None]:
    """Within this block every host-staged collective of a ``ParallelGroup`` calls ``cut(run)`` instead of running:
    ``run()`` performs it (result in its output tensor, as always), ``cut`` decides when (``PiecewiseGraph``).
    ``cut=None``: collectives run directly again (what runs *between* graph pieces)."""
    global _host_collective_cut
    previous, _host_collective_cut = _host_collective_cut, cut
    try:
        yield
    finally:
        _host_collective_cut = previous


def graph_capture_cut() -> Callable[[Callable[[], None]], None] | None:
    """The callback of ``cut_graphs_at_host_collectives`` while a CUDA graph is captured piecewise, else None: a
    layer whose work cannot be recorded (``MoELayer`` when its routing needs the host) hands it ``run`` the same way."""
    return _host_collective_cut


def rank_order_sum(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The sum over ``group`` of every rank's CPU tensor ``x``, added in rank order in float32 and rounded once.

    Why not gloo's own all_reduce: its ring adds each element in an order set by the tensor's size, so a bfloat16
    row summed over more than two ranks rounds differently in a batch of 17 rows than in one of 24 (a CUDA graph's
    padded bucket), and greedy tokens could differ between graph and eager decode. Here a row's result depends on
    nothing but that row.
    """
    world = dist.get_world_size(group)
    flat = x.reshape(-1)
    gathered = flat.new_empty(world * flat.numel())
    _all_gather_flat(gathered, flat, group=group)
    parts = gathered.view(world, -1)
    total = parts[0].float()
    for r in range(1, world):
        total += parts[r].float()
    return total.to(x.dtype).view(x.shape)


class CollectiveError(RuntimeError):
    """A collective failed because a peer died or did not join it within the group's timeout.

    The message names the group, its ranks, the peer (when the group has one other rank) and the timeout to raise.
    """


def _is_peer_failure(e: BaseException) -> bool:
    """A transport failure (dead or stuck peer) rather than a usage error of the collective (wrong shapes, ...)."""
    if isinstance(e, dist.DistError):
        return True
    msg = str(e)
    return any(s in msg for s in ("gloo", "Timed out", "timed out", "Connection", "connection", "NCCL", "Broken pipe"))


def collective_error(group_name: str, ranks: list[int], rank: int, op: str, timeout: timedelta | None,
                     e: BaseException) -> CollectiveError:
    """The ``CollectiveError`` for ``op`` on a group that failed with ``e``, seen from world rank ``rank``."""
    others = [r for r in ranks if r != rank]
    peer = f"peer rank {others[0]}" if len(others) == 1 else f"one of the peer ranks {others}"
    limit = f"{timeout.total_seconds():g} s" if timeout is not None else "the default timeout"
    # gloo's text: "[.../pair.cc:537] Read error [ip]:port: Connection reset by peer. This is typically ..."
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    first_line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first_line).split(". ")[0]
    return CollectiveError(
        f"{op} on the {group_name} group (ranks {ranks}) failed on rank {rank}: {peer} died or did not join within "
        f"{limit} ({first_line}); check that rank's own error first. If it is only slow (a long model load, a "
        f"stopped process), raise the timeout: --dist-timeout SECONDS in examples/infer_llama.py, "
        f"initialize_model_parallel(timeout=...) in the API"
    )


class ParallelGroup:
    """One process group seen from this rank: its members and the collectives the layers need.

    Every collective returns its input unchanged when ``world_size == 1`` (then ``device_group`` may be None).
    ``all_gather``, ``reduce_scatter`` and ``all_reduce`` are differentiable when the input requires grad.
    """

    def __init__(self, name: str, ranks: list[int], device_group: dist.ProcessGroup | None, rank: int,
                 timeout: timedelta | None = None, symmetric_memory: bool = False):
        self.name = name
        self.ranks = list(ranks)
        self.rank = rank
        self.rank_in_group = self.ranks.index(rank)
        self.world_size = len(self.ranks)
        self.device_group = device_group
        self.backend = dist.get_backend(device_group) if device_group is not None else None
        self.timeout = timeout  # only for error messages: the process group enforces it
        # small CUDA all-gathers over NVLink (megacp/symm_gather.py), made on first use when ``symmetric_memory``
        # (the world's agreed MEGACP_SYMM_MEM) allows it
        self.symmetric_memory = symmetric_memory
        self.symmetric: SymmetricGather | None = None

    def __repr__(self) -> str:
        return f"ParallelGroup({self.name}, ranks={self.ranks}, rank_in_group={self.rank_in_group})"

    def _collective(self, collective, *tensors: torch.Tensor, **kwargs) -> None:
        """Every collective goes through here: result in ``tensors[0]``; gloo + CUDA is staged through the host.

        A dead or stuck peer raises ``CollectiveError`` naming this group, the peer and the timeout. A staged
        collective met while a CUDA graph is captured goes to ``cut_graphs_at_host_collectives``'s callback.
        """
        stage = stages_through_host(self.backend, tensors[0].device)

        def run() -> None:
            with self._peer_failures(getattr(collective, "__name__", "collective")):
                run_collective(collective, tensors, stage, group=self.device_group, **kwargs)

        if stage and _host_collective_cut is not None:
            _host_collective_cut(run)  # a CUDA graph is being captured: it runs ``run`` between graph pieces
        else:
            run()

    @contextmanager
    def _peer_failures(self, op: str) -> Iterator[None]:
        """Turns a transport failure inside the block (a dead or stuck peer) into this group's ``CollectiveError``;
        other errors (a usage error of the collective) pass unchanged."""
        if self.device_group is None:  # a layout without communicators (ParallelContext.from_layout(new_group=None))
            raise RuntimeError(
                f"{op} on the {self.name} group (ranks {self.ranks}): this group describes a layout only and has no "
                f"process group; build the ParallelContext with initialize_model_parallel(...)"
            )
        try:
            yield
        except RuntimeError as e:
            if not _is_peer_failure(e):
                raise
            raise collective_error(self.name, self.ranks, self.rank, op, self.timeout, e) from e

    def _needs_autograd(self, x: torch.Tensor) -> bool:
        return x.requires_grad and torch.is_grad_enabled()

    def _split_size(self, x: torch.Tensor, dim: int, op: str) -> int:
        if x.shape[dim] % self.world_size != 0:
            raise ValueError(
                f"{self.name}.{op}: dim {dim} of shape {tuple(x.shape)} must be divisible by the group size "
                f"{self.world_size}; pad it to a multiple of {self.world_size}"
            )
        return x.shape[dim] // self.world_size

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's ``x`` (equal shapes) along ``dim`` in group order: ``[.., n, ..] -> [.., W·n, ..]``."""
        if self.world_size == 1:
            return x
        if self._needs_autograd(x):
            return _AllGather.apply(x, self, dim)
        return self._all_gather(x, dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum over ranks, keep this rank's equal slice along ``dim``: ``[.., W·n, ..] -> [.., n, ..]``."""
        if self.world_size == 1:
            return x
        if self._needs_autograd(x):
            return _ReduceScatter.apply(x, self, dim)
        return self._reduce_scatter(x, dim)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks. In place on ``x`` unless it requires grad (then a new, differentiable tensor)."""
        if self.world_size == 1:
            return x
        if self._needs_autograd(x):
            return _AllReduce.apply(x, self)
        self._collective(dist.all_reduce, x)
        return x

    def all_to_all(self, x: torch.Tensor, scatter_dim: int = 0, gather_dim: int = 0) -> torch.Tensor:
        """Split ``x`` into W equal chunks along ``scatter_dim``, send chunk i to rank i, concatenate the chunks
        received (in group order) along ``gather_dim``."""
        if self.world_size == 1:
            return x
        scatter_dim, gather_dim = scatter_dim % x.dim(), gather_dim % x.dim()
        chunk = self._split_size(x, scatter_dim, "all_to_all")
        send = x.movedim(scatter_dim, 0).contiguous()
        recv = torch.empty_like(send)
        self._collective(dist.all_to_all_single, recv, send)
        # recv: [W·chunk, rest...], block i from rank i -> W tensors shaped like x with chunk rows on scatter_dim
        pieces = recv.reshape(self.world_size, chunk, *send.shape[1:]).movedim(1, scatter_dim + 1).unbind(0)
        return torch.cat(pieces, dim=gather_dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy ``x`` of group rank ``src`` into ``x`` on every rank (in place); returns ``x``."""
        if self.world_size == 1:
            return x
        self._collective(dist.broadcast, x, src=self.ranks[src])
        return x

    def barrier(self) -> None:
        if self.world_size > 1:
            with self._peer_failures("barrier"):
                dist.barrier(group=self.device_group)

    def all_gather_object(self, obj: object) -> list[object]:
        """Every rank's picklable ``obj``, in group order (host-side; for reports and verdicts, not tensors)."""
        if self.world_size == 1:
            return [obj]
        # Pickled bytes in uint8 tensors, not dist.all_gather_object: that one unpickles through Tensor.numpy(), so a
        # minimal install (torch without numpy) could not run two ranks.
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
        sizes = torch.empty(self.world_size, dtype=torch.int64, device=device)
        self._collective(_all_gather_flat, sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=device))
        sizes_host = sizes.tolist()
        width = max(sizes_host)
        padded = torch.zeros(width, dtype=torch.uint8, device=device)
        padded[: payload.numel()] = payload
        gathered = torch.empty(self.world_size * width, dtype=torch.uint8, device=device)
        self._collective(_all_gather_flat, gathered, padded)
        rows = gathered.cpu().view(self.world_size, width)
        return [pickle.loads(bytes(rows[i, :n].clone().untyped_storage())) for i, n in enumerate(sizes_host)]

    def first_error(self, error: str | None) -> str | None:
        """Collective: each rank passes its own error message (None if fine); every rank gets back the first one in
        group order, or None. Lets a check that can fail on some ranks only (a shard with NaN weights, a rank short
        of memory) fail on all of them with the same message instead of leaving the others waiting."""
        return next((g for g in self.all_gather_object(error) if g is not None), None)  # type: ignore[misc]

    # Flat collectives: gloo only has the flat tensor versions, so move `dim` to the front and back.
    def _all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        dim = dim % x.dim()
        front = x.movedim(dim, 0).contiguous()
        out = None
        if symm_gather.applies(self.backend, front, self.world_size, self.symmetric_memory):  # decode-sized, NCCL
            if self.symmetric is None:
                self.symmetric = SymmetricGather(self.device_group.group_name, self.world_size, self.rank_in_group,
                                                 self._all_agree)
            out = self.symmetric.gather(front)
        if out is None:
            out = torch.empty((self.world_size * front.shape[0], *front.shape[1:]), dtype=x.dtype, device=x.device)
            self._collective(_all_gather_flat, out, front)
        return out.movedim(0, dim).contiguous() if dim else out

    def _all_agree(self, ok: bool) -> bool:
        """True on every rank if ``ok`` is on every rank (a MIN all-reduce of a flag)."""
        flag = torch.tensor([int(ok)], dtype=torch.int32, device="cuda" if self.backend == "nccl" else "cpu")
        self._collective(dist.all_reduce, flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def release_symmetric_buffers(self) -> None:
        """Drop this group's symmetric-memory buffers (``destroy_model_parallel`` does, before destroying groups)."""
        if self.symmetric is not None:
            self.symmetric.release()

    def _reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        dim = dim % x.dim()
        n = self._split_size(x, dim, "reduce_scatter")
        front = x.movedim(dim, 0).contiguous()
        out = torch.empty((n, *front.shape[1:]), dtype=x.dtype, device=x.device)
        self._collective(_reduce_scatter_flat, out, front, op=dist.ReduceOp.SUM)
        return out.movedim(0, dim).contiguous() if dim else out


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ParallelGroup, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return group._all_gather(x, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.group._reduce_scatter(grad, ctx.dim), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ParallelGroup, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return group._reduce_scatter(x, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.group._all_gather(grad, ctx.dim), None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ParallelGroup) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        group._collective(dist.all_reduce, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        ctx.group._collective(dist.all_reduce, grad)
        return grad, None


__all__ = ["CollectiveError", "ParallelGroup", "collective_error", "cut_graphs_at_host_collectives", "graph_capture_cut",
           "rank_order_sum", "run_collective", "stages_through_host"]
