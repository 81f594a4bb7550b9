"""The measured price of a verifying step, for the adaptive draft-length rule (spec_decode/adaptive.py).

The rule's fixed estimate (a verifying step costs 0.1 plain steps more than its roofline share) held on the CPU,
where the forward dominates. On the H200 at batch 1 a verification of 4 drafts took 2.27 ms against 0.98 ms for a
plain step (docs/PERF.md): the step waits for its tokens before the next one is drafted, so its host work is not
overlapped. At that price speculation with acceptance below about 0.6 is slower than none, while the estimate still
said it paid.

So the engine reports the wall time between consecutive applied steps (its cadence: host work, waits and device time
together) with the step's shape, and this keeps, per batch-size bucket (1, 2, 4, 8, ...), the median of the recent
plain steps and of the recent verifying steps' overhead over their roofline share, in plain steps. Medians shrug off
the odd slow step (a first compile, a collection); a step more than OUTLIER times the plain median is dropped.
Samples expire after EXPIRY_STEPS steps of their bucket, so a rule that turned speculation off falls back to the
estimate now and then, verifies a few steps and measures again.
"""
from __future__ import annotations

import statistics
from collections import deque

WINDOW = 16  # recent samples kept per bucket and kind
MIN_PLAIN = 8  # plain steps measured before a bucket's verifying overhead is computed
MIN_VERIFY = 4  # verifying steps measured before the measured overhead replaces the estimate
EXPIRY_STEPS = 2000  # steps of a bucket after which a sample no longer counts
OUTLIER = 20.0  # a step slower than this many plain steps is not a sample
REFRESH_STEPS = 64  # a median is recomputed after a new sample, or this many steps (so samples expire)
MAX_OVERHEAD = 8.0


def batch_bucket(num_requests: int) -> int:
    """1, 2, 4, 8, ...: the smallest power of two >= num_requests."""
    return 1 << max(num_requests - 1, 0).bit_length()


class StepCosts:
    def __init__(self) -> None:
        self._plain: dict[int, deque[tuple[int, float]]] = {}  # bucket -> (step, seconds)
        self._over: dict[int, deque[tuple[int, float]]] = {}  # bucket -> (step, overhead in plain steps)
        self._steps: dict[int, int] = {}  # bucket -> steps observed
        # bucket -> (median, step computed at): recomputed after a new sample or REFRESH_STEPS steps (expiry)
        self._plain_median: dict[int, tuple[float | None, int]] = {}
        self._overhead: dict[int, tuple[float | None, int]] = {}

    def observe(self, num_requests: int, share: float, num_drafts: int, seconds: float) -> None:
        """One applied step of `num_requests` requests, each computing 1 + num_drafts tokens; `share`: what the
        rule charges such a step in plain steps without its overhead (roofline and per-draft costs)."""
        bucket = batch_bucket(num_requests)
        step = self._steps[bucket] = self._steps.get(bucket, 0) + 1
        plain = self._cached(self._plain_median, self._plain, bucket, step, 1)
        if plain is not None and seconds > OUTLIER * plain:
            return
        if num_drafts == 0:
            self._plain.setdefault(bucket, deque(maxlen=WINDOW)).append((step, seconds))
            self._plain_median.pop(bucket, None)
            return
        samples = self._plain.get(bucket)
        if plain is None or samples is None or len(samples) < MIN_PLAIN:
            return
        overhead = min(max(seconds / plain - share, 0.0), MAX_OVERHEAD)
        self._over.setdefault(bucket, deque(maxlen=WINDOW)).append((step, overhead))
        self._overhead.pop(bucket, None)

    def overhead(self, num_requests: int) -> float | None:
        """The measured overhead of a verifying step at this batch size, in plain steps (None: not measured)."""
        bucket = batch_bucket(num_requests)
        return self._cached(self._overhead, self._over, bucket, self._steps.get(bucket, 0), MIN_VERIFY)

    @staticmethod
    def _cached(cache: dict[int, tuple[float | None, int]], samples: dict[int, deque[tuple[int, float]]],
                bucket: int, step: int, min_count: int) -> float | None:
        """The median of a bucket's live samples (None: fewer than min_count), cached for REFRESH_STEPS steps."""
        hit = cache.get(bucket)
        if hit is not None and step - hit[1] < REFRESH_STEPS:
            return hit[0]
        live = [v for s, v in samples.get(bucket, ()) if step - s < EXPIRY_STEPS]
        value = statistics.median(live) if len(live) >= min_count else None
        cache[bucket] = (value, step)
        return value
