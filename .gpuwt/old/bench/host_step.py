"""Host time of one pure-decode step on the CPU, at several batch sizes (JSON out).

Two figures per batch size, both without the model's arithmetic:

- ``session_step_us`` / ``decode_step_us``: ``KVSession.step`` / ``KVSession.decode_step`` of a pure-decode batch
  (allocation check, metadata build, cached lengths);
- ``engine_step_us``: one decode step of ``LLMEngine.generate`` (scheduling, the step, sampling, appending the ids
  and the stop checks) with the model's forward replaced by zeros of its output shape: the difference of two runs of
  ``max_new_tokens`` ``--short`` and ``--long`` divided by the extra steps, so prefill and setup cancel out (the least
  of ``--reps`` repetitions).

    python bench/host_step.py --batch 1 16 64 --json-out host.json
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import emit, environment
from megacp.engine import LLMEngine
from megacp.models.config import build_tiny_llama_config
from megacp.models.llama import LlamaForCausalLM
from megacp.sampling import SamplingParams
from megacp.session import KVSession


def _session_step_us(batch: int, steps: int, reps: int, fast: bool) -> float:
    """Least over ``reps`` (the machine's noise only adds) of the mean time of ``steps`` decode steps of ``batch`` requests: ``KVSession.step``, or
    with ``fast`` ``KVSession.decode_step``."""
    times = []
    for _ in range(reps):
        s = KVSession(1, 1, 8, num_kv_blocks=batch * (steps // 16 + 2), block_size=16, max_num_seqs=batch,
                      vocab_size=256)
        s.step([(i, [1, 2, 3]) for i in range(batch)])
        t0 = time.perf_counter()
        rids = list(range(batch))
        for k in range(steps):
            if fast:
                s.decode_step(rids, torch.full((batch,), k % 256, dtype=torch.long))
            else:
                s.step([(i, [k % 256]) for i in rids])
        times.append((time.perf_counter() - t0) / steps)
    return min(times) * 1e6


def _engine(batch: int, max_new: int) -> LLMEngine:
    model = LlamaForCausalLM(build_tiny_llama_config(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2), params_dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()  # finite logits (all zero: greedy id 0); the values do not matter here
    hidden = model.config.hidden_size
    model.forward = lambda ids, meta, caches: torch.zeros(meta.num_local_tokens, hidden)  # host path only
    return LLMEngine(model, num_kv_blocks=batch * (max_new // 16 + 2), block_size=16, max_num_seqs=batch,
                     enforce_eager=True)


def _engine_step_us(batch: int, short: int, long: int, reps: int) -> float:
    prompts = [[1 + i % 200, 2, 3] for i in range(batch)]
    times = []
    for _ in range(reps):
        run = {}
        for n in (short, long):
            eng = _engine(batch, long)
            eng.generate(prompts, SamplingParams(max_new_tokens=n, ignore_eos=True))
            run[n] = eng.stats.total_time_s
        times.append((run[long] - run[short]) / (long - short))
    return min(times) * 1e6


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--steps", type=int, default=200, help="decode steps timed per session run")
    p.add_argument("--short", type=int, default=20)
    p.add_argument("--long", type=int, default=220)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [dict(batch=b, session_step_us=round(_session_step_us(b, args.steps, args.reps, False), 1),
                 decode_step_us=round(_session_step_us(b, args.steps, args.reps, True), 1),
                 engine_step_us=round(_engine_step_us(b, args.short, args.long, args.reps), 1))
            for b in args.batch]
    result = dict(bench="host_step", device="cpu", results=rows, env=environment())
    emit(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
