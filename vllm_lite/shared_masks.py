"""A step's grammar bitmask through shared memory, between the engine core and worker processes.

In the server the workers are processes, and the mask rows (1.5 MB at 256 rows of the default vocabulary) used to
travel inside each SampleTokens message: msgspec copied them into the message, ZeroMQ through the socket, and the
worker decoded them into a new bytes object, about 1 ms a step of copies on the development machine split over the
two processes. Instead the engine core fills them straight into one of a few shared-memory slots (`MaskSlots`,
lent like the in-process worker's pinned buffer) and the message names the slot's segment; the worker maps it
(`attach_rows`) and reads the rows in place.

A slot is lent again only once the engine core has received the output of the step after the one that used it:
every rank handles its SampleTokens calls in order, and a rank cannot pass the next step's forward (its collectives
need every rank) before it has read the previous step's rows.
"""
from __future__ import annotations

import logging
import os
from multiprocessing import shared_memory

import numpy as np

from vllm_lite.protocol import GrammarOutput

logger = logging.getLogger("vllm_lite.shared_masks")

_MIN_BYTES = 1 << 20
_MAPPED_MAX = 8  # segments a worker keeps mapped (slots, and the old segments of slots that grew)
_SHM_DIR = "/dev/shm"


class _Segment(shared_memory.SharedMemory):
    """A SharedMemory whose collection does not complain while arrays still view it: its mapping then lives on
    with them and goes with the last one."""

    def __del__(self) -> None:
        try:
            self.close()
        except (BufferError, OSError):
            pass


def _create_segment(size: int) -> shared_memory.SharedMemory | None:
    """A new segment of `size` bytes with its memory reserved, or None where shared memory is short (a container's
    /dev/shm is often 64 MB, and NCCL uses it too). tmpfs gives pages only when they are first written, and a write
    it cannot back kills the process (SIGBUS), so the space is checked and then reserved at once (posix_fallocate
    fails cleanly instead)."""
    if os.path.isdir(_SHM_DIR):
        st = os.statvfs(_SHM_DIR)
        if st.f_bavail * st.f_frsize < 2 * size:
            return None
    try:
        segment = _Segment(create=True, size=size)
    except OSError:
        return None
    fd = getattr(segment, "_fd", -1)
    if fd >= 0 and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            segment.close()
            segment.unlink()
            return None
    return segment


class MaskSlots:
    """The engine-core side: `lend` a slot's rows to fill, `outgoing` for each SampleTokens call (the mask in a slot
    goes by name), `output_received` for each step output; `close` unlinks the segments."""

    def __init__(self, count: int = 3) -> None:
        self._segments: list[shared_memory.SharedMemory | None] = [None] * count
        self._last_use = [-2] * count  # index of the SampleTokens call that last sent each slot (-2: none)
        self._sampled = 0  # SampleTokens calls so far
        self._outputs = 0  # step outputs received so far
        self._lent: tuple[int, np.ndarray] | None = None
        self._disabled = False  # shared memory ran short once: every mask goes in the message from then on
        self._retired: list[shared_memory.SharedMemory] = []  # unlinked, closed once no array views them

    def lend(self, rows: int, num_words: int) -> np.ndarray | None:
        """A [rows, num_words] int32 array in a free slot (None: none is free yet, or shared memory is short; the
        mask then travels in the message). A later call takes the lent array back."""
        self._lent = None
        need = rows * num_words * 4
        free = [k for k, used in enumerate(self._last_use) if self._outputs >= used + 2]
        if not free or need == 0 or self._disabled:
            return None
        slot = min(free, key=lambda k: self._last_use[k])
        segment = self._segments[slot]
        self._close_retired()
        if segment is None or segment.size < need:
            if segment is not None:
                self._retire(segment)
                self._segments[slot] = None
            segment = _create_segment(max(need + need // 4, _MIN_BYTES))
            if segment is None:
                self._disabled = True
                logger.warning("shared memory (%s) is short: grammar masks go to the workers inside the step "
                               "messages from now on (slower at large batches)", _SHM_DIR)
                return None
            self._segments[slot] = segment
        rows_view = np.ndarray((rows, num_words), dtype=np.int32, buffer=segment.buf)
        self._lent = (slot, rows_view)
        return rows_view

    def outgoing(self, grammar: GrammarOutput | None) -> GrammarOutput | None:
        """The grammar to send with this SampleTokens call: rows filled in the slot lent last go by the slot's name,
        anything else as it is."""
        index, self._sampled = self._sampled, self._sampled + 1
        lent, self._lent = self._lent, None
        if grammar is None or lent is None:
            return grammar
        slot, rows_view = lent
        if not (isinstance(grammar.bitmask, memoryview) and grammar.bitmask.obj is rows_view):
            return grammar
        self._last_use[slot] = index
        return GrammarOutput(grammar.req_ids, grammar.rows_per_req, grammar.num_words, b"",
                             self._segments[slot].name)

    def output_received(self) -> None:
        self._outputs += 1

    def close(self) -> None:
        for k, segment in enumerate(self._segments):
            if segment is not None:
                self._retire(segment)
                self._segments[k] = None
        self._close_retired()

    def _retire(self, segment: shared_memory.SharedMemory) -> None:
        """Unlink now (the name goes; mappings stay valid), close once nothing views it: an array over the old rows
        may still be alive in the caller (a step's GrammarOutput not yet collected)."""
        segment.unlink()
        self._retired.append(segment)

    def _close_retired(self) -> None:
        kept = []
        for segment in self._retired:
            try:
                segment.close()
            except BufferError:
                kept.append(segment)
        self._retired = kept


class MaskReader:
    """The worker side: the segments it has mapped, by name."""

    def __init__(self) -> None:
        self._mapped: dict[str, shared_memory.SharedMemory] = {}

    def attach_rows(self, grammar: GrammarOutput) -> None:
        """Point a received grammar's bitmask at its rows in shared memory (it names a segment), in place."""
        if not grammar.shared:
            return
        segment = self._mapped.get(grammar.shared)
        if segment is None:
            segment = self._mapped[grammar.shared] = _Segment(name=grammar.shared)
            self._unmap_oldest()
        grammar.bitmask = segment.buf[: sum(grammar.rows_per_req) * grammar.num_words * 4]

    def _unmap_oldest(self) -> None:
        """Keep at most _MAPPED_MAX mappings: the oldest go (one still viewed stays until a later call)."""
        for name in list(self._mapped)[: max(0, len(self._mapped) - _MAPPED_MAX)]:
            try:
                self._mapped[name].close()
            except BufferError:  # rows of it are still referenced
                continue
            del self._mapped[name]

    def close(self) -> None:
        for segment in self._mapped.values():
            try:
                segment.close()
            except BufferError:
                pass
        self._mapped.clear()
