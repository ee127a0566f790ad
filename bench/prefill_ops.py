"""Ops and bytes of one prefill, counted, not timed: every aten op (views excluded) of ``LLMEngine.generate`` of
one prompt and one new token, with the bytes of the tensors it reads and writes (JSON out).

A CPU-runnable stand-in for a GPU profile of where the elementwise traffic goes: ``bytes`` adds each op's distinct
input and output tensors (a view argument counts as the elements it spans), so a pass over a ``[N·k, H]`` float32
tensor shows whatever device runs it. ``--kernels cuda`` makes the CPU take the paths a CUDA inference run takes
(``megacp.ops``' Triton kernels: each module's ``available`` answers True) with each kernel replaced by its PyTorch
reference, run uncounted and recorded as ONE op ``triton:<name>`` with its arguments' and result's bytes; without it
the CPU's own paths are counted. Works from any checkout: kernels a checkout lacks are skipped, so the same command
counts before and after a change (``PYTHONPATH=<checkout>``).

    python bench/prefill_ops.py --tokens 1024 --layers 4 --kernels cuda --json-out ops.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections import Counter
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # PYTHONPATH wins: any checkout

_FREE = ("aten::empty", "aten::empty_strided", "aten::empty_like", "aten::lift_fresh", "aten::_local_scalar_dense",
         "aten::resize_", "aten::set_")


def _aliases(out: Any, args: Any) -> bool:
    """Whether a view op's result shares memory with an argument (``aten::to`` is a "view" op that copies when it
    converts: that one counts)."""
    storages = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves(args)
                if isinstance(t, torch.Tensor)}
    return all(t.untyped_storage().data_ptr() in storages for t in torch.utils._pytree.tree_leaves(out)
               if isinstance(t, torch.Tensor))


class OpCounter(TorchDispatchMode):
    """Counts aten ops (views and allocations excluded) and the bytes of their tensor arguments and results."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.paused = 0
        self.active = False

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def record(self, name: str, tensors: list[torch.Tensor], written: tuple[torch.Tensor, ...] = ()) -> None:
        """One op over ``tensors`` (each distinct one counted once); ``written``: results counted again even when
        they are arguments (an in-place kernel reads and writes them)."""
        if not self.active:
            return
        seen = {(t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype): t.numel() * t.element_size()
                for t in tensors}
        self.calls[name] += 1
        self.bytes[name] += sum(seen.values()) + sum(t.numel() * t.element_size() for t in written)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = f"aten::{func._schema.name.split('::')[-1]}"
        if self.paused or name in _FREE or (func.is_view and _aliases(out, args)):
            return out
        flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
        self.record(name, [t for t in flat if isinstance(t, torch.Tensor) and t.device.type != "meta"])
        return out

    @contextlib.contextmanager
    def uncounted(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


def _standin(counter: OpCounter, name: str, reference: Callable) -> Callable:
    def call(*args, **kwargs):
        with counter.uncounted():
            out = reference(*args, **kwargs)
        res = tuple(t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor))
        counter.record(f"triton:{name}", [t for t in args if isinstance(t, torch.Tensor)], written=res)
        return out

    return call


def cuda_kernel_standins(counter: OpCounter) -> list[tuple[Any, str, Any]]:
    """(module, attribute, replacement) for every Triton kernel of the CUDA inference path this checkout has."""
    import torch.nn.functional as F

    from megacp.ops import decode_fused, rms_norm

    def silu_mul(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def add_rms_norm(x, residual, weight, eps):
        s = x if residual is None else x + residual
        return F.rms_norm(s, (s.shape[-1],), weight, eps), s

    patches = [(decode_fused, "available", lambda *a: True), (rms_norm, "available", lambda *a: True),
               (decode_fused, "silu_mul", _standin(counter, "silu_mul", silu_mul)),
               (rms_norm, "fused_add_rms_norm", _standin(counter, "add_rms_norm", add_rms_norm))]
    try:
        from megacp.ops import moe_combine
    except ImportError:
        return patches
    patches += [(moe_combine, "available", lambda *a: True),
                (moe_combine, "combine_rows_fused", _standin(counter, "moe_combine", moe_combine.combine_rows))]
    try:
        from megacp.ops import rope_inplace
    except ImportError:
        return patches
    from megacp.layers.rotary import RotaryTables, apply_rotary_tables

    def rotate_(x, cos, sin_signed, interleave=False):
        return x.copy_(apply_rotary_tables(x, RotaryTables(cos, sin_signed), interleave))

    return patches + [(rope_inplace, "available", lambda *a: True),
                      (rope_inplace, "rotate_", _standin(counter, "rope_inplace", rotate_))]


@contextlib.contextmanager
def patched(patches: list[tuple[Any, str, Any]]):
    saved = [(m, a, getattr(m, a)) for m, a, _ in patches]
    for m, a, new in patches:
        setattr(m, a, new)
    try:
        yield
    finally:
        for m, a, old in saved:
            setattr(m, a, old)


def build_model(shape: str, layers: int, overrides: dict, device: str) -> torch.nn.Module:
    """A megacp model of ``bench/e2e.py``'s ``shape`` with random bf16 weights (no checkpoint)."""
    from bench.e2e import model_config
    from megacp.models.config import model_config_from_dict
    from megacp.models.deepseek import DeepseekForCausalLM
    from megacp.models.llama import LlamaForCausalLM

    config = model_config_from_dict(model_config(shape, layers, 1 << 16, overrides).to_dict())
    torch.manual_seed(0)
    cls = DeepseekForCausalLM if config.is_mla else LlamaForCausalLM
    model = cls(config, torch.bfloat16).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model.eval()


def count_prefill(model: torch.nn.Module, tokens: int, kernels: str) -> dict:
    from megacp.engine import LLMEngine
    from megacp.sampling import SamplingParams

    engine = LLMEngine(model, num_kv_blocks=tokens // 16 + 4, block_size=16, max_num_batched_tokens=tokens,
                       max_num_seqs=1, enforce_eager=True)
    prompt = torch.randint(3, 1000, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    counter = OpCounter()
    with patched(cuda_kernel_standins(counter) if kernels == "cuda" else []), torch.inference_mode():
        engine.generate([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True))  # warm-up
        with counter:
            engine.generate([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True))
    top = sorted(counter.bytes, key=lambda n: -counter.bytes[n])
    return {"ops": sum(counter.calls.values()), "bytes": sum(counter.bytes.values()),
            "by_op": {n: {"calls": counter.calls[n], "mbytes": round(counter.bytes[n] / 2**20, 2)} for n in top}}


def main(argv: list[str] | None = None) -> dict:
    from bench.e2e import SHAPES, _parse_override

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-shape", default="deepseek-v2-lite", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--kernels", choices=("cpu", "cuda"), default="cuda",
                   help="cuda: the CUDA inference paths, Triton kernels as counted stand-ins")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    import torch.distributed as dist

    from megacp import parallel_state as ps

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ps.initialize_model_parallel(backend="gloo")
    try:
        model = build_model(args.model_shape, args.layers, dict(_parse_override(o) for o in args.override),
                            args.device)
        result = {"benchmark": "prefill_ops", "shape": args.model_shape, "layers": args.layers,
                  "tokens": args.tokens, "kernels": args.kernels, "megacp": os.path.dirname(
                      os.path.dirname(sys.modules["megacp"].__file__)),
                  **count_prefill(model, args.tokens, args.kernels)}
    finally:
        ps.destroy_model_parallel()
    text = json.dumps(result, indent=1)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text)
    return result


if __name__ == "__main__":
    main()
