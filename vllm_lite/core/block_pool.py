"""Physical KV-cache blocks, their free list and the prefix-cache hash map (vLLM v1 style).

Block ids are used directly as indices into the KV tensor by the model runner, so every id is in
[0, num_blocks). There is NO reserved null block: all `num_blocks` blocks are allocatable (padding slots in the
runner must use slot -1 / masking rather than a dedicated block).

Eviction is LRU over *free* blocks: a block whose ref count drops to 0 goes to the free-queue tail but keeps its
hash, so a later request can still hit it; allocation pops from the head and only then forgets the hash.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Sequence

BlockHash = int


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int],
                      extra_keys: tuple | None = None) -> BlockHash:
    """Chained hash of one FULL block: sha256(parent hash, token ids, extra keys) as an int.

    sha256 (rather than Python's hash) so that crafted prompts cannot collide with another user's prefix.
    Deterministic across processes as long as `extra_keys` has a stable repr.
    """
    h = hashlib.sha256()
    h.update(b"root" if parent_hash is None else parent_hash.to_bytes(32, "little"))
    h.update(array("q", token_ids).tobytes())
    if extra_keys is not None:
        h.update(repr(extra_keys).encode())
    return int.from_bytes(h.digest(), "little")


class KVCacheBlock:
    """One physical block; prev/next link it into the free queue while its ref count is 0."""
    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free_block", "next_free_block")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.prev_free_block: KVCacheBlock | None = None
        self.next_free_block: KVCacheBlock | None = None

    def __repr__(self) -> str:
        cached = "" if self.block_hash is None else ", cached"
        return f"KVCacheBlock({self.block_id}, ref={self.ref_cnt}{cached})"


class FreeBlockQueue:
    """Doubly-linked list of free blocks with O(1) popleft / append / remove-from-middle (sentinel ends)."""

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free_block = self._tail
        self._tail.prev_free_block = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self.num_free_blocks

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free_block
        if block is self._tail or block is None:
            raise ValueError("no free blocks left")
        self.remove(block)
        return block

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        if n > self.num_free_blocks:
            raise ValueError(f"asked for {n} free blocks, only {self.num_free_blocks} left")
        return [self.popleft() for _ in range(n)]

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free_block, block.next_free_block
        if prev is None or nxt is None:
            raise ValueError(f"{block} is not in the free queue")
        prev.next_free_block = nxt
        nxt.prev_free_block = prev
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free_block
        assert last is not None
        last.next_free_block = block
        block.prev_free_block = last
        block.next_free_block = self._tail
        self._tail.prev_free_block = block
        self.num_free_blocks += 1

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        """Head (evicted first) to tail; for tests and debugging."""
        out, cur = [], self._head.next_free_block
        while cur is not None and cur is not self._tail:
            out.append(cur)
            cur = cur.next_free_block
        return out


class BlockPool:
    """All KV blocks of one cache, the free queue and the hash -> block map used for prefix caching."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks={num_blocks} must be positive")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        # One block per hash: if two requests computed the same block concurrently, only the first is registered.
        self.cached_block_hash_to_block: dict[BlockHash, KVCacheBlock] = {}

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached_block_hash_to_block.get(block_hash)

    def _evict_cached(self, block: KVCacheBlock) -> None:
        h = block.block_hash
        if h is not None:
            if self.cached_block_hash_to_block.get(h) is block:
                del self.cached_block_hash_to_block[h]
            block.block_hash = None

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pop blocks from the free-queue head (LRU); a popped block loses its cached hash (eviction)."""
        blocks = self.free_block_queue.popleft_n(num_blocks)
        for block in blocks:
            self._evict_cached(block)
            block.ref_cnt = 1
        return blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Cache hit: take a reference; a free block leaves the free queue so it can no longer be evicted."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference each; blocks reaching 0 go to the tail in the given order (first = evicted first).

        Callers pass a request's blocks in reverse so its tail blocks (least likely shared) are evicted first.
        """
        for block in ordered_blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"{block} freed more times than allocated")
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)

    def cache_full_blocks(self, blocks: Sequence[KVCacheBlock], block_hashes: Sequence[BlockHash],
                          num_cached_blocks: int, num_full_blocks: int) -> None:
        """Register blocks[num_cached_blocks:num_full_blocks] (full, computed) under their chained hashes."""
        if not self.enable_caching:
            return
        for i in range(num_cached_blocks, num_full_blocks):
            block = blocks[i]
            if block.block_hash is not None:  # already cached (e.g. a prefix hit)
                continue
            h = block_hashes[i]
            if h in self.cached_block_hash_to_block:  # an identical block is already cached: keep that one
                continue
            block.block_hash = h
            self.cached_block_hash_to_block[h] = block

    def get_num_free_blocks(self) -> int:
        """Free blocks, including free blocks that still hold a cached (evictable) prefix."""
        return self.free_block_queue.num_free_blocks

    def get_usage(self) -> float:
        """Fraction of blocks held by requests (0.0 - 1.0)."""
        return 1.0 - self.get_num_free_blocks() / self.num_blocks

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (blocks in use keep their data but become unshareable). Always succeeds."""
        for block in self.cached_block_hash_to_block.values():
            block.block_hash = None
        self.cached_block_hash_to_block.clear()
        return True
