"""How the experts of an MoE layer are split over ranks (DESIGN §4).

For experts, prefill context parallelism acts like data parallelism: PCP ranks (and DP ranks) hold different tokens
but may share expert weights. So the experts are parallelised over the *flattened* ``dp·pcp·tp`` group, either

* tensor-parallel (default): every rank holds a ``1/flat_size`` slice of every expert's intermediate dimension, or
* expert-parallel (``use_ep``): every rank holds whole experts, about ``num_experts / flat_size`` of them, chosen by
  ``determine_expert_map``.

Both functions here are pure (no process groups); only the defaults of ``MoEParallelConfig.make`` read a
``ParallelContext``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megacp.parallel_state import ParallelContext, ParallelGroup, resolve_parallel_context

EXPERT_PLACEMENTS = ("linear", "round_robin")


@dataclass(frozen=True)
class MoEParallelConfig:
    """Expert parallel layout of one rank (DESIGN §4 fields).

    Two tensor-parallel sizes meet here, so the names say which one they mean:

    * **expert TP** — the fields ``tp_size``/``tp_rank`` (also ``expert_tp_size``/``expert_tp_rank``): how each
      expert is sharded. The flattened ``dp·pcp·tp`` group without EP, 1 with EP.
    * **attention TP** — ``attn_tp_size``/``attn_tp_rank``: parallel_state's TP group, whose ranks hold the same
      tokens. It is what ``make``'s ``tp_size`` argument takes (DESIGN §4 spelling).

    ``ep_size``/``ep_rank`` say how the experts are distributed (1 without EP, the flattened group with EP);
    ``pcp_*`` and ``dp_*`` are the attention-side sizes and ranks the flattening was built from.
    """

    tp_size: int
    tp_rank: int
    pcp_size: int
    pcp_rank: int
    dp_size: int
    dp_rank: int
    ep_size: int
    ep_rank: int
    use_ep: bool

    @staticmethod
    def make(
        tp_size: int | None = None,
        pcp_size: int | None = None,
        dp_size: int | None = None,
        use_ep: bool | None = None,
        tp_rank: int | None = None,
        pcp_rank: int | None = None,
        dp_rank: int | None = None,
        parallel_context: ParallelContext | None = None,
    ) -> "MoEParallelConfig":
        """Flatten (dp, pcp, attention tp) into one expert group.

        ``tp_size``/``tp_rank`` are the *attention* TP size and rank (the context's TP group), not the expert TP
        of the result. Every argument left None comes from ``parallel_context`` (``resolve_parallel_context``: the
        given one, else ``parallel_state``'s, else a single rank) — sizes, ranks, and ``use_ep`` from
        ``initialize_model_parallel(enable_expert_parallel=...)``, the one switch for EP. A rank left None for a size
        other than the context's cannot be known: ``RuntimeError``.
        """
        ctx = resolve_parallel_context(parallel_context)
        sizes = {"tp_size": tp_size, "pcp_size": pcp_size, "dp_size": dp_size}
        for name, default in (("tp_size", ctx.tp_size), ("pcp_size", ctx.pcp_size), ("dp_size", ctx.dp_size)):
            if sizes[name] is None:
                sizes[name] = default
            if isinstance(sizes[name], bool) or not isinstance(sizes[name], int) or sizes[name] < 1:
                raise ValueError(f"MoEParallelConfig.make: {name} must be an integer >= 1, got {sizes[name]!r}")
        tp_size, pcp_size, dp_size = sizes["tp_size"], sizes["pcp_size"], sizes["dp_size"]
        if use_ep is None:
            use_ep = ctx.enable_expert_parallel
        tp_rank = _default_rank("tp_rank", tp_rank, tp_size, ctx.tp)
        pcp_rank = _default_rank("pcp_rank", pcp_rank, pcp_size, ctx.pcp)
        dp_rank = _default_rank("dp_rank", dp_rank, dp_size, ctx.dp)

        flat_size = dp_size * pcp_size * tp_size
        flat_rank = dp_rank * pcp_size * tp_size + pcp_rank * tp_size + tp_rank
        if use_ep:
            return MoEParallelConfig(1, 0, pcp_size, pcp_rank, dp_size, dp_rank, flat_size, flat_rank, True)
        return MoEParallelConfig(flat_size, flat_rank, pcp_size, pcp_rank, dp_size, dp_rank, 1, 0, False)

    # Exactly one of tp_size / ep_size is the flattened size (the other is 1), so these hold in both modes.
    @property
    def flat_size(self) -> int:
        """``dp·pcp·tp``: the number of ranks the experts are spread over."""
        return self.tp_size * self.ep_size

    @property
    def flat_rank(self) -> int:
        """``dp_rank·pcp·tp + pcp_rank·tp + tp_rank``: this rank's index in the flattened expert group."""
        return self.ep_rank * self.tp_size + self.tp_rank

    @property
    def expert_tp_size(self) -> int:
        """How many ranks shard each expert (the ``tp_size`` field)."""
        return self.tp_size

    @property
    def expert_tp_rank(self) -> int:
        return self.tp_rank

    @property
    def attn_tp_size(self) -> int:
        """The attention TP size: ranks of one TP group hold the same (replicated) tokens."""
        return self.flat_size // (self.pcp_size * self.dp_size)

    @property
    def attn_tp_rank(self) -> int:
        return self.flat_rank % self.attn_tp_size


def _default_rank(name: str, rank: int | None, size: int, group: ParallelGroup) -> int:
    """``rank``, or when None the context group's rank (0 for size 1); checked against ``size``."""
    if rank is None:
        if size == 1:
            rank = 0
        elif size == group.world_size:
            rank = group.rank_in_group
        else:
            raise RuntimeError(
                f"MoEParallelConfig.make: {name} is not given and the parallel context's {group.name} group has "
                f"{group.world_size} ranks, not {size}; pass {name}, or call initialize_model_parallel(...) with "
                f"that layout first"
            )
    if not 0 <= rank < size:
        raise ValueError(f"MoEParallelConfig.make: {name}={rank} is out of range for size {size} (use 0..{size - 1})")
    return rank


def expert_counts(ep_size: int, num_experts: int) -> list[int]:
    """Number of experts on each EP rank: ``E // ep``, the first ``E % ep`` ranks get one more."""
    base, extra = divmod(num_experts, ep_size)
    return [base + (1 if r < extra else 0) for r in range(ep_size)]


def determine_expert_map(
    ep_size: int, ep_rank: int, num_experts: int, placement: str = "linear"
) -> tuple[int, torch.Tensor | None]:
    """Which experts live on ``ep_rank``.

    Returns ``(num_local, expert_map)``: ``expert_map: LongTensor [num_experts]`` gives each global expert's index
    among this rank's local experts, ``-1`` when it lives elsewhere; ``None`` when ``ep_size == 1`` (all local).
    ``linear`` gives each rank a contiguous range; ``round_robin`` gives rank r experts ``r, r+ep, r+2ep, …``.
    """
    if placement not in EXPERT_PLACEMENTS:
        raise ValueError(f"expert placement must be one of {EXPERT_PLACEMENTS}, got {placement!r}")
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise ValueError(f"determine_expert_map: need ep_size >= 1 and 0 <= ep_rank < ep_size, got {ep_size}, {ep_rank}")
    if num_experts < 1:
        raise ValueError(f"determine_expert_map: num_experts must be >= 1, got {num_experts}")
    if ep_size == 1:
        return num_experts, None

    counts = expert_counts(ep_size, num_experts)
    num_local = counts[ep_rank]
    if placement == "linear":
        start = sum(counts[:ep_rank])
        local_ids = torch.arange(start, start + num_local)
    else:
        local_ids = torch.arange(ep_rank, num_experts, ep_size)
    expert_map = torch.full((num_experts,), -1, dtype=torch.long)
    expert_map[local_ids] = torch.arange(num_local)
    return num_local, expert_map
