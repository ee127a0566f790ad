"""CUDA-graph decode: the pure-decode step captured once per batch-size bucket and replayed.

A decode step of a small batch is launch-bound: a few hundred small kernels whose launch costs exceed their run
time. A CUDA graph records them once and replays them with one launch. What makes the step capturable:

- its inputs live at fixed addresses (``AttentionMetadataBuilder``'s decode buffer and the block table's device
  copy, ``megacp.buffers``): a replay reads whatever the host copied there for this step;
- its shapes depend only on the batch size, which is padded up to a bucket (1, 2, 4, 8, 16, 24, 32, 48, 64, then
  steps of 32): padding rows carry token 0, an empty KV shard (the paged kernel returns lse -inf for them) and
  write their K/V to the cache's null slot, so they never touch a real slot or a real row;
- the paged decode kernel plans its split-KV grid by the block table's capacity instead of the step's longest
  sequence (``seq_lens_host=None``), and nothing reads a device value back.

Captured: block-table row gather → embedding → every layer (the DCP query all-gather and the CP merge all-gather
included, on NCCL) → final norm → logits (TP all-gather) → greedy ``sample`` (argmax, NaN/inf rows flagged). Sampling with temperature runs eagerly on
the replay's logits. Prefill and mixed steps always run eagerly. Collectives must be NCCL: gloo (CPU, or several
ranks sharing a GPU in tests) goes through the host and cannot be captured, so ``graph_support`` says no and the
engine runs eagerly; so do MoE models, whose expert all-to-all sizes depend on the routing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from megacp.kv.paged_cache import PagedKVCache
from megacp.layers.cp_metadata import AttentionMetadata, AttentionMetadataBuilder
from megacp.sampling import sample


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes a graph is captured for: 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, ... up to ``max_batch``."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b = b * 2 if b < 16 else (b + 8 if b < 32 else (b + 16 if b < 64 else b + 32))
    sizes.append(max_batch)
    return sorted(set(sizes))


def graph_support(model: torch.nn.Module, device: torch.device) -> str | None:
    """None when the decode step of ``model`` can be captured on ``device``, else the reason it cannot."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device (this run is on {device.type})"
    if getattr(model.config, "is_moe", False):
        return "MoE layers route a data-dependent number of tokens to each rank"
    from megacp import parallel_state as ps

    if ps.model_parallel_is_initialized():
        for group in (ps.get_tp_group(), ps.get_pcp_group(), ps.get_dcp_group(), ps.get_cp_group()):
            if group.world_size > 1 and group.backend != "nccl":
                return f"the {group.name} group uses {group.backend}, whose collectives go through the host"
    return None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: Tensor  # [B, vocab] float32, written by each replay
    greedy: Tensor  # [B] long


class DecodeGraphRunner:
    """Captures the pure-decode step for each bucket of ``batch_buckets(max_batch)``; ``run`` replays one.

    ``capture()`` records every bucket, largest first, into one shared memory pool (``capture_s`` and
    ``capture_bytes`` say what it cost); ``num_replays`` counts replays, so a test can prove the graph ran.
    """

    def __init__(self, model: torch.nn.Module, kv_caches: list[PagedKVCache], builder: AttentionMetadataBuilder,
                 max_batch: int) -> None:
        self.model, self.kv_caches, self.builder = model, kv_caches, builder
        self.buckets = batch_buckets(min(max_batch, builder.max_num_reqs))
        self.graphs: dict[int, _Graph] = {}
        self.capture_s = 0.0
        self.capture_bytes = 0
        self.num_replays = 0

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _forward(self, meta: AttentionMetadata) -> tuple[Tensor, Tensor]:
        meta.decode.gather_block_table()
        hidden = self.model(meta.input_ids, meta, self.kv_caches)
        logits = self.model.compute_logits(meta.select_logits_hidden(hidden)).float()
        return logits, sample(logits, 0.0, 1.0, None)  # greedy, NaN/inf rows flagged (no generator: capturable)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        for B in reversed(self.buckets):  # largest first: the smaller ones reuse its pool memory
            meta = self.builder.build([], [], [], token_ids=[], pad_decodes_to=B)  # all padding rows
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: Triton compilation, cuBLAS handles, lazy tables
                for _ in range(2):
                    self._forward(meta)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits, greedy = self._forward(meta)
            self.graphs[B] = _Graph(graph, logits, greedy)
        torch.cuda.synchronize()
        self.capture_bytes = max(0, free_before - torch.cuda.mem_get_info()[0])
        self.capture_s = time.perf_counter() - start

    def run(self, req_rows: list[int], num_computed: list[int], token_ids: list[int]) -> tuple[Tensor, Tensor]:
        """Replay the decode step of these requests: (logits [n, vocab] float32, greedy ids [n]).

        The returned tensors are views of the graph's outputs: read them before the next ``run``.
        """
        n = len(req_rows)
        B = next(b for b in self.buckets if b >= n)
        self.builder.build(req_rows, num_computed, [1] * n, token_ids=token_ids, pad_decodes_to=B)
        g = self.graphs[B]
        g.graph.replay()
        self.num_replays += 1
        return g.logits[:n], g.greedy[:n]
