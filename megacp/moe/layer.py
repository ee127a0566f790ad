"""The MoE layer: softmax top-k router, SwiGLU experts, optional gated shared expert (Mixtral, Qwen2-MoE).

Token flow over the flattened ``dp·pcp·tp`` expert group (DESIGN §4), ``T`` local tokens per rank:

1. Ranks of one attention-TP group hold the *same* tokens, ranks of different PCP/DP groups hold *different* numbers
   of different tokens. Each TP rank therefore contributes only its ``1/tp`` slice of the local tokens (the
   "sequence parallel" split), so the gathered set holds every distinct token exactly once and the router runs
   once per token. The slice and its router logits are all-gathered over the expert group: counts first, then
   slices padded to the largest count (gloo has no uneven all-gather), then unpadded.
2. Every rank runs its part of the experts on all gathered tokens: without EP its ``1/flat_size`` slice of every
   expert's intermediate dimension, with EP only the (token, expert) pairs whose expert is local. Either way the
   result is a partial sum, and each routed (token, expert) pair is computed exactly once across the group.
   The shared expert is always sharded over the intermediate dimension of the flattened group.
3. The partial sums are reduce-scattered back by the same padded chunks (each rank gets the full output of the
   slice it contributed) and all-gathered inside the TP group to restore the rank's ``T`` tokens.

Decode tokens that every PCP rank runs (DESIGN §3) are simply treated as different tokens: redundant, still exact.
The math (``route``, ``swiglu``, ``expert_forward``) is pure and tested against transformers without processes.

Backward: the expert-group all-gather and reduce-scatter are each other's conjugates (``ParallelGroup``), and the TP
split of step 1 and the TP all-gather of step 3 are wrapped in Megatron's sequence-parallel pair (split ↔ all-gather),
so the input gradient is whole and the same on every TP rank, like any TP-replicated activation's. Parameter
gradients (``grad_reduce_groups``, summed by ``parallel_state.allreduce_grads``): the experts and the shared expert
run on every token, so theirs are complete; the router and the shared-expert gate are replicated but each rank
applies them to part of the work, so theirs are summed over the whole expert group.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megacp import parallel_state
from megacp.moe.config import MoEParallelConfig, determine_expert_map
from megacp.ops import decode_fused, moe_combine
from megacp.parallel_state import ParallelContext, resolve_parallel_context
from megacp.weights import load_shard

_EXPERT_PROJ_ALIASES = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj",
                        "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Mixtral names its projections w1/w3/w2
_PER_EXPERT_NAME = re.compile(r"^experts\.(\d+)\.(\w+)\.weight$")


# ----------------------------------------------------------------------------------------------- pure math
def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts (in float32), then top-k; optionally renormalise the k weights to sum to 1.

    router_logits: [N, E] -> (weights float32 [N, k], expert ids long [N, k]). Mixtral always renormalises;
    Qwen2-MoE does when its config's ``norm_topk_prob`` is true.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def silu_mul(gate_up: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up`` [N, 2I] (gate columns then up) -> [N, I]; ``fused``: one kernel where
    ``decode_fused.available`` (CUDA, no gradient; exact), else the PyTorch ops."""
    if fused and decode_fused.available(gate_up):
        return decode_fused.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))``. x: [N, H], w13: [2I, H] (gate rows then up rows), w2: [H, I] -> [N, H].
    ``fused``: see ``silu_mul``."""
    return F.linear(silu_mul(F.linear(x, w13), fused), w2)


def expert_forward(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted sum of the routed experts that are local; non-local (token, expert) pairs contribute nothing.

    x: [N, H]; w13: [E_local, 2I, H]; w2: [E_local, H, I]; topk_weights/topk_ids: [N, k] (global expert ids);
    expert_map: [E] global -> local index or -1 (None: all experts local, identity) -> [N, H] in x.dtype.
    Accumulates in float32 (the router weights are float32), casts once at the end.
    """
    local_ids = topk_ids if expert_map is None else expert_map[topk_ids]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        token_idx, k_pos = torch.where(local_ids == e)
        if token_idx.numel() == 0:
            continue
        y = swiglu(x[token_idx], w13[e], w2[e]).float() * topk_weights[token_idx, k_pos, None]
        out.index_add_(0, token_idx, y)
    return out.to(x.dtype)


def expert_forward_grouped(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """``expert_forward`` with fixed shapes and no host sync: two grouped GEMMs (``torch._grouped_mm``) over the
    (token, expert) pairs sorted by local expert, so a CUDA graph can capture it. Same arguments and result.

    Every one of the ``N·k`` pairs is computed once: the pairs are sorted by local expert id (non-local pairs last,
    outside every group: their rows are never read), each expert's rows form one group of the GEMMs, and each token
    sums its pairs' weighted rows in float32 (``megacp.ops.moe_combine``). Inference only (the grouped GEMM has no
    autograd on every build); ``grouped_experts_usable`` says when it applies. ``fused`` (a layer's
    ``fused_decode``): on CUDA, SiLU·mul and the combine run as one Triton kernel each (``decode_fused.silu_mul``:
    exact; ``moe_combine.combine_rows_fused``: the float32 sum in a fixed order), else as PyTorch ops.
    """
    n, k = topk_ids.shape
    e_local = w13.shape[0]
    if n == 0:
        return x.new_zeros(x.shape)
    local_ids = (topk_ids if expert_map is None else expert_map[topk_ids]).flatten()  # [N·k]
    local_ids = torch.where(local_ids < 0, e_local, local_ids)  # non-local pairs sort after every local group
    order = torch.argsort(local_ids, stable=True)  # [N·k]: pair indices grouped by expert
    counts = torch.zeros(e_local + 1, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, local_ids, torch.ones_like(local_ids, dtype=torch.int32))
    offs = counts[:e_local].cumsum(0, dtype=torch.int32)  # [E_local] end of each expert's rows
    gate_up = torch._grouped_mm(x[order // k], w13.transpose(1, 2), offs=offs)  # [N·k, 2I]
    y = torch._grouped_mm(silu_mul(gate_up, fused), w2.transpose(1, 2), offs=offs)  # [N·k, H]; rows past offs[-1]: junk
    # pos[t, j]: the sorted row of pair (t, j) (the inverse permutation of order), -1 for a non-local pair
    pos = torch.empty_like(order).scatter_(0, order, torch.arange(n * k, device=x.device))
    pos = torch.where(local_ids < e_local, pos, -1).view(n, k)
    combine = moe_combine.combine_rows_fused if fused and moe_combine.available(y) else moe_combine.combine_rows
    return combine(y, pos, topk_weights, x.dtype)


def grouped_experts_usable(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether ``expert_forward_grouped`` runs here without a host sync: no gradient is wanted, the grouped GEMM
    exists, the rows are 16-byte aligned (its stride rule), and on CUDA the tensors are bfloat16 on sm_90+ (other
    CUDA cases take PyTorch's per-group fallback, which reads the offsets on the host)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w13.requires_grad or w2.requires_grad):
        return False
    item = x.element_size()
    if any(d * item % 16 for d in (x.shape[-1], w13.shape[1], w2.shape[-1])) or w13.dtype != x.dtype:
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.device.type == "cpu"


def shard_range(size: int, num_shards: int, shard: int) -> tuple[int, int]:
    """Balanced ``[start, end)`` of ``shard`` when ``size`` is split into ``num_shards`` (sizes differ by <= 1)."""
    return shard * size // num_shards, (shard + 1) * size // num_shards


# ----------------------------------------------------------------------------------------------- TP token split
class _SplitTokensToTP(torch.autograd.Function):
    """Forward: rows ``[rank·chunk, (rank+1)·chunk)`` of the TP-replicated ``x``; backward: all-gather the slices'
    gradients over TP, so every rank gets the whole (same) input gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, chunk: int) -> torch.Tensor:
        ctx.group, ctx.chunk, ctx.num_tokens = group, chunk, x.shape[0]
        start = group.rank_in_group * chunk
        return x[start : start + chunk].clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _gather_rows(grad, ctx.group, ctx.chunk, ctx.num_tokens), None, None


class _GatherTokensFromTP(torch.autograd.Function):
    """Forward: all-gather every TP rank's slice back into the ``num_tokens`` rows; backward: this rank's slice of
    the (TP-replicated) output gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, chunk: int, num_tokens: int) -> torch.Tensor:
        ctx.group, ctx.chunk, ctx.rows = group, chunk, x.shape[0]
        return _gather_rows(x, group, chunk, num_tokens)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        start = ctx.group.rank_in_group * ctx.chunk
        return grad[start : start + ctx.rows].contiguous(), None, None, None


def _gather_rows(x: torch.Tensor, group: Any, chunk: int, num_tokens: int) -> torch.Tensor:
    """Pad this rank's ``x`` [n ≤ chunk, H] to ``chunk`` rows, all-gather over ``group``, keep ``num_tokens`` rows."""
    padded = x.new_zeros(chunk, *x.shape[1:])
    padded[: x.shape[0]] = x
    return group.all_gather(padded)[:num_tokens]


# ----------------------------------------------------------------------------------------------- the layer
class MoELayer(nn.Module):
    """Sparse MoE block on local tokens: ``forward(hidden [T, H]) -> [T, H]`` (the routed experts plus, when
    ``shared_expert_intermediate_size`` is set, ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``, or the
    ungated ``shared_expert(x)`` with ``shared_expert_gate=False``).

    Subclasses change the routing through ``router_logits`` / ``select_experts`` (``megacp.moe.deepseek``), the
    shared expert's checkpoint name through ``SHARED_PREFIX``, and whether the router logits are computed once per
    token and sent with it (``LOGITS_TRAVEL_WITH_TOKENS``) or on every rank from the gathered tokens.

    Parameters (this rank's shares, trainable, in ``params_dtype``): ``router_weight [E, H]`` (replicated),
    ``w13 [E_local, 2·I_shard, H]`` (gate rows then up rows), ``w2 [E_local, H, I_shard]``, and for the shared expert
    ``shared_w13 [2·S_shard, H]``, ``shared_w2 [H, S_shard]``, ``shared_gate_weight [1, H]`` (replicated). Load them
    with ``load_weight``. ``parallel_context`` (``resolve_parallel_context``: given, else parallel_state's, else a
    single rank) gives the EP and TP groups; ``parallel_config`` defaults to ``MoEParallelConfig.make`` of it.
    """

    SHARED_PREFIX = "shared_expert"  # checkpoint name of the shared expert (Qwen2-MoE)
    LOGITS_TRAVEL_WITH_TOKENS = True  # router once per token, its logits gathered with the token

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        shared_expert_intermediate_size: int | None = None,
        parallel_config: MoEParallelConfig | None = None,
        placement: str = "linear",
        params_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        parallel_context: ParallelContext | None = None,
        shared_expert_gate: bool = True,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoELayer: top_k (num_experts_per_tok) must be in 1..{num_experts}, got {top_k}")
        self.parallel_context = resolve_parallel_context(parallel_context)
        cfg = parallel_config or MoEParallelConfig.make(parallel_context=self.parallel_context)
        self.parallel_config = cfg
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.shared_expert_gate = bool(shared_expert_intermediate_size) and shared_expert_gate
        self._groups_checked = False
        # Triton SiLU·mul and expert combine at inference on CUDA ($MEGACP_FUSED_DECODE, read once, not per step)
        self.fused_decode = decode_fused.enabled()

        self.num_local_experts, expert_map = determine_expert_map(cfg.ep_size, cfg.ep_rank, num_experts, placement)
        self.register_buffer("expert_map", expert_map, persistent=False)
        # Routed experts: sharded over the intermediate dim by the config's tp (flat group without EP, 1 with EP).
        self._expert_shard = shard_range(intermediate_size, cfg.tp_size, cfg.tp_rank)
        i_shard = self._expert_shard[1] - self._expert_shard[0]
        kw = {"dtype": params_dtype or torch.get_default_dtype(), "device": device}
        # Gradient groups (see the module docstring). With one rank in the expert group the layer is plain local
        # math on this rank's tokens: every parameter is then replicated like a dense one.
        if cfg.flat_size == 1:
            expert_groups = replicated_groups = parallel_state.DENSE_GRAD_GROUPS
        else:
            expert_groups, replicated_groups = parallel_state.NO_GRAD_GROUPS, parallel_state.EXPERT_GROUP_GRAD_GROUPS

        def param(*shape: int, groups: tuple[str, ...]) -> nn.Parameter:
            p = nn.Parameter(torch.empty(*shape, **kw))
            p.grad_reduce_groups = groups
            return p

        self.router_weight = param(num_experts, hidden_size, groups=replicated_groups)
        self.w13 = param(self.num_local_experts, 2 * i_shard, hidden_size, groups=expert_groups)
        self.w2 = param(self.num_local_experts, hidden_size, i_shard, groups=expert_groups)
        if shared_expert_intermediate_size:
            # The shared expert sees every token, so it is always sharded over the whole flattened group.
            self._shared_shard = shard_range(shared_expert_intermediate_size, cfg.flat_size, cfg.flat_rank)
            s_shard = self._shared_shard[1] - self._shared_shard[0]
            self.shared_w13 = param(2 * s_shard, hidden_size, groups=expert_groups)
            self.shared_w2 = param(hidden_size, s_shard, groups=expert_groups)
            if self.shared_expert_gate:
                self.shared_gate_weight = param(1, hidden_size, groups=replicated_groups)
        # Global expert id of each local expert, for the loaders.
        if expert_map is None:
            self.local_expert_ids = list(range(num_experts))
        else:
            local = torch.nonzero(expert_map >= 0).flatten()
            by_local_index = torch.empty_like(local)
            by_local_index[expert_map[local]] = local
            self.local_expert_ids = by_local_index.tolist()

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [T, H] (this rank's tokens) -> [T, H].

        A collective over the flattened group: every rank calls it the same number of times, also with ``T = 0``.
        """
        cut = parallel_state.graph_capture_cut()
        if cut is not None and not self.capturable(hidden):
            out = torch.empty_like(hidden)  # a graph tensor: the eager block writes it between the graph's pieces
            cut(lambda: out.copy_(self._forward(hidden)))
            return out
        return self._forward(hidden)

    def capturable(self, hidden: torch.Tensor) -> bool:
        """Whether a CUDA graph can record this block on ``hidden``'s device and dtype: a one-rank expert group (no
        token counts to exchange) whose experts take the sync-free grouped path (``grouped_experts_usable``)."""
        return self.parallel_config.flat_size == 1 and grouped_experts_usable(hidden, self.w13, self.w2)

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.parallel_config.flat_size == 1:
            return self.partial_forward(hidden, self.router_logits(hidden))
        return self._distributed_forward(hidden)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, H] -> [N, E]."""
        return F.linear(x, self.router_weight)

    def select_experts(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """router_logits [N, E] -> (weights float32 [N, k], expert ids long [N, k]): softmax top-k (``route``)."""
        return route(router_logits, self.top_k, self.renormalize)

    def partial_forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """This rank's share of the MoE output for tokens x: [N, H] with router_logits [N, E] -> [N, H]."""
        weights, ids = self.select_experts(router_logits)
        if grouped_experts_usable(x, self.w13, self.w2):
            out = expert_forward_grouped(x, self.w13, self.w2, weights, ids, self.expert_map, self.fused_decode)
        else:
            out = expert_forward(x, self.w13, self.w2, weights, ids, self.expert_map)
        if self.shared_expert_intermediate_size:
            shared = swiglu(x, self.shared_w13, self.shared_w2, self.fused_decode)
            if self.shared_expert_gate:
                # sigmoid(g(x)) * Σ_r shared_r(x) = Σ_r sigmoid(g(x)) * shared_r(x): gating the partial sum is exact.
                shared = torch.sigmoid(F.linear(x, self.shared_gate_weight)) * shared
            out = out + shared
        return out

    def _distributed_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        cfg = self.parallel_config
        ep_group, tp_group = self._groups()
        num_tokens, h = hidden.shape
        tp = cfg.attn_tp_size
        # 1. This TP rank's slice of the (TP-replicated) local tokens, with its router logits.
        chunk = -(-num_tokens // tp)
        mine = hidden if tp == 1 else _SplitTokensToTP.apply(hidden, tp_group, chunk)
        n_mine = mine.shape[0]
        # [n_mine, H + E] with the logits, else [n_mine, H]
        payload = torch.cat([mine, self.router_logits(mine)], dim=1) if self.LOGITS_TRAVEL_WITH_TOKENS else mine
        counts = ep_group.all_gather(torch.tensor([n_mine], dtype=torch.long, device=hidden.device))  # [flat]
        max_count = int(counts.max())
        if max_count == 0:  # no rank has tokens (every rank sees the same counts, so all return here)
            return hidden.new_zeros(hidden.shape)
        padded = payload.new_zeros(max_count, payload.shape[1])
        padded[:n_mine] = payload
        gathered = ep_group.all_gather(padded)  # [flat * max_count, H + E]; backward: reduce-scatter
        valid = (torch.arange(max_count, device=hidden.device)[None, :] < counts[:, None]).flatten()
        tokens = gathered[valid]
        # 2. This rank's partial sum for every distinct token.
        logits = tokens[:, h:] if self.LOGITS_TRAVEL_WITH_TOKENS else self.router_logits(tokens)
        partial = self.partial_forward(tokens[:, :h], logits)
        # 3. Sum the partials and hand each rank the slice it contributed, then rebuild the TP group's tokens.
        back = partial.new_zeros(valid.shape[0], h)
        back[valid] = partial
        mine_out = ep_group.reduce_scatter(back)[:n_mine]  # [n_mine, H]; backward: all-gather
        if tp == 1:
            return mine_out
        return _GatherTokensFromTP.apply(mine_out, tp_group, chunk, num_tokens)

    def _groups(self) -> tuple[Any, Any]:
        """The context's EP and TP groups, checked once against the config (at the first distributed forward: a
        config may be made for another rank's layout to build or load that rank's shard, as tests do)."""
        cfg, ctx = self.parallel_config, self.parallel_context
        if not self._groups_checked:
            if (ctx.ep_size, ctx.ep_rank) != (cfg.flat_size, cfg.flat_rank):
                raise ValueError(
                    f"MoELayer: the expert group has size {ctx.ep_size} and rank {ctx.ep_rank}, but the "
                    f"MoEParallelConfig says dp·pcp·tp = {cfg.flat_size} and flat rank {cfg.flat_rank}; build the "
                    f"config with MoEParallelConfig.make(parallel_context=...) of the layer's context"
                )
            if cfg.attn_tp_size > 1 and (ctx.tp_size, ctx.tp_rank) != (cfg.attn_tp_size, cfg.attn_tp_rank):
                raise ValueError(
                    f"MoELayer: the TP group has size {ctx.tp_size} and rank {ctx.tp_rank}, the MoEParallelConfig "
                    f"expects attention TP size {cfg.attn_tp_size} and rank {cfg.attn_tp_rank}; build the config "
                    f"with MoEParallelConfig.make(parallel_context=...) of the layer's context"
                )
            self._groups_checked = True
        return ctx.ep, ctx.tp

    # ------------------------------------------------------------------------------------------- loading
    def _named_shapes(self) -> dict[str, tuple[int, ...]]:
        """Full shapes of the block's tensors other than per-expert ones (``checkpoint_shape`` adds those)."""
        h, i, e, s = self.hidden_size, self.intermediate_size, self.num_experts, self.shared_expert_intermediate_size
        shapes = {"gate.weight": (e, h), "experts.gate_up_proj": (e, 2 * i, h), "experts.down_proj": (e, h, i)}
        if s:
            p = self.SHARED_PREFIX
            shapes.update({f"{p}.gate_proj.weight": (s, h), f"{p}.up_proj.weight": (s, h),
                           f"{p}.down_proj.weight": (h, s)})
            if self.shared_expert_gate:
                shapes["shared_expert_gate.weight"] = (1, h)
        return shapes

    def checkpoint_names(self, fused_experts: bool = False,
                         expert_proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> list[str]:
        """Every tensor of this block in a checkpoint (relative to ``model.layers.N.mlp.``): the experts per expert
        (``experts.{e}.{name}.weight`` for each of ``expert_proj_names``) or, with ``fused_experts``, transformers
        v5's ``experts.gate_up_proj`` / ``experts.down_proj``."""
        names = [n for n in self._named_shapes() if n.startswith("experts.") == fused_experts or
                 not n.startswith("experts.")]
        if not fused_experts:
            names += [f"experts.{e}.{p}.weight" for e in range(self.num_experts) for p in expert_proj_names]
        return names

    def checkpoint_shape(self, name: str) -> tuple[int, ...]:
        """Full shape of checkpoint tensor ``name`` (relative to ``model.layers.N.mlp.``, names as in ``load_weight``).

        The one statement of the MoE block's checkpoint schema: ``load_weight`` checks against it and the model's
        ``hf_weight_shapes`` reads it. ValueError for a name this layer does not have.
        """
        shapes = self._named_shapes()
        if name in shapes:
            return shapes[name]
        match = _PER_EXPERT_NAME.match(name)
        if match and match.group(2) in _EXPERT_PROJ_ALIASES:
            h, i = self.hidden_size, self.intermediate_size
            return (h, i) if _EXPERT_PROJ_ALIASES[match.group(2)] == "down_proj" else (i, h)
        raise ValueError(
            f"MoELayer.load_weight: unknown MoE weight {name!r} (expected experts.<e>.<gate_proj|up_proj|"
            f"down_proj>.weight, {', '.join(shapes)}"
            + (")" if self.shared_expert_intermediate_size else "; this layer has no shared expert)")
        )

    def load_weight(self, name: str, weight: Any) -> bool:
        """Load one checkpoint tensor named relative to the HF MoE block (``model.layers.N.mlp.`` stripped).

        Accepted names: ``gate.weight`` [E, H]; per expert ``experts.{e}.{gate_proj|up_proj|down_proj}.weight``
        (or Mixtral's ``w1|w3|w2``); the fused layout of transformers v5 ``experts.gate_up_proj`` [E, 2I, H] and
        ``experts.down_proj`` [E, H, I]; ``<SHARED_PREFIX>.{gate_proj|up_proj|down_proj}.weight`` and (gated)
        ``shared_expert_gate.weight`` [1, H]. ``weight`` is a tensor or a lazy safetensors slice (``get_slice``):
        only this rank's share is read. Returns False when the tensor belongs to another rank's expert.
        """
        full = self.checkpoint_shape(name)
        match = _PER_EXPERT_NAME.match(name)
        if match:
            return self.load_expert_weight(int(match.group(1)), match.group(2), weight)
        if name == "gate.weight":
            load_shard(self.router_weight, weight, (slice(None),), full)
        elif name == "shared_expert_gate.weight":
            load_shard(self.shared_gate_weight, weight, (slice(None),), full)
        elif name == "experts.gate_up_proj":
            # Fused [E, 2I, H]: gate rows 0..I, up rows I..2I; this rank needs rows [s, e) of each half.
            s, e = self._expert_shard
            i = self.intermediate_size
            for local, g in enumerate(self.local_expert_ids):
                load_shard(self.w13[local, : e - s], weight, (slice(g, g + 1), slice(s, e)), full)
                load_shard(self.w13[local, e - s:], weight, (slice(g, g + 1), slice(i + s, i + e)), full)
            return bool(self.local_expert_ids)
        elif name == "experts.down_proj":
            s, e = self._expert_shard
            for local, g in enumerate(self.local_expert_ids):
                load_shard(self.w2[local], weight, (slice(g, g + 1), slice(None), slice(s, e)), full)
            return bool(self.local_expert_ids)
        else:  # <SHARED_PREFIX>.{gate_proj,up_proj,down_proj}.weight
            s, e = self._shared_shard
            proj = name[len(self.SHARED_PREFIX) + 1:]
            if proj == "down_proj.weight":
                load_shard(self.shared_w2, weight, (slice(None), slice(s, e)), full)
            else:
                rows = slice(0, e - s) if proj == "gate_proj.weight" else slice(e - s, 2 * (e - s))
                load_shard(self.shared_w13[rows], weight, (slice(s, e),), full)
        return True

    def load_expert_weight(self, expert_id: int, name: str, weight: Any) -> bool:
        """Load one expert's projection (``gate_proj``/``up_proj`` [I, H], ``down_proj`` [H, I], or Mixtral's
        ``w1``/``w3``/``w2``) from the full tensor or a lazy slice. Returns False (reads nothing) for a non-local expert.
        """
        if name not in _EXPERT_PROJ_ALIASES:
            raise ValueError(f"MoELayer.load_expert_weight: name must be one of {sorted(_EXPERT_PROJ_ALIASES)}, got {name!r}")
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"MoELayer.load_expert_weight: expert_id {expert_id} is out of range 0..{self.num_experts - 1}")
        local = expert_id if self.expert_map is None else int(self.expert_map[expert_id])
        if local < 0:
            return False
        full = self.checkpoint_shape(f"experts.{expert_id}.{name}.weight")
        proj = _EXPERT_PROJ_ALIASES[name]
        s, e = self._expert_shard
        if proj == "down_proj":
            load_shard(self.w2[local], weight, (slice(None), slice(s, e)), full)
        else:
            rows = slice(0, e - s) if proj == "gate_proj" else slice(e - s, 2 * (e - s))
            load_shard(self.w13[local, rows], weight, (slice(s, e),), full)
        return True
