"""CUDA attention-with-LSE backends: Transformer Engine ("te"), cuDNN SDPA ("cudnn"), FlashAttention-2 ("flash").

All three plug into the registry of ``megacp.ops.attention`` and share its contract: packed varlen
``q [Tq, Hq, D], k/v [Tk, Hk, D]``, ``cu_seqlens`` int ``[B+1]``, causal = bottom-right aligned, natural-log float32
LSE ``[Tq, Hq]``. Decode over the paged cache goes to the Triton kernel of ``megacp.ops.paged_decode`` when Triton is
there (``paged`` hook), else to the gather path.

- "te": ``transformer_engine.pytorch``'s low-level ``fused_attn_fwd`` on the packed THD layout, one call per step for
  all sequences (``padding_causal_bottom_right`` or ``padding`` masks). The call is the one verified on H100 and
  H200 with TE 2.20.2 (the notes that came with the TE wheels the GPU sessions install; not in this repository):
  ``o_format="thd"`` always (leaving it out corrupts the heap), both padded cu_seqlens, stats ``[T, H, 1]`` =
  natural-log LSE.
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

Transformer Engine is optional and fragile: it is imported lazily, on first use, inside ``except Exception``. On a
machine with a system cuDNN besides PyTorch's pip cuDNN, TE loads the system one unless ``CUDNN_PATH`` points at
PyTorch's, after which PyTorch's own cuDNN kernels refuse to run. We detect that situation *before* importing TE,
keep TE out of the automatic choice, and say how to fix it when someone forces ``backend="te"``.
"""

from __future__ import annotations

import functools
import glob
import os

import torch
from torch import Tensor

from megacp.ops import paged_decode
from megacp.ops.attention import (
    AttentionBackend,
    bottom_right_causal_from_top_left,
    get_backend,
    host_cu_seqlens_or_read,
    key_lengths,
    keys_per_sequence,
    register_backend,
)
from megacp.ops.attention_grad import AutogradCall, differentiable, lse_differentiable_attention, needs_grad
from megacp.ops.cudnn_pieces import PiecesPlan, diagonal_blocks, nested_prefix_plan
from megacp.ops.merge import merge_attn_states_into

_HALF = (torch.float16, torch.bfloat16)
_FUSED_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------- shared helpers
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


# ----------------------------------------------------------------------------------------------- "te"
def cudnn_clash() -> str | None:
    """Why importing TE here would break PyTorch's cuDNN, or None if we see no reason.

    The clash: PyTorch uses its pip cuDNN (``nvidia.cudnn``); TE, unless ``CUDNN_PATH`` points at that copy, may load
    a system cuDNN of another version, after which PyTorch's cuDNN refuses to start.
    """
    try:
        import nvidia.cudnn as pip_cudnn  # the copy PyTorch loads (absent when torch bundles or uses the system one)

        torch_dir = os.path.realpath(list(pip_cudnn.__path__)[0])
    except Exception:  # noqa: BLE001
        return None
    chosen = os.environ.get("CUDNN_PATH") or os.environ.get("CUDNN_HOME")
    if chosen and os.path.realpath(chosen) == torch_dir:
        return None
    system = sorted(
        p for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/usr/local/cuda/lib64", "/lib64")
        for p in glob.glob(os.path.join(d, "libcudnn.so*"))
    )
    if not system:
        return None
    return (
        f"a system cuDNN ({system[0]}) is installed besides PyTorch's ({torch_dir}/lib) and CUDNN_PATH does not point "
        f"at PyTorch's, so Transformer Engine would load the system copy and break PyTorch's cuDNN kernels. Fix: "
        f"export CUDNN_PATH={torch_dir}; export LD_LIBRARY_PATH=$CUDNN_PATH/lib:$LD_LIBRARY_PATH (before Python "
        f"starts), or use backend 'cudnn' / 'flash'"
    )


@functools.lru_cache(maxsize=1)
def _te_state() -> tuple[tuple | None, str]:
    """``((fused_attn_fwd, fused_attn_bwd, sub-backend), "")`` when TE is usable, else ``(None, reason)``. Imports
    TE at most once."""
    clash = cudnn_clash()
    if clash is not None:
        return None, clash
    try:
        import transformer_engine.pytorch  # noqa: F401  (loads the extension and registers transformer_engine_torch)
        from transformer_engine.pytorch.cpp_extensions.fused_attn import (
            FusedAttnBackend,
            fused_attn_bwd,
            fused_attn_fwd,
        )
    except Exception as exc:  # noqa: BLE001  (ImportError, RuntimeError from a broken install, OSError, ...)
        reason = f"transformer_engine does not import ({type(exc).__name__}: {exc})"
        if "undefined symbol" in str(exc) or "cudnn" in str(exc).lower():
            reason += "; this looks like the cuDNN version clash: " + (
                "export CUDNN_PATH to PyTorch's nvidia.cudnn folder and prepend $CUDNN_PATH/lib to LD_LIBRARY_PATH")
        return None, reason
    return (fused_attn_fwd, fused_attn_bwd, FusedAttnBackend["F16_arbitrary_seqlen"]), ""


def te_unavailable_reason() -> str:
    """Empty when TE can be used, else why not (imports TE on first call)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    return _te_state()[1]


class _TECall:
    """TE's fused attention over one packed THD batch, forward and backward (an ``attention_grad.AttentionKernel``).

    The call is the one of the module docstring (``o_format="thd"`` always, both padded cu_seqlens); the backward
    passes the forward's output, its aux tensors (softmax stats, RNG state) and the same layout and mask arguments,
    with dO in the THD layout too.
    """

    def __init__(self, te: tuple, cu_q: list[int], cu_k: list[int], dev_cu, causal: bool, scale: float) -> None:
        self.fwd, self.bwd, self.sub_backend = te
        self.cu_q = cu_q
        self.max_q, self.max_k = _max_len(cu_q), _max_len(cu_k)
        self.cq, self.ck = dev_cu
        self.layout = dict(
            cu_seqlens_q_padded=self.cq, cu_seqlens_kv_padded=self.ck, attn_scale=scale, dropout=0.0,
            qkv_layout="thd_thd_thd", o_format="thd", attn_mask_type="padding_causal_bottom_right" if causal else "padding",
            window_size=(-1, 0) if causal else (-1, -1),
        )

    def forward(self, q: Tensor, k: Tensor, v: Tensor):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        raw, aux = self.fwd(True, self.max_q, self.max_k, self.cq, self.ck, q, k, v, q.dtype, self.sub_backend,
                            rng_gen=None, **self.layout)
        out = raw.view(q.shape[0], q.shape[1], v.shape[2])
        return out, lse_rows(aux[0], self.cu_q, q.shape[1]), (q, k, v, raw, list(aux))

    def backward(self, saved, d_out: Tensor):
        q, k, v, raw, aux = saved
        grads = self.bwd(self.max_q, self.max_k, self.cq, self.ck, q, k, v, raw,
                         d_out.to(q.dtype).reshape(raw.shape).contiguous(), q.dtype, aux, self.sub_backend,
                         do_format="thd", dqkv_layout="thd_thd_thd", **self.layout)
        return grads[0].view(q.shape), grads[1].view(k.shape), grads[2].view(v.shape)


def _te_kernel(q, k, v, cu_q, cu_k, causal, scale, dev_cu, used_k=None):
    te, reason = _te_state()
    if te is None:
        raise ValueError(f"attention backend 'te' cannot run: {reason}")
    # TE's THD layout reads sequence b at cu_seqlens_kv_padded[b]; overlapping ranges are not a documented use, so
    # the keys are laid out per sequence (one gather) and TE still runs all sequences in ONE launch.
    k, v, cu_k, dev_cu = _plain_keys(q, k, v, cu_q, cu_k, dev_cu, used_k)
    call = _TECall(te, cu_q, cu_k, dev_cu, causal, scale)
    if needs_grad(q, k, v):
        return lse_differentiable_attention(call, q, k, v, scale)
    out, lse, _ = call.forward(q, k, v)
    return out, lse


def _te_available(device: torch.device) -> bool:
    return _is_cuda(device) and te_unavailable_reason() == ""


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
