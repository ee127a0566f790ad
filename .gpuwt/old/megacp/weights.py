"""Loading checkpoint tensors into this rank's parameter shards, and making those parameters.

A loaded tensor is the *full* Hugging Face tensor, or a safetensors lazy slice (``safe_open(...).get_slice(name)``):
``load_shard`` checks its full shape and copies only this rank's part, so a rank never materialises another rank's
shard. The TP linears, the embeddings, the norms and the MoE experts all load through it; ``new_param`` makes their
parameters, marked with the groups ``parallel_state.allreduce_grads`` sums their gradients over.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from megacp.parallel_state import DENSE_GRAD_GROUPS


def loaded_shape(loaded: Any) -> tuple[int, ...]:
    """Shape of a full tensor or of a safetensors lazy slice."""
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    return tuple(loaded.get_shape())


def check_shape(loaded: Any, expected: Sequence[int]) -> None:
    shape = loaded_shape(loaded)
    if shape != tuple(expected):
        raise ValueError(f"checkpoint tensor has shape {list(shape)}, the model config expects {list(expected)}")


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a loaded (CPU, any dtype) tensor into a parameter slice of the same shape."""
    dst.copy_(src.to(dtype=dst.dtype, device=dst.device))


def load_shard(dst: torch.Tensor, loaded: Any, index: tuple[slice, ...], full_shape: Sequence[int]) -> None:
    """Check that ``loaded`` (full tensor or lazy safetensors slice) has ``full_shape``, then copy ``loaded[index]``
    (this rank's part, read alone from a lazy slice) into ``dst``, converting dtype and device.

    ``loaded[index]`` may carry extra size-1 dims (one expert's row of a fused ``[E, ...]`` tensor): it is reshaped to
    ``dst``'s shape. Every weight loader of the layers and of the MoE layer goes through here.
    """
    check_shape(loaded, full_shape)
    with torch.no_grad():
        copy_into(dst, loaded[index].reshape(dst.shape))


def default_weight_loader(param: nn.Parameter, loaded: Any) -> None:
    """Replicated parameter (norm weights, biases of row-parallel layers): copy the whole tensor."""
    load_shard(param.data, loaded, (slice(None),), param.shape)


def new_param(
    shape: Sequence[int], dtype: torch.dtype | None, grad_reduce_groups: tuple[str, ...] = DENSE_GRAD_GROUPS
) -> nn.Parameter:
    """A trainable parameter (uninitialised: the loaders fill it) marked for ``parallel_state.allreduce_grads``."""
    param = nn.Parameter(torch.empty(*shape, dtype=dtype or torch.get_default_dtype()))
    param.grad_reduce_groups = grad_reduce_groups
    return param
