"""Paged decode attention with LSE: a Triton kernel that reads K/V straight from the paged cache.

The generic path (``paged_attention_with_lse`` in ``attention.py``) gathers each sequence's K/V into a contiguous
copy and then runs a prefill kernel, so every decode step reads the cache twice and writes it once. This kernel reads
the cache once, through the block table, the way vLLM's paged attention does, and returns the log-sum-exp needed by
the DCP/PCP merges.

Design (split-KV, "flash decoding"): one program per (sequence, KV head, split of the sequence). A program loads the
``G = Hq / Hkv`` query heads that share its KV head (GQA: the K/V tile is read once for all of them), walks its
tokens in tiles of ``block_n``, looking up every token's block in the block table, and keeps an online softmax in
base 2. It writes a float32 partial output and a partial LSE per split; a second small kernel (``merge_kernel``)
merges the splits by LSE, or, for a few splits, the last split program to finish does (``merge_splits_on_arrival``).
Splits give enough programs to fill the GPU when the batch is small and the context long. The number of splits is
planned on the host (``choose_plan``: from the batch and an upper bound on the length, no device read), but each
program derives its token range from its sequence's real length on the device, so a plan sized by the block table's
capacity (a CUDA graph) still spreads a short sequence over every split. With one split the kernel writes the final
output itself and the merge kernel is skipped.

Without Triton (CPU, or no ``triton`` package) ``available()`` is False and callers use the gather path.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from megacp.ops.decode_fused import pdl_options, tl, triton
from megacp.ops.merge_kernel import merge_partials

if triton is not None:
    from megacp.ops.decode_fused import wait_for_previous_kernel
    from megacp.ops.merge_kernel import merge_splits_on_arrival

_LOG2E = 1.4426950408889634
# Triton reads TRITON_INTERPRET when it is imported; read it once here too (``available`` runs in every decode step).
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_BLOCK_N = 64  # tokens per tile
_MAX_SPLITS = 64  # cap on splits per sequence (the merge kernel walks them in chunks)
_MAX_FUSED_SPLITS = 8  # the in-kernel merge walks the splits one by one


def supports(q: Tensor, k_cache: Tensor) -> bool:
    """Whether the kernel takes these inputs: one dtype among float16, bfloat16 and float32 (float32 is computed
    without tf32), head dim up to 256."""
    return (q.dtype in (torch.float16, torch.bfloat16, torch.float32) and k_cache.dtype == q.dtype
            and q.shape[-1] <= 256)


def available(device: torch.device | str) -> bool:
    """Whether the Triton kernel can run on ``device`` (CUDA, or any device under ``TRITON_INTERPRET=1``)."""
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return _INTERPRETED and device.type == "cpu"


@dataclass(frozen=True)
class DecodePlan:
    """How the split kernel is launched: ``num_splits`` programs per (sequence, KV head), each walking its share of
    the sequence in tiles of ``block_n`` tokens, with Triton's ``num_warps`` and ``num_stages``."""

    num_splits: int
    block_n: int = _BLOCK_N
    num_warps: int = 4
    num_stages: int = 2
    # merge the splits in the split kernel (its last program per sequence and KV head does it) instead of a second
    # kernel: saves a launch, worth it for a few splits (``_MAX_FUSED_SPLITS``)
    fused_merge: bool = False

    def __post_init__(self) -> None:
        checks = (
            ("num_splits", self.num_splits, self.num_splits >= 1, "1 or more, e.g. 4"),
            ("block_n", self.block_n, self.block_n >= 16 and self.block_n & (self.block_n - 1) == 0,
             f"a power of two from 16, e.g. {_BLOCK_N}"),
            ("num_warps", self.num_warps, self.num_warps in (1, 2, 4, 8, 16), "1, 2, 4, 8 or 16"),
            ("num_stages", self.num_stages, self.num_stages >= 1, "1 or more, e.g. 2"),
        )
        for name, value, ok, valid in checks:
            if not isinstance(value, int) or isinstance(value, bool) or not ok:
                raise ValueError(f"DecodePlan({name}={value!r}) is not valid: use {valid}")


def choose_plan(batch: int, num_kv_heads: int, max_tokens: int, num_sms: int = 132) -> DecodePlan:
    """The split-KV plan for ``batch`` sequences of at most ``max_tokens`` tokens (the longest sequence, or an upper
    bound on it such as the block table's capacity).

    Aims at about four programs per multiprocessor over ``batch · num_kv_heads · num_splits`` programs: one wave,
    each program as long as possible (chosen with ``bench/decode_sweep.py``, docs/benchmarks.md). Never more splits
    than tiles, never more than ``_MAX_SPLITS``; up to ``_MAX_FUSED_SPLITS`` splits are merged in the kernel.
    """
    tiles = max(1, -(-max_tokens // _BLOCK_N))
    want = max(1, round(4 * num_sms / max(1, batch * num_kv_heads)))
    splits = min(want, tiles, _MAX_SPLITS)
    return DecodePlan(num_splits=splits, fused_merge=1 < splits <= _MAX_FUSED_SPLITS)


def paged_decode_with_lse(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    scale: float,
    max_seq_len: int | None = None,
    plan: DecodePlan | None = None,
    out: Tensor | None = None,
    lse: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Decode attention (one query per sequence, non-causal) over a paged K/V cache, with LSE.

    # q: [B, Hq, D], k_cache/v_cache: [num_blocks, block_size, Hkv, D], block_table: int [B, max_blocks],
    # seq_lens: int [B] (may be 0) -> (out [B, Hq, D] q.dtype, lse [B, Hq] float32 natural log)
    ``max_seq_len`` (optional, a host int bounding ``seq_lens``) sizes the split plan; without it the block table's
    capacity is used, which needs no device sync; ``plan`` overrides ``choose_plan`` (benchmarks). A sequence of
    length 0 gives out 0 and lse -inf. ``out`` [B, Hq, D] (float16/bfloat16/float32, last dim contiguous) and ``lse``
    [B, Hq] float32, both optional and of any strides otherwise, receive the result in place (e.g. the two views of a
    packed ``[out | lse]`` buffer).
    """
    if triton is None:
        raise ValueError("paged_decode_with_lse needs the 'triton' package; use paged_attention_with_lse(backend='torch')")
    B, Hq, D = q.shape
    num_blocks, block_size, Hkv, Dk = k_cache.shape
    if Dk != D or v_cache.shape != k_cache.shape or Hq % Hkv != 0:
        raise ValueError(
            f"paged_decode_with_lse: q {tuple(q.shape)} and caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} "
            f"need equal head dims, equal cache shapes and Hq a multiple of Hkv"
        )
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged_decode_with_lse: the caches' head_dim must be contiguous")
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device) if lse is None else lse
    if (out.shape != (B, Hq, D) or lse.shape != (B, Hq) or out.stride(-1) != 1 or lse.dtype != torch.float32
            or out.dtype not in (torch.float16, torch.bfloat16, torch.float32) or out.device != q.device):
        raise ValueError(f"paged_decode_with_lse: out {tuple(out.shape)} {out.dtype} and lse {tuple(lse.shape)} "
                         f"{lse.dtype} must be [B, Hq, D] half or float32 with a contiguous last dim and [B, Hq] "
                         f"float32 on q's device (B, Hq, D = {B}, {Hq}, {D})")
    if B == 0:
        return out, lse
    q = q.contiguous() if q.stride(-1) != 1 else q
    group = Hq // Hkv
    cap = block_table.shape[1] * block_size
    bound = cap if max_seq_len is None else max(0, min(int(max_seq_len), cap))
    num_sms = _num_sms(q.device.index if q.device.index is not None else torch.cuda.current_device()) if q.is_cuda else 4
    plan = plan or choose_plan(B, Hkv, bound, num_sms)
    splits = plan.num_splits
    fused = plan.fused_merge and splits > 1
    if splits == 1:  # the split kernel writes the final output and LSE itself
        out_part, lse_part, stride_os = out, lse, 0
    else:
        out_part = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(B, Hq, splits, dtype=torch.float32, device=q.device)
        stride_os = out_part.stride(2)
    seq_lens = seq_lens.to(device=q.device)
    # fused merge: one arrival counter per (sequence, KV head); without it the kernel never touches its counter
    # argument, which then is any device tensor
    counters = _arrival_counters(q.device, B * Hkv) if fused else seq_lens
    block_table = block_table.to(device=q.device)
    d_pad = max(16, triton.next_power_of_2(D))
    pdl = pdl_options(q)
    _split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, block_table, seq_lens, out_part, lse_part,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0),
        out_part.stride(0), out_part.stride(1), stride_os,
        lse_part.stride(0), lse_part.stride(1),
        out, lse, counters, out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        float(scale) * _LOG2E, splits,
        FUSED_MERGE=fused, BLOCK_SIZE=block_size, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=D, D_PAD=d_pad, BLOCK_N=plan.block_n,
        # float32 caches (tests, CPU-style runs) must not silently drop to tf32 in the matrix units
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", GDC=bool(pdl),
        num_warps=plan.num_warps, num_stages=plan.num_stages, **pdl,
    )
    if splits > 1 and not fused:  # [B, Hq, S, ...] partials, merged as [S, B, Hq, ...] strided views
        merge_partials(out_part.permute(2, 0, 1, 3), lse_part.permute(2, 0, 1), out, lse)
    return out, lse


_COUNTERS: dict[torch.device, list[Tensor]] = {}


def _arrival_counters(device: torch.device, n: int) -> Tensor:
    """``n`` zeroed int32 arrival counters for a fused-merge launch on ``device``, without a memset per launch.

    The buffer persists per device: the last program of each (sequence, KV head) resets its counter to 0 before the
    kernel ends, so the next launch in stream order finds zeros again (eager calls and graph replays alike). It
    assumes that fused launches on one device do not overlap in time (one stream, as the engine's step runs). A
    buffer too small is superseded by a larger zeroed one but kept alive, because graphs captured earlier hold its
    address; during a capture, where that zeroing would not run before later eager calls, the launch gets its own
    zeroed counters instead (a memset inside the graph).
    """
    bufs = _COUNTERS.setdefault(device, [])
    if bufs and bufs[-1].numel() >= n:
        return bufs[-1][:n]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    bufs.append(torch.zeros(max(n, 1024), dtype=torch.int32, device=device))
    return bufs[-1][:n]


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


if triton is not None:

    @triton.jit
    def _split_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, lse_ptr,
        stride_qb, stride_qh,
        stride_kn, stride_kt, stride_kh,
        stride_vn, stride_vt, stride_vh,
        stride_btb,
        stride_ob, stride_oh, stride_os,
        stride_lb, stride_lh,
        fin_out_ptr, fin_lse_ptr, counter_ptr, stride_fb, stride_fh, stride_flb, stride_flh,
        scale_log2, num_splits,
        FUSED_MERGE: tl.constexpr, BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
        GDC: tl.constexpr,
    ):
        if GDC:  # launched with PDL (decode_fused.pdl_options)
            wait_for_previous_kernel()
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(lens_ptr + b).to(tl.int32)
        # this split's share of the real length: whole tiles, spread evenly (trailing splits may be empty)
        tokens_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits) * BLOCK_N
        start = split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, seq_len)

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D_PAD)
        g_ok = g < GROUP
        d_ok = d < HEAD_DIM
        heads = kvh * GROUP + g
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)

        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
        bt_row = bt_ptr + b * stride_btb
        # Every tile starts below ``end``, so it holds at least one real token and m_i is finite after it.
        for t0 in range(start, end, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            t_ok = t < end
            blk = tl.load(bt_row + t // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
            kv_mask = t_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + (blk * stride_kn + (t % BLOCK_SIZE) * stride_kt)[:, None] + kvh * stride_kh
                        + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [GROUP_PAD, BLOCK_N], base-2 logits
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + (blk * stride_vn + (t % BLOCK_SIZE) * stride_vt)[:, None] + kvh * stride_vh
                        + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        has = l_i > 0
        l_safe = tl.where(has, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(has, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))
        o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=g_ok)

        if FUSED_MERGE:  # the last split program of this (sequence, KV head) to arrive merges every split
            merge_splits_on_arrival(
                counter_ptr + b * tl.num_programs(1) + kvh, num_splits,
                lse_ptr + b * stride_lb + heads * stride_lh, 1,
                out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], stride_os, g_ok, d_ok,
                fin_out_ptr + b * stride_fb + heads[:, None] * stride_fh + d[None, :],
                fin_lse_ptr + b * stride_flb + heads * stride_flh, GROUP_PAD, D_PAD,
            )


__all__ = ["DecodePlan", "available", "supports", "choose_plan", "paged_decode_with_lse"]
