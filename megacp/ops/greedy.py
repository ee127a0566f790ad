"""Greedy next tokens in one kernel: each row's argmax with a flag for rows holding NaN or inf.

``torch.isfinite(logits).all(-1)`` then ``logits.argmax(-1)`` then ``torch.where`` is four kernels over the
vocabulary per decode step, and PyTorch's argmax reduces one long row with few blocks (a 128k-vocabulary row took
about 28 µs on an H200, the finiteness check another 15, docs/benchmarks.md). ``greedy_tokens`` is one Triton launch:
programs of ``_BLOCK`` columns each reduce their chunk to (max, first index of the max, any non-finite), and the last
program of a row to arrive (an arrival counter, as the paged decode kernels' fused merge) reduces the chunks. Off CUDA
(or without Triton) the same contract in PyTorch ops.
"""

from __future__ import annotations

import torch
from torch import LongTensor, Tensor

from megacp.ops import paged_decode
from megacp.ops.decode_fused import pdl_options, tl, triton

if triton is not None:
    from megacp.ops.decode_fused import last_to_arrive, wait_for_previous_kernel

_BLOCK = 4096  # columns per program (a 128k vocabulary: 32 programs per row)


def greedy_tokens(logits: Tensor, nonfinite_token: int) -> LongTensor:
    """Greedy token per row, ``nonfinite_token`` for a row with any NaN or inf.

    # logits: [N, V] floating (last dim contiguous on CUDA) -> [N] long
    Ties go to the lowest id (as ``torch.argmax``). On CUDA (or the CPU under ``TRITON_INTERPRET=1``) one Triton
    kernel (no host sync, capturable in a CUDA graph); elsewhere PyTorch ops with the same result.
    """
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"greedy_tokens expects floating logits [N, V], got {tuple(logits.shape)} {logits.dtype}")
    N, V = logits.shape
    if not paged_decode.available(logits.device) or N == 0 or V == 0 or logits.stride(-1) != 1:
        finite = torch.isfinite(logits).all(dim=-1)
        return torch.where(finite, logits.argmax(dim=-1), nonfinite_token)
    chunks = triton.cdiv(V, _BLOCK)
    part_val = torch.empty(N, chunks, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(N, chunks, dtype=torch.int32, device=logits.device)
    part_bad = torch.empty(N, chunks, dtype=torch.int32, device=logits.device)
    tokens = torch.empty(N, dtype=torch.long, device=logits.device)
    counters = paged_decode._arrival_counters(logits.device, N)
    pdl = pdl_options(logits)
    _greedy_kernel[(N, chunks)](
        logits, part_val, part_idx, part_bad, tokens, counters, logits.stride(0), V, chunks, nonfinite_token,
        BLOCK=_BLOCK, CHUNKS_PAD=max(16, triton.next_power_of_2(chunks)), GDC=bool(pdl), num_warps=8, **pdl,
    )
    return tokens


if triton is not None:

    @triton.jit
    def _greedy_kernel(x_ptr, val_ptr, idx_ptr, bad_ptr, tok_ptr, counter_ptr, stride_x, V, chunks, nonfinite_token,
                       BLOCK: tl.constexpr, CHUNKS_PAD: tl.constexpr, GDC: tl.constexpr):
        if GDC:  # launched with PDL (decode_fused.pdl_options)
            wait_for_previous_kernel()
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        ok = cols < V
        x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=ok, other=float("-inf")).to(tl.float32)
        bad = tl.max((ok & ((x != x) | (tl.abs(x) == float("inf")))).to(tl.int32), 0)
        m = tl.max(x, 0)
        first = tl.min(tl.where(ok & (x == m), cols, V), 0)  # the lowest column holding the max
        part = row * chunks + chunk
        tl.store(val_ptr + part, m)
        tl.store(idx_ptr + part, first)
        tl.store(bad_ptr + part, bad)
        if last_to_arrive(counter_ptr + row, chunks):  # the row's last chunk to arrive reduces the row's chunks
            c = tl.arange(0, CHUNKS_PAD)
            c_ok = c < chunks
            vals = tl.load(val_ptr + row * chunks + c, mask=c_ok, other=float("-inf"), cache_modifier=".cg")
            idxs = tl.load(idx_ptr + row * chunks + c, mask=c_ok, other=V, cache_modifier=".cg")
            bads = tl.load(bad_ptr + row * chunks + c, mask=c_ok, other=0, cache_modifier=".cg")
            best = tl.max(vals, 0)
            # chunks hold increasing columns: the lowest index among the chunks holding the max is the first max
            tok = tl.min(tl.where(c_ok & (vals == best), idxs, V), 0)
            tok = tl.where(tl.max(bads, 0) > 0, nonfinite_token, tok)
            tl.store(tok_ptr + row, tok.to(tl.int64))
            tl.atomic_xchg(counter_ptr + row, 0)  # ready for the next launch (or graph replay)


__all__ = ["greedy_tokens"]
