"""Your own model on megacp: a 2-layer GPT (learned positions, LayerNorm, GELU MLP) run with context parallelism.

    torchrun --nproc-per-node 2 examples/own_model.py -pcp 2
    torchrun --nproc-per-node 4 examples/own_model.py -tp 2 -pcp 2 -dcp 2

The model is built from ``megacp.layers`` (tensor-parallel linears, vocabulary-parallel embedding and LM head,
``ContextParallelAttention``) plus plain PyTorch modules (``nn.LayerNorm``, ``nn.Embedding`` for the positions). A
``megacp.KVSession`` holds its KV cache and turns each step's requests into the metadata the layers read. Every rank
checks the logits of three steps against an unsharded plain-PyTorch reference with the same weights: a prefill of
two prompts (every position), a decode of both, and a mixed step (a follow-up chunk of the first request over its
cached context, a decode of the second, a new prompt). docs/own_model.md walks through it. Exit code 1 if a logit
differs by more than ``--atol``. ``--autograd`` runs the steps with gradients on (as a training loop would; the
default is ``torch.no_grad()``, what inference wants) and backpropagates each step's logits to the weights.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import megacp
from megacp.layers import (
    ColumnParallelLinear,
    ContextParallelAttention,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 97
    hidden: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 1  # multi-query: every -tp up to 4 and every -dcp dividing it are legal
    max_positions: int = 64

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads


# ------------------------------------------------------------------------------------------------ the megacp model
class Block(nn.Module):
    """Pre-LN transformer block; activations are this rank's rows ``[T_local, hidden]``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        D = cfg.head_dim
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.qkv = QKVParallelLinear(cfg.hidden, D, cfg.num_heads, cfg.num_kv_heads, bias=True)  # this TP rank's heads
        self.attn = ContextParallelAttention(cfg.num_heads, cfg.num_kv_heads, D, 1 / math.sqrt(D))  # global counts
        self.proj = RowParallelLinear(cfg.num_heads * D, cfg.hidden, bias=True)  # sums over TP
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.fc = ColumnParallelLinear(cfg.hidden, 4 * cfg.hidden, bias=True)
        self.out = RowParallelLinear(4 * cfg.hidden, cfg.hidden, bias=True)

    def forward(self, x: torch.Tensor, meta: megacp.AttentionMetadata, kv_cache) -> torch.Tensor:
        q, k, v = self.qkv.split_qkv(self.qkv(self.ln1(x)))
        x = x + self.proj(self.attn(q, k, v, meta, kv_cache).flatten(1))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden)
        self.pos = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.head = ParallelLMHead(cfg.vocab_size, cfg.hidden)

    def forward(self, meta: megacp.AttentionMetadata, kv_caches) -> torch.Tensor:
        """This rank's rows of the step -> their final hidden states ``[T_local, hidden]``."""
        x = self.tok(meta.input_ids) + self.pos(meta.positions)
        for block, cache in zip(self.blocks, kv_caches):
            x = block(x, meta, cache)
        return self.ln_f(x)


# ------------------------------------------------------------------------------------------------ the reference
class RefBlock(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        D = cfg.head_dim
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.qkv = nn.Linear(cfg.hidden, (cfg.num_heads + 2 * cfg.num_kv_heads) * D)
        self.proj = nn.Linear(cfg.num_heads * D, cfg.hidden)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.fc = nn.Linear(cfg.hidden, 4 * cfg.hidden)
        self.out = nn.Linear(4 * cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [L, hidden], one whole sequence
        c, L = self.cfg, x.shape[0]
        q, k, v = self.qkv(self.ln1(x)).split([c.num_heads * c.head_dim, *[c.num_kv_heads * c.head_dim] * 2], -1)
        q = q.view(L, c.num_heads, c.head_dim).transpose(0, 1)
        k, v = (t.view(L, c.num_kv_heads, c.head_dim).transpose(0, 1).repeat_interleave(
            c.num_heads // c.num_kv_heads, dim=0) for t in (k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(L, -1)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class RefGPT(nn.Module):
    """The same model, unsharded plain PyTorch (parameter names match ``GPT``'s)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.pos = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.blocks = nn.ModuleList(RefBlock(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)

    def forward(self, ids: list[int]) -> torch.Tensor:  # -> logits [L, vocab]
        x = self.tok(torch.tensor(ids)) + self.pos(torch.arange(len(ids)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def load_from_reference(model: GPT, ref: RefGPT, cfg: GPTConfig) -> None:
    """Give every megacp parameter its shard of the reference's full tensor (the layers' ``weight_loader``s pick
    this rank's rows or columns; plain PyTorch modules are copied whole)."""
    full = dict(ref.named_parameters())
    qkv_sizes = [cfg.num_heads * cfg.head_dim, *[cfg.num_kv_heads * cfg.head_dim] * 2]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".qkv." in name:  # q, k and v rows load separately: they are split over TP differently
                for shard, t in zip("qkv", full[name].split(qkv_sizes)):
                    param.weight_loader(param, t, shard)
            elif hasattr(param, "weight_loader"):
                param.weight_loader(param, full[name])
            else:
                param.copy_(full[name])


# ------------------------------------------------------------------------------------------------ the check
def run(tp: int, pcp: int, dcp: int, interleave: int, atol: float, autograd: bool = False) -> float:
    """Initialise model parallelism, build both models, run three steps; return the worst logit error.

    ``autograd``: the steps run with gradients enabled and each step's logits are backpropagated (``.sum()``), so
    every layer's forward and backward run under autograd at this layout; else under ``torch.no_grad()``.
    """
    megacp.initialize_model_parallel(tensor_model_parallel_size=tp, prefill_context_parallel_size=pcp,
                                     decode_context_parallel_size=dcp, cp_kv_cache_interleave_size=interleave,
                                     backend="gloo")
    cfg = GPTConfig()
    torch.manual_seed(0)  # the same reference weights on every rank
    ref = RefGPT(cfg).eval()
    model = GPT(cfg).eval()
    load_from_reference(model, ref, cfg)
    session = megacp.KVSession(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                               num_kv_blocks=16, block_size=4, vocab_size=cfg.vocab_size)
    gen = torch.Generator().manual_seed(1)
    seqs = {rid: torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist()
            for rid, n in (("a", 13), ("b", 6), ("c", 3))}
    worst = 0.0

    def check(step: str, got: torch.Tensor, want: torch.Tensor) -> None:
        nonlocal worst
        if autograd:
            got.sum().backward()  # raises if any layer's forward left the graph unusable
        err = (got.detach() - want.detach()).abs().max().item()
        worst = max(worst, err)
        if megacp.parallel_state.get_world_group().rank_in_group == 0:
            print(f"{step}: max |logits - reference| = {err:.2e}")

    with torch.enable_grad() if autograd else torch.no_grad():
        # 1. prefill two prompts: every position's logits (PCP-split rows gathered back in order)
        meta = session.step([("a", seqs["a"]), ("b", seqs["b"])])
        logits = model.head.compute_logits(meta.gather_hidden(model(meta, session.kv_caches)))
        check("prefill", logits, torch.cat([ref(seqs["a"]), ref(seqs["b"])]))
        # 2. decode one token of each (the reference's greedy choice), logits of the new token
        for rid in ("a", "b"):
            seqs[rid].append(int(ref(seqs[rid])[-1].argmax()))
        meta = session.step([("a", seqs["a"][-1:]), ("b", seqs["b"][-1:])])
        logits = model.head.compute_logits(meta.select_logits_hidden(model(meta, session.kv_caches)))
        check("decode", logits, torch.stack([ref(seqs["a"])[-1], ref(seqs["b"])[-1]]))
        # 3. mixed: a follow-up chunk of "a" over its cached context, a decode of "b", a new prompt "c"
        chunk = torch.randint(0, cfg.vocab_size, (7,), generator=gen).tolist()
        seqs["a"] += chunk
        seqs["b"].append(int(ref(seqs["b"])[-1].argmax()))
        meta = session.step([("a", chunk), ("b", seqs["b"][-1:]), ("c", seqs["c"])])
        logits = model.head.compute_logits(meta.gather_hidden(model(meta, session.kv_caches)))
        want = torch.cat([ref(seqs["a"])[-len(chunk):], ref(seqs["b"])[-1:], ref(seqs["c"])])
        check("chunk over cached context + decode + new prompt", logits, want)
    for rid in seqs:
        session.free(rid)
    megacp.destroy_model_parallel()
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--prefill-context-parallel-size", "-pcp", type=int, default=1)
    p.add_argument("--decode-context-parallel-size", "-dcp", type=int, default=1)
    p.add_argument("--cp-kv-cache-interleave-size", type=int, default=1)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--autograd", action="store_true", help="run the steps with gradients on and backpropagate")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    worst = run(args.tensor_parallel_size, args.prefill_context_parallel_size, args.decode_context_parallel_size,
                args.cp_kv_cache_interleave_size, args.atol, args.autograd)
    if worst > args.atol:
        print(f"FAIL: logits differ from the reference by {worst:.2e} > --atol {args.atol:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from megacp.program import exit_after  # no Python finalization: see megacp/program.py

    exit_after(main)
