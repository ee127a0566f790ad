"""Fused elementwise kernels of the decode step: RoPE + paged-cache write, and SiLU·mul.

A batch-1 decode step is launch-bound between its GEMVs: per layer the eager path runs RoPE as ~5 kernels (the
halves' ``cat``, two ``mul``, an ``add``, casts), the cache write as two ``index_copy_`` and SwiGLU as ``silu`` then
``mul``. Here:

- ``rope_and_cache_write(qkv, tables, k_cache, v_cache, slots, hq, hkv)``: ONE kernel reads the QKV projection's
  output, rotates q into a new ``[B, Hq, D]`` tensor and writes rotated k and v straight to their cache slots.
- ``silu_mul(gate_up)``: ONE kernel, ``silu(gate) · up`` of the gate-up projection's output ``[T, 2I]``.

Both are exact against the eager ops: the same operations in the same order with the same roundings (products and
sums rounded to the activations' dtype where PyTorch stores them, float32 inside ``silu`` as PyTorch's kernel; FMA
contraction off, libdevice's ``expf`` and a round-to-nearest division as CUDA's ``expf`` and ``/``). The GPU tests
compare them bitwise with the eager path; under Triton's interpreter (numpy) RoPE is bitwise too and SiLU within
one ulp of the dtype (CPU PyTorch's vectorised ``exp`` is another implementation).

Inference only, CUDA only (``available``); fixed grids from the shapes and no host reads, so a CUDA graph captures
them. ``MEGACP_FUSED_DECODE=0`` turns them off (the eager ops run), e.g. to count kernels before and after: a
model reads it once, when its layers are built (``enabled``), and keeps the answer in their ``fused_decode``.

Programmatic dependent launch (``pdl_options``): on Hopper and later, megacp's small decode kernels (these, the
fused residual-add + RMSNorm, the paged GQA decode and LSE merge kernels) are launched so that each may start while
the previous kernel drains; each waits for it (``wait_for_previous_kernel``) before touching memory, so the results
are bitwise the same. ``MEGACP_PDL=0`` launches them plainly (the 32-layer step profile of docs/benchmarks.md
measures both).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

try:  # optional: never let a missing or broken Triton break ``import megacp``
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except Exception:  # noqa: BLE001
    triton = None
    tl = None
    libdevice = None

ENV_FUSED = "MEGACP_FUSED_DECODE"
ENV_PDL = "MEGACP_PDL"


def enabled() -> bool:
    """Whether ``MEGACP_FUSED_DECODE`` leaves the fused kernels on (the default). Layers read it once, when they are
    built (their ``fused_decode``), never per step."""
    return os.environ.get(ENV_FUSED, "1") != "0"


def available(x: Tensor) -> bool:
    """Whether a layer whose ``fused_decode`` is on may call the fused kernels for activations ``x``: Triton, a
    CUDA tensor (the CPU keeps the PyTorch ops; Triton's interpreter still runs the kernels on CPU tensors when
    called directly) and no gradient."""
    if triton is None or not x.is_cuda:
        return False
    return not (torch.is_grad_enabled() and x.requires_grad)


def pdl_options(x: Tensor) -> dict:
    """Launch options for a decode kernel on ``x``'s device: ``{"launch_pdl": True}`` where programmatic dependent
    launch applies (CUDA, compute capability 9.0+, compiled kernels, ``$MEGACP_PDL`` not "0"), else ``{}``. A kernel
    launched with it must call ``wait_for_previous_kernel`` before its first memory access that an earlier kernel
    could have written or could still read (its ``GDC`` constexpr is ``bool(pdl_options(x))``)."""
    if triton is None or INTERPRETED or not x.is_cuda:
        return {}
    return _PDL if _pdl_on(x.device.index if x.device.index is not None else torch.cuda.current_device()) else {}


_PDL = {"launch_pdl": True}


@functools.lru_cache(maxsize=None)
def _pdl_on(device_index: int) -> bool:
    return os.environ.get(ENV_PDL, "1") != "0" and torch.cuda.get_device_capability(device_index)[0] >= 9


def rope_and_cache_write(qkv: Tensor, cos: Tensor, sin_signed: Tensor, k_cache: Tensor, v_cache: Tensor,
                         slots: Tensor, hq: int, hkv: int) -> Tensor:
    """Rotate q and k of a QKV projection's output (neox halves), return q, write k and v to their cache slots.

    # qkv: [B, (hq + 2·hkv)·D] (q heads, k heads, v heads; rows contiguous), cos/sin_signed: [B, 1, D] (the step's
    # RotaryTables: sin with its first half negated), k_cache/v_cache: [N, block_size, hkv, D] (contiguous),
    # slots: [B] flat slots (block · block_size + offset; the null slot for rows this rank does not store)
    # -> q [B, hq, D] in qkv's dtype
    Equals ``apply_rotary_tables`` on the q and k heads followed by ``PagedKVCache.write_rows`` (see the module
    docstring for the rounding).
    """
    B = qkv.shape[0]
    D = k_cache.shape[-1]
    if qkv.shape[1] != (hq + 2 * hkv) * D or qkv.stride(1) != 1:
        raise ValueError(f"rope_and_cache_write: qkv {tuple(qkv.shape)} is not [B, (hq + 2·hkv)·D] = "
                         f"[{B}, {(hq + 2 * hkv) * D}] with contiguous rows")
    if k_cache.shape[2] != hkv or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"rope_and_cache_write: caches {tuple(k_cache.shape)} must be contiguous "
                         f"[N, block_size, {hkv}, {D}]")
    q = torch.empty(B, hq, D, dtype=qkv.dtype, device=qkv.device)
    if B == 0:
        return q
    cos2, sin2 = cos.reshape(B, D), sin_signed.reshape(B, D)
    pdl = pdl_options(qkv)
    _rope_cache_kernel[(B, hq + hkv)](
        qkv, cos2, sin2, q, k_cache, v_cache, slots,
        qkv.stride(0), cos2.stride(0), sin2.stride(0),
        HQ=hq, HKV=hkv, D=D, HALF=D // 2, D_PAD=triton.next_power_of_2(D), GDC=bool(pdl), **EXACT, **pdl,
    )
    return q


def silu_mul(gate_up: Tensor) -> Tensor:
    """``silu(gate) · up`` of a merged gate-up projection's output.

    # gate_up: [T, 2·I] (gate columns then up columns, rows contiguous) -> [T, I] in gate_up's dtype
    Equals ``F.silu(gate) * up`` with ``gate, up = gate_up.chunk(2, -1)`` (see the module docstring).
    """
    T, two_i = gate_up.shape
    inner = two_i // 2
    if two_i % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"silu_mul: gate_up {tuple(gate_up.shape)} must be [T, 2·I] with contiguous rows")
    out = torch.empty(T, inner, dtype=gate_up.dtype, device=gate_up.device)
    if T == 0 or inner == 0:
        return out
    block = min(1024, triton.next_power_of_2(inner))
    pdl = pdl_options(gate_up)
    _silu_mul_kernel[(T, triton.cdiv(inner, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), inner, BLOCK=block, LIBDEVICE=not INTERPRETED,
        GDC=bool(pdl), **EXACT, **pdl,
    )
    return out


# FMA contraction would fuse `a*b + c*d` into one rounding where PyTorch rounds twice. Triton's interpreter (numpy)
# has no such option, and no libdevice: it takes numpy's exp.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
EXACT = {} if INTERPRETED else {"enable_fp_fusion": False}  # launch options of every kernel that keeps the roundings

if triton is not None:

    @triton.jit
    def rotate_pairs(x, xs, cos, sin):
        """RoPE of one row, ``x·cos + swap(x)·sin_signed`` (``xs``: the swapped row), each product and the sum rounded
        to x's dtype as the eager ops store them (launch with ``EXACT``)."""
        a = (x.to(tl.float32) * cos.to(tl.float32)).to(x.dtype)
        b = (xs.to(tl.float32) * sin.to(tl.float32)).to(x.dtype)
        return (a.to(tl.float32) + b.to(tl.float32)).to(x.dtype)

    @triton.jit
    def wait_for_previous_kernel():
        """The PDL handshake at a kernel's start: wait until the previous kernel in the stream has finished and its
        writes are visible, then let the next kernel launch (it waits in turn). A no-op without PDL."""
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def last_to_arrive(counter, num_programs):
        """Called by each of ``num_programs`` programs after its stores: True in the last one to arrive at the int32
        ``counter`` (0 before), which then sees every other program's stores and must reset the counter to 0
        (``tl.atomic_xchg(counter, 0)``) for the next launch. The barrier orders this program's stores before its
        arrival; acq_rel makes the others' visible to the last one."""
        tl.debug_barrier()
        return tl.atomic_add(counter, 1, sem="acq_rel") == num_programs - 1

    @triton.jit
    def _rope_cache_kernel(
        qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
        stride_row, stride_cos, stride_sin,
        HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, D_PAD: tl.constexpr,
        GDC: tl.constexpr,
    ):
        # one program per (token, head): heads [0, HQ) are q, [HQ, HQ + HKV) are k, whose program also copies v
        if GDC:
            wait_for_previous_kernel()
        t = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, D_PAD)
        m = d < D
        partner = tl.where(d < HALF, d + HALF, d - HALF)  # swap_halves: (x2, x1)
        row = qkv_ptr + t * stride_row + h * D
        x = tl.load(row + d, mask=m, other=0.0)
        xs = tl.load(row + partner, mask=m, other=0.0)
        cos = tl.load(cos_ptr + t * stride_cos + d, mask=m, other=0.0)
        sin = tl.load(sin_ptr + t * stride_sin + d, mask=m, other=0.0)
        rot = rotate_pairs(x, xs, cos, sin)
        if h < HQ:
            tl.store(q_ptr + (t * HQ + h) * D + d, rot, mask=m)
        else:
            j = h - HQ
            dst = tl.load(slot_ptr + t).to(tl.int64) * (HKV * D) + j * D
            tl.store(k_cache_ptr + dst + d, rot.to(k_cache_ptr.dtype.element_ty), mask=m)
            v = tl.load(qkv_ptr + t * stride_row + (HQ + HKV + j) * D + d, mask=m, other=0.0)
            tl.store(v_cache_ptr + dst + d, v.to(v_cache_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inner, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr,
                         GDC: tl.constexpr):
        if GDC:
            wait_for_previous_kernel()
        t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inner
        g = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0)
        u = tl.load(x_ptr + t * stride_x + inner + cols, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        # PyTorch's silu: x / (1 + exp(-x)) in float32, rounded to the dtype; then the product, rounded again
        if LIBDEVICE:
            e = libdevice.exp(-gf)  # CUDA's expf
        else:
            e = tl.exp(-gf)
        s = tl.math.div_rn(gf, 1.0 + e).to(g.dtype)
        out = (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype)
        tl.store(out_ptr + t * stride_o + cols, out, mask=mask)


__all__ = ["ENV_FUSED", "ENV_PDL", "EXACT", "INTERPRETED", "available", "enabled", "pdl_options",
           "rope_and_cache_write", "silu_mul"]
