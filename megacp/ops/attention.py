"""Attention that also returns the log-sum-exp of the scores (DESIGN §3 "Kernels / backends").

Public interface (docs/architecture.md "Attention with LSE"):

- ``attention_with_lse(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, backend=None, host_cu_seqlens=None,
  seqused_k=None) -> (out, lse)``: packed variable-length batch, GQA, ``causal`` = **bottom-right** alignment (query i
  of a sequence with lengths (lq, lk) sees keys j <= i + lk - lq). With ``seqused_k`` (FlashAttention's convention)
  sequence b's keys are ``k[cu_seqlens_k[b] : cu_seqlens_k[b] + seqused_k[b]]``: key ranges may overlap, so the two
  chunks of a PCP split attend to prefixes of one gathered K/V in one call, without copying it per chunk.
- ``paged_attention_with_lse(q, k_cache, v_cache, block_table, seq_lens, scale)``: decode over a paged cache.

LSE convention: natural log, float32, ``[Tq, Hq]``. Rows that see no key get ``out = 0`` and ``lse = -inf`` whatever
the kernel returns (some return 0 or NaN there), so partials merge exactly (megacp/ops/merge.py).

**No host syncs.** The kernels need the sequence lengths on the host (max lengths, per-sequence slices); reading
them from ``cu_seqlens`` on a CUDA device stalls the host until the GPU catches up. Callers that know the lengths (the
step metadata does) pass them as ``host_cu_seqlens`` / ``seq_lens_host`` and then no entry point reads a device
tensor back; without them the lengths are read once per call.

Backends live in a small registry (``register_backend``). The automatic choice is the highest-priority backend that is
``available`` for the query's device; ``MEGACP_ATTN_BACKEND`` or ``backend=`` forces one. A backend supplies a packed
varlen function; CPU-style backends write a per-sequence kernel and lift it with ``varlen.per_sequence``; a kernel
with only top-left causal masking gets bottom-right alignment from ``varlen.bottom_right_causal_from_top_left``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from megacp.config import debug_checks
from megacp.ops.attention_grad import differentiable, needs_grad
from megacp.ops.varlen import HostCuSeqlens, VarlenFn, key_lengths, keys_per_sequence, rows_with_keys

ENV_BACKEND = "MEGACP_ATTN_BACKEND"

# (q [B,Hq,D], k_cache, v_cache, block_table, seq_lens, scale) -> (out, lse) normalised, or None to use the gather
# path; it must not read ``seq_lens`` back to the host (CUDA graphs). With ``AttentionBackend.paged_writes_out`` it
# also takes the keywords ``out`` and ``lse`` (preallocated, see ``paged_attention_with_lse``) and writes there
PagedFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, float], Optional[tuple[Tensor, Tensor]]]


@dataclass(frozen=True)
class AttentionBackend:
    """One implementation of attention-with-LSE.

    ``varlen`` may leave rows that see no key unnormalised (``attention_with_lse`` fixes them). Higher ``priority``
    wins the automatic choice. ``paged`` (optional) is a decode kernel reading the paged cache directly
    (megacp/ops/paged_decode.py); ``unavailable_reason`` (optional) explains, in the error of a forced but unavailable
    backend, why it cannot run. ``takes_host_cu_seqlens``: ``varlen`` accepts the keyword ``host_cu_seqlens`` (the
    offsets as host ints, so it need not read ``cu_seqlens`` back).
    ``differentiable``: ``varlen`` returns an output and an LSE that autograd differentiates w.r.t. q, k and v (see
    megacp/ops/attention_grad.py); ``attention_with_lse`` refuses a backend without it when gradients are needed.
    ``paged_writes_out``: ``paged`` accepts the keywords ``out`` and ``lse`` and writes its result into them (else
    ``paged_attention_with_lse`` copies it there).
    ``takes_seqused_k``: ``varlen`` accepts the keyword ``seqused_k`` (key ranges by start and length, possibly
    overlapping; ``host_cu_seqlens`` then carries its host ints third); for the others ``attention_with_lse`` first
    lays each sequence's keys out on its own (one gather, ``keys_per_sequence``).
    """

    name: str
    varlen: VarlenFn
    available: Callable[[torch.device], bool]
    priority: int = 0
    paged: Optional[PagedFn] = None
    unavailable_reason: Optional[Callable[[torch.device], str]] = None
    takes_host_cu_seqlens: bool = False
    differentiable: bool = False
    paged_writes_out: bool = False
    takes_seqused_k: bool = False


_BACKENDS: dict[str, AttentionBackend] = {}


def register_backend(backend: AttentionBackend) -> None:
    """Add (or replace) a backend in the registry."""
    _BACKENDS[backend.name] = backend


def get_backend(name: str) -> AttentionBackend:
    """The registered backend called ``name`` (KeyError if none is)."""
    return _BACKENDS[name]


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends usable on ``device``, best first."""
    device = torch.device(device)
    ranked = sorted(_BACKENDS.values(), key=lambda b: -b.priority)
    return [b.name for b in ranked if b.available(device)]


def select_backend(device: torch.device | str, backend: str | AttentionBackend | None = None) -> AttentionBackend:
    """``backend`` (or ``$MEGACP_ATTN_BACKEND``) if given, else the best available one for ``device``.

    The one place the environment variable is read and the registry ranked: a layer calls it once and keeps the
    result (``ContextParallelAttention.attention_backend``), then passes the ``AttentionBackend`` itself to
    ``attention_with_lse`` / ``paged_attention_with_lse``, which use a given backend object as it is.
    """
    if isinstance(backend, AttentionBackend):
        return backend
    device = torch.device(device)
    name = backend if backend is not None else (os.environ.get(ENV_BACKEND) or None)
    usable = available_backends(device)
    if name is None:
        if not usable:  # "torch" is always available, so this only happens if someone replaced it
            raise ValueError(f"no attention backend is available on {device}; registered: {sorted(_BACKENDS)}")
        return _BACKENDS[usable[0]]
    if name not in usable:
        what = "unknown" if name not in _BACKENDS else f"not available on {device}"
        if name in _BACKENDS and _BACKENDS[name].unavailable_reason is not None:
            why = _BACKENDS[name].unavailable_reason(device)
            what += f" ({why})" if why else ""
        raise ValueError(
            f"attention backend {name!r} (from backend= or ${ENV_BACKEND}) is {what}; choose one of {usable}"
        )
    return _BACKENDS[name]


# ----------------------------------------------------------------------------------------------- public entry points
def attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    causal: bool,
    scale: float,
    backend: str | AttentionBackend | None = None,
    host_cu_seqlens: HostCuSeqlens | None = None,
    seqused_k: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Packed varlen attention returning the softmax log-sum-exp.

    # q: [Tq, Hq, D], k/v: [Tk, Hk, D], cu_seqlens_q/k: int [B+1], seqused_k: int [B] | None
    # -> (out [Tq, Hq, D] q.dtype, lse [Tq, Hq] float32)
    ``causal`` is bottom-right aligned; rows that see no key give out 0 and lse -inf. ``host_cu_seqlens``: the same
    offsets as host ints (optional; given, nothing is read back from the device), with ``seqused_k``'s third.
    ``seqused_k``: sequence b's keys are ``k[cu_seqlens_k[b] : cu_seqlens_k[b] + seqused_k[b]]`` (ranges may
    overlap; ``cu_seqlens_k[B]`` is not read), else ``k[cu_seqlens_k[b] : cu_seqlens_k[b + 1]]``. ``backend``: a
    name, an ``AttentionBackend`` (used as given: what the layers pass), or None (``select_backend``'s choice).
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, host_cu_seqlens)
    impl = select_backend(q.device, backend)
    if not impl.differentiable and needs_grad(q, k, v):
        raise ValueError(
            f"attention backend {impl.name!r} cannot compute gradients, and q/k/v require grad; choose a "
            f"differentiable one ({', '.join(n for n in available_backends(q.device) if _BACKENDS[n].differentiable)}) "
            f"with backend= or ${ENV_BACKEND}, or run under torch.no_grad() / torch.inference_mode()"
        )
    if seqused_k is not None and not impl.takes_seqused_k:
        k, v, cu_seqlens_k, host_cu_seqlens = keys_per_sequence(k, v, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                                                host_cu_seqlens)
        seqused_k = None
    extra = {} if seqused_k is None else {"seqused_k": seqused_k}
    if impl.takes_host_cu_seqlens:
        out, lse = impl.varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, float(scale),
                               host_cu_seqlens=host_cu_seqlens, **extra)
    else:
        out, lse = impl.varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, float(scale), **extra)
    out, lse = out.to(q.dtype), lse.float()
    if host_cu_seqlens is not None and _every_row_has_keys(host_cu_seqlens, causal):
        return out, lse  # nothing to normalise; skips a dozen small kernels per call
    has_key = rows_with_keys(cu_seqlens_q, cu_seqlens_k, causal, q.shape[0], seqused_k)
    return _normalise_empty_rows(out, lse, has_key)


def _every_row_has_keys(host_cu_seqlens: HostCuSeqlens, causal: bool) -> bool:
    cq = host_cu_seqlens[0]
    for b, lk in enumerate(key_lengths(host_cu_seqlens)):
        lq = cq[b + 1] - cq[b]
        if lq and (lk == 0 or (causal and lq > lk)):
            return False
    return True


def paged_attention_with_lse(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    scale: float,
    backend: str | AttentionBackend | None = None,
    seq_lens_host: Sequence[int] | None = None,
    out: Tensor | None = None,
    lse: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Decode attention (one query per sequence, non-causal) over this rank's paged KV shard.

    # q: [B, Hq, D], k_cache/v_cache: [num_blocks, block_size, Hkv, D], block_table: int [B, max_blocks] (local block
    # ids), seq_lens: int [B] (local lengths, may be 0) -> (out [B, Hq, D] q.dtype, lse [B, Hq] float32)
    Uses the backend's paged kernel when it has one (reads the cache through the block table), else gathers each
    sequence's K/V into a contiguous buffer and runs ``attention_with_lse``; seq_len 0 gives out 0 and lse -inf.
    ``seq_lens_host``: the same lengths as host ints (optional; given, nothing is read back from the device). The
    paged kernel plans its splits by the block table's capacity either way, as inside a CUDA graph, so a decode step
    gives the same numbers eagerly and replayed (each split finds its share of the real length on the device).
    ``out`` [B, Hq, D] (any float dtype, last dim contiguous) and ``lse`` [B, Hq] float32 or float64 (any strides),
    given together, receive the result and are returned: a caller lays out the partial for its collective this way
    (DCP decode writes into the packed buffer of ``cp_merge_packed``) with no extra copy. They take results only
    without autograd (views of one buffer cannot be written differentiably): with gradients, leave them out.
    The entries of ``block_table`` that hold a sequence's tokens (the first ``ceil(seq_len / block_size)`` of its
    row) must be blocks of the cache; entries past them are padding and may hold anything (``-1`` included: no
    path reads through them). No length may exceed its row's ``max_blocks·block_size``: checked on CPU
    (ValueError; free there), on CUDA only with ``MEGACP_DEBUG_CHECKS=1`` (a sync), else the caller's contract
    (``KVSession`` and the engine build them from their own allocator).
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"paged_attention_with_lse: expected q [B, Hq, D] and k/v cache [num_blocks, block_size, Hkv, D], got "
            f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    if block_table.shape[0] != q.shape[0] or seq_lens.shape != (q.shape[0],):
        raise ValueError(
            f"paged_attention_with_lse: block_table {tuple(block_table.shape)} and seq_lens {tuple(seq_lens.shape)} "
            f"need one row per query (B={q.shape[0]})"
        )
    if seq_lens_host is not None and len(seq_lens_host) != q.shape[0]:
        raise ValueError(f"paged_attention_with_lse: seq_lens_host has {len(seq_lens_host)} entries for B={q.shape[0]}")
    _check_out(q, out, lse)
    if q.device.type == "cpu" or debug_checks():
        _check_paged_read(block_table, seq_lens, k_cache.shape[0], k_cache.shape[1])
    impl = select_backend(q.device, backend)
    if impl.paged is not None and not needs_grad(q):
        into = {"out": out, "lse": lse} if impl.paged_writes_out and out is not None else {}
        res = impl.paged(q, k_cache, v_cache, block_table, seq_lens, float(scale), **into)
        if res is not None:
            return _written(res[0], res[1], out, lse) if into else (res[0].to(q.dtype), res[1].float())
    res = _paged_gather(q, k_cache, v_cache, block_table, seq_lens, scale, impl, seq_lens_host)
    return res if out is None else _written(res[0], res[1], out, lse)


def _check_paged_read(block_table: Tensor, seq_lens: Tensor, num_blocks: int, block_size: int) -> None:
    """ValueError unless every length fits its block-table row and every block id is one of the cache's."""
    lens = seq_lens.long().cpu()
    capacity = block_table.shape[1] * block_size
    if lens.numel() and not bool(((lens >= 0) & (lens <= capacity)).all()):
        b = int(torch.nonzero((lens < 0) | (lens > capacity))[0])
        raise ValueError(
            f"paged_attention_with_lse: seq_lens[{b}] = {int(lens[b])} does not fit block_table's row of "
            f"{block_table.shape[1]} blocks of {block_size} (0 to {capacity} tokens); widen the block table"
        )
    rows = block_table.long().cpu()
    used = torch.arange(rows.shape[1]).unsqueeze(0) < (lens.clamp(min=0) + block_size - 1).div(
        block_size, rounding_mode="floor").unsqueeze(1)  # [B, M]: entries that hold tokens
    bad = ((rows < 0) | (rows >= num_blocks)) & used
    if bool(bad.any()):
        b, j = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"paged_attention_with_lse: block_table[{b}, {j}] = {int(rows[b, j])} is not a block of the cache "
            f"(0 to {num_blocks - 1}); the block table and the cache disagree on num_blocks"
        )


def _check_out(q: Tensor, out: Tensor | None, lse: Tensor | None) -> None:
    if out is None and lse is None:
        return
    if needs_grad(q):
        raise ValueError("paged_attention_with_lse: out= and lse= take results only without autograd (q requires "
                         "grad); leave them out for a differentiable (out, lse), or run under torch.no_grad()")
    B, Hq, D = q.shape
    if (out is None or lse is None or out.shape != (B, Hq, D) or lse.shape != (B, Hq)
            or lse.dtype not in (torch.float32, torch.float64) or not out.is_floating_point() or out.stride(-1) != 1):
        got_out = None if out is None else (tuple(out.shape), out.dtype)
        got_lse = None if lse is None else (tuple(lse.shape), lse.dtype)
        raise ValueError(
            f"paged_attention_with_lse: out and lse go together, out [B, Hq, D] = {[B, Hq, D]} floating with a "
            f"contiguous last dim and lse [B, Hq] float32 (or float64); got out {got_out} and lse {got_lse}"
        )


def _written(res_out: Tensor, res_lse: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """The result in the caller's ``out``/``lse``: copied there unless the kernel wrote there already."""
    if res_out.data_ptr() != out.data_ptr():
        out.copy_(res_out)
    if res_lse.data_ptr() != lse.data_ptr():
        lse.copy_(res_lse)
    return out, lse


def _paged_gather(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float,
                  backend: str | AttentionBackend | None, seq_lens_host: Sequence[int] | None
                  ) -> tuple[Tensor, Tensor]:
    """The gather path of ``paged_attention_with_lse`` (no paged kernel, or gradients needed)."""
    block_size = k_cache.shape[1]
    lens = seq_lens.to(device=q.device, dtype=torch.long)
    if seq_lens_host is None:  # lengths unknown on the host (a CUDA graph): masked attention over whole rows
        return _paged_masked(q, k_cache, v_cache, block_table, lens, scale)
    host_max = max(seq_lens_host, default=0)
    if host_max > block_table.shape[1] * block_size:
        raise ValueError(
            f"paged_attention_with_lse: seq_lens up to {host_max} need more than block_table's "
            f"{block_table.shape[1]} blocks of {block_size}"
        )
    # Flat index t of every local token, sequence after sequence: sequence b, local index j = t - cu_k[b], slot
    # block_table[b, j // block_size] * block_size + j % block_size. Sizes come from the host: no read-back.
    cu_k_host = [0]
    for n in seq_lens_host:
        cu_k_host.append(cu_k_host[-1] + int(n))
    total = cu_k_host[-1]
    cu_k = torch.zeros(q.shape[0] + 1, device=q.device, dtype=torch.long)
    cu_k[1:] = torch.cumsum(lens, 0)
    seq = torch.repeat_interleave(torch.arange(q.shape[0], device=q.device), lens, output_size=total)
    j = torch.arange(total, device=q.device) - cu_k[seq]
    slots = block_table.to(device=q.device, dtype=torch.long)[seq, j // block_size] * block_size + j % block_size
    k = k_cache.flatten(0, 1)[slots]
    v = v_cache.flatten(0, 1)[slots]
    cu_q = torch.arange(q.shape[0] + 1, device=q.device, dtype=torch.int32)
    host = (list(range(q.shape[0] + 1)), cu_k_host)
    return attention_with_lse(q, k, v, cu_q, cu_k.to(torch.int32), causal=False, scale=scale, backend=backend,
                              host_cu_seqlens=host)


# ----------------------------------------------------------------------------------------------- helpers
def _paged_masked(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, lens: Tensor, scale: float
                  ) -> tuple[Tensor, Tensor]:
    """Decode over every slot of each sequence's block-table row, masked past its length: fixed shapes, no host
    value, so it can be captured in a CUDA graph. Reads the whole row (capacity, not length): the fallback when no
    paged kernel runs (float32, odd head dims).

    # q [B, Hq, D], caches [N, bs, Hkv, D], block_table [B, M], lens [B] -> (out [B, Hq, D], lse [B, Hq] float32)
    """
    B, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    # Entries past a sequence's blocks are padding (e.g. -1): clamp them to a real block, whose slots are masked.
    rows = block_table.to(device=q.device, dtype=torch.long).clamp(0, k_cache.shape[0] - 1)
    k = k_cache[rows].reshape(B, -1, Hkv, D).repeat_interleave(Hq // Hkv, dim=2).float()  # [B, M·bs, Hq, D]
    v = v_cache[rows].reshape(B, -1, Hkv, D).repeat_interleave(Hq // Hkv, dim=2).float()
    scores = torch.einsum("bhd,bkhd->bhk", q.float(), k) * scale
    valid = torch.arange(scores.shape[-1], device=q.device) < lens.unsqueeze(1)  # [B, M·bs]
    scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for an empty shard
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))  # 0 where masked
    v = v.masked_fill(~valid[:, :, None, None], 0.0)  # slots past the length may hold anything, NaN included
    out = torch.einsum("bhk,bkhd->bhd", probs, v)
    return out.to(q.dtype), lse


def _normalise_empty_rows(out: Tensor, lse: Tensor, has_key: Tensor) -> tuple[Tensor, Tensor]:
    """out 0 / lse -inf where ``has_key`` is False.  # out [T, H, D], lse [T, H], has_key bool [T]"""
    keep = has_key.view(-1, 1)
    lse = torch.where(keep, lse, torch.full_like(lse, float("-inf")))
    out = torch.where(keep.unsqueeze(-1), out, torch.zeros_like(out))
    return out, lse


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                  seqused_k: Tensor | None = None, host_cu_seqlens: HostCuSeqlens | None = None) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or k.shape[:2] != v.shape[:2] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"attention_with_lse: expected q [Tq, Hq, D], k [Tk, Hk, D], v [Tk, Hk, Dv], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"attention_with_lse: query heads ({q.shape[1]}) must be a multiple of key/value heads "
            f"({k.shape[1]}) for GQA"
        )
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.numel() < 1:
        raise ValueError(
            f"attention_with_lse: cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k "
            f"{tuple(cu_seqlens_k.shape)} must both be [B+1]"
        )
    if seqused_k is not None and seqused_k.shape != (cu_seqlens_q.numel() - 1,):
        raise ValueError(f"attention_with_lse: seqused_k {tuple(seqused_k.shape)} must be [B] = "
                         f"[{cu_seqlens_q.numel() - 1}] (one key count per sequence)")
    if host_cu_seqlens is not None and len(host_cu_seqlens) != (2 if seqused_k is None else 3):
        raise ValueError(
            f"attention_with_lse: host_cu_seqlens has {len(host_cu_seqlens)} entries; it is (cu_seqlens_q, "
            f"cu_seqlens_k) as host ints, with seqused_k's host ints third exactly when seqused_k is given"
        )
