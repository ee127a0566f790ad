"""ContextParallelAttention on 8 gloo ranks against single-device causal attention (issue 3 acceptance).

One 8-process pool runs the whole matrix: for each (tp, pcp, dcp) the world is filled with dp = 8 / (pcp·tp), and
one task loops over the KV interleave sizes. Every rank builds the same seeded q/k/v for every token of every request
(full heads, then slices its TP heads), runs a mixed step sequence through the layer:

1. a packed prefill of prompts of lengths 1, 3, 2·pcp−1, 37, 100;
2. one mixed step: prefill chunks over cached context (5, 2 and 11 new tokens), a decode, and a fresh prompt;
3. five decode steps of all requests (different lengths),

and compares every real output row with plain SDPA over the request's full sequence (float64), the logits rows of
``select_logits_hidden`` too. At the end it checks that its cache holds exactly its share of every sequence's K/V
(DESIGN §2 slot formula, written out independently here). PCP padding rows get huge garbage inputs, so any leak of
padding into attention shows up as a large error.

``_scenario`` also runs on a CUDA device in another dtype, head dim and head count (``scripts/gpu_cp_matrix.py``: the
same matrix, 8 gloo ranks on one GPU; ``scripts/nccl_check.py``: every layout of a torchrun world, NCCL on GPUs); in
float32 it must stay within ``ATOL``, in a half dtype within twice the error of plain single-device SDPA in that dtype
on that device (FlashAttention's tests' rule).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.dist_pool import model_parallel

HEAD_DIM = 4
NUM_HEADS = 4
BLOCK = 8
INTERLEAVES = (1, 4, BLOCK)
CONFIGS = [(1, 1, 1), (1, 2, 1), (1, 4, 1), (2, 1, 2), (2, 2, 1), (2, 2, 2), (4, 1, 2), (4, 1, 4), (2, 4, 1), (4, 2, 2)]
ATOL = 1e-5


def _num_kv_heads(tp: int, dcp: int) -> int:
    # dcp > 1 needs every DCP group to share one (replicated) KV head: tp / num_kv_heads == dcp. Otherwise use 2
    # KV heads, which gives real GQA (2 query heads per KV head) and, for tp = 4, no replication.
    return 2 if dcp == 1 else tp // dcp


def _sequences(num_reqs_lengths: list[int], num_kv: int, seed: int, head_dim: int = HEAD_DIM,
               num_heads: int = NUM_HEADS) -> list[tuple[torch.Tensor, ...]]:
    """Per request: full-head float32 (q [L, Hq, D], k [L, Hkv, D], v [L, Hkv, D]), identical on every rank."""
    out = []
    for i, L in enumerate(num_reqs_lengths):
        g = torch.Generator().manual_seed(seed + i)
        out.append(tuple(torch.randn(L, h, head_dim, generator=g) for h in (num_heads, num_kv, num_kv)))
    return out


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype = torch.float64,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Plain causal SDPA over one full sequence (float64 on the CPU: the exact answer).

    # q [L, Hq, D], k/v [L, Hkv, D] -> [L, Hq, D] in ``dtype`` on ``device``
    """
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = (t.to(device, dtype).transpose(0, 1)
                  for t in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
    scale = 1 / math.sqrt(q.shape[-1])
    return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale).transpose(0, 1)


def _head_slices(tp: int, tp_rank: int, num_kv: int, num_heads: int = NUM_HEADS) -> tuple[slice, slice]:
    hq = num_heads // tp
    if tp > num_kv:  # each KV head replicated on tp / num_kv adjacent ranks
        kv = tp_rank // (tp // num_kv)
        return slice(tp_rank * hq, (tp_rank + 1) * hq), slice(kv, kv + 1)
    hkv = num_kv // tp
    return slice(tp_rank * hq, (tp_rank + 1) * hq), slice(tp_rank * hkv, (tp_rank + 1) * hkv)


def _local_inputs(meta, req_ids, hs, kvs, seqs, computed, new, with_grad=False):
    """This rank's q/k/v rows in meta's local order; padding rows get large garbage."""
    which = torch.repeat_interleave(torch.arange(len(req_ids)), torch.tensor(new))
    rel = torch.cat([torch.arange(n) for n in new])
    ti = meta.token_index.cpu()
    real = ti >= 0
    idx = ti.clamp(min=0)
    req_of_row = torch.tensor(req_ids)[which[idx]]
    pos_of_row = torch.tensor(computed)[which[idx]] + rel[idx]
    assert torch.equal(meta.positions.cpu()[real], pos_of_row[real]), "meta.positions are not num_computed + offset"
    g = torch.Generator().manual_seed(7)
    tensors = []
    for j, heads in enumerate((hs, kvs, kvs)):
        rows = torch.stack([seqs[int(r)][j][int(p), heads] for r, p in zip(req_of_row, pos_of_row)]) if idx.numel() \
            else torch.zeros(0, heads.stop - heads.start, seqs[0][0].shape[-1])
        garbage = 1e3 * torch.randn(rows.shape, generator=g)
        t = torch.where(real.view(-1, 1, 1), rows, garbage)
        tensors.append(t.clone().requires_grad_(True) if with_grad else t)
    return tensors, real, req_of_row, pos_of_row


def _scenario(tp: int, pcp: int, dcp: int, interleave: int, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, head_dim: int = HEAD_DIM, num_heads: int = NUM_HEADS) -> dict:
    from megacp import parallel_state as ps
    from megacp.kv import BlockTable, PagedKVCache
    from megacp.layers.cp_attention import ContextParallelAttention
    from megacp.layers.metadata_builder import build_attention_metadata

    if ps.model_parallel_is_initialized():
        W, R = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        tp_rank = ps.get_tensor_model_parallel_rank()
    else:  # one process, no torch.distributed: the layer and the metadata fall back to a single rank
        W, R, tp_rank = 1, 0, 0
    assert W == pcp * dcp
    num_kv = _num_kv_heads(tp, dcp)
    hs, kvs = _head_slices(tp, tp_rank, num_kv, num_heads)

    # The schedule: (request, num_new) per step; requests 0..4 are the first packed prefill, 5 arrives in step 2.
    prompts = [1, 3, 2 * pcp - 1, 37, 100]
    steps = [list(enumerate(prompts)), [(0, 5), (1, 2), (3, 11), (4, 1), (5, 2 * pcp + 1)]]
    steps += [[(i, 1) for i in range(6)] for _ in range(5)]
    final = [0] * 6
    for step in steps:
        for i, n in step:
            final[i] += n
    seqs = _sequences(final, num_kv, seed=100, head_dim=head_dim, num_heads=num_heads)
    refs = [_reference(*s) for s in seqs]
    # The bar: every real row is checked exactly once over the steps, so bounding each step by the worst row of
    # same-dtype single-device SDPA is FlashAttention's rule over the whole output.
    ref_err = max((_reference(*s, dtype=dtype, device=device).double().cpu() - r)[:, hs].abs().max().item()
                  for s, r in zip(seqs, refs))
    tol = ATOL if dtype == torch.float32 else 2 * ref_err

    # Block table: every request's virtual blocks up front, shuffled ids (the same on every rank).
    per_req = [-(-L // (BLOCK * W)) for L in final]
    ids = torch.randperm(sum(per_req), generator=torch.Generator().manual_seed(3)).tolist()
    rows, start = [], 0
    for n in per_req:
        rows.append(ids[start:start + n])
        start += n
    bt = BlockTable(BLOCK, 6, max(per_req), cp_world_size=W, cp_rank=R, interleave_size=interleave)
    for i, row in enumerate(rows):
        bt.set_row(i, row)
    cache = PagedKVCache(sum(per_req), BLOCK, kvs.stop - kvs.start, head_dim, dtype, device)
    layer = ContextParallelAttention(num_heads, num_kv, head_dim, 1 / math.sqrt(head_dim))

    done = [0] * 6
    max_err, checked = 0.0, 0
    for s, step in enumerate(steps):
        req_ids, new = [i for i, _ in step], [n for _, n in step]
        computed = [done[i] for i in req_ids]
        meta = build_attention_metadata(req_ids, computed, new, bt, device=device, null_slot=cache.null_slot)
        qkv, real, req_of_row, pos_of_row = _local_inputs(meta, req_ids, hs, kvs, seqs, computed, new)
        out_dev = layer(*(t.to(device, dtype) for t in qkv), meta, cache)
        out = out_dev.float().cpu()  # float32 on the CPU: the tensor itself
        expected = torch.stack([refs[int(r)][int(p), hs] for r, p in zip(req_of_row, pos_of_row)]).to(out.dtype)
        err = (out[real] - expected[real]).abs().max().item() if bool(real.any()) else 0.0
        where = f"step {s} (tp={tp} pcp={pcp} dcp={dcp} interleave={interleave})"
        assert err <= tol, f"{where}: max error {err:.3g} vs single-device attention (bar {tol:.3g})"
        assert bool((out[~real] == 0).all()), f"{where}: padding rows must be zero"
        # the logits rows: last new token of each request, the same on every PCP rank
        picked = meta.select_logits_hidden(out_dev.flatten(1)).float().cpu()
        last = torch.stack([refs[i][done[i] + n - 1, hs].flatten() for i, n in step]).to(out.dtype)
        lerr = (picked - last).abs().max().item()
        assert lerr <= tol, f"{where}: select_logits_hidden error {lerr:.3g}"
        max_err, checked = max(max_err, err, lerr), checked + int(real.sum()) + len(step)
        for i, n in step:
            done[i] += n

    # The cache holds exactly this rank's share (DESIGN §2 formula), and nothing else.
    flat_k, flat_v = cache.k.flatten(0, 1).cpu(), cache.v.flatten(0, 1).cpu()
    written = torch.zeros(flat_k.shape[0], dtype=torch.bool)
    for i, L in enumerate(final):
        p = torch.arange(L)
        off = p % (BLOCK * W)
        mine = (off // interleave) % W == R
        block_id = torch.tensor(rows[i])[p // (BLOCK * W)]
        slot = (block_id * BLOCK + (off // (W * interleave)) * interleave + off % interleave)[mine]
        assert torch.equal(flat_k[slot], seqs[i][1][p[mine]][:, kvs].to(dtype)), f"request {i}: cached K differs"
        assert torch.equal(flat_v[slot], seqs[i][2][p[mine]][:, kvs].to(dtype)), f"request {i}: cached V differs"
        written[slot] = True
    stray = (flat_k[~written] != 0).any(dim=(1, 2)) | (flat_v[~written] != 0).any(dim=(1, 2))
    assert not bool(stray.any()), f"{int(stray.sum())} slots hold tokens this rank does not own"
    return {"max_err": max_err, "single_device_err": ref_err, "checked": checked, "owned": int(written.sum())}


def _matrix_task(tp: int, pcp: int, dcp: int) -> list[dict]:
    # One set of process groups per config: the layer reads the interleave size from the BlockTable (parallel_state
    # only stores it for the engine), and creating gloo groups is the slow, fragile part on a loaded box.
    with model_parallel(tensor_model_parallel_size=tp, prefill_context_parallel_size=pcp,
                        decode_context_parallel_size=dcp, data_parallel_size=8 // (pcp * tp)):
        return [_scenario(tp, pcp, dcp, interleave) for interleave in INTERLEAVES]


def test_single_device_without_parallel_state():
    """The same scenario in this process, no torch.distributed: every collective is the identity."""
    from megacp import parallel_state as ps

    assert not ps.model_parallel_is_initialized()
    result = _scenario(1, 1, 1, interleave=1)
    assert result["owned"] == 1 + 5 + 5 + 3 + 2 + 5 + 1 + 5 + 37 + 11 + 5 + 100 + 1 + 5 + 3 + 5


def test_layer_rejects_bad_inputs():
    from megacp.kv import BlockTable, PagedKVCache
    from megacp.layers.cp_attention import ContextParallelAttention
    from megacp.config import ParallelConfig
    from megacp.layers.metadata_builder import build_attention_metadata
    from megacp.parallel_state import ParallelContext

    tp3 = ParallelContext.from_layout(ParallelConfig(tensor_model_parallel_size=3), 0)
    with pytest.raises(ValueError, match="decode_context_parallel_size|tensor_model_parallel_size"):
        ContextParallelAttention(4, 2, HEAD_DIM, 0.5, parallel_context=tp3)
    layer = ContextParallelAttention(NUM_HEADS, 2, HEAD_DIM, 0.5)
    bt = BlockTable(BLOCK, 2, 2)
    bt.set_row(0, [0])
    bt.set_row(1, [1])
    cache = PagedKVCache(2, BLOCK, 2, HEAD_DIM)
    meta = build_attention_metadata([0, 1], [3, 0], [1, 4], bt, null_slot=cache.null_slot)  # a decode and a prefill
    q, k = torch.zeros(5, NUM_HEADS, HEAD_DIM), torch.zeros(5, 2, HEAD_DIM)
    with pytest.raises(ValueError, match="kv_cache"):
        layer(q, k, k, meta, None)
    with pytest.raises(ValueError, match="expects q"):
        layer(q[:4], k[:4], k[:4], meta, cache)
    with pytest.raises(ValueError, match="holds 2 KV heads of dim 4 on this rank, but the kv_cache was made for 1"):
        layer(q, k, k, meta, PagedKVCache(2, BLOCK, 1, HEAD_DIM))
    with pytest.raises(ValueError, match="BlockTable"):
        build_attention_metadata([0], [3], [1], None)


@pytest.mark.parametrize("tp,pcp,dcp", CONFIGS, ids=[f"tp{t}-pcp{p}-dcp{d}" for t, p, d in CONFIGS])
def test_cp_attention_matches_single_device(dist_pool_8, tp, pcp, dcp):
    results = dist_pool_8.run(_matrix_task, tp, pcp, dcp)
    final_lengths = [1 + 5 + 5, 3 + 2 + 5, 2 * pcp - 1 + 5, 37 + 11 + 5, 100 + 1 + 5, 2 * pcp + 1 + 5]
    for per_interleave in zip(*results):  # one interleave size, all 8 ranks
        assert all(r["checked"] > 0 for r in per_interleave)
        # the CP group of each (dp, kv-head) replica stores every token exactly once
        assert sum(r["owned"] for r in per_interleave) == sum(final_lengths) * (8 // (pcp * dcp))


# ------------------------------------------------------------------------------------------------ backward
def _backward_task(pcp: int) -> float:
    from megacp.layers.cp_attention import ContextParallelAttention
    from megacp.layers.metadata_builder import build_attention_metadata

    with model_parallel(prefill_context_parallel_size=pcp, data_parallel_size=8 // pcp):
        prompts = [1, 3, 2 * pcp - 1, 37, 20]
        num_kv = 2
        seqs = _sequences(prompts, num_kv, seed=500)
        req_ids = list(range(len(prompts)))
        meta = build_attention_metadata(req_ids, [0] * len(prompts), prompts, None)  # no KV cache: training-style
        hs, kvs = slice(0, NUM_HEADS), slice(0, num_kv)
        (q, k, v), real, req_of_row, pos_of_row = _local_inputs(
            meta, req_ids, hs, kvs, seqs, [0] * len(prompts), prompts, with_grad=True)
        layer = ContextParallelAttention(NUM_HEADS, num_kv, HEAD_DIM, 1 / math.sqrt(HEAD_DIM))
        out = layer(q, k, v, meta, None)
        grads_out = [torch.randn(L, NUM_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(900 + i))
                     for i, L in enumerate(prompts)]
        g_local = torch.stack([grads_out[int(r)][int(p)] for r, p in zip(req_of_row, pos_of_row)])
        (out * g_local).sum().backward()

        worst = 0.0
        ref_grads = []
        for (qf, kf, vf), g in zip(seqs, grads_out):
            leaves = [t.double().requires_grad_(True) for t in (qf, kf, vf)]
            (_reference(*leaves) * g.double()).sum().backward()
            ref_grads.append([t.grad for t in leaves])
        for j, local in enumerate((q, k, v)):
            expected = torch.stack([ref_grads[int(r)][j][int(p)] for r, p in zip(req_of_row, pos_of_row)])
            err = (local.grad[real].double() - expected[real]).abs().max().item()
            assert err <= ATOL, f"pcp={pcp}: grad of {'qkv'[j]} differs by {err:.3g} from single-device"
            assert bool((local.grad[~real] == 0).all()), "padding rows must get zero gradient"
            worst = max(worst, err)
        return worst


@pytest.mark.parametrize("pcp", [2, 4])
def test_pcp_prefill_backward_matches_single_device(dist_pool_8, pcp):
    errs = dist_pool_8.run(_backward_task, pcp)
    assert max(errs) <= ATOL


def _layout_mismatch_task() -> list[str]:
    """A layer built before initialize_model_parallel (one rank) used with metadata of a pcp = 2 and of a dcp = 2
    layout, and a layer built for dcp = 2 used with single-rank metadata."""
    from megacp.layers.cp_attention import ContextParallelAttention
    from megacp.layers.metadata_builder import build_attention_metadata
    from megacp.parallel_state import ParallelContext

    layer = ContextParallelAttention(NUM_HEADS, 2, HEAD_DIM, 0.5)
    messages = []
    for sizes in (dict(prefill_context_parallel_size=2), dict(tensor_model_parallel_size=2,
                                                             decode_context_parallel_size=2)):
        with model_parallel(**sizes):
            meta = build_attention_metadata([0], [0], [40], None)
            q = torch.zeros(meta.num_local_tokens, NUM_HEADS, HEAD_DIM)
            kv = torch.zeros(meta.num_local_tokens, 2, HEAD_DIM)
            with pytest.raises(ValueError) as err:
                layer(q, kv, kv, meta, None)
            messages.append(str(err.value))
            if "decode_context_parallel_size" in sizes:
                dcp_layer = ContextParallelAttention(NUM_HEADS, 1, HEAD_DIM, 0.5)
                single = build_attention_metadata([0], [0], [40], None,
                                                  parallel_context=ParallelContext.single())
                q = torch.zeros(40, NUM_HEADS // 2, HEAD_DIM)
                kv = torch.zeros(40, 1, HEAD_DIM)
                with pytest.raises(ValueError) as err:
                    dcp_layer(q, kv, kv, single, None)
                messages.append(str(err.value))
    return messages


def test_layer_used_with_metadata_of_another_layout_names_both(dist_pool_2):
    for pcp_msg, dcp_msg, reverse_msg in dist_pool_2.run(_layout_mismatch_task):
        assert "built for prefill_context_parallel_size=1, decode_context_parallel_size=1" in pcp_msg
        assert "metadata is for prefill_context_parallel_size=2, decode_context_parallel_size=1" in pcp_msg
        assert "built for prefill_context_parallel_size=1, decode_context_parallel_size=1" in dcp_msg
        assert "metadata is for prefill_context_parallel_size=1, decode_context_parallel_size=2" in dcp_msg
        assert "built for prefill_context_parallel_size=1, decode_context_parallel_size=2" in reverse_msg
        assert "metadata is for prefill_context_parallel_size=1, decode_context_parallel_size=1" in reverse_msg
