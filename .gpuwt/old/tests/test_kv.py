"""megacp.kv: CP-sharded KV layout (DESIGN §2), block table, allocator, paged cache. Pure CPU, no processes.

The reference for slot placement is built the other way round from the library: it walks each rank's *slots*
(block by block, round by round) and deals positions to them, instead of mapping positions to slots.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacp.kv import (
    BlockAllocator,
    BlockTable,
    KVCacheFullError,
    PagedKVCache,
    blocks_needed,
    cp_local_index,
    cp_local_positions,
    cp_local_seq_lens,
    cp_owner_rank,
    kv_capacity_tokens,
)
from megacp.kv.layout import local_slots
from tests.references import gather_local_shard

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def kv_layouts(draw):
    """(block_size, interleave, pcp, dcp) with interleave dividing block_size."""
    block_size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    interleave = draw(st.sampled_from([d for d in (1, 2, 4, 8, 16) if block_size % d == 0]))
    pcp = draw(st.sampled_from([1, 2, 4]))
    dcp = draw(st.sampled_from([1, 2, 4]))
    return block_size, interleave, pcp, dcp


def reference_placement(seq_len: int, row: list[int], block_size: int, W: int, I: int) -> dict[int, tuple[int, int]]:
    """position -> (cp_rank, slot), by filling each rank's slots in order: virtual block b is physical block row[b]
    on every rank; inside it, round g hands I consecutive positions to rank 0, then I to rank 1, ..."""
    placement = {}
    p = 0
    for block_id in row:
        for g in range(block_size // I):
            for rank in range(W):
                for i in range(I):
                    if p < seq_len:
                        placement[p] = (rank, block_id * block_size + g * I + i)
                    p += 1
    return placement


def slot_mappings(table_args: dict, rows: dict[int, list[int]], req: torch.Tensor, pos: torch.Tensor, W: int):
    """[W, T] slot mapping of the same tokens as seen by each CP rank."""
    out = []
    for rank in range(W):
        bt = BlockTable(cp_world_size=W, cp_rank=rank, **table_args)
        for r, ids in rows.items():
            bt.set_row(r, ids)
        out.append(bt.compute_slot_mapping(req, pos))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------- hand-worked layouts


def test_hand_worked_w2_i1_bs4():
    # Virtual blocks of 4·2 = 8 positions; row [7, 3]. Rank 0 takes even positions, rank 1 odd ones; each rank
    # packs its 4 tokens of virtual block 0 into physical block 7 (slots 28..31), of virtual block 1 into block 3.
    positions = torch.arange(10)
    assert cp_owner_rank(positions, 2, 1).tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert cp_local_index(positions, 4, 2, 1).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    maps = slot_mappings(dict(block_size=4, max_num_reqs=2, max_num_blocks_per_req=4), {1: [7, 3]},
                         torch.full((10,), 1), positions, 2)
    assert maps[0].tolist() == [28, -1, 29, -1, 30, -1, 31, -1, 12, -1]
    assert maps[1].tolist() == [-1, 28, -1, 29, -1, 30, -1, 31, -1, 12]
    # L=10: 5 + 5; L=9: base = (9 // 1 // 2)·1 = 4, rank 0 gets clamp(9 - 8 - 0, 0, 1) = 1 more, rank 1 none.
    assert cp_local_seq_lens(torch.tensor([10, 9, 1, 0]), 2, 0, 1).tolist() == [5, 5, 1, 0]
    assert cp_local_seq_lens(torch.tensor([10, 9, 1, 0]), 2, 1, 1).tolist() == [5, 4, 0, 0]
    assert cp_local_positions(9, 2, 0, 1).tolist() == [0, 2, 4, 6, 8]
    assert cp_local_positions(9, 2, 1, 1).tolist() == [1, 3, 5, 7]


def test_hand_worked_w2_i2_bs4():
    # Interleave 2: runs of two positions alternate ranks. Row [5, 2]: rank 0 holds 0,1,4,5 in block 5 (slots
    # 20..23) and 8,9 in block 2 (slots 8, 9); rank 1 holds 2,3,6,7 in block 5 and 10,11 in block 2.
    positions = torch.arange(12)
    assert cp_owner_rank(positions, 2, 2).tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1]
    maps = slot_mappings(dict(block_size=4, max_num_reqs=1, max_num_blocks_per_req=2, interleave_size=2),
                         {0: [5, 2]}, torch.zeros(12, dtype=torch.long), positions, 2)
    assert maps[0].tolist() == [20, 21, -1, -1, 22, 23, -1, -1, 8, 9, -1, -1]
    assert maps[1].tolist() == [-1, -1, 20, 21, -1, -1, 22, 23, -1, -1, 8, 9]
    # L=10: base = (10 // 2 // 2)·2 = 4; rank 0: 4 + clamp(10 - 8 - 0, 0, 2) = 6; rank 1: 4 + clamp(0, 0, 2) = 4.
    assert cp_local_seq_lens(torch.tensor([10, 11]), 2, 0, 2).tolist() == [6, 6]
    assert cp_local_seq_lens(torch.tensor([10, 11]), 2, 1, 2).tolist() == [4, 5]
    assert cp_local_positions(10, 2, 0, 2).tolist() == [0, 1, 4, 5, 8, 9]
    assert cp_local_positions(10, 2, 1, 2).tolist() == [2, 3, 6, 7]


def test_hand_worked_w4_i2_local_lens():
    # pcp=2, dcp=2 (W=4), I=2, L=13: rounds of 8 — 0-7 give two to each rank; 8,9 -> r0, 10,11 -> r1, 12 -> r2.
    lens = [int(cp_local_seq_lens(torch.tensor([13]), 4, r, 2)[0]) for r in range(4)]
    assert lens == [4, 4, 3, 2]
    assert cp_local_positions(13, 4, 2, 2).tolist() == [4, 5, 12]
    assert cp_local_positions(13, 4, 3, 2).tolist() == [6, 7]


# ---------------------------------------------------------------------------------------------- layout properties


@SETTINGS
@given(layout=kv_layouts(), seq_lens=st.lists(st.integers(0, 300), min_size=1, max_size=3), seed=st.integers(0, 2**31))
def test_layout_properties(layout, seq_lens, seed):
    block_size, I, pcp, dcp = layout
    W = pcp * dcp
    gen = torch.Generator().manual_seed(seed)
    need = [blocks_needed(L, block_size, W) for L in seq_lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    rows, start = {}, 0
    for r, n in enumerate(need):
        rows[r], start = perm[start:start + n], start + n
    # All requests' tokens in one batch, shuffled, so row lookups and per-token math must not rely on order.
    req = torch.cat([torch.full((L,), r, dtype=torch.long) for r, L in enumerate(seq_lens)])
    pos = torch.cat([torch.arange(L) for L in seq_lens])
    order = torch.randperm(req.numel(), generator=gen)
    req, pos = req[order], pos[order]

    table_args = dict(block_size=block_size, max_num_reqs=len(seq_lens), max_num_blocks_per_req=max(need + [1]),
                      interleave_size=I)
    maps = slot_mappings(table_args, rows, req, pos, W)  # [W, T]

    # Every token lives on exactly one CP rank, at the slot the reference construction gives it.
    assert ((maps >= 0).sum(0) == 1).all()
    for r, L in enumerate(seq_lens):
        ref = reference_placement(L, rows[r], block_size, W, I)
        mine = req == r
        for p, rank_slots in zip(pos[mine].tolist(), maps[:, mine].T.tolist()):
            rank, slot = ref[p]
            assert rank_slots[rank] == slot

    lens = torch.tensor(seq_lens)
    total_local = torch.zeros_like(lens)
    for rank in range(W):
        owned = maps[rank] >= 0
        slots = maps[rank][owned]
        # Slots are unique across the whole batch on this rank, and each lies in its own request's blocks.
        assert slots.unique().numel() == slots.numel()
        local_lens = cp_local_seq_lens(lens, W, rank, I)
        total_local += local_lens
        for r, L in enumerate(seq_lens):
            mine = owned & (req == r)
            assert int(mine.sum()) == int(local_lens[r])
            assert set((maps[rank][mine] // block_size).tolist()) <= set(rows[r])
            # cp_local_positions lists exactly the owned positions, and its order is the cache's local order:
            # local index j sits at slot row[j // B]·B + j % B.
            local_pos = cp_local_positions(L, W, rank, I)
            assert local_pos.tolist() == sorted(pos[mine].tolist())
            slot_of = dict(zip(pos[mine].tolist(), maps[rank][mine].tolist()))
            j = torch.arange(int(local_lens[r]))
            assert [slot_of[p] for p in local_pos.tolist()] == local_slots(torch.tensor(rows[r]), j, block_size).tolist()
            assert (cp_local_index(local_pos, block_size, W, I) == torch.arange(local_pos.numel())).all()
    assert (total_local == lens).all()


@SETTINGS
@given(layout=kv_layouts(), seq_len=st.integers(1, 300))
def test_identity_table_local_order_is_increasing_slots(layout, seq_len):
    block_size, I, pcp, dcp = layout
    W = pcp * dcp
    n = blocks_needed(seq_len, block_size, W)
    for rank in range(W):
        bt = BlockTable(block_size, 1, n, cp_world_size=W, cp_rank=rank, interleave_size=I)
        bt.set_row(0, list(range(n)))
        local_pos = cp_local_positions(seq_len, W, rank, I)
        slots = bt.compute_slot_mapping(torch.zeros_like(local_pos), local_pos)
        assert slots.tolist() == list(range(local_pos.numel()))


@SETTINGS
@given(layout=kv_layouts(), num_blocks=st.integers(1, 6))
def test_capacity_is_w_times_unsharded(layout, num_blocks):
    block_size, I, pcp, dcp = layout
    W = pcp * dcp
    cap = kv_capacity_tokens(num_blocks, block_size, W)
    assert cap == W * kv_capacity_tokens(num_blocks, block_size, 1) == W * num_blocks * block_size
    # A sequence of exactly `cap` tokens fits in num_blocks blocks and fills every slot of every rank once;
    # one more token needs another block.
    assert blocks_needed(cap, block_size, W) == num_blocks
    assert blocks_needed(cap + 1, block_size, W) == num_blocks + 1
    pos = torch.arange(cap)
    for rank in range(W):
        bt = BlockTable(block_size, 1, num_blocks, cp_world_size=W, cp_rank=rank, interleave_size=I)
        bt.set_row(0, torch.randperm(num_blocks))
        slots = bt.compute_slot_mapping(torch.zeros_like(pos), pos)
        assert sorted(slots[slots >= 0].tolist()) == list(range(num_blocks * block_size))


# ---------------------------------------------------------------------------------------------- block table API


def test_block_table_rows_and_errors():
    bt = BlockTable(block_size=4, max_num_reqs=3, max_num_blocks_per_req=3, cp_world_size=2, cp_rank=1)
    bt.set_row(2, [9, 4])
    bt.append_row(2, [6])
    assert bt.row_host(2).tolist() == [9, 4, 6]
    bt.commit()
    assert bt.table[[2, 0]].tolist() == [[9, 4, 6], [0, 0, 0]]
    # Position 23 is in virtual block 2 (id 6), slot 6·4 + (7 // 2) = 27; position 24 is past the row.
    assert bt.compute_slot_mapping(torch.tensor([2]), torch.tensor([23])).tolist() == [27]
    with pytest.raises(ValueError, match="request row 2: position 24"):
        bt.compute_slot_mapping(torch.tensor([2, 2]), torch.tensor([0, 24]))
    bt.clear_row(2)
    with pytest.raises(ValueError, match="request row 2"):
        bt.compute_slot_mapping(torch.tensor([2]), torch.tensor([0]))
    with pytest.raises(ValueError, match="max_num_blocks_per_req=3"):
        bt.set_row(0, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="req_index=3"):
        bt.set_row(3, [1])
    assert bt.compute_slot_mapping(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)).numel() == 0


def test_append_blocks_equals_append_row_per_row():
    """``append_blocks`` (one block to each of several rows, tensor ops) leaves the table ``append_row`` would,
    host and committed device copy, and refuses a row that is full."""
    a, b = (BlockTable(block_size=4, max_num_reqs=4, max_num_blocks_per_req=3) for _ in range(2))
    for t in (a, b):
        t.set_row(1, [5])
        t.set_row(3, [7, 2])
        t.commit()
    a.append_blocks(torch.tensor([3, 0, 1]), [8, 1, 6])
    for row, block in ((3, 8), (0, 1), (1, 6)):
        b.append_row(row, [block])
    a.commit()
    b.commit()
    assert [a.row_host(r).tolist() for r in range(4)] == [b.row_host(r).tolist() for r in range(4)] \
        == [[1], [5, 6], [], [7, 2, 8]]
    assert torch.equal(a.table, b.table) and a.num_blocks_host(torch.arange(4)).tolist() == [1, 2, 0, 3]
    with pytest.raises(ValueError, match="max_num_blocks_per_req=3"):
        a.append_blocks(torch.tensor([3]), [9])


@pytest.mark.parametrize("block_size,interleave", [(4, 3), (4, 8), (4, 0), (16, 5)])
def test_block_table_rejects_bad_interleave(block_size, interleave):
    with pytest.raises(ValueError, match="cp_kv_cache_interleave_size"):
        BlockTable(block_size, 1, 1, cp_world_size=2, interleave_size=interleave)


def test_block_table_rejects_bad_rank_and_sizes():
    with pytest.raises(ValueError, match="cp_rank=2"):
        BlockTable(4, 1, 1, cp_world_size=2, cp_rank=2)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1, got 0"):
        BlockTable(0, 1, 1)
    with pytest.raises(ValueError, match="cp_world_size=0"):
        BlockTable(4, 1, 1, cp_world_size=0)


# ---------------------------------------------------------------------------------------------- paged cache


@settings(max_examples=60, deadline=None)
@given(layout=kv_layouts(), seq_len=st.integers(1, 120), split=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_paged_cache_round_trip(layout, seq_len, split, seed):
    block_size, I, pcp, dcp = layout
    W = pcp * dcp
    gen = torch.Generator().manual_seed(seed)
    n = blocks_needed(seq_len, block_size, W)
    num_blocks = n + 2
    row = torch.randperm(num_blocks, generator=gen)[:n]
    hkv, d = 2, 3
    k = torch.randn(seq_len, hkv, d, generator=gen)
    v = torch.randn(seq_len, hkv, d, generator=gen)
    sentinel = 7.5  # unwritten slots must keep it: slot -1 tokens are not written anywhere
    k_full, v_full = torch.zeros_like(k), torch.zeros_like(v)
    cut = int(split * seq_len)  # write as a prefill then a continuation, like chunked prefill / decode
    for rank in range(W):
        bt = BlockTable(block_size, 1, n, cp_world_size=W, cp_rank=rank, interleave_size=I)
        bt.set_row(0, row)
        cache = PagedKVCache(num_blocks, block_size, hkv, d)
        cache.k.fill_(sentinel)
        cache.v.fill_(sentinel)
        for lo, hi in ((0, cut), (cut, seq_len)):
            pos = torch.arange(lo, hi)
            cache.write(k[lo:hi], v[lo:hi], bt.compute_slot_mapping(torch.zeros_like(pos), pos))
        local_len = int(cp_local_seq_lens(torch.tensor([seq_len]), W, rank, I)[0])
        gk, gv = gather_local_shard(cache, bt.row_host(0), local_len)
        local_pos = cp_local_positions(seq_len, W, rank, I)
        assert torch.equal(gk, k[local_pos]) and torch.equal(gv, v[local_pos])
        k_full[local_pos], v_full[local_pos] = gk, gv
        written = cache.k.reshape(-1, hkv, d)[local_slots(torch.as_tensor(row), torch.arange(local_len), block_size)]
        assert torch.equal(written, gk)
        assert int((cache.k != sentinel).any(-1).any(-1).sum()) == local_len
        assert int((cache.v != sentinel).any(-1).any(-1).sum()) == local_len
    # The ranks' shards together are the whole sequence.
    assert torch.equal(k_full, k) and torch.equal(v_full, v)


def test_paged_cache_write_ignores_minus_one_and_validates():
    cache = PagedKVCache(num_blocks=2, block_size=2, num_kv_heads=1, head_dim=2, dtype=torch.float64)
    k = torch.arange(8, dtype=torch.float32).reshape(4, 1, 2)
    cache.write(k, -k, torch.tensor([3, -1, 0, -1]))
    assert cache.k.reshape(4, 2).tolist() == [[4, 5], [0, 0], [0, 0], [0, 1]]
    assert cache.v.reshape(4, 2).tolist() == [[-4, -5], [0, 0], [0, 0], [0, -1]]
    assert cache.k.dtype == torch.float64 and cache.num_tokens_capacity == 4
    gk, _ = gather_local_shard(cache, [1, 0], 3)  # local order: slots 2, 3, 0
    assert gk.reshape(3, 2).tolist() == [[0, 0], [0, 1], [4, 5]]
    cache.write(k[:1], k[:1], torch.tensor([cache.null_slot]))  # the null slot takes writes, outside k/v
    assert cache.null_slot == 4 and cache.k.reshape(4, 2).tolist()[0] == [4, 5]
    with pytest.raises(ValueError, match="outside this cache's 4 slots"):
        cache.write(k[:1], k[:1], torch.tensor([5]))
    with pytest.raises(ValueError, match=r"shape \[T, 1, 2\]"):
        cache.write(k.reshape(4, 2, 1), k.reshape(4, 2, 1), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="local_len=5"):
        gather_local_shard(cache, [1, 0], 5)


# ---------------------------------------------------------------------------------------------- allocator


def test_blocks_needed_hand_values():
    assert blocks_needed(0, 4, 2) == 0
    assert blocks_needed(8, 4, 2) == 1
    assert blocks_needed(9, 4, 2) == 2
    assert blocks_needed(1, 16, 1) == 1
    assert blocks_needed(33, 16, 1) == 3
    with pytest.raises(ValueError):
        blocks_needed(-1, 4, 1)


def test_allocator_all_or_nothing_and_errors():
    alloc = BlockAllocator(5)
    assert alloc.allocate(3) == [0, 1, 2] and alloc.num_free == 2
    with pytest.raises(KVCacheFullError, match=r"asked for 3, 2 of 5 free.*max_num_batched_tokens") as exc:
        alloc.allocate(3)
    assert isinstance(exc.value, RuntimeError)
    assert alloc.num_free == 2  # nothing half-allocated
    alloc.free([1])
    assert alloc.allocate(2) == [1, 3]
    with pytest.raises(ValueError, match="double free of KV block 4"):
        alloc.free([0, 4])  # 4 was never handed out: still free
    with pytest.raises(ValueError, match="double free of KV block 0"):
        alloc.free([0, 0])
    assert alloc.num_free == 1  # failed frees freed nothing
    with pytest.raises(ValueError, match="not in this pool"):
        alloc.free([5])
    alloc.free([0, 2])
    with pytest.raises(ValueError, match="double free of KV block 2"):
        alloc.free([2])
    assert alloc.allocate(0) == [] and alloc.num_free == 3
    with pytest.raises(ValueError):
        BlockAllocator(0)


@settings(max_examples=100, deadline=None)
@given(num_blocks=st.integers(1, 20), ops=st.lists(st.tuples(st.booleans(), st.integers(0, 8)), max_size=30))
def test_allocator_random_ops_match_model(num_blocks, ops):
    alloc = BlockAllocator(num_blocks)
    held: list[list[int]] = []
    for is_alloc, n in ops:
        in_use = {b for ids in held for b in ids}
        if is_alloc:
            if n <= num_blocks - len(in_use):
                ids = alloc.allocate(n)
                assert len(ids) == n and not (set(ids) & in_use) and all(0 <= b < num_blocks for b in ids)
                held.append(ids)
            else:
                with pytest.raises(KVCacheFullError):
                    alloc.allocate(n)
        elif held:
            alloc.free(held.pop(n % len(held)))
        assert alloc.num_free == num_blocks - len({b for ids in held for b in ids})
