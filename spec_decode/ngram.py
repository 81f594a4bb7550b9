"""N-gram prompt lookup (vLLM's "ngram" method): drafts copied from earlier in the request's own tokens.

The longest suffix n-gram of the request's prompt + output (n in [prompt_lookup_min, prompt_lookup_max]) that
occurred earlier is looked up, and the k tokens that followed its most recent earlier occurrence are proposed.
Edit, summarise-and-quote and code-rewrite prompts repeat long spans of their input, so these drafts are often right
and cost no model. Each request's tokens live in a growing numpy buffer (appended per step, never rebuilt) and one
lookup is a few vectorised compares over the buffer.
"""
from __future__ import annotations

import weakref

import numpy as np

from vllm_lite.request import Request


class TokenBuffer:
    """A request's tokens as a numpy array that grows with the request (amortised O(1) appends)."""

    __slots__ = ("data", "size")

    def __init__(self) -> None:
        self.data = np.empty(256, dtype=np.int64)
        self.size = 0

    def sync(self, tokens: list[int]) -> np.ndarray:
        """Append what `tokens` gained since the last call; the request's tokens as an array view."""
        n = len(tokens)
        if n > self.data.shape[0]:
            grown = np.empty(max(n, 2 * self.data.shape[0]), dtype=np.int64)
            grown[:self.size] = self.data[:self.size]
            self.data = grown
        if n > self.size:
            self.data[self.size:n] = tokens[self.size:n]
        self.size = n
        return self.data[:n]


class RequestBuffers:
    """One TokenBuffer per live request, dropped with the request object (no finish hook needed)."""

    def __init__(self) -> None:
        self._buffers: weakref.WeakKeyDictionary[Request, TokenBuffer] = weakref.WeakKeyDictionary()

    def tokens(self, request: Request) -> np.ndarray:
        buf = self._buffers.get(request)
        if buf is None:
            buf = self._buffers[request] = TokenBuffer()
        return buf.sync(request.all_token_ids)


def match_lengths(corpus: np.ndarray, ends: np.ndarray, pattern: np.ndarray, max_len: int) -> np.ndarray:
    """For each candidate end e (corpus[e] == pattern[-1]), how many tokens of `pattern`'s tail corpus[..e] repeats,
    capped at max_len (vectorised over candidates; at most max_len compares each)."""
    match = np.ones(ends.shape[0], dtype=bool)
    length = np.ones(ends.shape[0], dtype=np.int64)
    for j in range(1, min(max_len, pattern.shape[0])):
        idx = ends - j
        match &= idx >= 0
        match[match] = corpus[idx[match]] == pattern[pattern.shape[0] - 1 - j]
        if not match.any():
            break
        length += match
    return length


def ngram_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix n-gram of `tokens`
    with min_n <= n <= max_n; empty when no such n-gram occurred earlier."""
    total = tokens.shape[0]
    if total < min_n + 1 or k <= 0:
        return tokens[:0]
    # Candidate ends e < total - 1 of an earlier occurrence: tokens[e] equals the last token.
    ends = np.flatnonzero(tokens[:total - 1] == tokens[total - 1])
    if ends.size == 0:
        return tokens[:0]
    length = match_lengths(tokens, ends, tokens, max_n)
    best = int(length.max())
    if best < min_n:
        return tokens[:0]
    start = int(ends[np.flatnonzero(length == best)[-1]]) + 1
    return tokens[start:start + k]


class NgramProposer:
    """Engine-core proposer for method "ngram"."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self.buffers = RequestBuffers()

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        return ngram_lookup(self.buffers.tokens(request), self.min_n, self.max_n, max_tokens).tolist()
