"""The "te" attention backend's kernel: Transformer Engine's low-level ``fused_attn_fwd`` / ``fused_attn_bwd`` on the
packed THD layout, one call per step for all sequences (``padding_causal_bottom_right`` or ``padding`` masks).

The call is the one verified on H100 and H200 with TE 2.20.2 (the notes that came with the TE wheels the GPU
sessions install; not in this repository): ``o_format="thd"`` always (leaving it out corrupts the heap), both padded
cu_seqlens, stats ``[T, H, 1]`` = natural-log LSE. With gradients, ``fused_attn_fwd`` runs in training mode and
``fused_attn_bwd`` gives the gradient (``megacp.ops.attention_grad`` makes the LSE differentiable too).

Transformer Engine is optional and fragile: it is imported lazily, on first use, inside ``except Exception``. On a
machine with a system cuDNN besides PyTorch's pip cuDNN, TE loads the system one unless ``CUDNN_PATH`` points at
PyTorch's, after which PyTorch's own cuDNN kernels refuse to run. ``cudnn_clash`` detects that situation *before*
importing TE; ``backends_cuda`` keeps TE out of the automatic choice then and says how to fix it when someone
forces ``backend="te"``.
"""

from __future__ import annotations

import functools
import glob
import os

import torch
from torch import Tensor

from megacp.ops.attention_grad import lse_differentiable_attention, needs_grad
from megacp.ops.backends_common import _is_cuda, _max_len, _plain_keys, lse_rows


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


__all__ = ["cudnn_clash", "te_unavailable_reason"]
