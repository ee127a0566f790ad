"""One MLA layer's paged latent cache on one rank (DESIGN §2, §3b).

Multi-head latent attention stores one row per token and layer, shared by every head: ``c_kv`` (``kv_lora_rank``
numbers, after ``kv_a_layernorm``) then ``k_pe`` (``qk_rope_head_dim`` numbers, RoPE applied), ``D = kv_lora_rank +
qk_rope_head_dim`` in all (576 for DeepSeek-V3). There is no head axis: the layout is ``[num_blocks, block_size, D]``
with the block table, slot math and CP sharding of §2 unchanged, so with DCP = TP a token's row lives on one rank of
the CP group instead of on every TP rank.

Like ``PagedKVCache`` it has a hidden null block whose first slot (``null_slot``) takes the writes of decode rows
this rank does not store, and the same two ways to write (``write_rows``: rows and slots planned on the host, never
synchronises; ``write``: a full slot mapping with ``-1`` = skip, planned here).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megacp.config import debug_checks
from megacp.kv.paged_cache import check_slots, write_plan


class LatentPagedCache:
    """Latent rows of one MLA layer: ``.latent`` [num_blocks, block_size, latent_dim] (``c_kv | k_pe``)."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        latent_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size), ("latent_dim", latent_dim)):
            if value < 1:
                raise ValueError(f"LatentPagedCache {name}={value} must be >= 1")
        self.num_blocks, self.block_size, self.latent_dim = num_blocks, block_size, latent_dim
        self.debug_checks = debug_checks()  # read once (PagedKVCache's rule)
        self._all = torch.zeros(num_blocks + 1, block_size, latent_dim, dtype=dtype, device=device)
        self.latent = self._all[:num_blocks]  # without the null block

    @property
    def dtype(self) -> torch.dtype:
        return self.latent.dtype

    @property
    def device(self) -> torch.device:
        return self.latent.device

    @property
    def null_slot(self) -> int:
        """A slot outside the real blocks that ``write_rows`` accepts and nothing ever reads."""
        return self.num_blocks * self.block_size

    @property
    def num_tokens_capacity(self) -> int:
        """Token slots on this rank: ``num_blocks·block_size`` (the CP group holds ``pcp·dcp`` times as many)."""
        return self.num_blocks * self.block_size

    def rows(self, slots: Tensor) -> Tensor:
        """The stored rows at ``slots``.  # slots: [N] long -> [N, latent_dim]"""
        return self._all.view(-1, self.latent_dim)[slots]

    def write(self, latent: Tensor, slot_mapping: Tensor) -> None:
        """Store rows at their slots; ``-1`` slots (another CP rank's tokens, padding) are skipped.

        # latent: [T, latent_dim], slot_mapping: [T] int
        """
        self._check_rows(latent)
        slots = torch.as_tensor(slot_mapping, dtype=torch.long).cpu().reshape(-1)
        if slots.numel() != latent.shape[0]:
            raise ValueError(f"slot_mapping has {slots.numel()} entries for {latent.shape[0]} tokens")
        rows, slots = write_plan(slots)
        self.check_slots(slots)  # on the host: free
        self.write_rows(latent, None if rows is None else rows.to(self.device), slots.to(self.device))

    def write_rows(self, latent: Tensor, rows: Tensor | None, slots: Tensor) -> None:
        """Store ``latent[rows]`` at ``slots`` without reading anything back from the device.

        # latent: [T, latent_dim]; rows: [N] long into T (None: all T in order); slots: [N] long (valid or null_slot)
        """
        self._check_rows(latent)
        latent = latent.detach()
        if rows is not None:
            latent = latent.index_select(0, rows)
        if latent.shape[0] != slots.shape[0]:
            raise ValueError(f"write_rows: {latent.shape[0]} rows for {slots.shape[0]} slots; pass one slot per row")
        if slots.device.type == "cpu" or self.debug_checks:
            self.check_slots(slots)
        self._all.view(-1, self.latent_dim).index_copy_(0, slots, latent.to(self.dtype))

    def check_slots(self, slots: Tensor) -> None:
        """ValueError unless every slot is one of this cache's (or the null slot); reads ``slots`` on the host."""
        check_slots(slots, self.num_blocks, self.block_size)

    def _check_rows(self, latent: Tensor) -> None:
        if latent.dim() != 2 or latent.shape[1] != self.latent_dim:
            raise ValueError(
                f"LatentPagedCache.write wants latent rows of shape [T, {self.latent_dim}] (kv_lora_rank + "
                f"qk_rope_head_dim), got {tuple(latent.shape)}"
            )
