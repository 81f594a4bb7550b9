"""Suffix speculation (method "suffix", after SuffixDecoding, arXiv 2411.04975): drafts from the continuations of
the request's current suffix, seen earlier in its own prompt + output or in the outputs of earlier requests.

Both sources are token corpora indexed incrementally (each new token is appended to a numpy buffer and its bigram
to a position list; nothing is rebuilt per step): the request's own tokens, and one shared corpus of the outputs of
up to `suffix_decoding_max_cached_requests` finished requests (oldest dropped first). A lookup
- takes the earlier occurrences of the current last two tokens (the most recent MAX_CANDIDATES), extends each
  match backwards (vectorised) up to `suffix_decoding_max_tree_depth` tokens and keeps the longest-matching ones;
- walks their continuations like a frequency tree: at each depth the most frequent next token among the
  occurrences that agree with the draft so far, its probability = its share of them; the draft stops when the
  product of these probabilities falls below `suffix_decoding_min_token_prob`, at
  `suffix_decoding_max_spec_factor` x the match length, or at the engine's k.
So the draft length per request follows the match's confidence. The better of the two sources (expected accepted
tokens = the sum of the cumulative probabilities) is proposed. Matches need at least two tokens.
"""
from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass

import numpy as np

from vllm_lite.config import SpeculativeConfig
from vllm_lite.request import Request
from vllm_lite.spec_decode.ngram import TokenBuffer, match_lengths

MAX_CANDIDATES = 256  # most recent occurrences of a bigram looked at per lookup
SEPARATOR = -1  # between requests in the shared corpus: never matches a token, ends a continuation


class TokenIndex:
    """A growing token corpus with the end positions of every bigram (appended incrementally)."""

    def __init__(self) -> None:
        self.buffer = TokenBuffer()
        self.tokens: list[int] = []
        self.bigrams: dict[tuple[int, int], list[int]] = {}
        self.floor = 0  # positions below this are dropped (shared corpus eviction)

    def extend(self, new: list[int]) -> None:
        start = len(self.tokens)
        self.tokens.extend(new)
        self.buffer.sync(self.tokens)
        tokens, bigrams = self.tokens, self.bigrams
        for i in range(max(start, 1), len(tokens)):
            key = (tokens[i - 1], tokens[i])
            positions = bigrams.get(key)
            if positions is None:
                bigrams[key] = [i]
            else:
                positions.append(i)

    def candidates(self, pattern: np.ndarray, before: int) -> np.ndarray:
        """End positions e < before (and >= floor) of earlier occurrences of pattern's last two tokens."""
        positions = self.bigrams.get((int(pattern[-2]), int(pattern[-1])))
        if not positions:
            return np.empty(0, dtype=np.int64)
        ends = np.asarray(positions[-MAX_CANDIDATES - 1:], dtype=np.int64)
        return ends[(ends < before) & (ends - 1 >= self.floor)]


@dataclass
class Draft:
    tokens: list[int]
    score: float  # expected number of accepted tokens


def draft_from(index: TokenIndex, pattern: np.ndarray, before: int, k: int, max_depth: int, spec_factor: float,
               min_prob: float) -> Draft:
    """The frequency-tree draft of `index` for the suffix `pattern` (see the module docstring), from occurrences
    ending before position `before`."""
    if pattern.shape[0] < 2 or k <= 0:
        return Draft([], 0.0)
    ends = index.candidates(pattern, before)
    if ends.size == 0:
        return Draft([], 0.0)
    corpus = index.buffer.data[:len(index.tokens)]
    lengths = match_lengths(corpus, ends, pattern, max_depth)
    best = int(lengths.max())
    ends = ends[lengths == best]
    limit = min(k, int(spec_factor * best))
    if limit <= 0:
        return Draft([], 0.0)
    # Continuations [n, limit], SEPARATOR past the corpus end or a separator.
    cols = ends[:, None] + 1 + np.arange(limit)[None, :]
    conts = np.full(cols.shape, SEPARATOR, dtype=np.int64)
    inside = cols < corpus.shape[0]
    conts[inside] = corpus[cols[inside]]
    conts[np.cumsum(conts == SEPARATOR, axis=1) > 0] = SEPARATOR
    alive = np.ones(ends.shape[0], dtype=bool)
    tokens: list[int] = []
    prob, score = 1.0, 0.0
    for depth in range(limit):
        col = conts[alive, depth]
        valid = col != SEPARATOR
        if not valid.any():
            break
        values, counts = np.unique(col[valid], return_counts=True)
        top = counts.max()
        tied = values[counts == top]
        if tied.shape[0] > 1:  # the most recent occurrence decides a tie
            recent = col[valid][::-1]
            choice = int(recent[np.isin(recent, tied)][0])
        else:
            choice = int(tied[0])
        prob *= top / col.shape[0]
        if prob < min_prob:
            break
        tokens.append(choice)
        score += prob
        alive[alive] = col == choice
    return Draft(tokens, score)


class SharedOutputs:
    """The outputs of the last `max_requests` finished requests, one corpus with separators between them."""

    def __init__(self, max_requests: int) -> None:
        self.max_requests = max_requests
        self.index = TokenIndex()
        self.starts: deque[int] = deque()  # where each cached request's outputs begin

    def add(self, outputs: list[int]) -> None:
        if not outputs:
            return
        self.starts.append(len(self.index.tokens))
        self.index.extend(list(outputs) + [SEPARATOR])
        while len(self.starts) > self.max_requests:
            self.starts.popleft()
            self.index.floor = self.starts[0]
        if self.index.floor > len(self.index.tokens) // 2:  # compact: rebuild from the kept requests
            kept = self.index.tokens[self.index.floor:]
            self.starts = deque(s - self.index.floor for s in self.starts)
            self.index = TokenIndex()
            self.index.extend(kept)


class SuffixProposer:
    """Engine-core proposer for method "suffix"."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.max_depth = config.suffix_decoding_max_tree_depth
        self.spec_factor = config.suffix_decoding_max_spec_factor
        self.min_prob = config.suffix_decoding_min_token_prob
        self.shared = SharedOutputs(config.suffix_decoding_max_cached_requests)
        self._own: weakref.WeakKeyDictionary[Request, TokenIndex] = weakref.WeakKeyDictionary()

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        own = self._own.get(request)
        if own is None:
            own = self._own[request] = TokenIndex()
            num_prompt = request.num_prompt_tokens
            # When the request object goes (finished or aborted), its outputs join the shared corpus.
            weakref.finalize(request, self._retire, own, num_prompt)
        own.extend(request.all_token_ids[len(own.tokens):])
        total = len(own.tokens)
        pattern = own.buffer.data[max(0, total - self.max_depth):total]
        args = (max_tokens, self.max_depth, self.spec_factor, self.min_prob)
        mine = draft_from(own, pattern, total - 1, *args)
        theirs = draft_from(self.shared.index, pattern, len(self.shared.index.tokens), *args)
        return (theirs if theirs.score > mine.score else mine).tokens

    def _retire(self, own: TokenIndex, num_prompt: int) -> None:
        self.shared.add(own.tokens[num_prompt:])
