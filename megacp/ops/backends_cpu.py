"""The CPU attention-with-LSE backends, registered into ``megacp.ops.attention``'s registry: "torch" (the reference:
explicit matmul and masked softmax in float32, float64 for float64 inputs; any device, differentiable) and
"sdpa_cpu" (aten's CPU flash kernel; the two chunks of a PCP split as one masked call). Same contract as every
backend (``attention_with_lse``): packed varlen, GQA, bottom-right causal, natural-log float32 LSE ``[Tq, Hq]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megacp.ops.attention import AttentionBackend, register_backend
from megacp.ops.varlen import (
    bottom_right_causal_from_top_left,
    bottom_right_causal_mask,
    cat_results,
    empty_lse,
    per_sequence,
    segments,
)
from megacp.ops.attention_grad import differentiable


# ----------------------------------------------------------------------------------------------- "torch" (reference)
def _torch_seq_masked(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Explicit matmul + masked softmax in float32 (float64 for float64 inputs); NaN-free for fully masked rows."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    lq, hq, _ = q.shape
    lk, hk, _ = k.shape
    group = hq // hk
    qg = q.to(compute).reshape(lq, hk, group, -1)  # query head h uses kv head h // group
    scores = torch.einsum("qhgd,khd->hgqk", qg, k.to(compute)) * scale  # [Hk, G, lq, lk]
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # fully masked rows: exp(-inf - 0) = 0, no NaN
    p = torch.exp(scores - m)
    s = p.sum(dim=-1, keepdim=True)
    s_safe = torch.where(s > 0, s, torch.ones_like(s))
    out = torch.einsum("hgqk,khd->qhgd", p / s_safe, v.to(compute)).reshape(lq, hq, -1)
    lse = torch.where(s > 0, m + torch.log(s_safe), torch.full_like(s, float("-inf")))
    return out.to(q.dtype), lse.reshape(hq, lq).transpose(0, 1).float()


def _torch_seq(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    allowed = bottom_right_causal_mask(q.shape[0], k.shape[0], q.device) if causal else None
    return _torch_seq_masked(q, k, v, allowed, scale)


# ----------------------------------------------------------------------------------------------- "sdpa_cpu"
_CPU_FLASH_OP = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _sdpa_cpu_call(
    q: Tensor, k: Tensor, v: Tensor, top_left_causal: bool, scale: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One sequence through aten's CPU flash kernel (handles GQA natively; crashes on empty q or k, never pass them).

    # q/k: [lq|lk, H, D], v: [lk, Hk, Dv] -> (out [lq, Hq, Dv], lse [lq, Hq] float32); mask: additive, [lq, lk]
    The kernel wants one head size: a narrower V (MLA's v_head_dim < qk_head_dim) is zero-padded and the output
    sliced, narrower Q/K are zero-padded (zeros add nothing to the scores): exact either way.
    """
    d, dv = q.shape[-1], v.shape[-1]
    if dv < d:
        out, lse = _sdpa_cpu_call(q, k, torch.nn.functional.pad(v, (0, d - dv)), top_left_causal, scale, mask)
        return out[..., :dv], lse
    if dv > d:
        q, k = (torch.nn.functional.pad(t, (0, dv - d)) for t in (q, k))
    out, lse = _CPU_FLASH_OP(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        is_causal=top_left_causal,
        attn_mask=mask,
        scale=scale,
    )
    # float64 inputs keep a float64 LSE, so the LSE merges of the decomposition below stay exact in float64
    return out[0].transpose(0, 1), lse[0].transpose(0, 1).to(torch.promote_types(q.dtype, torch.float32))


# The kernel differentiates its output only; wrapped, its LSE is differentiable too, so the prefix + square
# decomposition below merges partials with gradients intact (the same path the cuDNN backend takes on CUDA).
_sdpa_cpu_grad_call = differentiable(_sdpa_cpu_call)


def _sdpa_cpu_seq(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    if not causal:
        return _sdpa_cpu_grad_call(q, k, v, False, scale)
    return bottom_right_causal_from_top_left(_sdpa_cpu_grad_call, q, k, v, scale)


def _sdpa_cpu_available(device: torch.device) -> bool:
    return _CPU_FLASH_OP is not None and device.type == "cpu"


def _check_sdpa_cpu_dtypes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dtype not in _CPU_FLASH_DTYPES or q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(
            f"attention backend 'sdpa_cpu' needs q/k/v of one dtype among {_CPU_FLASH_DTYPES}, got "
            f"{q.dtype}/{k.dtype}/{v.dtype}; use backend='torch'"
        )


def _sdpa_cpu_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, host_cu_seqlens=None, seqused_k=None):
    """Consecutive sequences whose keys start at the same row (the head and tail chunk of a PCP split, reading
    prefixes of one gathered K/V) run as ONE kernel call, each row masked to its own sequence's keys (bottom-right
    causal); a sequence on its own as one call (two for a causal chunk with fewer queries than keys)."""
    _check_sdpa_cpu_dtypes(q, k, v)
    outs, lses = [], []
    for group in _shared_key_groups(segments(cu_seqlens_q, cu_seqlens_k, host_cu_seqlens, seqused_k)):
        (q0, _), (k0, _) = group[0]
        q1, lk = group[-1][0][1], max(k1 - k0 for _, (_, k1) in group)
        if q1 == q0:
            continue
        if lk == 0:
            outs.append(q.new_zeros(q1 - q0, q.shape[1], v.shape[2]))
            lses.append(empty_lse(q1 - q0, q.shape[1], q.device))
            continue
        if len(group) == 1:
            out, lse = _sdpa_cpu_seq(q[q0:q1], k[k0 : k0 + lk], v[k0 : k0 + lk], causal, scale)
        else:  # rows that see no key come back out 0 / lse 0 here; attention_with_lse normalises them
            allowed = torch.cat([_group_rows_allowed(qb - qa, kb - ka, lk, causal) for (qa, qb), (ka, kb) in group])
            mask = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, float("-inf"))
            out, lse = _masked_sdpa_cpu(mask)(q[q0:q1], k[k0 : k0 + lk], v[k0 : k0 + lk], False, scale)
        outs.append(out.to(q.dtype))
        lses.append(lse.float())
    return cat_results(outs, lses, q, v)


def _masked_sdpa_cpu(mask: Tensor):
    """``_sdpa_cpu_call`` with this additive mask, differentiable. Its own function so that the backward, which
    runs after the caller's loop, replays the call with this group's mask, not the loop's last one."""
    return differentiable(lambda q, k, v, _top_left, scale: _sdpa_cpu_call(q, k, v, False, scale, mask))


def _shared_key_groups(segments: list[tuple[tuple[int, int], tuple[int, int]]]) -> list[list]:
    """Runs of consecutive sequences whose key ranges start at the same row (``segments``' host ranges)."""
    groups: list[list] = []
    for seg in segments:
        if groups and groups[-1][0][1][0] == seg[1][0]:
            groups[-1].append(seg)
        else:
            groups.append([seg])
    return groups


def _group_rows_allowed(lq: int, lk_seq: int, lk: int, causal: bool) -> Tensor:
    """bool [lq, lk]: which of a group's ``lk`` keys a sequence's rows see: its first ``lk_seq``, bottom-right causal
    when ``causal``."""
    j = torch.arange(lk).unsqueeze(0)
    allowed = (j < lk_seq).expand(lq, lk)
    if causal:
        allowed = allowed & (j <= torch.arange(lq).unsqueeze(1) + (lk_seq - lq))
    return allowed


register_backend(
    AttentionBackend(
        name="torch",
        varlen=per_sequence(_torch_seq),
        available=lambda device: True,
        priority=0,
        takes_host_cu_seqlens=True,
        takes_seqused_k=True,
        differentiable=True,  # plain torch ops
    )
)
register_backend(
    AttentionBackend(
        name="sdpa_cpu",
        varlen=_sdpa_cpu_varlen,
        available=_sdpa_cpu_available,
        priority=10,
        takes_host_cu_seqlens=True,
        takes_seqused_k=True,
        differentiable=True,
    )
)
