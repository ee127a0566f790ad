"""Fine-tune megacp's tiny Llama on one long sequence split over context-parallel (and tensor-parallel) ranks.

    torchrun --nproc-per-node 2 examples/train_cp.py -pcp 2
    torchrun --nproc-per-node 4 examples/train_cp.py -tp 2 -pcp 2 --seq-len 2048

Every step runs the forward of the whole sequence with its tokens split over the PCP ranks (head/tail chunks, as in
prefill; K/V are all-gathered inside attention and their gradients reduce-scattered back), a next-token
cross-entropy over this rank's tokens, ``backward``, ``parallel_state.allreduce_grads`` (sums each gradient over
the groups its parameter is replicated across: PCP and DP for the dense weights) and an SGD update. Next to it every
rank runs the same steps unsharded, in plain PyTorch on the Hugging Face tensors (one process's computation), and
prints per step both losses and the largest relative gradient difference. Exit code 1 if they differ by more than
``--rtol``. docs/training.md explains the pieces.
"""

from __future__ import annotations

import argparse
import sys
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch without numpy warns; nothing needs it

import torch
import torch.nn.functional as F

from megacp import parallel_state as ps
from megacp.layers.metadata_builder import build_attention_metadata
from megacp.models import load_model
from megacp.models.loader import seeded_hf_weights

TEXT = ("Context parallelism splits one long sequence over several ranks; each rank holds a share of the tokens, "
        "and attention exchanges keys and values so that every token still sees its whole causal prefix. ")


# ------------------------------------------------------------------------------------------------ the reference
def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Hugging Face Llama's rotary embedding (``rotate_half`` pairs).  # x: [T, H, D] -> [T, H, D]"""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * inv_freq[None]  # [T, D/2]
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(x.dtype)[:, None] for f in (torch.cos, torch.sin))
    rotated = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


def reference_loss(w: dict[str, torch.Tensor], cfg, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of the Llama with full (unsharded) HF tensors ``w`` on one process.

    # ids, targets: [L] -> scalar
    """
    L, H, Hkv, D = ids.numel(), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * weight

    positions = torch.arange(L)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = _rope((h @ w[p + "self_attn.q_proj.weight"].T).view(L, H, D), positions, cfg.rope_theta)
        k = _rope((h @ w[p + "self_attn.k_proj.weight"].T).view(L, Hkv, D), positions, cfg.rope_theta)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(L, Hkv, D)
        k, v = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
        a = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        x = x + a.transpose(0, 1).reshape(L, H * D) @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    logits = norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T
    return F.cross_entropy(logits, targets, reduction="sum")


# ------------------------------------------------------------------------------------------------ megacp side
def local_loss(model, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """This rank's share of the summed next-token cross-entropy: its PCP tokens only (every TP rank of a PCP rank
    computes the same value). The PCP ranks' shares add up to the whole sequence's loss.

    # ids, targets: [L] (the whole sequence, the same on every rank) -> scalar
    """
    meta = build_attention_metadata([0], [0], [ids.numel()], None)  # one sequence, no KV cache: a training prefill
    index = meta.token_index  # [T_local]: this rank's positions in the sequence, -1 for PCP padding rows
    real = index >= 0
    hidden = model(ids[index.clamp(min=0)], meta)  # [T_local, hidden]
    logits = model.lm_head.compute_logits(hidden[real])  # [T_real, vocab], gathered over TP
    return F.cross_entropy(logits.float(), targets[index[real]], reduction="sum")


def sharded_like(model, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full HF-named tensors cut the way ``model``'s parameters are (through a copy of the model's own loaders)."""
    copy = load_model(None, next(model.parameters()).dtype, "cpu")
    loaders = copy.hf_weight_loaders()
    with torch.no_grad():
        for name, tensor in full.items():
            loaders[name](tensor)
    return dict(copy.named_parameters())


def max_relative_difference(grads: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """max over parameters of max |g - g_ref| / max |g_ref|."""
    return max(((g - want[n]).abs().max() / want[n].abs().max().clamp(min=1e-30)).item() for n, g in grads.items())


def train(args: argparse.Namespace) -> tuple[float, float]:
    """Run ``args.steps`` SGD steps on both sides: (the largest relative gradient difference seen, the difference
    of step 0's gradients had ``allreduce_grads`` been left out, a negative control)."""
    model = load_model(None, torch.float32, "cpu", seed=args.seed).requires_grad_(True).train()
    cfg = model.config
    full = {n: t.float().requires_grad_(True) for n, t in seeded_hf_weights(model, args.seed).items()}
    data = torch.tensor(list((TEXT * (args.seq_len // len(TEXT) + 2)).encode()[: args.seq_len + 1]))
    ids, targets = data[:-1], data[1:]  # predict every next byte of the sequence
    scale = 1.0 / ids.numel()  # mean over the sequence's tokens: each rank's sum over its tokens, scaled the same
    rank0 = ps.get_world_group().rank_in_group == 0
    worst = 0.0
    for step in range(args.steps):
        loss = local_loss(model, ids, targets) * scale
        loss.backward()
        local = {n: p.grad.clone() for n, p in model.named_parameters()} if step == 0 else {}
        ps.allreduce_grads(model)  # each gradient summed over the groups its parameter is replicated across
        total = ps.get_pcp_group().all_reduce(loss.detach().clone())  # the PCP ranks' shares: the whole loss

        ref = reference_loss(full, cfg, ids, targets) * scale
        ref.backward()
        want = sharded_like(model, {n: t.grad for n, t in full.items()})
        err = max_relative_difference({n: p.grad for n, p in model.named_parameters()}, want)
        worst = max(worst, err)
        if step == 0:
            control = max_relative_difference(local, want)
        if rank0:
            print(f"step {step}: loss {total.item():.6f} (one rank: {ref.item():.6f}), "
                  f"max relative gradient difference {err:.2e}", flush=True)
        with torch.no_grad():
            for p in model.parameters():
                p -= args.lr * p.grad
                p.grad = None
            for t in full.values():
                t -= args.lr * t.grad
                t.grad = None
    if rank0:
        print(f"without allreduce_grads, step 0's gradients would differ by {control:.2e}", flush=True)
    return worst, control


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="launch: torchrun --nproc-per-node N examples/train_cp.py -tp T -pcp P "
                                       "(N = tp·pcp)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="ranks splitting heads and MLP")
    p.add_argument("--prefill-context-parallel-size", "-pcp", type=int, default=1,
                   help="ranks splitting the sequence's tokens")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens in the training sequence")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny Llama's weights")
    p.add_argument("--rtol", type=float, default=1e-4, help="largest relative gradient difference accepted")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=args.tensor_parallel_size,
                                     prefill_context_parallel_size=args.prefill_context_parallel_size,
                                     backend="gloo")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    worst, control = train(args)
    split = ps.get_prefill_context_parallel_world_size() > 1
    ps.destroy_model_parallel()
    if worst > args.rtol:
        print(f"FAIL: gradients differ from one rank's by {worst:.2e} (relative) > --rtol {args.rtol:g}",
              file=sys.stderr)
        return 1
    if split and control <= args.rtol:  # with the tokens split, each rank's own gradient is only a share
        print(f"FAIL: the negative control (no allreduce_grads) matched too ({control:.2e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from megacp.program import exit_after  # no Python finalization: see megacp/program.py

    exit_after(main)
