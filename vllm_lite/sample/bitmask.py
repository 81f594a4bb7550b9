"""The step's grammar bitmask on the worker: packed rows from the engine core applied to the logits in place.

GrammarOutput rows follow the engine core's order of constrained requests; the logits rows follow the step's
sampling requests (1 + k rows for a request verifying k drafts). `GrammarBitmaskApplier` maps one onto the other
(a numpy range per constrained request), stages the words through pinned host buffers (two, alternating, each
reused only after the device has read it) and masks just those rows (kernels/bitmask.py: Triton on CUDA). In the
engine's process (the in-process executor) the engine core fills its mask straight into one of those buffers
(`host_buffer`), which is then copied to the device as it is.
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
        self._lent: tuple[int, int] | None = None  # (buffer, address) of the array host_buffer lent last
        self._rows = np.arange(256, dtype=np.int64)

    def host_buffer(self, rows: int, num_words: int) -> np.ndarray | None:
        """A [rows, num_words] int32 array in pinned host memory for the next step's mask (CUDA; None elsewhere):
        filled there, `apply` copies it to the device without staging it first (1.5 MB at 256 rows of the default
        vocabulary: 0.25 ms on the H200 machine's CPU). It is the buffer the device read two steps ago, once that
        copy has finished; a later call takes the lent array back."""
        if self.device.type != "cuda":
            return None
        turn = self._ready_buffer(packed_starts((rows * num_words, 2 * rows), 4)[-1])
        host = self._buffers[turn][0].numpy()[: rows * num_words].reshape(rows, num_words)
        self._lent = (turn, host.ctypes.data)
        return host

    def _ready_buffer(self, need: int) -> int:
        """The next buffer's index, holding `need` int32 at least, once the device has read its last copy."""
        if len(self._buffers) < 2 or self._buffers[self._turn][0].numel() < need:
            self._buffers = [(torch.empty(2 * need, dtype=torch.int32, pin_memory=True), None) for _ in range(2)]
            self._turn = 0
        buf, done = self._buffers[self._turn]
        if done is not None:
            done.synchronize()  # the copy that last read this buffer (two steps ago) has finished
            self._buffers[self._turn] = (buf, None)
        return self._turn

    def apply(self, logits: torch.Tensor, grammar: GrammarOutput, req_ids: list[str],
              row_offsets: list[int] | None = None) -> None:
        """logits [R, V] of the step's sampling rows; req_ids: the sampling requests in logits order;
        row_offsets: each one's first logits row, then R (None: one row each). Rows of requests without grammar
        rows stay untouched."""
        words = np.frombuffer(grammar.bitmask, dtype=np.int32).reshape(-1, grammar.num_words)
        m = len(grammar.req_ids)
        total = len(req_ids) if row_offsets is None else row_offsets[-1]
        if m == len(words) == total and grammar.req_ids == req_ids:
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
        offsets = np.arange(len(req_ids) + 1) if row_offsets is None else np.asarray(row_offsets, dtype=np.int64)
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
        """Words and destination rows on the device (one copy each through a pinned buffer on CUDA; the words in
        place where they were filled into the array host_buffer lent)."""
        m, w = words.shape
        if self.device.type != "cuda":
            return torch.from_numpy(np.array(words, dtype=np.int32)), torch.from_numpy(rows)  # own, writable copy
        lent, self._lent = self._lent, None
        _, rows_start, need = packed_starts((m * w, 2 * m), 4)  # the words, then the rows as int64 (two int32 each)
        if lent is not None and lent[1] == words.ctypes.data and words.flags.c_contiguous:
            turn = lent[0]  # the words are in place
            host = self._buffers[turn][0].numpy()
        else:
            if lent is not None and lent[0] == self._turn:  # the lent buffer holds this step's words: not that one
                self._turn ^= 1
            turn = self._ready_buffer(need)
            host = self._buffers[turn][0].numpy()
            host[: m * w].reshape(m, w)[:] = words
        buf = self._buffers[turn][0]
        host[rows_start: rows_start + 2 * m].view(np.int64)[:] = rows
        dev = buf[:need].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._buffers[turn] = (buf, event)
        self._turn = turn ^ 1
        return dev[: m * w].view(m, w), dev[rows_start: rows_start + 2 * m].view(torch.int64)


def pack_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """allowed [N, V] bool -> words [N, ceil(V / 32)] int32 (the inverse of unpack_bitmask; tests and tools)."""
    n, v = allowed.shape
    w = -(-v // 32)
    padded = torch.zeros(n, w * 32, dtype=torch.int64, device=allowed.device)
    padded[:, :v] = allowed.to(torch.int64)
    words = (padded.view(n, w, 32) << torch.arange(32, device=allowed.device)).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
