"""The grammar masks' shared-memory slots (vllm_lite/shared_masks.py), without processes: when a slot may be lent
again, what goes in the message, growth and shutdown while an array still views a segment, the fallback to the
message when shared memory is short, and the worker side's mapping."""
from __future__ import annotations

import os

import numpy as np
import pytest

import vllm_lite.shared_masks as shared_masks
from vllm_lite.protocol import GrammarOutput
from vllm_lite.shared_masks import MaskReader, MaskSlots


def _grammar(rows: np.ndarray) -> GrammarOutput:
    n = rows.shape[0]
    return GrammarOutput([str(i) for i in range(n)], [1] * n, rows.shape[1], memoryview(rows).cast("B"))


def test_a_slot_is_lent_again_once_the_next_steps_output_is_back():
    slots, reader = MaskSlots(count=3), MaskReader()
    sent = []
    for step in range(3):  # three steps in flight at most: one slot each
        rows = slots.lend(4, 8)
        assert rows is not None
        rows[:] = step
        sent.append(slots.outgoing(_grammar(rows)))
    assert len({g.shared for g in sent}) == 3 and all(g.bitmask == b"" for g in sent)
    assert slots.lend(4, 8) is None  # no output back yet: every slot may still be read
    assert slots.outgoing(_grammar(np.zeros((4, 8), np.int32))).bitmask != b""  # the mask went in the message
    slots.output_received()  # step 0's output: its slot may still be read by a rank behind
    assert slots.lend(4, 8) is None
    slots.outgoing(None)
    slots.output_received()  # step 1's output: every rank has read step 0's rows
    rows = slots.lend(4, 8)
    assert rows is not None and rows.base is not None
    for step, grammar in enumerate(sent[1:], start=1):  # the worker side reads each slot's rows in place
        reader.attach_rows(grammar)
        assert (np.frombuffer(grammar.bitmask, np.int32) == step).all()
    sent[1] = sent[2] = None
    reader.close()
    slots.close()
    assert not any(os.path.exists(f"/dev/shm/{g.shared}") for g in sent if g is not None)


def test_growth_and_close_while_an_array_views_the_old_rows():
    slots = MaskSlots(count=1)
    small = slots.lend(2, 8)
    name = slots.outgoing(_grammar(small)).shared
    slots.output_received()
    slots.output_received()
    big = slots.lend(1024, 1536)  # 6 MB: a new segment; `small` still views the old one
    assert big is not None and big.shape == (1024, 1536)
    grown = slots.outgoing(_grammar(big)).shared
    assert grown != name and not os.path.exists(f"/dev/shm/{name}")  # unlinked at once
    small[:] = 1  # the old mapping stays valid while viewed
    slots.close()  # no BufferError although `small` and `big` view the segments
    assert not os.path.exists(f"/dev/shm/{grown}")
    del small, big


def test_short_shared_memory_falls_back_to_the_message(monkeypatch, caplog):
    monkeypatch.setattr(shared_masks, "_create_segment", lambda size: None)
    slots = MaskSlots()
    assert slots.lend(4, 8) is None
    rows = np.ones((4, 8), np.int32)
    assert slots.outgoing(_grammar(rows)).bitmask == memoryview(rows).cast("B")
    assert "short" in caplog.text
    monkeypatch.undo()
    assert slots.lend(4, 8) is None  # once short, always the message (no repeated attempts)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="Linux shared memory")
def test_segments_are_not_created_without_room(monkeypatch):
    class Stat:
        f_bavail, f_frsize = 10, 4096  # 40 KB free

    monkeypatch.setattr(shared_masks.os, "statvfs", lambda path: Stat())
    assert shared_masks._create_segment(1 << 20) is None
