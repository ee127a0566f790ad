"""Pure tests of the PCP head–tail split and of the per-step metadata (no processes).

The multi-rank behaviour is simulated: metadata is built for every (pcp_rank, dcp_rank) of a CP group and the
collectives are replaced by plain concatenation / summation over the simulated ranks.
"""

from __future__ import annotations

import pytest
import torch

from megacp.kv import BlockTable
from megacp.kv.layout import cp_local_seq_lens
from megacp.layers.metadata_builder import build_attention_metadata
from megacp.layers.pcp_split import pcp_chunk_size, pcp_restore_index, pcp_split_positions
from tests.references import layout_context

NULL_SLOT = 10**6  # a cache's null slot (no cache is built here)


def _idx(index, as_range):
    """A metadata index that may have been sent as a range only."""
    return torch.arange(*as_range) if as_range is not None else index


def _decode_slots(m):
    """Old-style decode slot mapping: -1 where this rank does not store the token."""
    s = m.decode.slot_mapping
    return torch.where(s == NULL_SLOT, -1, s)


def _prefill_slots(m):
    """Slot of each sequence-ordered new token on this rank, -1 when not owned."""
    p = m.prefill
    n = _idx(p.gather_index, p.gather_range).numel()
    rows = torch.arange(n) if p.write_rows is None else p.write_rows
    return torch.full((n,), -1, dtype=torch.long).index_copy(0, rows, p.write_slots)


# ------------------------------------------------------------------------------------------- pcp_split_positions
def test_split_hand_examples():
    assert pcp_split_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert pcp_split_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    # 5 tokens, pcp 2: padded to 8, chunks of 2; rank 0 gets 0,1 and padding 6,7
    assert pcp_split_positions(5, 2, 0).tolist() == [0, 1, 6, 7]
    assert pcp_split_positions(5, 2, 1).tolist() == [2, 3, 4, 5]
    # 1 token, pcp 4: padded to 8, chunks of 1
    assert [pcp_split_positions(1, 4, r).tolist() for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert pcp_split_positions(12, 3, 2).tolist() == [4, 5, 6, 7]
    assert pcp_split_positions(13, 3, 0).tolist() == [0, 1, 2, 15, 16, 17]
    # pcp 1 neither splits nor pads
    assert pcp_split_positions(3, 1, 0).tolist() == [0, 1, 2]
    assert pcp_chunk_size(13, 3) == 3 and pcp_chunk_size(13, 1) == 13


@pytest.mark.parametrize("pcp", [1, 2, 3, 4, 8])
def test_split_covers_every_position_once(pcp):
    for n in range(0, 70):
        parts = [pcp_split_positions(n, pcp, r) for r in range(pcp)]
        assert len({p.numel() for p in parts}) == 1, "every rank must hold the same number of rows"
        allpos = torch.cat(parts)
        assert sorted(allpos.tolist()) == list(range(allpos.numel()))  # a permutation of the padded prompt
        pad = allpos.numel() - n
        assert 0 <= pad < (2 * pcp if pcp > 1 else 1)
        if pcp > 1:
            assert allpos.numel() % (2 * pcp) == 0


@pytest.mark.parametrize("pcp", [2, 3, 4])
def test_split_balances_causal_work(pcp):
    def work(pos: torch.Tensor, n: int) -> int:  # a causal query at position p attends p + 1 keys
        return int((pos[pos < n] + 1).sum())

    for n in (4 * pcp, 10 * pcp, 64 * pcp):
        works = [work(pcp_split_positions(n, pcp, r), n) for r in range(pcp)]
        assert len(set(works)) == 1, works  # a multiple of 2·pcp: exactly equal
        contiguous = [work(torch.arange(r * n // pcp, (r + 1) * n // pcp), n) for r in range(pcp)]
        assert max(contiguous) > max(works)
    # with padding: the imbalance is at most one chunk's worth of a full row per rank
    for n in range(1, 200):
        works = [work(pcp_split_positions(n, pcp, r), n) for r in range(pcp)]
        c = pcp_chunk_size(n, pcp)
        assert max(works) - min(works) <= 2 * c * n


@pytest.mark.parametrize("pcp", [1, 2, 4])
def test_restore_index(pcp):
    for n in range(0, 40):
        gathered = torch.cat([pcp_split_positions(n, pcp, r) for r in range(pcp)])
        assert gathered[pcp_restore_index(n, pcp)].tolist() == list(range(n))


def test_split_rejects_bad_args():
    with pytest.raises(ValueError, match="prefill_context_parallel_size"):
        pcp_split_positions(4, 2, 2)
    with pytest.raises(ValueError):
        pcp_split_positions(-1, 2, 0)


# ------------------------------------------------------------------------------------------- step metadata
BLOCK = 4


def _tables(pcp, dcp, interleave, lengths):
    """One BlockTable per CP rank, same virtual blocks (a shuffled id per block, to exercise the indirection)."""
    W = pcp * dcp
    per_req = [-(-L // (BLOCK * W)) for L in lengths]
    ids = torch.randperm(sum(per_req), generator=torch.Generator().manual_seed(0)).tolist()
    tables = []
    for R in range(W):
        bt = BlockTable(BLOCK, len(lengths), max(per_req), cp_world_size=W, cp_rank=R, interleave_size=interleave)
        start = 0
        for i, n in enumerate(per_req):
            bt.set_row(i, ids[start:start + n])
            start += n
        tables.append(bt)
    return tables


def _metas(pcp, dcp, interleave, computed, new):
    lengths = [c + n for c, n in zip(computed, new)]
    tables = _tables(pcp, dcp, interleave, lengths)
    req = list(range(len(computed)))
    return {
        (r, d): build_attention_metadata(req, computed, new, tables[r * dcp + d], null_slot=NULL_SLOT,
                                         parallel_context=layout_context(pcp, dcp, r, d))
        for r in range(pcp) for d in range(dcp)
    }


CASES = [
    # (computed, new): fresh prompts of awkward lengths, decodes, and chunks over cached context
    ([0, 0, 0, 0], [1, 3, 7, 37]),
    ([5, 0, 9, 2, 0], [1, 2, 1, 6, 13]),
    ([3, 8], [1, 1]),
]


@pytest.mark.parametrize("pcp,dcp,interleave", [(1, 1, 1), (2, 1, 1), (2, 2, 2), (4, 1, 4), (3, 1, 2), (1, 2, 1)])
@pytest.mark.parametrize("computed,new", CASES)
def test_metadata_tokens_positions_and_gather(pcp, dcp, interleave, computed, new):
    metas = _metas(pcp, dcp, interleave, computed, new)
    total_new = sum(new)
    offsets = [sum(new[:i]) for i in range(len(new))]
    req_of_token = torch.repeat_interleave(torch.arange(len(new)), torch.tensor(new))
    rel_of_token = torch.cat([torch.arange(n) for n in new])
    decodes = [i for i in range(len(new)) if computed[i] > 0 and new[i] == 1]
    prefills = [i for i in range(len(new)) if i not in decodes]

    sizes = {m.num_local_tokens for m in metas.values()}
    assert len(sizes) == 1, "T_local must be equal on all ranks (all-gathers need equal shapes)"
    for (r, d), m in metas.items():
        assert m.num_decodes == len(decodes)
        assert m.token_index[: m.num_decodes].tolist() == [offsets[i] for i in decodes]
        real = m.token_index >= 0
        ti = m.token_index[real]
        expected_pos = torch.tensor(computed)[req_of_token[ti]] + rel_of_token[ti]
        assert torch.equal(m.positions[real], expected_pos)
        # DCP ranks of one PCP rank compute the same tokens
        assert torch.equal(m.token_index, metas[(r, 0)].token_index)

    # every new token is computed by exactly one PCP rank (decodes: by all of them)
    seen = torch.zeros(total_new, dtype=torch.long)
    for r in range(pcp):
        m = metas[(r, 0)]
        ti = m.token_index[m.num_decodes:]
        seen.index_add_(0, ti[ti >= 0], torch.ones_like(ti[ti >= 0]))
    assert all(int(seen[offsets[i] + k]) == 1 for i in prefills for k in range(new[i]))

    # simulate the all-gather of the prefill rows' "K" (here: the token index) and restore sequence order
    expected_seq = torch.cat([torch.arange(offsets[i], offsets[i] + new[i]) for i in prefills]) if prefills else \
        torch.zeros(0, dtype=torch.long)
    for d in range(dcp):
        gathered = torch.cat([metas[(r, d)].token_index[metas[(r, d)].num_decodes:] for r in range(pcp)])
        for r in range(pcp):
            p = metas[(r, d)].prefill
            if p is not None:
                assert torch.equal(gathered[_idx(p.gather_index, p.gather_range)], expected_seq)

    # each token's K/V is written by exactly one CP rank (decode and prefill alike)
    writes = torch.zeros(total_new, dtype=torch.long)
    for m in metas.values():
        if m.decode is not None:
            writes[torch.tensor([offsets[i] for i in decodes], dtype=torch.long)[_decode_slots(m) >= 0]] += 1
        if m.prefill is not None:
            writes[expected_seq[_prefill_slots(m) >= 0]] += 1
    assert writes.tolist() == [1] * total_new

    # logits rows: every request's last new token, provided by exactly one PCP rank
    provided = torch.zeros(len(new), dtype=torch.long)
    for r in range(pcp):
        m = metas[(r, 0)]
        logits_rows = _idx(m.logits_rows, m.logits_range)
        if m.prefill is None and r > 0:
            continue  # pure decode: every PCP rank has the rows, rank 0's are used
        mine = logits_rows >= 0
        provided += mine.long()
        assert torch.equal(m.token_index[logits_rows[mine]],
                           torch.tensor([offsets[i] + new[i] - 1 for i in range(len(new))])[mine])
    assert provided.tolist() == [1] * len(new)


@pytest.mark.parametrize("pcp", [1, 2, 4])
def test_metadata_chunks_are_causal_prefixes(pcp):
    computed, new = [0, 4, 0], [9, 5, 1]
    metas = _metas(pcp, 1, 1, computed, new)
    for (r, _), m in metas.items():
        # positions of the sequence-ordered new-token K/V
        seq_pos = torch.cat([torch.arange(computed[i], computed[i] + new[i]) for i in range(len(new))])
        seq_req = torch.cat([torch.full((n,), i) for i, n in enumerate(new)])
        p = m.prefill
        q_rows = _idx(p.q_rows, p.q_range)
        cu_q, cu_k = p.cu_seqlens_q.tolist(), p.cu_seqlens_k.tolist()
        assert cu_q == p.cu_seqlens_q_host and cu_k == p.cu_seqlens_k_host
        assert cu_q[-1] == q_rows.numel() and cu_k[-1] == sum(new)
        # with pcp > 1 the head and tail chunk of a request start at the same key row (overlapping prefixes)
        assert (p.seqused_k is None) == (pcp == 1)
        if p.seqused_k is None:
            used = [b - a for a, b in zip(cu_k[:-1], cu_k[1:])]
        else:
            used = p.seqused_k.tolist()
            assert used == p.seqused_k_host
        for c in range(len(cu_q) - 1):
            q_pos = m.positions[q_rows[cu_q[c]:cu_q[c + 1]]]
            k = torch.arange(cu_k[c], cu_k[c] + used[c])
            # keys are the request's new tokens from its first one up to the chunk's last query
            assert seq_req[k].unique().numel() == 1
            req = int(seq_req[k[0]])
            assert seq_pos[k].tolist() == list(range(computed[req], int(q_pos[-1]) + 1))
            assert q_pos.tolist() == list(range(int(q_pos[0]), int(q_pos[-1]) + 1))
        # context rows: exactly the local rows of request 1 (the only prefill with cached context)
        ctx = m.context
        assert ctx.num_rows == ctx.rows.numel() and torch.equal(ctx.real_rows, ctx.rows[ctx.real_index])
        assert (m.token_index[ctx.real_rows] >= 0).all()
        assert set(m.token_index[ctx.real_rows].tolist()) <= set(range(9, 14))
        assert ctx.cu_seqlens_k.tolist() == [0, int(cp_local_seq_lens(torch.tensor([4]), pcp, r)[0])]
    real_ctx = sum(int(m.context.real_index.numel()) for m in metas.values())
    assert real_ctx == 5


def test_metadata_local_lengths_follow_design_formula():
    computed, new = [0, 10, 3], [5, 1, 4]
    W, I = 4, 2
    metas = _metas(2, 2, I, computed, new)
    for (r, d), m in metas.items():
        R = r * 2 + d
        def local(L):
            base = (L // I // W) * I
            return base + min(max(L - base * W - R * I, 0), I)

        # decode of request 1: the local shard includes the new token at position 10
        assert m.decode.seq_lens.tolist() == m.decode.seq_lens_host == [local(11)]
        # context rows of request 2 see its 3 cached tokens' local share
        assert m.context.cu_seqlens_k.tolist() == m.context.cu_seqlens_k_host == [0, local(3)]


def test_metadata_rejects_mismatched_table():
    bt = BlockTable(BLOCK, 2, 4, cp_world_size=2, cp_rank=0)
    with pytest.raises(ValueError, match="cp_world_size"):
        build_attention_metadata([0], [0], [3], bt, parallel_context=layout_context(1, 1, 0, 0))
    with pytest.raises(ValueError, match="num_new_tokens"):
        build_attention_metadata([0], [0], [0], bt, parallel_context=layout_context(2, 1, 0, 0))


@pytest.mark.parametrize("pcp,dcp,interleave", [(1, 1, 1), (2, 1, 1), (2, 2, 2), (1, 4, 4), (4, 1, 2)])
def test_metadata_context_queries_and_slots(pcp, dcp, interleave):
    computed, new = [6, 0, 11, 3], [3, 4, 9, 1]  # requests 0 and 2 are prefills over cached context
    lengths = [c + n for c, n in zip(computed, new)]
    tables = _tables(pcp, dcp, interleave, lengths)
    metas = _metas(pcp, dcp, interleave, computed, new)
    W = pcp * dcp
    offsets = [sum(new[:i]) for i in range(len(new))]
    req_of_token = torch.repeat_interleave(torch.arange(len(new)), torch.tensor(new))
    for (r, d), m in metas.items():
        R = r * dcp + d
        # the CP all-gather of the context rows' token indices, regrouped by request
        gathered = torch.cat([metas[(w // dcp, w % dcp)].token_index[metas[(w // dcp, w % dcp)].context.rows]
                              for w in range(W)])[m.context.q_perm]
        cu = m.context.cu_seqlens_q.tolist()
        assert len(cu) == 3
        for s, req in enumerate([0, 2]):
            seg = gathered[cu[s]:cu[s + 1]]
            real = seg[seg >= 0]
            assert sorted(real.tolist()) == sorted(list(range(offsets[req], offsets[req] + new[req])) * dcp)
            assert (req_of_token[real] == req).all()
        # the context slots: this rank's positions < num_computed, in position order
        cuk = m.context.cu_seqlens_k.tolist()
        for s, req in enumerate([0, 2]):
            pos = torch.arange(computed[req])
            pos = pos[(pos // interleave) % W == R]
            expect = tables[R].compute_slot_mapping(torch.full_like(pos, req), pos)
            assert torch.equal(m.context.kv_slots[cuk[s]:cuk[s + 1]], expect)


@pytest.mark.parametrize("pcp", [1, 2, 3])
def test_prefill_plan_is_host_only_and_covers_every_token(pcp):
    """The pure host plan of a mixed step (a decode, a fresh prompt, a chunk over cached context), rank by rank:
    host tensors and Python ints only; every new prefill token is a query on exactly one rank, gathered once in
    sequence order and stored by exactly one rank; the decode row is on every rank; only the chunk has context."""
    from megacp.layers.step_plan import make_schedule, plan_prefill

    computed, new = [4, 0, 6], [1, 9, 5]
    tables = _tables(pcp, 1, 1, [c + n for c, n in zip(computed, new)])
    s = make_schedule([0, 1, 2], computed, new)
    assert (s.decodes, s.prefills, s.offsets) == ([0], [1, 2], [0, 1, 10])
    plans = [plan_prefill(s, pcp, r, tables[r]) for r in range(pcp)]
    queried, stored = [], torch.zeros(14, dtype=torch.long)
    for r, p in enumerate(plans):
        tensors = [p.token_index, p.positions, p.caller_rows, p.logits_rows, p.gather, p.slots, p.q_rows]
        assert all(t.device.type == "cpu" for t in tensors)
        assert all(type(x) is int for x in p.cu_q + p.cu_k + (p.seqused_k or []))
        assert p.num_local == 1 + p.num_prefill_rows
        assert p.token_index[0] == 0 and p.positions[0] == 4  # the decode row, replicated on every PCP rank
        queried += p.token_index[p.q_rows].tolist()
        # keys by start and length: each chunk reads a prefix of its request's sequence-ordered new K/V (14 rows)
        assert p.cu_q[-1] == len(p.q_rows) and p.cu_k[-1] == 14
        used = p.seqused_k if p.seqused_k is not None else [b - a for a, b in zip(p.cu_k, p.cu_k[1:])]
        assert len(used) == len(p.cu_q) - 1 and all(a + n <= 14 for a, n in zip(p.cu_k, used))
        assert (p.seqused_k is None) == (pcp == 1)  # with pcp = 1 the ranges lie one after another
        stored += (p.slots >= 0).long()
        # gather: rank-major rows of the PCP all-gather of every rank's prefill rows, back in sequence order
        assert sorted(p.gather.tolist()) == p.gather.unique().tolist() and len(p.gather) == 14
        ctx = p.context
        assert ctx is not None and ctx.cu_q[-1] == pcp * len(ctx.rows)  # only request 2 has cached context
        assert ctx.cu_k == [0, int(cp_local_seq_lens(torch.tensor([6]), pcp, r, 1)[0])]
        assert ctx.cu_ctx == [0, 6] and len(ctx.gather_rows) == 6  # pass-KV: the whole context, sequence order
    assert sorted(queried) == list(range(1, 15))  # tokens 1..14 are the prefill tokens, each queried once
    assert stored.tolist() == [1] * 14
