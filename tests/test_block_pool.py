"""BlockPool / FreeBlockQueue / KVCacheManager: hash chains, LRU eviction order, ref counts, prefix hits."""
from __future__ import annotations

import pytest

from vllm_lite.core.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock, hash_block_tokens
from vllm_lite.core.kv_cache_manager import KVCacheManager
from vllm_lite.request import Request
from vllm_lite.sampling_params import SamplingParams


def ids(blocks):
    return [b.block_id for b in blocks]


def make_req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=8), eos_token_id=None)


# ---------------------------------------------------------------- hashes
def test_hash_chain():
    a = hash_block_tokens(None, (1, 2, 3, 4))
    assert a == hash_block_tokens(None, (1, 2, 3, 4))
    assert a == hash_block_tokens(None, [1, 2, 3, 4])
    assert a != hash_block_tokens(None, (1, 2, 3, 5))
    b = hash_block_tokens(a, (5, 6, 7, 8))
    assert b == hash_block_tokens(a, (5, 6, 7, 8))
    assert b != hash_block_tokens(None, (5, 6, 7, 8))
    assert b != hash_block_tokens(hash_block_tokens(None, (0, 2, 3, 4)), (5, 6, 7, 8))
    assert hash_block_tokens(a, (5, 6, 7, 8), ("lora", 1)) != b
    assert hash_block_tokens(a, (5, 6, 7, 8), ("lora", 1)) == hash_block_tokens(a, (5, 6, 7, 8), ("lora", 1))


def test_request_block_hashes_incremental():
    mgr = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True, max_model_len=32)
    req = make_req("r", [1, 2, 3, 4, 5, 6])
    mgr.update_block_hashes(req)
    h0 = hash_block_tokens(None, (1, 2, 3, 4))
    assert req.block_hashes == [h0]
    req.append_output_token_ids([7])
    mgr.update_block_hashes(req)
    assert req.block_hashes == [h0]  # block 2 not full yet
    req.append_output_token_ids([8, 9])
    mgr.update_block_hashes(req)
    assert req.block_hashes == [h0, hash_block_tokens(h0, (5, 6, 7, 8))]


# ---------------------------------------------------------------- free queue
def test_free_queue_ops():
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert len(q) == 5
    q.remove(blocks[2])
    assert ids(q.get_all_free_blocks()) == [0, 1, 3, 4]
    assert q.popleft() is blocks[0]
    q.append(blocks[2])
    assert ids(q.get_all_free_blocks()) == [1, 3, 4, 2]
    assert ids(q.popleft_n(2)) == [1, 3]
    assert len(q) == 2
    with pytest.raises(ValueError):
        q.popleft_n(3)
    with pytest.raises(ValueError):
        q.remove(blocks[0])  # not in the queue


# ---------------------------------------------------------------- block pool
def test_pool_alloc_free_order_and_eviction():
    pool = BlockPool(6, enable_caching=True)
    a = pool.get_new_blocks(3)
    assert ids(a) == [0, 1, 2] and all(b.ref_cnt == 1 for b in a)
    assert pool.get_num_free_blocks() == 3 and pool.get_usage() == pytest.approx(0.5)
    hashes = [hash_block_tokens(None, (i,)) for i in range(3)]
    pool.cache_full_blocks(a, hashes, 0, 2)  # only the two full blocks
    assert pool.get_cached_block(hashes[0]) is a[0] and pool.get_cached_block(hashes[1]) is a[1]
    assert pool.get_cached_block(hashes[2]) is None
    pool.free_blocks(reversed(a))  # tail first
    assert ids(pool.free_block_queue.get_all_free_blocks()) == [3, 4, 5, 2, 1, 0]
    # Still cached while free.
    assert pool.get_cached_block(hashes[0]) is a[0]
    # Allocating 5: pops 3,4,5 (never cached), then 2 (uncached), then 1 -> evicts hash 1; block 0 survives.
    b = pool.get_new_blocks(5)
    assert ids(b) == [3, 4, 5, 2, 1]
    assert pool.get_cached_block(hashes[1]) is None and a[1].block_hash is None
    assert pool.get_cached_block(hashes[0]) is a[0]
    with pytest.raises(ValueError):
        pool.get_new_blocks(2)


def test_pool_lru_least_recently_freed_first():
    pool = BlockPool(4, enable_caching=True)
    x = pool.get_new_blocks(2)
    y = pool.get_new_blocks(2)
    hx = [hash_block_tokens(None, (10,)), hash_block_tokens(None, (11,))]
    hy = [hash_block_tokens(None, (20,)), hash_block_tokens(None, (21,))]
    pool.cache_full_blocks(x, hx, 0, 2)
    pool.cache_full_blocks(y, hy, 0, 2)
    pool.free_blocks(reversed(y))  # y freed first -> evicted first
    pool.free_blocks(reversed(x))
    assert ids(pool.free_block_queue.get_all_free_blocks()) == [3, 2, 1, 0]
    pool.get_new_blocks(1)
    assert pool.get_cached_block(hy[1]) is None  # y's tail block went first
    assert pool.get_cached_block(hy[0]) is y[0]


def test_touch_and_ref_counts_shared_prefix():
    pool = BlockPool(4, enable_caching=True)
    a = pool.get_new_blocks(2)
    h = [hash_block_tokens(None, (1,)), hash_block_tokens(None, (2,))]
    pool.cache_full_blocks(a, h, 0, 2)
    pool.touch([a[0]])  # a second request shares block 0 while in use
    assert a[0].ref_cnt == 2 and pool.get_num_free_blocks() == 2
    pool.free_blocks(reversed(a))  # first request done
    assert a[0].ref_cnt == 1 and a[1].ref_cnt == 0
    assert ids(pool.free_block_queue.get_all_free_blocks()) == [2, 3, 1]
    pool.touch([a[1]])  # cache hit on a free block: leaves the free queue
    assert a[1].ref_cnt == 1
    assert ids(pool.free_block_queue.get_all_free_blocks()) == [2, 3]
    pool.free_blocks([a[0]])
    pool.free_blocks([a[1]])
    assert ids(pool.free_block_queue.get_all_free_blocks()) == [2, 3, 0, 1]
    with pytest.raises(RuntimeError):
        pool.free_blocks([a[1]])


def test_duplicate_hash_keeps_first_block():
    pool = BlockPool(4, enable_caching=True)
    a, b = pool.get_new_blocks(1), pool.get_new_blocks(1)
    h = [hash_block_tokens(None, (7,))]
    pool.cache_full_blocks(a, h, 0, 1)
    pool.cache_full_blocks(b, h, 0, 1)
    assert pool.get_cached_block(h[0]) is a[0] and b[0].block_hash is None
    pool.free_blocks(a)
    pool.get_new_blocks(3)  # pops 2, 3, then a[0] -> evicted
    assert pool.get_cached_block(h[0]) is None


def test_reset_prefix_cache():
    pool = BlockPool(2, enable_caching=True)
    a = pool.get_new_blocks(1)
    pool.cache_full_blocks(a, [123], 0, 1)
    assert pool.reset_prefix_cache()
    assert pool.get_cached_block(123) is None and a[0].block_hash is None


def test_caching_disabled_registers_nothing():
    pool = BlockPool(2, enable_caching=False)
    a = pool.get_new_blocks(1)
    pool.cache_full_blocks(a, [5], 0, 1)
    assert pool.get_cached_block(5) is None


# ---------------------------------------------------------------- KV cache manager
def _run_prefill(mgr: KVCacheManager, req: Request) -> list[int]:
    blocks, n = mgr.get_computed_blocks(req)
    assert mgr.allocate_slots(req, req.num_tokens - n, blocks) is not None
    req.num_computed_tokens = req.num_tokens
    mgr.cache_blocks(req, req.num_computed_tokens)
    return mgr.get_block_ids(req.request_id)


def test_manager_prefix_hit_and_full_hit_keeps_last_token():
    mgr = KVCacheManager(num_blocks=10, block_size=4, enable_caching=True, max_model_len=64)
    a = make_req("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert _run_prefill(mgr, a) == [0, 1, 2]
    # Shares the 2 full blocks, then diverges.
    b = make_req("b", list(range(8)) + [100, 101, 102])
    blocks, n = mgr.get_computed_blocks(b)
    assert ids(blocks) == [0, 1] and n == 8
    new = mgr.allocate_slots(b, b.num_tokens - n, blocks)
    assert ids(new) == [3]
    assert mgr.get_block_ids("b") == [0, 1, 3]
    assert [blk.ref_cnt for blk in mgr.block_pool.blocks[:4]] == [2, 2, 1, 1]
    assert (mgr.prefix_cache_queries, mgr.prefix_cache_hits) == (10 + 11, 8)
    # A prompt exactly equal to 2 cached blocks: last block dropped so the last token is recomputed.
    c = make_req("c", list(range(8)))
    blocks, n = mgr.get_computed_blocks(c)
    assert ids(blocks) == [0] and n == 4
    # Freed requests stay cached; freeing order puts tail blocks first.
    mgr.free(a)
    mgr.free(b)
    assert [blk.ref_cnt for blk in mgr.block_pool.blocks[:4]] == [0, 0, 0, 0]
    assert ids(mgr.block_pool.free_block_queue.get_all_free_blocks()) == [4, 5, 6, 7, 8, 9, 2, 3, 1, 0]
    blocks, n = mgr.get_computed_blocks(make_req("d", list(range(9))))
    assert ids(blocks) == [0, 1] and n == 8


def test_manager_allocation_failure_returns_none_without_side_effects():
    mgr = KVCacheManager(num_blocks=4, block_size=4, enable_caching=True, max_model_len=16)
    a = make_req("a", list(range(12)))
    assert _run_prefill(mgr, a) == [0, 1, 2]
    b = make_req("b", list(range(100, 109)))  # needs 3 blocks, 1 free
    assert mgr.allocate_slots(b, 9) is None
    assert mgr.get_block_ids("b") == [] and mgr.get_num_free_blocks() == 1
    assert mgr.prefix_cache_queries == 12  # failed admissions are not counted
    # Decode growth of a: 12 computed, +1 token -> needs a 4th block.
    a.append_output_token_ids([5])
    a.num_computed_tokens = 12
    assert ids(mgr.allocate_slots(a, 1)) == [3]
    assert mgr.allocate_slots(a, 5) is None  # would need a 5th block
    assert mgr.usage == 1.0


def test_manager_hit_blocks_not_counted_as_free_space():
    # 4 blocks; a's two full blocks are cached and free; b hits both and needs 2 more new blocks.
    mgr = KVCacheManager(num_blocks=4, block_size=4, enable_caching=True, max_model_len=16)
    a = make_req("a", list(range(8)) + [50])
    _run_prefill(mgr, a)
    mgr.free(a)
    assert mgr.get_num_free_blocks() == 4
    b = make_req("b", list(range(8)) + list(range(200, 208)))  # 16 tokens = 4 blocks, 2 hit
    blocks, n = mgr.get_computed_blocks(b)
    assert n == 8
    # 2 new blocks needed + lookahead 1 token -> a 5th block: 4 free minus 2 (hits, evictable) = 2 < 3.
    assert mgr.allocate_slots(b, 8, blocks, num_lookahead_tokens=1) is None
    assert all(blk.ref_cnt == 0 for blk in blocks)
    new = mgr.allocate_slots(b, 8, blocks)
    assert ids(new) == [3, 2] and mgr.get_block_ids("b") == [0, 1, 3, 2]
    assert blocks[0].block_hash is not None and blocks[1].block_hash is not None
