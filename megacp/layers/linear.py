"""Megatron-style tensor-parallel linear layers.

Column parallel: the weight ``[out, in]`` is split along ``out``; each TP rank computes its slice of the output.
Row parallel: the weight is split along ``in``; each rank multiplies its slice of the input and the partial
products are summed with an all-reduce. A column layer followed by a row layer (QKV → o_proj, gate/up → down)
needs exactly one all-reduce.

Every layer has ``weight_loader(param, loaded, ...)``: ``loaded`` is the *full* Hugging Face tensor, or a
safetensors lazy slice; the loader indexes only this rank's rows/columns (``megacp.weights.load_shard``) so
a rank never materialises another rank's shard. ``checkpoint_shape(param, ...)`` (same extra arguments) is the full
shape the loader expects: the one statement of each checkpoint tensor's shape, which ``load_shard`` checks.

The collectives are wrapped in Megatron's conjugate autograd pairs (copy ↔ all-reduce, gather ↔ split) so
``kv_cache=None`` prefill stays differentiable.

The TP group is ``parallel_context.tp`` (``parallel_state.resolve_parallel_context``: the given context, else the
global one, else a single rank). Parameters are created trainable, like ``nn.Linear`` (``load_model`` freezes the
model for inference), in ``params_dtype`` (default: torch's default dtype), and carry ``grad_reduce_groups`` for
``parallel_state.allreduce_grads``: their gradients are partial over the PCP and DP ranks, which hold other tokens.

``decode_gemv`` (off unless the owning model turns it on, per projection: ``megacp.ops.gemv.roles()``): decode-shaped
inference calls (CUDA, at most ``gemv.MAX_ROWS`` rows, no gradient) run ``megacp.ops.gemv``'s Triton GEMV instead of
cuBLAS; every other call, and any call under autograd, is ``F.linear``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megacp.config import kv_head_layout, validate_model_parallel
from megacp.ops import gemv
from megacp.parallel_state import ParallelContext, resolve_parallel_context
from megacp.weights import default_weight_loader, load_shard, new_param


# --------------------------------------------------------------------------- helpers
def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator // denominator``; ValueError naming ``what`` when it does not divide."""
    if numerator % denominator != 0:
        raise ValueError(
            f"{what} ({numerator}) must be divisible by the tensor-parallel size ({denominator}); "
            f"choose tensor_model_parallel_size among the divisors of {numerator}"
        )
    return numerator // denominator


# --------------------------------------------------------------------------- conjugate collectives
class _CopyToTP(torch.autograd.Function):
    """Forward identity, backward all-reduce (input of a column-parallel layer)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.group.all_reduce(grad.contiguous().clone()), None


class _ReduceFromTP(torch.autograd.Function):
    """Forward all-reduce, backward identity (output of a row-parallel layer)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        return group.all_reduce(x.contiguous().clone())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """Forward all-gather along the last dim, backward keep this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return group.all_gather(x.contiguous(), dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        g = ctx.group
        return grad.chunk(g.world_size, dim=-1)[g.rank_in_group].contiguous(), None


def copy_to_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    if group.world_size == 1 or not (x.requires_grad and torch.is_grad_enabled()):
        return x
    return _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    if group.world_size == 1:
        return x
    if not (x.requires_grad and torch.is_grad_enabled()):
        return group.all_reduce(x.contiguous())  # in place is fine: x is a fresh matmul output
    return _ReduceFromTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    if group.world_size == 1:
        return x
    return _GatherFromTP.apply(x, group)


# --------------------------------------------------------------------------- layers
class ColumnParallelLinear(nn.Module):
    """``y = x Wᵀ + b`` with W ``[output_size, input_size]`` split along the output dim.

    forward: x ``[T, input_size]`` → ``[T, output_size / tp]`` (or ``[T, output_size]`` with ``gather_output``).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        gather_output: bool = False,
        params_dtype: torch.dtype | None = None,
        parallel_context: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        self.parallel_context = resolve_parallel_context(parallel_context)
        self.group = self.parallel_context.tp
        self.tp_size = self.group.world_size
        self.tp_rank = self.group.rank_in_group
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_per_partition = divide(output_size, self.tp_size, "linear output size")
        self.gather_output = gather_output
        self.decode_gemv = False  # the owner may turn on megacp.ops.gemv for decode-shaped calls (see the module)
        self.weight = new_param((self.output_size_per_partition, input_size), params_dtype)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = new_param((self.output_size_per_partition,), params_dtype)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def checkpoint_shape(self, param: nn.Parameter) -> tuple[int, ...]:
        """The full ``[output_size, input_size]`` weight or ``[output_size]`` bias."""
        return (self.output_size, *param.shape[1:])

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        """Keep rows ``[rank·n, (rank+1)·n)`` of the full ``[output_size, ...]`` tensor."""
        n = self.output_size_per_partition
        start = self.tp_rank * n
        load_shard(param.data, loaded, (slice(start, start + n),), self.checkpoint_shape(param))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tp_region(x, self.group)
        if self.decode_gemv and gemv.applies(x, self.weight, self.bias):
            y = gemv.linear(x, self.weight)
        else:
            y = F.linear(x, self.weight, self.bias)
        return gather_from_tp_region(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """``y = x Wᵀ + b`` with W ``[output_size, input_size]`` split along the input dim.

    forward: x ``[T, input_size / tp]`` (already split, e.g. attention heads) → ``[T, output_size]``, summed over
    TP (``reduce_results=False`` leaves the partial sum, without bias, for a caller that reduces later).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        reduce_results: bool = True,
        params_dtype: torch.dtype | None = None,
        parallel_context: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        self.parallel_context = resolve_parallel_context(parallel_context)
        self.group = self.parallel_context.tp
        self.tp_size = self.group.world_size
        self.tp_rank = self.group.rank_in_group
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = divide(input_size, self.tp_size, "linear input size")
        self.reduce_results = reduce_results
        self.decode_gemv = False  # the owner may turn on megacp.ops.gemv for decode-shaped calls (see the module)
        self.weight = new_param((output_size, self.input_size_per_partition), params_dtype)
        self.weight.weight_loader = self.weight_loader
        if bias:
            # Replicated; added once, after the reduction.
            self.bias = new_param((output_size,), params_dtype)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)

    def checkpoint_shape(self, param: nn.Parameter) -> tuple[int, ...]:
        """The full ``[output_size, input_size]`` weight; the (replicated) bias is whole on every rank."""
        return (self.output_size, self.input_size) if param is self.weight else tuple(param.shape)

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        """Keep columns ``[rank·n, (rank+1)·n)`` of the full ``[output_size, input_size]`` tensor."""
        n = self.input_size_per_partition
        start = self.tp_rank * n
        load_shard(param.data, loaded, (slice(None), slice(start, start + n)), self.checkpoint_shape(param))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode_gemv and gemv.applies(x, self.weight):
            y = gemv.linear(x, self.weight)
        else:
            y = F.linear(x, self.weight)
        if not self.reduce_results:
            return y
        y = reduce_from_tp_region(y, self.group)
        return y + self.bias if self.bias is not None else y


class ReplicatedLinear(nn.Module):
    """``y = x Wᵀ + b`` with the whole W on every TP rank (MLA's ``q_a_proj`` and ``kv_a_proj_with_mqa``: small
    down-projections whose output every head needs).

    forward: x ``[T, input_size]`` → ``[T, output_size]``, no collective. Its input and output are the same on every
    TP rank; a consumer that uses only its heads' part of the output must make the output's gradient whole
    (``copy_to_tp_region``: the MLA layer does, once, on the latent), then W's gradient is whole too and is summed
    over PCP and DP only, like a norm's.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = new_param((output_size, input_size), params_dtype)
        self.weight.weight_loader = default_weight_loader
        if bias:
            self.bias = new_param((output_size,), params_dtype)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)

    def checkpoint_shape(self, param: nn.Parameter) -> tuple[int, ...]:
        """The full tensor: what every rank holds."""
        return tuple(param.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused into one matmul (MLP gate/up).

    The local weight is the concatenation of each output's local slice: ``[gate_local | up_local]``.
    forward: x ``[T, input_size]`` → ``[T, sum(output_sizes) / tp]``.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        parallel_context: ParallelContext | None = None,
    ) -> None:
        parallel_context = resolve_parallel_context(parallel_context)
        self.output_sizes = list(output_sizes)
        for size in self.output_sizes:
            divide(size, parallel_context.tp_size, "MLP intermediate size")
        super().__init__(input_size, sum(self.output_sizes), bias=bias, params_dtype=params_dtype,
                         parallel_context=parallel_context)

    def checkpoint_shape(  # type: ignore[override]
        self, param: nn.Parameter, shard_id: int | None = None
    ) -> tuple[int, ...]:
        """Full shape of output ``shard_id``'s tensor: ``[output_sizes[shard_id], input_size]`` (bias: no 2nd dim)."""
        if shard_id is None:
            raise ValueError("MergedColumnParallelLinear needs shard_id (index into output_sizes)")
        return (self.output_sizes[shard_id], *param.shape[1:])

    def weight_loader(  # type: ignore[override]
        self, param: nn.Parameter, loaded: Any, shard_id: int | None = None
    ) -> None:
        """Load output ``shard_id`` (0 = gate, 1 = up) from its full ``[output_sizes[shard_id], ...]`` tensor."""
        full_shape = self.checkpoint_shape(param, shard_id)
        n = full_shape[0] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        start = self.tp_rank * n
        load_shard(param.data[offset : offset + n], loaded, (slice(start, start + n),), full_shape)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection; local output ``[q (Hq/tp heads) | k (Hkv_local) | v (Hkv_local)]`` × ``head_dim``.

    forward: x ``[T, hidden]`` → ``[T, (Hq_local + 2·Hkv_local)·head_dim]``.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        parallel_context: ParallelContext | None = None,
    ) -> None:
        parallel_context = resolve_parallel_context(parallel_context)
        tp_size, tp_rank = parallel_context.tp_size, parallel_context.tp_rank
        validate_model_parallel(num_heads, num_kv_heads, tp_size)  # heads vs TP, the GQA rule (DESIGN §3)
        self.head_dim = head_dim
        self.total_num_heads = num_heads
        self.total_num_kv_heads = num_kv_heads
        self.num_heads = num_heads // tp_size
        self.num_kv_heads, self.kv_head_start = kv_head_layout(num_kv_heads, tp_size, tp_rank)
        local_out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, local_out * tp_size, bias=bias, params_dtype=params_dtype,
                         parallel_context=parallel_context)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        if tp_size > num_kv_heads:  # each KV head's rows live on tp / num_kv_heads ranks: see sum_replicated_kv_grad
            for param in (self.weight, self.bias):
                if param is not None:
                    param.grad_reduce_hook = self.sum_replicated_kv_grad

    def sum_replicated_kv_grad(self, param: nn.Parameter) -> None:
        """Sum the K/V rows of ``param.grad`` over the TP ranks that hold the same KV head (tp > num_kv_heads).

        Each of those ranks applied the head only to its own query heads, so its gradient for the head's rows is a
        partial sum; the input gradient is right as it is (the TP all-reduce of the column layer sums the ranks'
        parts once). Collective over the TP group; ``parallel_state.allreduce_grads`` calls it.
        """
        replicas = self.tp_size // self.total_num_kv_heads
        first = (self.tp_rank // replicas) * replicas
        kv = param.grad[self.q_size :]  # [2·head_dim, ...]: this rank's one K head then V head
        gathered = self.group.all_gather(kv.unsqueeze(0).contiguous(), dim=0)  # [tp, 2·head_dim, ...]
        with torch.no_grad():
            kv.copy_(gathered[first : first + replicas].sum(dim=0))

    def checkpoint_shape(  # type: ignore[override]
        self, param: nn.Parameter, shard_id: str | None = None
    ) -> tuple[int, ...]:
        """Full ``[heads·head_dim, hidden]`` shape of HF ``q_proj``/``k_proj``/``v_proj`` (``shard_id`` "q"/"k"/"v")."""
        if shard_id not in ("q", "k", "v"):
            raise ValueError(f"QKVParallelLinear shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        heads = self.total_num_heads if shard_id == "q" else self.total_num_kv_heads
        return (heads * self.head_dim, *param.shape[1:])

    def weight_loader(  # type: ignore[override]
        self, param: nn.Parameter, loaded: Any, shard_id: str | None = None
    ) -> None:
        """Load the full HF ``q_proj``/``k_proj``/``v_proj`` weight or bias (``shard_id`` "q", "k" or "v")."""
        full_shape = self.checkpoint_shape(param, shard_id)
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.tp_rank * self.q_size
        else:
            size, start = self.kv_size, self.kv_head_start * self.head_dim
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
        load_shard(param.data[offset : offset + size], loaded, (slice(start, start + size),), full_shape)

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv ``[T, local_out]`` → q ``[T, Hq_local, D]``, k and v ``[T, Hkv_local, D]``."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        t = qkv.shape[0]
        return (
            q.reshape(t, self.num_heads, self.head_dim),
            k.reshape(t, self.num_kv_heads, self.head_dim),
            v.reshape(t, self.num_kv_heads, self.head_dim),
        )
