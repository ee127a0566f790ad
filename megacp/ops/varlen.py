"""The packed variable-length ("varlen") batch that ``attention_with_lse`` takes, and the helpers backends share.

A batch is its sequences' rows packed one after another, ``cu_seqlens_q`` / ``cu_seqlens_k`` ``[B+1]`` offsets
(FlashAttention's convention), with ``seqused_k`` optionally giving each sequence's key count from its offset (so key
ranges may overlap: a PCP split's two chunks over one gathered K/V). Causal masks are **bottom-right** aligned: query i
of a sequence with lengths (lq, lk) sees keys j <= i + lk - lq. Here: the kernel signatures (``VarlenFn``,
``SeqFn``), the host offsets (``host_cu_seqlens_or_read``, ``segments``, ``key_lengths``, ``keys_per_sequence``),
the masks (``bottom_right_causal_mask``, ``rows_with_keys``) and the lifts a backend uses to write its kernel for one
sequence (``per_sequence``) or with top-left causal masking only (``bottom_right_causal_from_top_left``). Pure
PyTorch; ``attention.py`` holds the registry and the entry points.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from megacp.ops.merge import merge_attn_states

# (q [Tq,Hq,D], k [Tk,Hk,D], v, cu_seqlens_q [B+1], cu_seqlens_k [B+1], causal, scale) -> (out [Tq,Hq,D], lse [Tq,Hq]);
# a backend with ``takes_host_cu_seqlens`` also accepts ``host_cu_seqlens=(cu_q list, cu_k list) | None``.
VarlenFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor]]
# (cu_seqlens_q, cu_seqlens_k) as host ints, plus seqused_k when the call has it
HostCuSeqlens = tuple[Sequence[int], ...]
# One sequence, lq > 0 and lk > 0: (q [lq,Hq,D], k [lk,Hk,D], v, causal (bottom-right), scale) -> (out, lse)
SeqFn = Callable[[Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor]]


def key_lengths(host_cu_seqlens: HostCuSeqlens) -> list[int]:
    """Each sequence's key count from host offsets: ``seqused_k`` when they carry it, else ``cu_k`` differences."""
    ck = host_cu_seqlens[1]
    if len(host_cu_seqlens) > 2:
        return [int(n) for n in host_cu_seqlens[2]]
    return [ck[b + 1] - ck[b] for b in range(len(ck) - 1)]


def keys_per_sequence(k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, seqused_k: Tensor,
                      host_cu_seqlens: HostCuSeqlens | None) -> tuple[Tensor, Tensor, Tensor, HostCuSeqlens]:
    """Key ranges given by start and length (``seqused_k``) laid out one after another: what a kernel without
    ``seqused_k`` takes. One concatenation of slices each for K and V (overlapping ranges are copied once each).

    # k/v: [Tk, Hk, D] -> (k/v [sum(seqused_k), Hk, D], cu_seqlens_k [B+1] int32 cumulative, host offsets)
    """
    if host_cu_seqlens is None:  # a host sync on CUDA: callers with the lengths pass them
        host_cu_seqlens = (cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), seqused_k.tolist())
    cq, ck = list(host_cu_seqlens[0]), list(host_cu_seqlens[1])
    lens = key_lengths(host_cu_seqlens)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    starts = ck[: len(lens)]
    if starts == cu[:-1]:  # already one after another (a pcp = 1 step): a view, no copy
        k, v = k[: cu[-1]], v[: cu[-1]]
    else:
        k = torch.cat([k[a : a + n] for a, n in zip(starts, lens)])
        v = torch.cat([v[a : a + n] for a, n in zip(starts, lens)])
    cu_t = torch.tensor(cu, dtype=torch.int32)
    cu_t = cu_t.pin_memory().to(k.device, non_blocking=True) if k.device.type == "cuda" else cu_t
    return k, v, cu_t, (cq, cu)


def bottom_right_causal_mask(lq: int, lk: int, device: torch.device | str = "cpu") -> Tensor:
    """``allowed[i, j] = j <= i + lk - lq`` (bottom-right aligned causal mask).  # -> bool [lq, lk]"""
    i = torch.arange(lq, device=device).unsqueeze(1)
    j = torch.arange(lk, device=device).unsqueeze(0)
    return j <= i + (lk - lq)


def rows_with_keys(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, causal: bool, total_q: int,
                   seqused_k: Tensor | None = None) -> Tensor:
    """Which packed query rows see at least one key (vectorised, no host sync).  # -> bool [Tq]"""
    cu_q = cu_seqlens_q.long()
    cu_k = cu_seqlens_k.long()
    lq = cu_q[1:] - cu_q[:-1]
    lk = cu_k[1:] - cu_k[:-1] if seqused_k is None else seqused_k.to(cu_k.device).long()
    seq = torch.repeat_interleave(torch.arange(lq.numel(), device=cu_q.device), lq, output_size=total_q)
    i = torch.arange(total_q, device=cu_q.device) - cu_q[seq]
    has = lk[seq] > 0
    if causal:
        has = has & (i + lk[seq] - lq[seq] >= 0)
    return has


def per_sequence(seq_fn: SeqFn) -> VarlenFn:
    """Lift a one-sequence kernel to the packed varlen interface (loops over sequences, skips empty ones)."""

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, host_cu_seqlens=None, seqused_k=None):
        outs, lses = [], []
        for (q0, q1), (k0, k1) in segments(cu_seqlens_q, cu_seqlens_k, host_cu_seqlens, seqused_k):
            if q1 == q0:
                continue
            if k1 == k0:
                outs.append(q.new_zeros(q1 - q0, q.shape[1], v.shape[2]))
                lses.append(empty_lse(q1 - q0, q.shape[1], q.device))
                continue
            out, lse = seq_fn(q[q0:q1], k[k0:k1], v[k0:k1], causal, scale)
            outs.append(out.to(q.dtype))
            lses.append(lse.float())
        return cat_results(outs, lses, q, v)

    return varlen


def bottom_right_causal_from_top_left(
    attn: Callable[[Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor]],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Bottom-right causal attention for one sequence from a kernel whose ``causal`` is top-left aligned.

    # q: [lq, Hq, D], k/v: [lk, Hk, D] (lq, lk > 0) -> (out, lse float32)
    lq <= lk: keys [0, lk-lq) are visible to every query (non-causal part) and keys [lk-lq, lk) form a square where
    top-left == bottom-right; the two partials are merged by LSE. lq > lk: the first lq-lk queries see nothing, the
    rest form a square. Gradients are right only if ``attn``'s LSE is differentiable (``attention_grad.differentiable``).
    """
    lq, lk = q.shape[0], k.shape[0]
    if lq >= lk:
        out, lse = attn(q[lq - lk :], k, v, True, scale)
        if lq == lk:
            return out, lse.float()
        empty_out = out.new_zeros(lq - lk, *out.shape[1:])
        return torch.cat([empty_out, out]), torch.cat([empty_lse(lq - lk, q.shape[1], q.device), lse.float()])
    d = lk - lq
    o_prefix, l_prefix = attn(q, k[:d], v[:d], False, scale)
    o_square, l_square = attn(q, k[d:], v[d:], True, scale)
    return merge_attn_states(o_prefix, l_prefix, o_square, l_square)


def host_cu_seqlens_or_read(
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, host_cu_seqlens: HostCuSeqlens | None, seqused_k: Tensor | None = None
) -> HostCuSeqlens:
    """The varlen offsets as host lists ``(cu_q, cu_k)`` (``+ (seqused_k,)`` when given): ``host_cu_seqlens`` when
    the caller has them, else one read of the tensors (a host sync on CUDA)."""
    if host_cu_seqlens is not None:
        return tuple(list(x) for x in host_cu_seqlens)
    if seqused_k is not None:
        return cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), seqused_k.tolist()
    return cu_seqlens_q.tolist(), cu_seqlens_k.tolist()


def segments(
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, host_cu_seqlens: HostCuSeqlens | None = None,
    seqused_k: Tensor | None = None,
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Each sequence's (query rows, key rows) as host ranges."""
    host = host_cu_seqlens_or_read(cu_seqlens_q, cu_seqlens_k, host_cu_seqlens, seqused_k)
    cq, ck = host[0], host[1]
    return [((cq[b], cq[b + 1]), (ck[b], ck[b] + n)) for b, n in enumerate(key_lengths(host))]


def empty_lse(rows: int, heads: int, device: torch.device) -> Tensor:
    return torch.full((rows, heads), float("-inf"), dtype=torch.float32, device=device)


def cat_results(outs: list[Tensor], lses: list[Tensor], q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    if not outs:
        return q.new_zeros(0, q.shape[1], v.shape[2]), empty_lse(0, q.shape[1], q.device)
    return torch.cat(outs), torch.cat(lses)
