"""A small generation engine: requests -> KV blocks -> batched prefill/decode steps -> sampled tokens.

Every rank of a model-parallel replica (its TP, PCP and DCP ranks) runs the same engine with the same requests and
makes the same scheduling decisions, so all ranks build the same step and call the same collectives. Per step:

1. **Schedule** (pure Python): one decode token for every running request that finished its prompt, then prompt
   chunks (oldest request first) up to ``max_num_batched_tokens`` tokens in total. A prompt longer than the budget is
   prefilled over several steps, each chunk attending to the request's own already cached context. A request is
   admitted when its first chunk is scheduled: it then reserves, in the engine's ``KVSession``, all the virtual KV
   blocks it can ever need (``prompt + max_new_tokens`` tokens) at once, or waits until running requests free theirs.
2. **Run**: ``KVSession.step`` (the step's metadata: PCP split of prefill tokens, slot mapping for this CP rank) ->
   model forward -> ``select_logits_hidden`` -> ``compute_logits`` (full vocabulary on every rank) -> ``sample``.
   A pure-decode step on CUDA (dense model) replays a CUDA graph over the same session instead (``megacp.cuda_graph``;
   with gloo groups the graph is cut into pieces at each collective, which runs eagerly between them).
3. **Agree**: the sampled ids are broadcast from TP rank 0 over the TP group, then from PCP rank 0 over the PCP group,
   i.e. from the replica's first rank (world rank 0 when dp = 1). Sampling is already seeded identically everywhere,
   the broadcast makes divergence impossible rather than unlikely.
4. **Finish**: a request stops at ``max_new_tokens`` or at an EOS id (unless ``ignore_eos``) and frees its blocks.
   A request whose logits hold NaN/inf stops with ``finish_reason="error"`` and a warning: ``sample`` marks its row
   with ``NONFINITE_TOKEN`` on the device, so the flag rides in the step's one read-back of the ids, and the
   broadcast makes the verdict the same on every rank.

**Async scheduling** (``LLMEngine(async_scheduling=True)``, the default; as vLLM's ``async_scheduling``): the host
schedules and launches step N+1 while step N runs on the device, for consecutive greedy pure-decode steps of requests
past their prompt. Step N+1's input ids are step N's agreed ids, gathered on the device (no host round-trip); it is
launched (graph replay or eager) before the host reads step N's ids back, and then the host processes step N (outputs,
stops, frees). A request that ends by length at step N is known on the host and is left out of step N+1; one that hits EOS
(or NaN/inf) at step N was computed in step N+1 too: that row is discarded (its KV slot lies inside the request's
reservation) and the request freed. Every step keeps its one read-back (two pinned buffers alternate). Prefill and
mixed steps run synchronously: the pipeline drains first, and so it does when a waiting request could be admitted
(now, or into the room a length stop frees; room freed by an EOS is seen one step later than synchronously, which
moves an admission, not an id). Every decision reads host state only, the same on every rank, so the collectives
stay in step. The ids equal the synchronous engine's: a greedy row depends on its own request only (up to
batch-size-dependent rounding, the condition under which a graph's padded batch gives the eager ids too). Sampling
with temperature > 0 stays synchronous: the generator's draws depend on the batch's rows, so one extra row (a
request computed past its EOS) would shift every later draw.

``generate`` first runs ``validate_requests`` (pure: token ids, lengths, sampling), so a bad request raises
``ValueError`` on every rank before any collective and the engine stays usable.

Data parallelism is the caller's business: give each DP replica its own share of the prompts (see
examples/infer_llama.py).
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from megacp.buffers import CpuGpuBuffer
from megacp.checks import check_bool, check_int
from megacp.config import validate_moe_data_parallel
from megacp.cuda_graph import DecodeGraphRunner, graph_support
from megacp.layers.cp_metadata import is_decode
from megacp.parallel_state import ParallelContext, resolve_parallel_context
from megacp.sampling import NONFINITE_TOKEN, SamplingParams, sample
from megacp.session import KVSession, step_logits, validate_requests


@dataclass
class RequestOutput:
    """One finished request. ``prompt_logits``: [vocab] float32 logits at the last prompt position (if asked)."""

    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str  # "length", "eos" or "error" (see ``error``)
    ttft_s: float
    prompt_logits: Tensor | None = None
    error: str | None = None  # why a request with finish_reason "error" stopped (NaN/inf logits)


@dataclass
class EngineStats:
    """Timings of the last ``generate`` and this rank's KV numbers.

    ``decode_tokens_per_s`` counts the tokens of steps that ran no prefill work, over those steps' wall time (with
    async scheduling: time two steps in flight share is counted once, and discarded rows are not tokens).
    ``kv_capacity_tokens`` is how many tokens the CP group's caches hold (``num_kv_blocks·block_size·pcp·dcp``);
    ``kv_slots_per_rank`` how many token slots this rank has; ``peak_tokens_stored`` the most this rank held at once.
    ``cuda_graphs``: "on", or why decode runs eagerly; ``graph_replays``: decode steps run as a graph replay;
    ``graph_capture_s`` / ``graph_capture_bytes``: what capturing cost (once per engine). ``async_scheduling``:
    whether the engine ran with ``LLMEngine(async_scheduling=True)``; ``async_steps``: steps launched on the device ids
    of a step still in flight (greedy pure-decode steps only, see the module docstring).
    """

    ttft_s: list[float] = field(default_factory=list)
    num_steps: int = 0
    decode_tokens: int = 0
    decode_time_s: float = 0.0
    total_time_s: float = 0.0
    kv_capacity_tokens: int = 0
    kv_slots_per_rank: int = 0
    peak_tokens_stored: int = 0
    cuda_graphs: str = ""
    graph_replays: int = 0
    graph_capture_s: float = 0.0
    graph_capture_bytes: int = 0
    async_scheduling: bool = False
    async_steps: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_time_s if self.decode_time_s > 0 else 0.0


@dataclass
class _Request:
    index: int  # position in the caller's list
    prompt: list[int]
    output: list[int] = field(default_factory=list)
    computed: int = 0  # tokens in the cache: the engine's copy of its session's count, advanced by each step
    ttft_s: float = 0.0
    prompt_logits: Tensor | None = None
    finish_reason: str = ""
    error: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_at(self, position: int) -> int:
        """``tokens[position]`` without building ``tokens``."""
        n = len(self.prompt)
        return self.prompt[position] if position < n else self.output[position - n]


@dataclass
class _Step:
    """A launched step: what it scheduled, and its sampled ids once ``_agree`` started their read-back."""

    index: int  # steps of this generate before it
    sched: list[tuple[_Request, int]]
    need: list[int]  # indices into sched of the entries that sample
    pure_decode: bool
    t0: float  # when it was launched
    tokens: Tensor | None = None  # [len(need)] long on the device, agreed (the next step's input ids when pipelined)
    logits: Tensor | None = None  # [len(need), vocab] float32 (read before the next step when a first token needs it)
    host: Tensor | None = None  # the pinned read-back of tokens, valid once ``ready`` fired
    ready: Any = None  # torch.cuda.Event, None on the CPU (the copy is done)


@dataclass
class _Generation:
    """The state of one ``generate`` call."""

    waiting: deque[_Request]
    running: list[_Request]
    sampling: SamplingParams
    generator: torch.Generator
    return_prompt_logits: bool
    stats: EngineStats
    start: float
    last_done: float = 0.0  # when the last step's ids were processed


class LLMEngine:
    """Runs ``generate`` for a ``LlamaForCausalLM`` on one DP replica of a ``ParallelContext``.

    ``num_kv_blocks``: physical KV blocks per rank and layer (the same virtual block ids on every CP rank).
    ``max_num_seqs``: requests admitted at once (rows of the block table). The KV cache is a ``KVSession``
    (``self.session``): requests are its ids, each step its metadata. On CUDA with NCCL (or one GPU) pure-decode
    steps replay CUDA graphs; ``enforce_eager=True`` turns that off. ``parallel_context``: the layout, default the
    model's (``model.parallel_context``), else ``resolve_parallel_context``'s. ``async_scheduling=True`` (the
    default): greedy pure-decode steps are launched one ahead of the host's processing of their predecessor (module
    docstring), with the synchronous engine's ids; sampling with temperature > 0 runs synchronously; ``False`` runs
    every step synchronously (the host's per-step work then adds to the step time: ~15% of a batch-1 8B step on an
    H200, docs/benchmarks.md).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        num_kv_blocks: int,
        block_size: int = 16,
        max_num_batched_tokens: int = 512,
        max_num_seqs: int = 64,
        enforce_eager: bool = False,
        parallel_context: ParallelContext | None = None,
        async_scheduling: bool = True,
    ) -> None:
        num_kv_blocks = check_int("LLMEngine(num_kv_blocks)", num_kv_blocks, 1, hint="KV blocks per rank, e.g. 64")
        block_size = check_int("LLMEngine(block_size)", block_size, 1, hint="KV tokens per block, e.g. 16")
        max_num_batched_tokens = check_int("LLMEngine(max_num_batched_tokens)", max_num_batched_tokens, 1,
                                           hint="tokens per step, e.g. 512")
        max_num_seqs = check_int("LLMEngine(max_num_seqs)", max_num_seqs, 1, hint="requests run at once, e.g. 64")
        self.async_scheduling = check_bool("LLMEngine(async_scheduling)", async_scheduling)
        ctx = self.parallel_context = resolve_parallel_context(
            parallel_context if parallel_context is not None else getattr(model, "parallel_context", None))
        validate_moe_data_parallel(getattr(model.config, "is_moe", False), ctx.dp_size)
        self.model = model
        self.max_num_batched_tokens = max_num_batched_tokens
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_model_len = int(model.config.max_position_embeddings)
        self.session = KVSession.for_model(model, num_kv_blocks, block_size, max_num_seqs,
                                           max_seq_len=self.max_model_len, parallel_context=ctx)  # K/V or latent rows
        # The step's read-back, two buffers: with async scheduling a step's copy is queued before the previous
        # step's ids are read. And the rows of the in-flight step's ids that feed the next step.
        self._sampled = tuple(CpuGpuBuffer(max_num_seqs, dtype=torch.long, device=self.device) for _ in range(2))
        self._fed_index = CpuGpuBuffer(max_num_seqs, dtype=torch.long, device=self.device)
        # CUDA-graph decode (megacp/cuda_graph.py), captured at the first pure-decode step.
        self.graphs_off_reason = "enforce_eager=True" if enforce_eager else graph_support(model, self.device)
        self.graph_runner: DecodeGraphRunner | None = None
        self.eos_token_ids = set(model.config.eos_token_ids)
        self.stats = EngineStats()
        self._requests: list[_Request] = []
        self._nonfinite_weight: str | None = None  # found by _stop_nonfinite, per generate ("" = none on this rank)

    @property
    def block_size(self) -> int:
        return self.session.block_size

    @property
    def num_kv_blocks(self) -> int:
        return self.session.num_kv_blocks

    # ------------------------------------------------------------------ admission
    def _computed(self, req: _Request) -> int:
        """Tokens of ``req`` already in the (CP-sharded) cache."""
        return req.computed

    def _in_prefill(self, req: _Request) -> bool:
        return self._computed(req) < len(req.prompt)

    def _try_admit(self, req: _Request, max_new_tokens: int) -> bool:
        total = len(req.prompt) + max_new_tokens
        if not self.session.can_reserve(req.index, total):
            return False
        self.session.reserve(req.index, total)
        return True

    # ------------------------------------------------------------------ scheduling
    def _schedule(
        self, waiting: deque[_Request], running: list[_Request], max_new_tokens: int
    ) -> list[tuple[_Request, int]]:
        """This step's (request, number of new tokens): decodes first, then prompt chunks within the token budget."""
        sched = [(r, 1) for r in running if not self._in_prefill(r)]
        budget = self.max_num_batched_tokens - len(sched)
        for r in running:
            if self._in_prefill(r) and budget > 0:
                n = min(len(r.prompt) - self._computed(r), budget)
                sched.append((r, n))
                budget -= n
        while waiting and budget > 0 and self._try_admit(waiting[0], max_new_tokens):
            r = waiting.popleft()
            running.append(r)
            n = min(len(r.prompt), budget)
            sched.append((r, n))
            budget -= n
        return sched

    # ------------------------------------------------------------------ one step
    def _launch(self, g: _Generation, sched: list[tuple[_Request, int]], feed: _Step | None = None) -> _Step:
        """Build and launch one step (``_run_step``); ``feed``: the in-flight step whose device ids are its input."""
        if not sched:  # cannot happen after validate_requests: an empty cache fits any single request
            raise RuntimeError("scheduler made no progress; this is a bug in megacp.engine")
        need = [i for i, (r, n) in enumerate(sched) if self._computed(r) + n >= len(r.prompt)]
        step = _Step(g.stats.num_steps, sched, need, self._is_pure_decode(sched), time.perf_counter())
        self._run_step(step, g.sampling, g.generator, feed)  # advances the cache
        g.stats.num_steps += 1
        g.stats.async_steps += feed is not None
        g.stats.peak_tokens_stored = max(g.stats.peak_tokens_stored, self.session.tokens_stored())
        return step

    @torch.inference_mode()
    def _run_step(self, step: _Step, sampling: SamplingParams, generator: torch.Generator,
                  feed: _Step | None = None) -> None:
        """Forward the scheduled tokens, sample the entries ``step.need`` (indices into ``step.sched`` that end a
        prompt or decode), agree on them and start their read-back (``_agree``). A pure-decode step whose every row
        samples may replay a CUDA graph; ``feed`` (async scheduling): its ids come from that step's sampled ids on
        the device instead of the host."""
        # Host work only until the sampled ids come back: the metadata and the input ids cross over in the
        # session's persistent buffers without a sync, and the copy of the sampled ids into pinned memory at the end
        # is the step's one read-back (docs/benchmarks.md: host-bound decode).
        sched, need = step.sched, step.need
        for r, n in sched:
            r.computed += n  # the session's count once the step is built (a failed step ends generate)
        runner = self._graph_runner_for(sched, need, step.pure_decode)
        if step.pure_decode and len(need) == len(sched):  # the metadata from the session's per-row state
            rids = [r.index for r, _ in sched]
            ids = self._fed_ids(sched, feed) if feed is not None else \
                torch.tensor([r.token_at(r.computed - 1) for r, _ in sched], dtype=torch.long)
            if runner is not None:
                logits, greedy = runner.run(rids, ids)
                self.stats.graph_replays += 1
                tokens = greedy if sampling.temperature == 0 else sample(logits, sampling.temperature,
                                                                         sampling.top_p, generator)
                self._agree(step, tokens, logits)
                return
            meta = self.session.decode_step(rids, ids)
        else:
            meta = self.session.step([(r.index, r.tokens[r.computed - n : r.computed]) for r, n in sched],
                                     logits_requests=need)
        logits = step_logits(self.model, meta, self.session.kv_caches, logits=bool(need))  # [n, vocab] float32
        if logits is not None:
            self._agree(step, sample(logits, sampling.temperature, sampling.top_p, generator), logits)

    def _fed_ids(self, sched: list[tuple[_Request, int]], feed: _Step) -> Tensor:
        """The input ids of a decode step of requests that all sampled in ``feed``: their rows of ``feed.tokens``,
        gathered on the device (the index crosses over in a persistent buffer: no sync). A NaN/inf row's
        ``NONFINITE_TOKEN`` becomes id 0: its request stops with ``feed`` and this step's row is discarded.

        # -> [len(sched)] long on the engine's device
        """
        row = {r.index: i for i, (r, _) in enumerate(feed.sched)}
        index = [row[r.index] for r, _ in sched]
        if index == list(range(len(index))):
            ids = feed.tokens[: len(index)]
        else:
            host = self._fed_index.host()
            host[: len(index)] = torch.tensor(index, dtype=torch.long)
            ids = feed.tokens.index_select(0, self._fed_index.to_device(len(index)))
        return ids.clamp(min=0)

    def _agree(self, step: _Step, tokens: Tensor, logits: Tensor) -> None:
        """Broadcast the sampled ids from the replica's first rank (over TP, then PCP) and start their one read-back
        (into one of two pinned buffers, so a step in flight and the next one never share one)."""
        tokens = self.parallel_context.tp.broadcast(tokens.contiguous(), src=0)
        tokens = self.parallel_context.pcp.broadcast(tokens, src=0)
        step.tokens, step.logits = tokens, logits
        step.host, step.ready = self._sampled[step.index % 2].to_host_async(tokens)

    def _is_pure_decode(self, sched: list[tuple[_Request, int]]) -> bool:
        """Every scheduled request is a decode, by the metadata's own rule (``cp_metadata.is_decode``, which makes
        the step's ``meta.is_pure_decode``): known before the step is built, for the graph and the decode stats."""
        return all(is_decode(self._computed(r), n) for r, n in sched)

    def _graph_runner_for(self, sched: list[tuple[_Request, int]], need: list[int], pure_decode: bool
                          ) -> DecodeGraphRunner | None:
        """The graph runner when this step is a pure decode whose every row samples (a graph returns them all), and
        it can replay it (capturing on first use), else None."""
        if self.graphs_off_reason is not None or not pure_decode or len(need) != len(sched):
            return None
        if self.graph_runner is None:
            self.graph_runner = DecodeGraphRunner(self.model, self.session, self.session.max_num_seqs,
                                                  parallel_context=self.parallel_context)
            self.graph_runner.capture()
            self.stats.graph_capture_s = self.graph_runner.capture_s
            self.stats.graph_capture_bytes = self.graph_runner.capture_bytes
        return self.graph_runner if len(sched) <= self.graph_runner.max_batch else None

    # ------------------------------------------------------------------ async scheduling
    def _pipelined(self, step: _Step, sampling: SamplingParams) -> bool:
        """Whether ``step`` may stay in flight while the next one is launched: async scheduling, greedy, and a pure
        decode of requests past their prompt (every row samples; no first token, so no prompt logits to keep)."""
        return (self.async_scheduling and sampling.temperature == 0 and step.pure_decode
                and len(step.need) == len(step.sched) and all(r.output for r, _ in step.sched))

    def _lookahead(self, g: _Generation, inflight: _Step) -> list[tuple[_Request, int]] | None:
        """The next step, scheduled before ``inflight``'s ids are read, or None when it needs them read first.

        It is a decode of ``inflight``'s requests but those it ends by length (``len(output) + 1`` reaches
        ``max_new_tokens``: known on the host) and those that ended before it (an EOS or NaN/inf at the step
        before: their ``inflight`` row is discarded). None, so the pipeline drains and the step is scheduled as the
        synchronous engine does, when another running request would join (a prompt chunk: a mixed step) or when
        a waiting request could be admitted now or into the room a length stop frees. (Room freed by an EOS is seen
        one step later than the synchronous engine sees it: the admission, not the ids, moves by a step.)
        """
        rows = [r for r, _ in inflight.sched if not r.finish_reason]
        keep = [r for r in rows if len(r.output) + 1 < g.sampling.max_new_tokens]
        held = {r.index for r in rows}
        if not keep or any(r.index not in held for r in g.running):
            return None
        if g.waiting and (len(keep) < len(rows) or self._admits(g, len(keep))):
            return None
        return [(r, 1) for r in keep]

    def _admits(self, g: _Generation, num_decodes: int) -> bool:
        """Whether ``_schedule`` would admit the first waiting request next to ``num_decodes`` decodes now."""
        head = g.waiting[0]
        return (self.max_num_batched_tokens > num_decodes
                and self.session.can_reserve(head.index, len(head.prompt) + g.sampling.max_new_tokens))

    # ------------------------------------------------------------------ the loop
    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingParams, return_prompt_logits: bool = False
    ) -> list[RequestOutput]:
        """Run all prompts to completion; outputs in the order of ``prompt_ids``. Updates ``self.stats``."""
        prompts = self.validate_requests(prompt_ids, sampling, return_prompt_logits)
        self._nonfinite_weight = None
        reqs = [_Request(i, ids) for i, ids in enumerate(prompts)]
        self._requests = reqs
        stats = EngineStats(
            kv_capacity_tokens=self.session.capacity_tokens,
            kv_slots_per_rank=self.num_kv_blocks * self.block_size,
            cuda_graphs=self.graphs_off_reason or "on",
            async_scheduling=self.async_scheduling,
        )
        if self.graph_runner is not None:
            stats.graph_capture_s, stats.graph_capture_bytes = self.graph_runner.capture_s, \
                self.graph_runner.capture_bytes
        self.stats = stats  # the steps count into it (graph replays, capture)
        g = _Generation(deque(reqs), [], sampling, torch.Generator(device=self.device).manual_seed(sampling.seed),
                        return_prompt_logits, stats, time.perf_counter())
        try:
            self._loop(g)
        finally:
            # A step that raised (a bad input, a dead peer) must not leak this engine's KV blocks and rows.
            for r in g.running:
                if r.index in self.session:
                    self.session.free(r.index)
        stats.total_time_s = time.perf_counter() - g.start
        stats.ttft_s = [r.ttft_s for r in reqs]
        self.stats = stats
        return self.outputs_so_far()

    def _loop(self, g: _Generation) -> None:
        """Steps until every request finished. Synchronously each step is launched, then its ids are read back and
        processed (``_finish``). With async scheduling a pipelined step (``_pipelined``) stays in flight: the next
        one (``_lookahead``) is launched on its device ids before its own ids are read; when there is no such next
        step the in-flight one is finished first and the next scheduled from the processed state."""
        inflight: _Step | None = None
        while g.waiting or g.running:
            ahead = None if inflight is None else self._lookahead(g, inflight)
            if inflight is not None and ahead is None:  # drain
                self._finish(g, inflight)
                inflight = None
                continue
            if ahead is not None:
                step = self._launch(g, ahead, feed=inflight)
            else:
                step = self._launch(g, self._schedule(g.waiting, g.running, g.sampling.max_new_tokens))
            if inflight is not None:
                self._finish(g, inflight)
            inflight = step if self._pipelined(step, g.sampling) else None
            if inflight is None:
                self._finish(g, step)
        if inflight is not None:  # only rows of requests that already stopped: nothing to append
            self._finish(g, inflight)

    def _finish(self, g: _Generation, step: _Step) -> None:
        """Wait for ``step``'s ids and process them: append, stop at EOS / length / NaN-inf, free. A row of a request
        that stopped at an earlier step (async scheduling computed it ahead) is discarded."""
        if step.ready is not None:
            step.ready.synchronize()
        tokens = [] if step.host is None else step.host.tolist()
        now = time.perf_counter()
        decoded = 0
        for k, (j, tok) in enumerate(zip(step.need, tokens)):
            r = step.sched[j][0]
            if r.finish_reason:
                continue
            decoded += 1
            if tok == NONFINITE_TOKEN:  # the same on every rank: the ids were broadcast from one rank
                self._stop_nonfinite(r, step.index)
                g.running.remove(r)
                continue
            if not r.output:
                r.ttft_s = now - g.start
                if g.return_prompt_logits:
                    r.prompt_logits = step.logits[k].cpu()
            r.output.append(tok)
            if tok in self.eos_token_ids and not g.sampling.ignore_eos:
                r.finish_reason = "eos"
            elif len(r.output) >= g.sampling.max_new_tokens:
                r.finish_reason = "length"
            if r.finish_reason:
                self.session.free(r.index)
                g.running.remove(r)
        if step.pure_decode:  # wall time not already counted for the step before (in flight alongside)
            g.stats.decode_time_s += now - max(step.t0, g.last_done)
            g.stats.decode_tokens += decoded
        g.last_done = now

    def outputs_so_far(self) -> list[RequestOutput]:
        """The requests of the running (or last) ``generate`` as they stand, in its prompt order: after an interrupt
        (KeyboardInterrupt), the unfinished ones have ``finish_reason`` "" and the tokens sampled so far."""
        return [RequestOutput(r.prompt, list(r.output), r.finish_reason, r.ttft_s, r.prompt_logits, r.error)
                for r in self._requests]

    def validate_requests(self, prompt_ids: Any, sampling: SamplingParams, return_prompt_logits: bool = False
                          ) -> list[list[int]]:
        """Every check of a ``generate`` call, run before anything else: the prompts as ``list[list[int]]``.

        Pure given the engine's configuration, so every rank reaches the same verdict from the same arguments and a
        rejected request (``ValueError``: a token id outside the vocabulary, a non-integer id, an empty prompt, a
        prompt that cannot fit the cache or the model's positions, a bad ``sampling``) leaves the ranks in step and the
        engine usable.
        """
        if not self.parallel_context.is_live():
            raise RuntimeError(
                "LLMEngine.generate: the model-parallel state this engine was built on has been destroyed "
                "(destroy_model_parallel); after initialize_model_parallel(...) load the model and build a new LLMEngine"
            )
        if not isinstance(sampling, SamplingParams):
            raise ValueError(
                f"generate(sampling) must be a megacp.sampling.SamplingParams, got {type(sampling).__name__}"
            )
        check_bool("generate(return_prompt_logits)", return_prompt_logits)
        return validate_requests(
            prompt_ids, sampling.max_new_tokens, vocab_size=int(self.model.config.vocab_size),
            max_model_len=self.max_model_len, num_kv_blocks=self.num_kv_blocks, block_size=self.block_size,
            cp_world_size=self.session.cp_world_size,
        )

    def _stop_nonfinite(self, req: _Request, step: int) -> None:
        """Stop a request whose logits were NaN/inf: free it, record why, warn (on every rank: the verdict came with
        the broadcast ids)."""
        if self._nonfinite_weight is None:  # one scan per generate call, and only once something went wrong
            self._nonfinite_weight = next(
                (n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())), "")
        bad = self._nonfinite_weight
        where = f"; this rank's first non-finite weight is {bad}" if bad else ""
        req.finish_reason = "error"
        req.error = (
            f"request {req.index}: the model produced NaN/inf logits at step {step} (after {len(req.output)} "
            f"generated tokens), so the request was stopped{where}; check the checkpoint for non-finite weights "
            f"(load_model checks them unless check_finite=False / --skip-finite-check) or use a wider dtype"
        )
        warnings.warn(req.error, RuntimeWarning, stacklevel=3)
        self.session.free(req.index)
