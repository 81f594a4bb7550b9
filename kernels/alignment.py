"""Where segments packed into one staging buffer start: each on an aligned boundary.

Triton (and inductor) specialise a kernel on whether each pointer argument is 16-byte aligned. A segment that starts
off a boundary only sometimes (after an odd count) therefore compiles another variant in the middle of serving,
stalling every running request's step. Every packer of kernel inputs lays its segments out with `packed_starts`.
"""
from __future__ import annotations

from collections.abc import Sequence

ALIGN_BYTES = 16


def packed_starts(sizes: Sequence[int], itemsize: int, align_bytes: int = ALIGN_BYTES) -> list[int]:
    """Element offsets of segments of `sizes` elements (`itemsize` bytes each) packed back to back, every one
    starting on an `align_bytes` boundary; the last entry is the padded total."""
    step = max(align_bytes // itemsize, 1)
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + -(-n // step) * step)
    return starts
