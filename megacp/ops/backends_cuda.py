"""CUDA attention-with-LSE backends: Transformer Engine ("te"), cuDNN SDPA ("cudnn"), FlashAttention-2 ("flash").

All three plug into the registry of ``megacp.ops.attention`` (registered here) and share its contract: packed varlen
``q [Tq, Hq, D], k/v [Tk, Hk, D]``, ``cu_seqlens`` int ``[B+1]``, causal = bottom-right aligned, natural-log float32
LSE ``[Tq, Hq]``. Decode over the paged cache goes to the Triton kernel of ``megacp.ops.paged_decode`` when Triton is
there (``paged`` hook), else to the gather path.

- "te": ``transformer_engine.pytorch``'s low-level ``fused_attn_fwd`` on the packed THD layout, one call per step for
  all sequences (its kernel, the lazy import and the cuDNN-clash check: ``megacp.ops.backends_te``).
- "cudnn": ``aten::_scaled_dot_product_cudnn_attention``. Its causal mask is top-left, so a chunk with fewer queries
  than keys runs as unmasked prefix keys plus a square causal part, merged by LSE. Causal batches whose sequences
  read nested prefixes of one K/V (a PCP rank's head and tail chunks) run as pieces (``nested_prefix_plan``): one
  call per distinct prefix piece, on a contiguous suffix of the packed queries, and one batched call for all
  squares of one length: 3 calls for PCP rank r > 0, 2 for rank 0, instead of 4 and 3. Other layouts, or
  ``MEGACP_CUDNN_PIECES=0``, run per sequence: one call, or prefix + square (``bottom_right_causal_from_top_left``).
- "flash": ``aten::_flash_attention_forward`` on the packed layout (varlen; its causal mask is bottom-right; GQA
  native).
- "cuda" (the automatic choice): picks one of the above per call by shape, from the measurements in
  docs/benchmarks.md: a few sequences that are long (the PCP chunks of a 128k prompt) or need one cuDNN call each
  (a whole prompt) go to cuDNN, everything else to TE (one packed call), or without TE to cuDNN for a few
  sequences and FlashAttention for many.

Inputs the fused kernels cannot take (float32, head dims that are not a multiple of 8 or above 256) go to the "torch"
reference backend on the same device, so a CUDA run of the small float32 tests still works. A V head dim other than
Q/K's (MLA prefill: 192 / 128) goes to the same kernels (``_any_v_dim``): TE and cuDNN are tried with it as it is
(each learns on its first such call whether this TE / cuDNN takes it), FlashAttention and the ones that refuse get
the narrower side zero-padded, which is exact (zero V columns give zero outputs, sliced off; zero Q/K columns add
nothing to the scores). ``bench/prefill_mla.py`` measures the candidates.

Backward (all four are ``differentiable``): when q/k/v require grad, "te" runs ``fused_attn_fwd`` in training mode
and ``fused_attn_bwd`` for the gradient, "cudnn" and "flash" let PyTorch's autograd differentiate their ops, and
``megacp.ops.attention_grad`` makes the LSE differentiable too (the ops differentiate their output only), so the LSE
merges of cuDNN's prefix + square decomposition and of its pieces pass gradients exactly. Without gradients nothing changes.
What the kernels share (the packed wrapper, the V-head-dim adapter, ``lse_rows``): ``megacp.ops.backends_common``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from megacp.ops.attention import AttentionBackend, register_backend
from megacp.ops.varlen import bottom_right_causal_from_top_left
from megacp.ops.attention_grad import AutogradCall, differentiable, lse_differentiable_attention, needs_grad
from megacp.ops.backends_common import (  # noqa: F401  (fused_shapes_ok, lse_rows, padded_v_dim: public here too)
    _any_v_dim,
    _is_cuda,
    _key_ranges,
    _max_len,
    _packed,
    _paged,
    fused_shapes_ok,
    lse_rows,
    padded_v_dim,
)
from megacp.ops.backends_te import _te_available, _te_kernel, cudnn_clash, te_unavailable_reason  # noqa: F401
from megacp.ops.cudnn_pieces import PiecesPlan, diagonal_blocks, nested_prefix_plan
from megacp.ops.merge import merge_attn_states_into


# ----------------------------------------------------------------------------------------------- "cudnn"
_CUDNN_OP = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
# Whether the cuDNN op takes fewer K/V heads than query heads (GQA) itself; None until the first GQA call tells.
_CUDNN_GQA: dict[str, bool | None] = {"native": None}

ENV_PIECES = "MEGACP_CUDNN_PIECES"
# Whether the "cudnn" kernel runs nested-prefix layouts (PCP's chunks) as pieces (``_cudnn_pieces``); False (or
# MEGACP_CUDNN_PIECES=0 at import) keeps the per-sequence prefix + square calls. bench/prefill_split.py sets it to
# measure both in one run.
CUDNN_PIECES = os.environ.get(ENV_PIECES, "1") != "0"
# Measured on an H200 (2026-12-03, bench/prefill_split.py, pieces vs per sequence in the same rounds): 1.05-1.06x
# faster at 32k tokens (pcp 1-8), 0.99-1.01x at 128k; so batches whose longest key range reaches this many keys
# keep the per-sequence calls.
PIECES_MAX_KEYS = 65536


def _cudnn_batch(q: Tensor, k: Tensor, v: Tensor, top_left_causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """B sequences of one shape through ONE cuDNN SDPA call.

    # q: [B, lq, Hq, D], k/v: [B, lk, Hk, D(v)] (any strides, last dim contiguous)
    # -> (out [B, lq, Hq, Dv], lse [B, lq, Hq] float32)
    """
    res = _CUDNN_OP(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, top_left_causal,
                    False, scale=scale)
    batch, lq, heads = q.shape[:3]
    return res[0].transpose(1, 2), res[1].reshape(batch, heads, -1)[:, :, :lq].transpose(1, 2).float()


_cudnn_grad_batch = differentiable(_cudnn_batch)  # attention_grad's LSE backward broadcasts over [B, lq, H]


def _cudnn_call(q: Tensor, k: Tensor, v: Tensor, top_left_causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """One sequence through cuDNN SDPA (``_cudnn_batch`` of one).

    # q: [lq, Hq, D], k/v: [lk, Hk, D] -> (out [lq, Hq, D], lse [lq, Hq] float32)
    """
    out, lse = _cudnn_batch(q[None], k[None], v[None], top_left_causal, scale)
    return out[0], lse[0]


# With gradients: the op differentiates its output, attention_grad its LSE (for the prefix + square merge).
_cudnn_grad_call = differentiable(_cudnn_call)


def _cudnn_gqa(call, q: Tensor, k: Tensor, v: Tensor, flag: bool, scale: float) -> tuple[Tensor, Tensor]:
    """``call(q, k, v, flag, scale)`` with fewer K/V heads than query heads (heads: dim -2): K/V as they are where
    the op takes that, else repeated to the query heads."""
    group = q.shape[-2] // k.shape[-2]
    # Training repeats K/V for GQA (autograd sums the copies' gradients): whether cuDNN's *backward* takes fewer KV
    # heads would only show after the forward succeeded, too late to fall back.
    if group > 1 and _CUDNN_GQA["native"] is not False and not needs_grad(q, k, v):
        try:
            res = call(q, k, v, flag, scale)
            _CUDNN_GQA["native"] = True
            return res
        except RuntimeError:  # this torch/cuDNN wants equal head counts: repeat K/V from now on
            _CUDNN_GQA["native"] = False
    if group > 1:
        k, v = k.repeat_interleave(group, dim=-2), v.repeat_interleave(group, dim=-2)
    return call(q, k, v, flag, scale)


def _cudnn_seq(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    return _cudnn_gqa(_cudnn_seq_heads, q, k, v, causal, scale)


def _cudnn_seq_heads(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    if not causal:
        return _cudnn_grad_call(q, k, v, False, scale)
    return bottom_right_causal_from_top_left(_cudnn_grad_call, q, k, v, scale)


def _cudnn_kernel(q, k, v, cu_q, cu_k, causal, scale, dev_cu=None, used_k=None):
    """Packed varlen through cuDNN SDPA, which has a top-left causal mask and no bottom-right varlen form in aten.

    Causal batches whose sequences read nested prefixes of one K/V (PCP's head and tail chunks) run as
    ``_cudnn_pieces``: one call per distinct unmasked prefix piece and one for all square parts of one length.
    Other layouts, ``CUDNN_PIECES`` off, key ranges of ``PIECES_MAX_KEYS`` or more and anything that needs
    gradients run per sequence: one call, two for a causal chunk with lq < lk (prefix + square, merged by LSE).
    Overlapping key ranges are slices (no copy).
    The pieces are inference only: on an H200 (2026-12-03) the real op's backward through them gave q/k/v
    gradients 13% (relative norm) away from the per-sequence path's, which the CPU stand-in does not reproduce.
    """
    keys = _key_ranges(cu_k, used_k)
    pieces = (causal and CUDNN_PIECES and not needs_grad(q, k, v)
              and max((k1 - k0 for k0, k1 in keys), default=0) < PIECES_MAX_KEYS)
    plan = nested_prefix_plan(cu_q, keys) if pieces else None
    if plan is not None:
        return _cudnn_pieces(q, k, v, cu_q, plan, scale)
    outs, lses = [], []
    for b, (k0, k1) in enumerate(keys):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(k0, k1)
        out, lse = _cudnn_seq(q[qs], k[ks], v[ks], causal, scale)
        outs.append(out)
        lses.append(lse)
    if len(outs) == 1:  # a whole prompt: no copy (cat of one tensor still copies)
        return outs[0], lses[0]
    return torch.cat(outs), torch.cat(lses)


def _cudnn_pieces(q: Tensor, k: Tensor, v: Tensor, cu_q: list[int], plan: PiecesPlan,
                  scale: float) -> tuple[Tensor, Tensor]:
    """Run ``plan``'s calls and LSE-merge each query row's partials into one output.

    # q: [Tq, Hq, D], k/v: [Tk, Hk, D(v)] -> (out [Tq, Hq, Dv], lse [Tq, Hq] float32)
    Differentiable like the per-sequence path (``differentiable`` calls, autograd through the views and merges).
    """
    def square_batch(b0: int, b1: int, offsets: list[int]) -> tuple[Tensor, Tensor]:
        rows = cu_q[b0 + 1] - cu_q[b0]
        qs = q[cu_q[b0] : cu_q[b1]].unflatten(0, (b1 - b0, rows))  # [B, lq, Hq, D], a view
        return _cudnn_gqa(_cudnn_grad_batch, qs, diagonal_blocks(k, offsets, rows),
                          diagonal_blocks(v, offsets, rows), True, scale)

    if not plan.prefix and len(plan.squares) == 1:  # equal whole prompts: one call is the whole answer
        out, lse = square_batch(*plan.squares[0])
        return out.flatten(0, 1), lse.flatten(0, 1)
    squares: list[tuple[Tensor, Tensor]] = []  # per sequence: its square's (out, lse)
    for batch in plan.squares:
        out, lse = square_batch(*batch)
        squares.extend(zip(out.unbind(0), lse.unbind(0)))
    pieces = [_cudnn_gqa(_cudnn_grad_call, q[q0:q1], k[k0:k1], v[k0:k1], False, scale)
              for q0, q1, k0, k1 in plan.prefix]
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    for b, own in enumerate(plan.parts):
        r0, r1 = cu_q[b], cu_q[b + 1]
        mine = [(pieces[i], plan.prefix[i][0]) for i in own]  # (piece's (out, lse), its first query row)
        merge_attn_states_into([o[r0 - at : r1 - at] for (o, _), at in mine] + [squares[b][0]],
                               [s[r0 - at : r1 - at] for (_, s), at in mine] + [squares[b][1]],
                               out[r0:r1], lse[r0:r1])
    return out, lse


def _cudnn_available(device: torch.device) -> bool:
    return _CUDNN_OP is not None and _is_cuda(device) and torch.backends.cudnn.is_available()


# ----------------------------------------------------------------------------------------------- "flash"
_FLASH_OP = getattr(torch.ops.aten, "_flash_attention_forward", None)


def _flash_kernel(q, k, v, cu_q, cu_k, causal, scale, dev_cu, used_k=None):
    """One FlashAttention-2 varlen launch; overlapping key ranges through its ``seqused_k`` (sequence b reads keys
    ``[cu_k[b], cu_k[b] + seqused_k[b])``, causal aligned to that length): no copy of the shared K/V."""
    used = {} if used_k is None else {"seqused_k": used_k[1]}
    max_k = _max_len(cu_k, None if used_k is None else used_k[0])

    def call(q_: Tensor, k_: Tensor, v_: Tensor) -> tuple[Tensor, Tensor]:
        res = _FLASH_OP(
            q_, k_, v_, dev_cu[0], dev_cu[1], _max_len(cu_q), max_k,
            0.0, causal, False, scale=scale, **used,
        )
        return res[0], lse_rows(res[1], cu_q, q_.shape[1])

    if needs_grad(q, k, v):  # the op differentiates its output; attention_grad adds the LSE
        return lse_differentiable_attention(AutogradCall(call), q, k, v, scale)
    return call(q, k, v)


def _flash_available(device: torch.device) -> bool:
    return _FLASH_OP is not None and _is_cuda(device) and torch.backends.cuda.is_flash_attention_available()


# ----------------------------------------------------------------------------------------------- "cuda"
# Measured on an H100 (docs/benchmarks.md, bench/prefill_split.py): a single square causal call is as fast or faster
# on cuDNN (32k: 14.6-15.4 ms vs TE 15.4-15.7; 128k: 258-262 ms vs 263-274); for 128k-token prompts cuDNN's
# per-sequence calls also beat TE's packed call at every PCP size; at 32k TE wins once chunks need cuDNN's
# prefix + square decomposition (TE runs them as one packed bottom-right launch, no LSE merges).
# Those PCP numbers predate the "cudnn" kernel's pieces (3 calls per rank instead of 4; not yet measured against
# TE), so the rule still sends 32k PCP chunks to TE when it is there. Without TE (the H200 runs so far) "cuda" runs
# the "cudnn" kernel for a few sequences, pieces included.
LONG_KEYS = 65536
FEW_SEQUENCES = 4
_KERNELS = {name: _any_v_dim(name, kernel)
            for name, kernel in (("te", _te_kernel), ("cudnn", _cudnn_kernel), ("flash", _flash_kernel))}


def choose_kernel(num_seqs: int, max_keys: int, device: torch.device, one_call_each: bool = False) -> str:
    """Which fused kernel the "cuda" backend runs for a packed batch of ``num_seqs`` sequences.

    ``one_call_each``: every sequence is one cuDNN call (non-causal, or causal with as many queries as keys).
    """
    few = num_seqs <= FEW_SEQUENCES
    if few and (max_keys >= LONG_KEYS or one_call_each) and _cudnn_available(device):
        return "cudnn"
    if _te_available(device):
        return "te"
    if (few or not _flash_available(device)) and _cudnn_available(device):
        return "cudnn"
    return "flash"


def _auto_kernel(q, k, v, cu_q, cu_k, causal, scale, dev_cu, used_k=None):
    keys = _key_ranges(cu_k, used_k)
    one_call_each = not causal or all(q1 - q0 == k1 - k0 for q0, q1, (k0, k1) in zip(cu_q[:-1], cu_q[1:], keys))
    name = choose_kernel(len(cu_q) - 1, max(k1 - k0 for k0, k1 in keys), q.device, one_call_each)
    return _KERNELS[name](q, k, v, cu_q, cu_k, causal, scale, dev_cu, used_k)


def _any_fused(device: torch.device) -> bool:
    return _cudnn_available(device) or _flash_available(device) or _te_available(device)


# ----------------------------------------------------------------------------------------------- registration
# Higher priority wins the automatic choice; "cuda" dispatches per shape among the others.
PRIORITY = {"cuda": 50, "te": 40, "cudnn": 35, "flash": 30}

register_backend(
    AttentionBackend("te", _packed(_KERNELS["te"]), _te_available, PRIORITY["te"], paged=_paged, paged_writes_out=True,
                     unavailable_reason=lambda device: te_unavailable_reason() if _is_cuda(device) else "",
                     takes_host_cu_seqlens=True, differentiable=True, takes_seqused_k=True)
)
for _name, _kernel, _available in (("cudnn", _KERNELS["cudnn"], _cudnn_available),
                                   ("flash", _KERNELS["flash"], _flash_available), ("cuda", _auto_kernel, _any_fused)):
    register_backend(AttentionBackend(_name, _packed(_kernel), _available, PRIORITY[_name], paged=_paged,
                                      paged_writes_out=True, takes_host_cu_seqlens=True, differentiable=True,
                                      takes_seqused_k=True))

__all__ = ["PRIORITY", "choose_kernel", "cudnn_clash", "fused_shapes_ok", "lse_rows", "padded_v_dim",
           "te_unavailable_reason"]
