"""Vocabulary-parallel token embedding and LM head.

The vocabulary is padded up to a multiple of ``tp`` and split into ``tp`` equal contiguous ranges; rank ``r`` owns
rows ``[r·V_local, (r+1)·V_local)``. Padding rows are zero and are sliced off the logits, so callers always see the
true vocabulary size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megacp.layers.linear import copy_to_tp_region, gather_from_tp_region, reduce_from_tp_region
from megacp.parallel_state import ParallelContext, resolve_parallel_context
from megacp.weights import load_shard, new_param


def pad_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Smallest multiple of ``tp_size`` that is ≥ ``vocab_size``."""
    return -(-vocab_size // tp_size) * tp_size


def vocab_range(vocab_size: int, tp_size: int, tp_rank: int) -> tuple[int, int, int]:
    """``(start, end, rows_per_rank)``: this rank's padded rows; the real ones are ``[start, min(end, vocab_size))``."""
    per_rank = pad_vocab_size(vocab_size, tp_size) // tp_size
    start = tp_rank * per_rank
    return start, start + per_rank, per_rank


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over TP.

    forward: ids ``[T]`` (long) → ``[T, embedding_dim]``; each rank looks up the ids it owns, others contribute
    zeros, and an all-reduce sums them.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        params_dtype: torch.dtype | None = None,
        parallel_context: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        self.parallel_context = resolve_parallel_context(parallel_context)
        self.group = self.parallel_context.tp
        self.tp_size = self.group.world_size
        self.tp_rank = self.group.rank_in_group
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, self.tp_size)
        self.vocab_start, self.vocab_end, self.num_embeddings_per_partition = vocab_range(
            num_embeddings, self.tp_size, self.tp_rank
        )
        self.weight = new_param((self.num_embeddings_per_partition, embedding_dim), params_dtype)
        self.weight.weight_loader = self.weight_loader

    def checkpoint_shape(self, param: nn.Parameter) -> tuple[int, ...]:
        """The full ``[vocab_size, embedding_dim]`` tensor."""
        return (self.num_embeddings, self.embedding_dim)

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        """Keep this rank's rows of the full ``[vocab_size, embedding_dim]`` tensor; zero the padding rows."""
        real_end = min(self.vocab_end, self.num_embeddings)
        n = max(real_end - self.vocab_start, 0)
        with torch.no_grad():
            param.data.zero_()
        rows = (slice(self.vocab_start, self.vocab_start + n),)
        load_shard(param.data[:n], loaded, rows, self.checkpoint_shape(param))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        owned = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(owned, input_ids - self.vocab_start, torch.zeros_like(input_ids))
        out = F.embedding(local_ids, self.weight) * owned.unsqueeze(-1).to(self.weight.dtype)
        return reduce_from_tp_region(out, self.group)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection ``hidden → vocab`` sharded like the embedding (so it can be tied to it).

    ``compute_logits(hidden [N, embedding_dim]) -> [N, num_embeddings]``: local logits, all-gathered over TP, padding
    columns dropped; every TP rank returns the full-vocabulary logits. Constructed like the embedding.
    """

    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's weight (``tie_word_embeddings``); both use the same vocab split."""
        if (embedding.num_embeddings, embedding.tp_size) != (self.num_embeddings, self.tp_size):
            raise ValueError("cannot tie an LM head to an embedding with a different vocabulary or TP size")
        self.weight = embedding.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(copy_to_tp_region(hidden, self.group), self.weight)  # [N, V_local]
        logits = gather_from_tp_region(local, self.group)  # [N, V_padded]
        return logits[..., : self.num_embeddings]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.compute_logits(hidden)
