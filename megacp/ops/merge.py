"""Merging partial attention results by log-sum-exp (DESIGN §3 "LSE conventions").

A partial result ``(o_i, l_i)`` is attention over a subset of the keys: ``o_i`` is the softmax-weighted value sum over
that subset and ``l_i`` the natural-log sum of ``exp(scores)`` over it (float32, ``-inf`` when the subset is empty).
Attention over the union of disjoint subsets is

    L = logsumexp_i l_i,        o = Σ_i exp(l_i − L) · o_i .

The pure functions (``lse_merge_weights``, ``merge_attn_states_n``, ``merge_attn_states``, and
``merge_attn_states_into`` for partials in separate tensors written into a given output) do this locally;
``dcp_merge`` is a thin layer that applies the same weights across the ranks of a ``ParallelGroup`` (the prefill
over cached context uses it), and
``cp_merge_gathered`` does both at once with one all-gather over the CP group (decode uses its packed form
``cp_merge_packed``; on CUDA the local merge is one Triton kernel, ``merge_kernel.merge_partials``, when no gradient
is needed).
Every function is exact when some (or all) partials are empty: all-empty rows give ``o = 0`` and ``L = -inf``,
never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from megacp.ops import paged_decode
from megacp.ops.merge_kernel import MAX_INTO, merge_into, merge_partials
from megacp.parallel_state import ParallelGroup, resolve_parallel_context


def lse_merge_weights(lses: Tensor) -> tuple[Tensor, Tensor]:
    """Weights ``exp(l_i − L)`` and the merged ``L = logsumexp_i l_i`` over dim 0, safe for ``-inf`` entries.

    # lses: [N, ...] -> (weights [N, ...] float32, lse [...] float32; float64 for float64 lses)
    Where every ``l_i`` is ``-inf`` the weights are 0 and ``L`` is ``-inf``. Differentiable (also at ``-inf``).
    """
    lses = lses.to(torch.promote_types(lses.dtype, torch.float32))
    m = lses.amax(dim=0)
    # An all -inf column would give exp(-inf - -inf) = NaN: shift it by 0 instead (its weights are then exactly 0).
    # (Python scalars in torch.where: no extra fill kernels; this runs once per layer per decode step.)
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.exp(lses - m)
    s = e.sum(dim=0)
    nonempty = s > 0
    s_safe = torch.where(nonempty, s, 1.0)
    lse = torch.where(nonempty, m + torch.log(s_safe), float("-inf"))
    return e / s_safe, lse


def merge_attn_states_n(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """Merge N partial attention states over dim 0.

    # outs: [N, ..., D] (any float dtype), lses: [N, ...] -> (out [..., D] in outs.dtype, lse [...] float32)
    Computed in float32, or float64 when the inputs are; differentiable w.r.t. outs and lses.
    """
    if outs.shape[:-1] != lses.shape:
        raise ValueError(
            f"merge_attn_states_n: outs {tuple(outs.shape)} must be lses {tuple(lses.shape)} plus a head_dim"
        )
    if outs.shape[0] == 0:
        raise ValueError("merge_attn_states_n: need at least one partial state (N >= 1)")
    weights, lse = lse_merge_weights(lses)
    out = (weights.unsqueeze(-1) * outs.to(weights.dtype)).sum(dim=0)
    return out.to(outs.dtype), lse


def merge_attn_states(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial attention states.

    # o1, o2: [..., D]; l1, l2: [...] -> (out [..., D] in o1.dtype, lse [...] float32)
    """
    work = torch.promote_types(torch.promote_types(l1.dtype, l2.dtype), torch.float32)
    return merge_attn_states_n(torch.stack([o1, o2.to(o1.dtype)]), torch.stack([l1.to(work), l2.to(work)]))


def merge_attn_states_into(outs: Sequence[Tensor], lses: Sequence[Tensor], out: Tensor, lse: Tensor) -> None:
    """Merge N partial states held in separate tensors, writing the result into ``out`` and ``lse`` (in place).

    # outs[i]: [..., D] (any float dtype), lses[i]: [...] -> out: [..., D] (written), lse: [...] float32 (written)
    ``merge_attn_states_n``'s math without stacking the outputs: the weighted sum accumulates in float32 (float64
    for float64 inputs) one partial at a time and is cast once, into ``out``. That is about half the memory
    traffic of stack + merge + copy, which matters when the partials are whole prefill chunks (the cuDNN
    decomposition of ``backends_cuda``). One partial is copied as it is. Differentiable (autograd records the
    writes into ``out``/``lse``); without a gradient to record, 2..4 ``[R, H, D]`` partials on a GPU merge in one
    Triton kernel (``merge_kernel.merge_into``: the same math, the sum divided once instead of pre-normalised
    weights, so float32 rounding may differ in the last bits).
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"merge_attn_states_into: need as many outputs as LSEs, at least one ({len(outs)}, "
                         f"{len(lses)})")
    if len(outs) == 1:
        out.copy_(outs[0])
        lse.copy_(lses[0])
        return
    if _merge_into_applies(outs, lses, out, lse):  # one kernel instead of ~10 elementwise passes (merge_kernel)
        merge_into(list(outs), list(lses), out, lse)
        return
    work = torch.promote_types(lses[0].dtype, torch.float32)
    weights, merged_lse = lse_merge_weights(torch.stack([x.to(work) for x in lses]))
    acc = weights[0].unsqueeze(-1) * outs[0]
    for w, o in zip(weights[1:], outs[1:]):
        acc.addcmul_(w.unsqueeze(-1), o)
    out.copy_(acc)
    lse.copy_(merged_lse)


def _merge_into_applies(outs: Sequence[Tensor], lses: Sequence[Tensor], out: Tensor, lse: Tensor) -> bool:
    """Whether ``merge_kernel.merge_into`` takes this merge: 2..MAX_INTO partials shaped ``[R, H, D]`` / ``[R, H]``
    float32 with contiguous last dims, and ``_kernel_may_merge``."""
    if not 2 <= len(outs) <= MAX_INTO or out.dim() != 3:
        return False
    if lse.dtype != torch.float32 or any(s.dtype != torch.float32 for s in lses) or out.stride(-1) != 1:
        return False
    if any(o.shape != out.shape or o.stride(-1) != 1 for o in outs):
        return False
    return _kernel_may_merge(*outs, *lses, out, lse)


def _scale_for_group(out: Tensor, lse: Tensor, group: "ParallelGroup") -> tuple[Tensor, Tensor]:
    """This rank's ``exp(l_rank − L) · out`` (float32) and the group-wide ``L`` (lse all-gathered over ``group``)."""
    all_lse = group.all_gather(lse.float().unsqueeze(0).contiguous(), dim=0)  # [W, ...]
    weights, merged_lse = lse_merge_weights(all_lse)
    scaled = weights[group.rank_in_group].unsqueeze(-1) * out.float()
    return scaled, merged_lse


def dcp_merge(out: Tensor, lse: Tensor, group: "ParallelGroup | None" = None) -> tuple[Tensor, Tensor]:
    """Decode-CP merge: every rank attended all DCP ranks' heads against its own KV shard.

    # out: [B, Hq_local*dcp, D], lse: [B, Hq_local*dcp]
    # -> (out [B, Hq_local, D] in out.dtype, lse [B, Hq_local] float32)
    Heads are ordered by DCP rank (the order of the Q all-gather); this rank keeps slice ``rank_in_group``.
    All-gathers lse, rescales, and reduce-scatters the rescaled output over the head dim (in float32).
    """
    group = _default_group(group, "dcp")
    _check_merge_shapes("dcp_merge", out, lse)
    if out.shape[1] % group.world_size != 0:
        raise ValueError(
            f"dcp_merge: head dim {out.shape[1]} must be Hq_local * dcp (dcp = {group.world_size}); "
            "all-gather q over the DCP group's heads before attention"
        )
    if group.world_size == 1:
        return out, lse.float()
    scaled, merged_lse = _scale_for_group(out, lse, group)
    local_heads = out.shape[1] // group.world_size
    start = group.rank_in_group * local_heads
    merged = group.reduce_scatter(scaled.contiguous(), dim=1)
    return merged.to(out.dtype), merged_lse[:, start : start + local_heads].contiguous()


def cp_merge_gathered(
    out: Tensor, lse: Tensor, dcp_size: int, group: "ParallelGroup | None" = None
) -> tuple[Tensor, Tensor]:
    """Decode merge over the whole CP group in one collective: equals a DCP merge over heads followed by a PCP merge
    over ranks (all-gather lse, rescale, all-reduce).

    # out: [B, Hq_local*dcp, D], lse: [B, Hq_local*dcp] (this rank's partial over all the DCP group's heads)
    # -> (out [B, Hq_local, D] in out.dtype, lse [B, Hq_local] float32) for this rank's own heads
    ``group`` is the CP group (default parallel_state's, one rank before it is initialised), ordered
    ``cp_rank = pcp_rank·dcp + dcp_rank``; every rank's partial covers the same ``dcp·Hq_local`` heads (the PCP
    ranks computed the same gathered queries), so this rank keeps heads ``dcp_rank·Hq_local ... +Hq_local`` of each
    of the ``W = pcp·dcp`` partials and merges them.

    Why one all-gather of the packed ``[out | lse]`` instead of dcp_merge's all-gather + reduce-scatter and
    a PCP merge's all-gather + all-reduce: decode tensors are small (``B·dcp·Hq_local·(D+1)`` floats: a few KiB at
    batch 1, ~1 MiB at batch 64 with 32 heads of 128), so each collective costs its fixed launch/host latency, not
    bandwidth (docs/benchmarks.md measured ~0.2–0.3 ms of host time per NCCL call). Moving ``W×`` the bytes in one
    call is cheaper than up to four calls, and the partials travel in float32, so the merge rounds to ``out.dtype``
    once instead of after each stage. A caller that can write its partial straight into the packed layout
    (``paged_attention_with_lse(..., out=, lse=)``, as decode does) calls ``cp_merge_packed`` and skips the packing.
    """
    group = _default_group(group, "cp")
    _check_merge_shapes("cp_merge_gathered", out, lse)
    _check_dcp_size("cp_merge_gathered", dcp_size, group, out.shape[1])
    if group.world_size == 1:
        return out, lse.float()
    work = torch.promote_types(out.dtype, torch.float32)
    return cp_merge_packed(torch.cat([out.to(work), lse.to(work).unsqueeze(-1)], dim=-1), dcp_size, group, out.dtype)


def cp_merge_packed(
    packed: Tensor, dcp_size: int, group: "ParallelGroup | None" = None, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """``cp_merge_gathered`` of a partial already packed as the collective sends it.

    # packed: [B, Hq_local*dcp, D+1] float32 or float64: [..., :D] the partial output, [..., D] its lse
    # -> (out [B, Hq_local, D] in out_dtype (default packed.dtype), lse [B, Hq_local] float32)
    """
    group = _default_group(group, "cp")
    if packed.dim() != 3 or packed.shape[-1] < 2 or packed.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"cp_merge_packed: expected packed [B, H, D+1] float32 or float64 (out | lse), got "
                         f"{tuple(packed.shape)} {packed.dtype}")
    _check_dcp_size("cp_merge_packed", dcp_size, group, packed.shape[1])
    out_dtype = out_dtype or packed.dtype
    if group.world_size == 1:
        return packed[..., :-1].to(out_dtype), packed[..., -1].float()
    local_heads = packed.shape[1] // dcp_size
    start = (group.rank_in_group % dcp_size) * local_heads
    gathered = group.all_gather(packed.unsqueeze(0), dim=0)  # [W, B, dcp·H, D+1], CP rank major
    mine = gathered[:, :, start : start + local_heads]  # [W, B, H, D+1]: every partial of this rank's heads
    if _fused_merge_applies(mine):  # one kernel instead of ~15 small ones per layer (merge_kernel)
        merged = packed.new_empty(packed.shape[0], local_heads, packed.shape[2] - 1, dtype=out_dtype)
        merged_lse = packed.new_empty(packed.shape[0], local_heads, dtype=torch.float32)
        merge_partials(mine[..., :-1], mine[..., -1], merged, merged_lse)
        return merged, merged_lse
    merged, merged_lse = merge_attn_states_n(mine[..., :-1], mine[..., -1])
    return merged.to(out_dtype), merged_lse


def _default_group(group: ParallelGroup | None, name: str) -> ParallelGroup:
    """``group``, or group ``name`` of ``resolve_parallel_context()`` (the layers always pass theirs)."""
    return group if group is not None else resolve_parallel_context().group(name)


def _check_dcp_size(fn: str, dcp_size: int, group: "ParallelGroup", num_heads: int) -> None:
    if dcp_size < 1 or group.world_size % dcp_size != 0 or num_heads % dcp_size != 0:
        raise ValueError(
            f"{fn}: dcp_size={dcp_size} must divide the CP group size {group.world_size} and the head "
            f"dim {num_heads} (= Hq_local * dcp); pass the DCP group's world size"
        )


def _fused_merge_applies(partials: Tensor) -> bool:
    """Whether ``merge_partials`` takes this merge: float32 partials (not float64) and ``_kernel_may_merge``."""
    return partials.dtype == torch.float32 and _kernel_may_merge(partials)


def _kernel_may_merge(*tensors: Tensor) -> bool:
    """Whether a Triton merge kernel may replace the PyTorch merge of ``tensors``: Triton runs on their device and no
    gradient is needed (the kernels have no backward; training goes through the PyTorch merge)."""
    return (paged_decode.available(tensors[0].device)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def _check_merge_shapes(fn: str, out: Tensor, lse: Tensor) -> None:
    if out.dim() != 3 or out.shape[:2] != lse.shape:
        raise ValueError(f"{fn}: expected out [B, H, D] and lse [B, H], got {tuple(out.shape)} and {tuple(lse.shape)}")
