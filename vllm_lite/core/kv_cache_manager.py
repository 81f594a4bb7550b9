"""Per-request block tables on top of a BlockPool, with prefix-cache lookup and hit statistics (vLLM v1 style)."""
from __future__ import annotations

from vllm_lite.core.block_pool import BlockPool, KVCacheBlock, hash_block_tokens
from vllm_lite.request import Request


class KVCacheManager:
    """Owns the BlockPool and maps request ids to their ordered block lists.

    Prefix-cache statistics are cumulative: `prefix_cache_queries` counts the tokens of every request admitted
    (on each admission, so a resumed preempted request counts again) and `prefix_cache_hits` the tokens of those
    served from the cache.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 max_model_len: int | None = None) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.max_model_len = max_model_len
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # Number of leading blocks of each request already registered in the prefix cache.
        self.num_cached_block: dict[str, int] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def usage(self) -> float:
        return self.block_pool.get_usage()

    def update_block_hashes(self, request: Request) -> None:
        """Extend `request.block_hashes` with the chained hashes of newly FULL blocks (incremental, O(new blocks))."""
        if not self.enable_caching:
            return
        bs = self.block_size
        hashes = request.block_hashes
        tokens = request.all_token_ids
        for i in range(len(hashes), len(tokens) // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, tokens[i * bs:(i + 1) * bs]))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of `request` as (blocks, num_computed_tokens); takes no references.

        At least the last token is always left to compute (the model must produce logits to sample from), so a
        full hit drops its last block.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0  # prompt logprobs need logits at every prompt position (as vLLM, no cache hits)
        self.update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for h in request.block_hashes[:max_blocks]:
            block = self.block_pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] | None = None,
                       num_lookahead_tokens: int = 0) -> list[KVCacheBlock] | None:
        """Make room for `num_new_tokens` (+ lookahead) after the request's computed tokens.

        `new_computed_blocks` are prefix-cache hits from get_computed_blocks (first admission only); they are
        touched so they cannot be evicted. Returns the newly allocated blocks (possibly []), or None, with no
        state changed, when the pool cannot satisfy it (free cached blocks count as available, except the hits
        themselves).
        """
        req_id = request.request_id
        if not new_computed_blocks:  # fast path of a running request whose blocks already have room (most decodes)
            owned = self.req_to_blocks.get(req_id)
            if owned is not None and (request.num_computed_tokens + num_new_tokens + num_lookahead_tokens
                                      <= len(owned) * self.block_size):
                return []
        new_computed_blocks = new_computed_blocks or []
        req_blocks = self.req_to_blocks.get(req_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total = num_computed + num_new_tokens + num_lookahead_tokens
        num_required = -(-total // self.block_size)
        num_new_blocks = max(0, num_required - len(req_blocks) - len(new_computed_blocks))
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.block_pool.get_num_free_blocks() - num_evictable_hits:
            return None
        first_admission = req_id not in self.req_to_blocks
        if first_admission:
            self.req_to_blocks[req_id] = req_blocks
            self.num_cached_block[req_id] = len(new_computed_blocks)
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(new_computed_blocks) * self.block_size
        if new_computed_blocks:
            self.block_pool.touch(new_computed_blocks)
            req_blocks.extend(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks) if num_new_blocks else []
        req_blocks.extend(new_blocks)
        return new_blocks

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's full blocks whose tokens are computed (and known) in the prefix cache."""
        if not self.enable_caching:
            return
        req_id = request.request_id
        blocks = self.req_to_blocks.get(req_id)
        if blocks is None:
            return
        self.update_block_hashes(request)
        num_full = min(num_computed_tokens // self.block_size, len(request.block_hashes), len(blocks))
        start = self.num_cached_block[req_id]
        if num_full > start:
            self.block_pool.cache_full_blocks(blocks, request.block_hashes, start, num_full)
            self.num_cached_block[req_id] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so its last blocks are the first evicted."""
        blocks = self.req_to_blocks.pop(request.request_id, None)
        self.num_cached_block.pop(request.request_id, None)
        if blocks:
            self.block_pool.free_blocks(reversed(blocks))

    def get_blocks(self, request_id: str) -> list[KVCacheBlock]:
        return self.req_to_blocks.get(request_id, [])

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def get_num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    def reset_prefix_cache(self) -> bool:
        """Forget all cached prefixes; running requests keep their blocks (they are just no longer shareable)."""
        return self.block_pool.reset_prefix_cache()
