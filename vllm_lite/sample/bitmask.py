"""The step's grammar bitmask on the worker: packed rows from the engine core applied to the logits in place.

GrammarOutput rows follow the engine core's order of constrained requests; the logits rows follow the step's
sampling requests (1 + k rows for a request verifying k drafts). `GrammarBitmaskApplier` maps one onto the other
(a numpy range per constrained request), stages the words through pinned host buffers (two, alternating, each
reused only after the device has read it) and masks just those rows (kernels/bitmask.py: Triton on CUDA).
"""
from __future__ import annotations

import numpy as np
import torch

from vllm_lite.kernels.alignment import packed_starts
from vllm_lite.kernels.bitmask import apply_bitmask, unpack_bitmask  # noqa: F401 (unpack: re-exported for tools)
from vllm_lite.protocol import GrammarOutput


class GrammarBitmaskApplier:
    """Applies GrammarOutputs to a device's logits; holds the reusable host staging buffers."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._turn = 0
        self._rows = np.arange(256, dtype=np.int64)

    def apply(self, logits: torch.Tensor, grammar: GrammarOutput, req_ids: list[str], row_offsets: list[int]) -> None:
        """logits [R, V] of the step's sampling rows; req_ids: the sampling requests in logits order;
        row_offsets: each one's first logits row, then R. Rows of requests without grammar rows stay untouched."""
        words = np.frombuffer(grammar.bitmask, dtype=np.int32).reshape(-1, grammar.num_words)
        m = len(grammar.req_ids)
        if m == len(words) == row_offsets[-1] and grammar.req_ids == req_ids:
            # Every sampling row is constrained, one row each, in order (batch 1, or a batch of grammars without
            # drafts): grammar row i masks logits row i, no index work.
            words_t, rows_t = self._stage(words, self._arange(m))
            apply_bitmask(logits, words_t, rows_t)
            return
        where = {r: j for j, r in enumerate(req_ids)}
        j = np.fromiter((where.get(r, -1) for r in grammar.req_ids), dtype=np.int64, count=m)
        keep = j >= 0
        if not keep.any():
            return
        n = np.fromiter(grammar.rows_per_req, dtype=np.int64, count=m)
        first = np.cumsum(n) - n  # each constrained request's first grammar row
        offsets = np.asarray(row_offsets, dtype=np.int64)
        j = j[keep]
        k = np.minimum(n[keep], offsets[j + 1] - offsets[j])  # rows masked per request (its logits rows at most)
        within = np.arange(int(k.sum()), dtype=np.int64) - np.repeat(np.cumsum(k) - k, k)
        src_rows = np.repeat(first[keep], k) + within
        dst_rows = np.repeat(offsets[j], k) + within
        if len(src_rows) != len(words) or src_rows[-1] != len(words) - 1:  # not simply all rows in order
            words = words[src_rows]
        words_t, rows_t = self._stage(words, dst_rows)
        apply_bitmask(logits, words_t, rows_t)

    def _arange(self, m: int) -> np.ndarray:
        if len(self._rows) < m:
            self._rows = np.arange(max(m, 2 * len(self._rows)), dtype=np.int64)
        return self._rows[:m]

    def _stage(self, words: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Words and destination rows on the device (one copy each through a pinned buffer on CUDA)."""
        m, w = words.shape
        if self.device.type != "cuda":
            return torch.from_numpy(np.array(words, dtype=np.int32)), torch.from_numpy(rows)  # own, writable copy
        _, start, need = packed_starts((2 * m, m * w), 4)  # the rows as int64 (two int32 slots each), the words
        if len(self._buffers) < 2 or self._buffers[self._turn][0].numel() < need:
            self._buffers = [(torch.empty(2 * need, dtype=torch.int32, pin_memory=True), None) for _ in range(2)]
            self._turn = 0
        buf, done = self._buffers[self._turn]
        if done is not None:
            done.synchronize()  # the copy that last read this buffer (two steps ago) has finished
        host = buf.numpy()
        host[: 2 * m].view(np.int64)[:] = rows
        host[start: need].reshape(m, w)[:] = words
        dev = buf[:need].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._buffers[self._turn] = (buf, event)
        self._turn ^= 1
        return dev[start:].view(m, w), dev[: 2 * m].view(torch.int64)


def pack_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """allowed [N, V] bool -> words [N, ceil(V / 32)] int32 (the inverse of unpack_bitmask; tests and tools)."""
    n, v = allowed.shape
    w = -(-v // 32)
    padded = torch.zeros(n, w * 32, dtype=torch.int64, device=allowed.device)
    padded[:, :v] = allowed.to(torch.int64)
    words = (padded.view(n, w, 32) << torch.arange(32, device=allowed.device)).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
