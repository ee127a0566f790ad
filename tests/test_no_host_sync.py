"""No host syncs inside the model's layers: a step's forward reads nothing back from the device.

On CUDA every read-back (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``, boolean-mask indexing, ...) stalls
the host until the GPU has finished all queued work; ~40 of them per decode step made megacp's decode host-bound
(docs/benchmarks.md). On the CPU nothing stalls, so we count the *calls* instead: ``HostReads`` patches the Python
read-back methods of ``torch.Tensor`` and watches the aten ops that synchronise on CUDA (a ``TorchDispatchMode``),
and the tests run whole steps of the model (prefill, decode, prefill over cached context, mixed) under it, asserting
zero reads, and compare the logits with a cache-free forward of the full sequences (so a "sync-free" step that
computes the wrong thing fails too). The same holds on 4 gloo ranks with tp=2, pcp=2, dcp=2 and interleave 2.

Also here: the sync-free forms (host offsets / lengths, ``write_rows``, the block table's host copy) agree with the
forms that read the device.
"""

from __future__ import annotations

import traceback
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megacp.kv import BlockTable, LatentPagedCache, PagedKVCache, blocks_needed
from megacp.layers.metadata_builder import build_attention_metadata
from megacp.ops import attention_with_lse, paged_attention_with_lse
from megacp.ops import backends_common
from tests.dist_pool import model_parallel

aten = torch.ops.aten
# aten ops that read a device value back on CUDA (a sync), whatever their arguments.
_SYNC_OPS = {
    aten._local_scalar_dense, aten.is_nonzero, aten.nonzero, aten.masked_select, aten.equal, aten.allclose,
    aten.unique_consecutive, aten._unique2, aten.unique_dim, aten.bincount, aten.histc,
}
_PATCHED = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
# Index checks that run only when the tensors are on the CPU (free there; on CUDA only with MEGACP_DEBUG_CHECKS=1):
# their reads would never happen on a GPU, so they are not counted.
CPU_ONLY_CHECKS = {"_check_paged_read", "check_slots"}


class HostReads(TorchDispatchMode):
    """Context manager recording every host read-back of a tensor value (``.reads``: one line per read)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self._saved: dict[str, object] = {}

    def _record(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "megacp" in f.filename]
        if any(f.name in CPU_ONLY_CHECKS for f in frames):
            return
        where = f"{frames[-1].filename.split('megacp/')[-1]}:{frames[-1].lineno}" if frames else "?"
        self.reads.append(f"{what} at {where}")

    def __enter__(self):
        for name in _PATCHED:
            original = getattr(torch.Tensor, name)
            self._saved[name] = torch.Tensor.__dict__.get(name)  # None: inherited from the C base class

            def patched(t, *args, _name=name, _original=original, **kwargs):
                self._record(f"Tensor.{_name}")
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, patched)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, own in self._saved.items():
            if own is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, own)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _SYNC_OPS:
            self._record(str(func))
        elif packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype == torch.bool for i in indices):
                self._record(f"{func} with a boolean mask")
        elif packet is aten.repeat_interleave and kwargs.get("output_size") is None and len(args) >= 1 \
                and isinstance(args[-1 if len(args) == 1 else 1], torch.Tensor):
            self._record(f"{func} without output_size")
        return func(*args, **kwargs)


def test_host_reads_catches_each_kind_of_read():
    x = torch.arange(6)
    with HostReads() as r:
        _ = x[x > 2]
        _ = int(x[0])
        _ = x.tolist()
        _ = bool(x.any())
        _ = torch.nonzero(x)
        _ = torch.repeat_interleave(x, x)
        _ = torch.repeat_interleave(x, x, output_size=15)  # sized on the host: no read
        _ = x.index_select(0, x[:2])  # plain gathers are fine
    kinds = " | ".join(r.reads)
    assert len(r.reads) >= 6, kinds
    for needle in ("boolean mask", "Tensor.__int__", "Tensor.tolist", "Tensor.__bool__", "nonzero", "output_size"):
        assert needle in kinds
    assert sum("output_size" in x for x in r.reads) == 1  # the call sized on the host is not a read
    assert "tolist" not in torch.Tensor.__dict__  # the patches are gone again


# --------------------------------------------------------------------------------------------- model steps
BLOCK = 4


def _full_logits(model, seqs: list[list[int]], device: str = "cpu") -> torch.Tensor:
    """Reference: one cache-free prefill of the whole sequences -> last-position logits [len(seqs), vocab]."""
    meta = build_attention_metadata(list(range(len(seqs))), [0] * len(seqs), [len(s) for s in seqs], None, device=device)
    flat = torch.tensor([t for s in seqs for t in s], device=device)
    with torch.no_grad():
        hidden = model(flat[meta.token_index.clamp(min=0)], meta, None)
        return model.compute_logits(meta.select_logits_hidden(hidden))


def _run_steps(model, cp_world: int, cp_rank: int, interleave: int, device: str = "cpu",
               guard=HostReads) -> tuple[list[list[str]], float]:
    """Prefill, decode, then a mixed step (decode + prefill over cached context + fresh prompt), each counted.

    Returns the host reads of each step's ``model.forward`` (``guard()``: a context manager with ``.reads``) and the
    largest |logits − reference| relative to the reference's largest |logit|.
    """
    cfg = model.config
    seqs = [[3, 14, 15, 92, 65, 35, 89, 7, 8], [27, 18, 28, 18, 28, 9, 10, 11, 12], [1, 2, 3]]
    steps = [  # (block-table rows, num_computed, num_new); token ids come from seqs
        ([0, 1], [0, 0], [7, 5]),  # prefill of two prompts
        ([0, 1], [7, 5], [1, 1]),  # two decodes
        ([0, 1, 2], [8, 6, 0], [1, 3, 3]),  # mixed: a decode, a prefill over cached context, a fresh prompt
    ]
    per_req = blocks_needed(16, BLOCK, cp_world)
    table = BlockTable(BLOCK, 3, per_req, cp_world, cp_rank, interleave, device=device)
    for i in range(3):
        table.set_row(i, list(range(i * per_req, (i + 1) * per_req)))
    dtype = next(model.parameters()).dtype
    if getattr(model, "latent_dim", None):  # MLA: one latent row per token and layer
        caches = [LatentPagedCache(3 * per_req, BLOCK, model.latent_dim, dtype, device)
                  for _ in range(cfg.num_hidden_layers)]
    else:
        caches = [PagedKVCache(3 * per_req, BLOCK, model.num_local_kv_heads, cfg.head_dim, dtype, device)
                  for _ in range(cfg.num_hidden_layers)]
    reads, err = [], 0.0
    for rows, computed, new in steps:
        meta = build_attention_metadata(rows, computed, new, table, device=device, null_slot=caches[0].null_slot)
        flat = torch.tensor([t for r, c, n in zip(rows, computed, new) for t in seqs[r][c:c + n]], device=device)
        ids = flat[meta.token_index.clamp(min=0)]
        with torch.no_grad(), guard() as counter:
            hidden = model(ids, meta, caches)
        reads.append(counter.reads)
        with torch.no_grad():
            got = model.compute_logits(meta.select_logits_hidden(hidden)).float()
        ref = _full_logits(model, [seqs[r][: c + n] for r, c, n in zip(rows, computed, new)], device).float()
        err = max(err, float((got - ref).abs().max() / ref.abs().max()))
    return reads, err


def test_model_steps_read_nothing_back_single_device():
    from megacp.models import load_model

    with model_parallel():
        model = load_model(None, torch.float32, "cpu")
        reads, err = _run_steps(model, 1, 0, 1)
    assert reads == [[], [], []], reads
    assert err < 1e-4


def _tiny_deepseek(dtype: torch.dtype = torch.float32, device: str = "cpu", moe: bool = False):
    """A seeded dense DeepSeek-V3 (MLA with q-LoRA, interleaved rope, YaRN) of tests/deepseek_tiny.py's sizes;
    ``moe=True``: its layers 1 and 2 are MoE blocks (8 experts, top-2, group-limited, biased router)."""
    from megacp.models.config import model_config_from_dict
    from megacp.models.deepseek import DeepseekForCausalLM
    from megacp.models.loader import seeded_hf_weights
    from tests.deepseek_tiny import tiny_deepseek_config

    config = model_config_from_dict(tiny_deepseek_config(3, first_k_dense_replace=1 if moe else 3).to_dict())
    with torch.device(device):
        model = DeepseekForCausalLM(config, params_dtype=dtype)
    loaders = model.hf_weight_loaders()
    for name, tensor in seeded_hf_weights(model, 0).items():
        loaders[name](tensor)
    return model.eval()


def test_mla_model_steps_read_nothing_back_single_device():
    with model_parallel():
        reads, err = _run_steps(_tiny_deepseek(), 1, 0, 1)
    assert reads == [[], [], []], reads
    assert err < 1e-4


def test_moe_model_steps_read_nothing_back_single_device():
    """A DeepSeek MoE in inference: the grouped expert GEMMs (sorted pairs, device offsets) read nothing back."""
    with model_parallel():
        reads, err = _run_steps(_tiny_deepseek(moe=True), 1, 0, 1)
    assert reads == [[], [], []], reads
    assert err < 1e-4


def _dist_task():
    from megacp.models import load_model

    with model_parallel(tensor_model_parallel_size=2, prefill_context_parallel_size=2, decode_context_parallel_size=2,
                        cp_kv_cache_interleave_size=2) as ps:
        coords = (ps.get_context_parallel_world_size(), ps.get_context_parallel_rank(), 2)
        return [_run_steps(load_model(None, torch.float32, "cpu"), *coords), _run_steps(_tiny_deepseek(), *coords)]


def test_model_steps_read_nothing_back_tp2_pcp2_dcp2(dist_pool_4):
    """The tiny Llama (GQA) and a dense DeepSeek (MLA: latent cache, absorbed DCP decode, pass-KV/pass-Q context)."""
    for per_model in dist_pool_4.run(_dist_task):
        for reads, err in per_model:
            assert reads == [[], [], []], reads
            assert err < 1e-4


# --------------------------------------------------------------------------------------------- on a GPU
class _NoCudaSync(HostReads):
    """``HostReads`` plus torch's own sync detector: any stream synchronisation inside raises."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        return super().__enter__()

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        return super().__exit__(*exc)


def _tiny_model(dtype: torch.dtype, device: str, **overrides):
    """The seeded tiny Llama with head dim 64 (the built-in one has 8, too small for some fused kernels);
    ``overrides``: other ``build_tiny_llama_config`` arguments."""
    from megacp.models.config import build_tiny_llama_config
    from megacp.models.llama import LlamaForCausalLM
    from megacp.models.loader import seeded_hf_weights

    shape = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    config = build_tiny_llama_config(**{**shape, **overrides})
    with torch.device(device):
        model = LlamaForCausalLM(config, params_dtype=dtype)
    loaders = model.hf_weight_loaders()
    for name, tensor in seeded_hf_weights(model, 0).items():
        loaders[name](tensor)
    return model.eval()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_model_steps_do_not_sync_on_cuda(dtype, tol):
    """float32 runs the reference prefill kernels, bf16 the fused ones (cuDNN/flash/TE); both the Triton paged decode."""
    with model_parallel(backend="gloo"):
        model = _tiny_model(dtype, "cuda")
        _run_steps(model, 1, 0, 1, "cuda")  # warm-up: kernel compilation and first-use allocations
        reads, err = _run_steps(model, 1, 0, 1, "cuda", guard=_NoCudaSync)
    assert reads == [[], [], []], reads
    assert err < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_mla_model_steps_do_not_sync_on_cuda(dtype, tol):
    """A dense DeepSeek: the Triton paged MLA decode, prefill with qk_head_dim != v_head_dim on the CUDA backends."""
    with model_parallel(backend="gloo"):
        model = _tiny_deepseek(dtype, "cuda")
        _run_steps(model, 1, 0, 1, "cuda")  # warm-up
        reads, err = _run_steps(model, 1, 0, 1, "cuda", guard=_NoCudaSync)
    assert reads == [[], [], []], reads
    assert err < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_moe_model_steps_do_not_sync_on_cuda():
    """A DeepSeek MoE in bfloat16 on sm_90+: routing and the grouped expert GEMMs stay on the device."""
    with model_parallel(backend="gloo"):
        model = _tiny_deepseek(torch.bfloat16, "cuda", moe=True)
        _run_steps(model, 1, 0, 1, "cuda")  # warm-up
        reads, err = _run_steps(model, 1, 0, 1, "cuda", guard=_NoCudaSync)
    assert reads == [[], [], []], reads
    assert err < 5e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_syncs_once_per_step_on_cuda():
    """Per step the engine may read back only the sampled ids (one sync)."""
    from megacp.engine import LLMEngine
    from megacp.sampling import SamplingParams

    with model_parallel(backend="gloo"):
        model = _tiny_model(torch.bfloat16, "cuda")
        engine = LLMEngine(model, num_kv_blocks=16, block_size=16)
        prompts = [[5, 6, 7, 8, 9], [1, 2, 3]]
        engine.generate(prompts, SamplingParams(max_new_tokens=3, ignore_eos=True))  # warm-up
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                engine.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert engine.stats.num_steps == 6
    assert len(syncs) <= engine.stats.num_steps, [str(w.message) for w in syncs[:5]]


# --------------------------------------------------------------------------------------------- the sync-free forms
def _varlen_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = [(3, 5), (0, 2), (2, 0), (4, 4), (5, 2)]  # includes no-query, no-key and lq > lk (keyless rows) sequences
    cu_q, cu_k = [0], [0]
    for lq, lk in lens:
        cu_q.append(cu_q[-1] + lq)
        cu_k.append(cu_k[-1] + lk)
    q = torch.randn(cu_q[-1], 4, 8, generator=g)
    k = torch.randn(cu_k[-1], 2, 8, generator=g)
    v = torch.randn(cu_k[-1], 2, 8, generator=g)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("backend", ["torch", "sdpa_cpu"])
@pytest.mark.parametrize("causal", [True, False])
def test_host_cu_seqlens_give_the_same_result_without_reads(backend, causal):
    q, k, v, cu_q, cu_k = _varlen_case()
    cq, ck = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    ref_out, ref_lse = attention_with_lse(q, k, v, cq, ck, causal, 0.3, backend=backend)
    with HostReads() as r:
        out, lse = attention_with_lse(q, k, v, cq, ck, causal, 0.3, backend=backend, host_cu_seqlens=(cu_q, cu_k))
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert bool((lse[cu_q[4]:cu_q[4] + 3] == float("-inf")).all()) == causal  # lq > lk: 3 keyless rows if causal
    assert r.reads == []


def test_packed_cuda_wrapper_uses_host_offsets():
    """The wrapper shared by the CUDA backends takes the host offsets instead of reading cu_seqlens back."""
    q, k, v, cu_q, cu_k = _varlen_case(1)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    seen = []

    def kernel(q, k, v, hq, hk, causal, scale, dev_cu, used_k):
        seen.append((hq, hk, dev_cu[0].tolist(), dev_cu[1].tolist(), used_k))
        return backends_common._reference(q, k, v, dev_cu[0], dev_cu[1], causal, scale, (hq, hk))

    fake_q = torch.full((len(cu_q),), -7, dtype=torch.int32)  # never read: the host offsets are used
    out, lse = backends_common._packed(kernel)(q, k, v, fake_q, fake_q, True, 0.3, host_cu_seqlens=(cu_q, cu_k))
    hq, hk, dq, dk, used = seen[0]
    assert hq == dq == [0, 3, 7, 12] and hk == dk == [0, 5, 9, 11] and used is None  # the kept sequences only
    ref_out, ref_lse = attention_with_lse(q.float(), k.float(), v.float(), torch.tensor(cu_q), torch.tensor(cu_k),
                                          True, 0.3, backend="torch")
    assert float((out.float() - ref_out).abs().max()) < 2e-2
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))


def test_packed_cuda_wrapper_passes_overlapping_key_ranges_from_the_host():
    """seqused_k (a PCP rank's two chunks over one K/V) reaches the kernel as host lengths: nothing read back."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(n, 2, 8, generator=g).bfloat16() for n in (8, 16, 16))
    seen = []

    def kernel(q, k, v, hq, hk, causal, scale, dev_cu, used_k):
        seen.append((hq, hk, used_k[0]))
        return q.new_zeros(q.shape), torch.zeros(q.shape[:2])

    fake = torch.full((3,), -7, dtype=torch.int32)
    with HostReads() as r:
        backends_common._packed(kernel)(q, k, v, fake, fake, True, 0.3, host_cu_seqlens=([0, 4, 8], [0, 0, 16], [8, 16]),
                                      seqused_k=torch.tensor([8, 16], dtype=torch.int32))
    assert r.reads == [] and seen == [([0, 4, 8], [0, 0, 16], [8, 16])]


def test_paged_attention_with_host_lengths_matches_and_reads_nothing():
    g = torch.Generator().manual_seed(2)
    kc, vc = torch.randn(6, BLOCK, 2, 8, generator=g), torch.randn(6, BLOCK, 2, 8, generator=g)
    bt = torch.tensor([[5, 1, 0], [2, 3, 4], [0, 0, 0]])
    lens = [9, 3, 0]
    q = torch.randn(3, 4, 8, generator=g)
    with HostReads() as r:
        # without host lengths: the masked whole-row form (what a CUDA graph runs); with them: the gather form
        ref_out, ref_lse = paged_attention_with_lse(q, kc, vc, bt, torch.tensor(lens), 0.5)
        out, lse = paged_attention_with_lse(q, kc, vc, bt, torch.tensor(lens), 0.5, seq_lens_host=lens)
    assert r.reads == []
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(lse, ref_lse, atol=1e-6)
    assert torch.equal(lse.isinf(), ref_lse.isinf()) and bool((ref_out[2] == 0).all())
    # independent reference: the first sequence's 9 tokens are blocks 5, 1, 0 in order
    keys = torch.cat([kc[5], kc[1], kc[0, :1]])
    vals = torch.cat([vc[5], vc[1], vc[0, :1]])
    scores = torch.einsum("hd,khd->hk", q[0], keys.repeat_interleave(2, dim=1)) * 0.5
    expect = torch.einsum("hk,khd->hd", scores.softmax(-1), vals.repeat_interleave(2, dim=1))
    assert torch.allclose(out[0], expect, atol=1e-5)
    assert torch.allclose(lse[0], scores.logsumexp(-1), atol=1e-5)
    assert bool((lse[2] == float("-inf")).all()) and bool((out[2] == 0).all())


def test_write_rows_equals_write_and_block_table_host_copy():
    bt = BlockTable(BLOCK, 3, 4, cp_world_size=2, cp_rank=1, interleave_size=2)
    bt.set_row(0, [3, 1])
    bt.append_row(0, [2])
    bt.set_row(2, [0])
    bt.commit()
    assert torch.equal(bt.table.cpu(), bt._table_host) and bt.table[0].tolist() == [3, 1, 2, 0]
    assert bt.row_host(0).tolist() == [3, 1, 2]
    pos = torch.arange(0, 20)
    slots = bt.compute_slot_mapping(torch.zeros_like(pos), pos)
    assert torch.equal(slots, bt.slot_mapping_host(torch.zeros_like(pos), pos))
    k = torch.randn(20, 1, 2)
    a, b = PagedKVCache(4, BLOCK, 1, 2), PagedKVCache(4, BLOCK, 1, 2)
    a.write(k, -k, slots)
    rows = torch.nonzero(slots >= 0).flatten()
    with HostReads() as r:
        b.write_rows(k, -k, rows, slots[rows])
    assert r.reads == []
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and int((a.k != 0).any(-1).sum()) == rows.numel()
    with pytest.raises(ValueError, match="one slot per row"):
        b.write_rows(k, k, rows, slots)
