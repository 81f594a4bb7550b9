"""Keeping Python's cyclic garbage collector off the start-up heap.

After start-up a process holds ~0.5M long-lived objects (torch, the compiled model, inductor's caches, CUDA graphs)
that never become garbage. Every full collection walks all of them (~0.2 s on the development machine, several times
that on the H100 machine's host) and the steady allocations of a serving loop trigger one now and then: a stall of
the whole pipeline. `gc.freeze()` moves them into a permanent generation the collector skips (vLLM does the same).
"""
from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect once, then exempt everything alive from future collections (call when start-up is done)."""
    gc.collect()
    gc.freeze()
