"""CUDA-graph decode: the pure-decode step captured once per batch-size bucket and replayed.

A decode step of a small batch is launch-bound: a few hundred small kernels whose launch costs exceed their run
time. A CUDA graph records them once and replays them with one launch. What makes the step capturable:

- its inputs live at fixed addresses (the ``KVSession``'s metadata builder's decode buffer and its block table's
  device copy, ``megacp.buffers``): a replay reads whatever the host copied there for this step;
- its shapes depend only on the batch size, which is padded up to a bucket (1, 2, 4, 8, 16, 24, 32, 48, 64, then
  steps of 32): padding rows carry token 0, an empty KV shard (the paged kernel returns lse -inf for them) and
  write their K/V to the cache's null slot, so they never touch a real slot or a real row;
- the paged decode kernel plans its split-KV grid by the block table's capacity, not the step's longest sequence
  (each split finds its share of the real length on the device; the eager step plans the same way, so a replay
  gives the eager numbers), and nothing reads a device value back.

Captured: block-table row gather → embedding → every layer (the DCP query all-gather and the CP merge all-gather
included) → final norm → logits (TP all-gather) → greedy ``sample`` (argmax, NaN/inf rows flagged). Sampling with
temperature runs eagerly on the replay's logits. Prefill and mixed steps always run eagerly.

NCCL collectives are recorded in the graph. A gloo group's collectives go through host memory and cannot be: there
the step is captured in pieces (``PiecewiseGraph``) cut at each such collective, which runs eagerly between the
pieces' replays, on the same tensors (what several ranks sharing one GPU in tests and ``scripts/gpu_graph_matrix.py``
use). The same cut serves MoE blocks that need the host (``MoELayer.capturable``: an expert group of several ranks,
whose token counts are exchanged and read back, or no sync-free grouped GEMM here): the block runs eagerly between
the pieces on the graph's tensors. A one-rank expert group in bfloat16 on sm_90+ is recorded whole (grouped GEMMs).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch
from torch import Tensor

from megacp import parallel_state as ps
from megacp.layers.cp_metadata import AttentionMetadata
from megacp.parallel_state import ParallelContext
from megacp.sampling import sample
from megacp.session import KVSession, step_logits


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
    return None


class PiecewiseGraph:
    """One step captured as a sequence of CUDA graphs cut at each host-staged (gloo) collective.

    ``capture(stream)`` is a context manager around the step's code: it records graph pieces into ``pool``; each staged
    collective met inside ends the current piece, runs once (so every rank stays in step) and is kept. ``replay()``
    replays piece 0, runs collective 0 eagerly, replays piece 1, ... With NCCL (or one rank) there are no cuts and
    it is one plain graph. Pieces share ``pool`` and are replayed in the order they were captured, which is what
    makes sharing it safe.
    """

    def __init__(self, pool: tuple[int, int]) -> None:
        self.pool = pool
        self.pieces: list[torch.cuda.CUDAGraph] = []
        self.collectives: list[Callable[[], None]] = []

    def _begin(self) -> None:
        self.pieces.append(torch.cuda.CUDAGraph())
        self.pieces[-1].capture_begin(pool=self.pool)

    def _cut(self, collective: Callable[[], None]) -> None:
        self.pieces[-1].capture_end()
        with ps.cut_graphs_at_host_collectives(None):  # its own collectives (an eager MoE block's) run directly
            collective()
        self.collectives.append(collective)
        self._begin()

    @contextlib.contextmanager
    def capture(self, stream: torch.cuda.Stream):
        """Record on ``stream`` (not the default stream, which cannot capture). Callers pass one stream to all their
        captures: PyTorch keeps a cuBLAS workspace per (handle, stream) for good, so a fresh stream per capture
        costs a workspace each."""
        torch.cuda.synchronize()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), ps.cut_graphs_at_host_collectives(self._cut):
            self._begin()
            try:
                yield self
            finally:
                self.pieces[-1].capture_end()
        torch.cuda.current_stream().wait_stream(stream)

    def replay(self) -> None:
        for i, piece in enumerate(self.pieces):
            piece.replay()
            if i < len(self.collectives):
                self.collectives[i]()


@dataclass
class _Graph:
    graph: PiecewiseGraph
    logits: Tensor  # [B, vocab] float32, written by each replay
    greedy: Tensor  # [B] long


class DecodeGraphRunner:
    """Captures the pure-decode step for each bucket of ``batch_buckets(max_batch)``; ``run`` replays one.

    The step runs over ``session`` (its caches, and its metadata builder's buffers, which the graphs read).
    ``capture()`` records every bucket, largest first, into one shared memory pool (``capture_s`` and
    ``capture_bytes`` say what it cost); ``num_replays`` counts replays, so a test can prove the graph ran.
    ``parallel_context``: the layout whose collectives the graphs record, the session's (given, it must be that one).
    """

    def __init__(self, model: torch.nn.Module, session: KVSession, max_batch: int,
                 parallel_context: ParallelContext | None = None) -> None:
        if parallel_context is not None and parallel_context is not session.parallel_context:
            raise ValueError("DecodeGraphRunner: parallel_context must be the session's (KVSession(parallel_context="
                             "...)): the graphs replay the session's buffers over that layout's groups")
        self.parallel_context = session.parallel_context
        self.model, self.session = model, session
        self.buckets = batch_buckets(min(max_batch, session.builder.max_num_reqs))
        self.graphs: dict[int, _Graph] = {}
        self.capture_s = 0.0
        self.capture_bytes = 0
        self.num_replays = 0
        if ps.model_parallel_is_initialized() and ps.get_parallel_context() is self.parallel_context:
            ps.release_before_destroy(self.release)  # its NCCL groups die with destroy_model_parallel

    def release(self) -> None:
        """Drop every captured graph (and their memory pool): ``destroy_model_parallel`` calls it before destroying the
        groups whose NCCL collectives the graphs recorded. ``run`` then refuses to replay."""
        if self.graphs:
            torch.cuda.synchronize()  # no replay still running
        for g in self.graphs.values():
            for piece in g.graph.pieces:
                piece.reset()
        self.graphs.clear()

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _forward(self, meta: AttentionMetadata) -> tuple[Tensor, Tensor]:
        """What is captured: the block-table gather, the engine's step (``step_logits``) and greedy sampling."""
        meta.decode.gather_block_table()
        logits = step_logits(self.model, meta, self.session.kv_caches)  # [B, vocab] float32
        return logits, sample(logits, 0.0, 1.0, None)  # greedy, NaN/inf rows flagged (no generator: capturable)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()  # every warm-up and capture: one cuBLAS workspace, not two per bucket
        for B in reversed(self.buckets):  # largest first: the smaller ones reuse its pool memory
            meta = self.session.step([], pad_decodes_to=B)  # all padding rows
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: Triton compilation, cuBLAS handles, lazy tables
                for _ in range(2):
                    self._forward(meta)
            torch.cuda.current_stream().wait_stream(side)
            graph = PiecewiseGraph(pool)
            with graph.capture(side):
                logits, greedy = self._forward(meta)
            self.graphs[B] = _Graph(graph, logits, greedy)
        torch.cuda.synchronize()
        self.capture_bytes = max(0, free_before - torch.cuda.mem_get_info()[0])
        self.capture_s = time.perf_counter() - start

    def run(self, request_ids: Sequence[Hashable], token_ids: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """Replay the decode step of these requests (each with cached tokens) and their new ids
        (``KVSession.decode_step``'s arguments): (logits [n, vocab] float32, greedy ids [n]).

        The returned tensors are views of the graph's outputs: read them before the next ``run``.
        """
        n = len(request_ids)
        if not self.graphs:
            raise RuntimeError("DecodeGraphRunner.run: the graphs were released (destroy_model_parallel); build a new "
                               "LLMEngine after initialize_model_parallel(...)")
        B = next(b for b in self.buckets if b >= n)
        meta = self.session.decode_step(request_ids, token_ids, pad_decodes_to=B)
        if not meta.is_pure_decode:  # the builder refuses padding for other steps; this states the contract
            raise ValueError("DecodeGraphRunner.run: the step must be pure decode (meta.is_pure_decode)")
        g = self.graphs[B]
        g.graph.replay()
        self.num_replays += 1
        return g.logits[:n], g.greedy[:n]
