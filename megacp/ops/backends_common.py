"""What the CUDA attention backends share (``backends_cuda``'s kernels and ``backends_te``'s): the packed-varlen
wrapper every fused kernel runs inside (``_packed``: the float32 / odd-head-dim fallback to the "torch" reference,
empty batches, sequences without queries or keys, host cu_seqlens), the V-head-dim adapter (``_any_v_dim``,
``padded_v_dim``, ``_NATIVE_V_DIM``: what TE and cuDNN were found to take), ``lse_rows`` (a kernel's LSE in any
layout -> ``[Tq, H]``), key-range helpers and the paged decode hook (``_paged``: the Triton kernel of
``megacp.ops.paged_decode``). The contract is ``megacp.ops.attention``'s (packed ``q [Tq, Hq, D]``, ``k/v
[Tk, Hk, D]``, bottom-right causal, natural-log float32 LSE).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megacp.ops import paged_decode
from megacp.ops.attention import get_backend
from megacp.ops.varlen import host_cu_seqlens_or_read, key_lengths, keys_per_sequence
from megacp.ops.attention_grad import needs_grad

_HALF = (torch.float16, torch.bfloat16)
_FUSED_MAX_HEAD_DIM = 256


def fused_shapes_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether q/k/v suit the fused kernels: one half dtype, head dims (Q/K's and V's, which may differ) multiples
    of 8 and at most 256."""
    return (
        q.dtype in _HALF and k.dtype == q.dtype and v.dtype == q.dtype
        and all(d % 8 == 0 and d <= _FUSED_MAX_HEAD_DIM for d in (q.shape[-1], v.shape[-1]))
    )


# Whether TE's / cuDNN's kernel takes a V head dim other than Q/K's, learnt on the first such call (None: not yet).
_NATIVE_V_DIM: dict[str, bool | None] = {"te": None, "cudnn": None}


def _any_v_dim(name: str, kernel):
    """``kernel`` (a packed kernel of ``_packed``) made to take V of another head dim than Q/K.

    # q/k: [T, H, D], v: [Tk, Hk, Dv] -> (out [Tq, Hq, Dv], lse [Tq, Hq])
    TE and cuDNN get the shapes as they are until one refuses them (a RuntimeError on the first such call); with
    gradients, or for the others, the narrower side is zero-padded to the wider and the output sliced: exact.
    """

    def call(q, k, v, cu_q, cu_k, causal, scale, dev_cu, used_k=None):
        d, dv = q.shape[-1], v.shape[-1]
        if dv == d:
            return kernel(q, k, v, cu_q, cu_k, causal, scale, dev_cu, used_k)
        if name in _NATIVE_V_DIM and _NATIVE_V_DIM[name] is not False and not needs_grad(q, k, v):
            try:
                res = kernel(q, k, v, cu_q, cu_k, causal, scale, dev_cu, used_k)
                _NATIVE_V_DIM[name] = True
                return res
            except RuntimeError:
                _NATIVE_V_DIM[name] = False
        return padded_v_dim(kernel, q, k, v, cu_q, cu_k, causal, scale, dev_cu, used_k)

    return call


def padded_v_dim(kernel, q, k, v, cu_q, cu_k, causal, scale, dev_cu, used_k=None):
    """Run ``kernel`` with Q/K and V zero-padded to one head dim; the output sliced back to V's (exact)."""
    d, dv = q.shape[-1], v.shape[-1]
    if dv < d:
        out, lse = kernel(q, k, torch.nn.functional.pad(v, (0, d - dv)), cu_q, cu_k, causal, scale, dev_cu, used_k)
        return out[..., :dv].contiguous(), lse
    pad = (0, dv - d)
    return kernel(torch.nn.functional.pad(q, pad), torch.nn.functional.pad(k, pad), v, cu_q, cu_k, causal, scale,
                  dev_cu, used_k)


def _reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, host_cu_seqlens=None, seqused_k=None):
    impl = get_backend("torch")  # the pure PyTorch reference of megacp.ops.attention
    return impl.varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, host_cu_seqlens=host_cu_seqlens,
                       seqused_k=seqused_k)


def lse_rows(lse: Tensor, cu_q: list[int], heads: int) -> Tensor:
    """Bring a kernel's LSE to ``[Tq, H]`` whatever layout it came in.

    # lse: [Tq, H, 1] (TE THD stats) | [H, Tq] (unpadded varlen) | [B, H, max_q(+padding)] (padded per sequence)
    # -> [Tq, H] float32
    """
    total = cu_q[-1]
    if lse.dim() == 3 and lse.shape[0] == total and lse.shape[1] == heads and lse.shape[2] == 1:
        return lse[..., 0].float()
    if lse.dim() == 2 and lse.shape == (heads, total):
        return lse.t().float()
    if lse.dim() == 3 and lse.shape[0] == len(cu_q) - 1 and lse.shape[1] == heads:
        lens = _host_to_device([b - a for a, b in zip(cu_q[:-1], cu_q[1:])], torch.long, lse.device)
        seq = torch.repeat_interleave(torch.arange(len(lens), device=lse.device), lens, output_size=total)
        starts = _host_to_device(cu_q[:-1], torch.long, lse.device)
        within = torch.arange(total, device=lse.device) - starts[seq]
        return lse[seq, :, within].float()
    raise ValueError(f"unexpected LSE layout {tuple(lse.shape)} for {total} query rows and {heads} heads")


def _keep_sequences(q, k, v, cu_q: list[int], cu_k: list[int]):
    """Drop sequences with no queries or no keys (kernels differ on them; their rows are out 0 / lse -inf anyway).

    Returns ``None`` when every sequence is kept, else ``(q_rows, q, k, v, cu_q, cu_k)`` for the kept ones, with
    ``q_rows`` the kept query rows' indices in the original packing.
    """
    keep = [b for b in range(len(cu_q) - 1) if cu_q[b + 1] > cu_q[b] and cu_k[b + 1] > cu_k[b]]
    if len(keep) == len(cu_q) - 1:
        return None
    dev = q.device

    def rows(cu):
        parts = [torch.arange(cu[b], cu[b + 1], device=dev) for b in keep]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=dev)

    def cums(cu):
        out = [0]
        for b in keep:
            out.append(out[-1] + cu[b + 1] - cu[b])
        return out

    q_rows, k_rows = rows(cu_q), rows(cu_k)
    return q_rows, q[q_rows], k[k_rows], v[k_rows], cums(cu_q), cums(cu_k)


def _packed(kernel):
    """Wrap a packed-varlen kernel ``(q, k, v, cu_q list, cu_k list, causal, scale, dev_cu, used_k) -> (out, lse)``.

    ``dev_cu`` is ``(cu_seqlens_q, cu_seqlens_k)`` int32 on the device, matching the host lists; ``used_k`` is None
    or ``(seqused_k host list, seqused_k int32 on the device)``: key ranges by start (``cu_k[b]``) and length, maybe
    overlapping (``attention_with_lse``'s ``seqused_k``). Handles what every packed kernel needs: the float32/odd-shape
    fallback, empty batches and sequences without queries or keys (dropped before the call, filled with out 0 /
    lse -inf after). The host lists come from ``host_cu_seqlens`` when the caller has them (no sync), else from one
    read of ``cu_seqlens``.
    """

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, host_cu_seqlens=None, seqused_k=None):
        if not fused_shapes_ok(q, k, v):
            return _reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, host_cu_seqlens, seqused_k)
        # The kernels need the lengths on the host: a sync unless the caller passed them.
        host = host_cu_seqlens_or_read(cu_seqlens_q, cu_seqlens_k, host_cu_seqlens, seqused_k)
        cu_q, cu_k = host[0], host[1]
        lens_q = [b - a for a, b in zip(cu_q[:-1], cu_q[1:])]
        if seqused_k is not None and 0 in lens_q + key_lengths(host):  # rare: drop empties from a plain layout
            k, v, cu_seqlens_k, host = keys_per_sequence(k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, host)
            cu_k, seqused_k = host[1], None
        used_k = None if seqused_k is None else (key_lengths(host), seqused_k.to(torch.int32))
        kept = None if used_k is not None else _keep_sequences(q, k, v, cu_q, cu_k)  # used_k: none is empty
        if kept is None:
            dev_cu = (cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32))
            return kernel(q, k, v, cu_q, cu_k, causal, scale, dev_cu, used_k)
        q_rows, qs, ks, vs, cq, ck = kept
        out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
        lse = torch.full((q.shape[0], q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
        if q_rows.numel():
            dev_cu = (_host_to_device(cq, torch.int32, q.device), _host_to_device(ck, torch.int32, q.device))
            o, l = kernel(qs, ks, vs, cq, ck, causal, scale, dev_cu, None)
            out[q_rows] = o.to(out.dtype)
            lse[q_rows] = l
        return out, lse

    return varlen


def _plain_keys(q, k, v, cu_q, cu_k, dev_cu, used_k):
    """A kernel without overlapping key ranges: lay them out one after another (``keys_per_sequence``).
    -> (k, v, cu_k list, dev_cu)"""
    if used_k is None:
        return k, v, cu_k, dev_cu
    k, v, cu_t, host = keys_per_sequence(k, v, dev_cu[0], dev_cu[1], used_k[1], (cu_q, cu_k, used_k[0]))
    return k, v, list(host[1]), (dev_cu[0], cu_t)


def _key_ranges(cu_k: list[int], used_k) -> list[tuple[int, int]]:
    """Each sequence's key rows ``[start, stop)``."""
    if used_k is None:
        return list(zip(cu_k[:-1], cu_k[1:]))
    return [(a, a + n) for a, n in zip(cu_k[:-1], used_k[0])]


def _host_to_device(values: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host list on ``device`` without a stream sync (pinned + non-blocking; a blocking copy syncs)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _max_len(cu: list[int], used: list[int] | None = None) -> int:
    return max(b - a for a, b in zip(cu[:-1], cu[1:])) if used is None else max(used)


def _paged(q, k_cache, v_cache, block_table, seq_lens, scale, out=None, lse=None):
    """Paged decode for the CUDA backends: the Triton kernel when it can run (half or float32 caches), else the
    gather path (None)."""
    if not paged_decode.available(q.device) or not paged_decode.supports(q, k_cache):
        return None
    return paged_decode.paged_decode_with_lse(q, k_cache, v_cache, block_table, seq_lens, scale, out=out, lse=lse)


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


__all__ = ["fused_shapes_ok", "lse_rows", "padded_v_dim"]
