"""Pass-Q or pass-KV for the prefill over cached context: one rule for GQA and MLA (DESIGN §3, §3b).

New tokens of a request with cached context attend to that context, which lies sharded over the ``W = pcp·dcp``
ranks of the CP group. Two ways give the same result (``ContextParallelAttention._context_pass_q`` / ``_pass_kv``):

- pass-Q: all-gather the new tokens' queries over the CP group, attend them to every rank's local shard, merge the
  ``W`` partials by LSE (the DCP decode merge: an all-gather of LSEs and a reduce-scatter of the rescaled output);
- pass-KV: all-gather the context's local K/V shards (MLA: the latent rows), restore sequence order, attend the
  local queries to the whole context; no merge.

Both do the same attention FLOPs (``W·Tc`` queries over a ``1/W`` shard, or ``Tc`` queries over all of it), so
what separates them is communication. Meta's rule ("Context Parallelism for Scalable Million-Token Inference",
§3.4) compares the communication of a *ring* pass-KV with the attention compute it can hide behind, and otherwise
picks the smaller message (pass-Q when the new tokens are a small fraction of the context, KV/Q size ratio
``2·N_kv/N_h``). Our collectives are all-gathers not overlapped with compute, so the criterion here is the bytes
each rank receives, weighted by ``PASS_KV_CROSSOVER``: pass-KV when ``bytes_kv < crossover·bytes_q``. The default
(1.0) is the pure byte count; the real crossover (collective latency, pass-Q's two merge collectives, the restore
copy) must be calibrated on the GPU: ``bench/context_prefill.py`` times both and prints the measured ratio.
"""

from __future__ import annotations

CONTEXT_TRANSFERS = ("auto", "pass_q", "pass_kv")
PASS_KV_CROSSOVER = 1.0  # pass-KV when its bytes < this · pass-Q's bytes; calibrate with bench/context_prefill.py
LSE_BYTES = 4  # the merge moves float32 LSEs and float32 rescaled outputs (megacp.ops.merge.dcp_merge)


def check_context_transfer(context_transfer: str) -> str:
    """The override, checked once at construction (the same error on every rank, before any collective)."""
    if context_transfer not in CONTEXT_TRANSFERS:
        raise ValueError(f"context_transfer={context_transfer!r}: choose one of {CONTEXT_TRANSFERS}")
    return context_transfer


def context_transfer_bytes(num_new: int, context_tokens: int, num_heads: int, q_dim: int, out_dim: int,
                           kv_row_dim: int, cp_world_size: int, dtype_bytes: int) -> dict[str, int]:
    """Bytes each CP rank receives for the prefill over cached context, by either way.

    ``num_new``: query rows per rank (``ContextMetadata.num_rows``, equal on every rank); ``context_tokens``: context
    rows each rank sends under pass-KV (its shard padded to the longest, ``ContextMetadata.gather_pad``);
    ``num_heads``: this rank's query heads; ``q_dim``/``out_dim``: width of one head's query and output as the merge
    sees them; ``kv_row_dim``: numbers one context token occupies in a shard. GQA: ``q_dim = out_dim = head_dim``,
    ``kv_row_dim = 2·Hkv_local·head_dim``; MLA (absorbed pass-Q, latent rows): ``q_dim = r + rope``,
    ``out_dim = r``, ``kv_row_dim = r + rope``. ``dtype_bytes``: the activation dtype's size.

    pass-Q: the other ranks' queries (``Tc·H·q_dim``), LSEs (``Tc·W·H`` float32) and parts of the reduce-scatter
    (``Tc·H·out_dim`` float32); pass-KV: the other ranks' padded shards (``context_tokens·kv_row_dim``).
    Host ints only, so every CP rank computes the same numbers.
    """
    others = cp_world_size - 1
    rows = others * num_new * num_heads
    return {
        "pass_q": rows * (q_dim * dtype_bytes + (cp_world_size + out_dim) * LSE_BYTES),
        "pass_kv": others * context_tokens * kv_row_dim * dtype_bytes,
    }


def choose_context_transfer(num_new: int, context_tokens: int, num_heads: int, q_dim: int, out_dim: int,
                            kv_row_dim: int, cp_world_size: int, dtype_bytes: int,
                            crossover: float = PASS_KV_CROSSOVER) -> tuple[str, dict[str, int]]:
    """``("pass_q" | "pass_kv", context_transfer_bytes(...))``: pass-KV when ``bytes_kv < crossover·bytes_q``.

    Arguments as ``context_transfer_bytes``. Ties (a single CP rank: both 0) go to pass-Q, the path without a
    padded copy of the context.
    """
    moved = context_transfer_bytes(num_new, context_tokens, num_heads, q_dim, out_dim, kv_row_dim, cp_world_size,
                                   dtype_bytes)
    return ("pass_kv" if moved["pass_kv"] < crossover * moved["pass_q"] else "pass_q"), moved
