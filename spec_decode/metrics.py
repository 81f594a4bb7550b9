"""The engine's periodic speculative-decoding log line: acceptance over the last interval, from the scheduler's
cumulative counters (SchedulerStats), written only while requests are verifying drafts."""
from __future__ import annotations

import logging
import time

from vllm_lite.protocol import SchedulerStats

logger = logging.getLogger("vllm_lite.spec_decode")

LOG_INTERVAL_S = 5.0


def acceptance_summary(num_drafts: int, num_draft_tokens: int, num_accepted: int,
                       accepted_per_pos: list[int]) -> dict[str, float | list[float]]:
    """Mean acceptance length (tokens per verifying step, the bonus token included), acceptance rate, and the
    fraction of verifications that accepted the draft at each position."""
    if num_drafts <= 0:
        return {"mean_acceptance_length": 1.0, "acceptance_rate": 0.0, "per_position": []}
    return {"mean_acceptance_length": 1.0 + num_accepted / num_drafts,
            "acceptance_rate": num_accepted / max(num_draft_tokens, 1),
            "per_position": [n / num_drafts for n in accepted_per_pos]}


class SpecDecodeLogger:
    """Call `maybe_log(stats)` every step; it logs at most every LOG_INTERVAL_S seconds when drafts were verified."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.last_time = time.monotonic()
        self.last = SchedulerStats()

    def maybe_log(self, stats: SchedulerStats, extra: str = "") -> None:
        now = time.monotonic()
        if now - self.last_time < self.interval_s:
            return
        drafts = stats.num_drafts - self.last.num_drafts
        if drafts > 0:
            prev = self.last.num_accepted_tokens_per_pos
            per_pos = [n - (prev[i] if i < len(prev) else 0) for i, n in enumerate(stats.num_accepted_tokens_per_pos)]
            s = acceptance_summary(drafts, stats.num_draft_tokens - self.last.num_draft_tokens,
                                   stats.num_accepted_tokens - self.last.num_accepted_tokens, per_pos)
            logger.info("spec decode: mean acceptance length %.2f, acceptance rate %.1f%%, per-position acceptance "
                        "%s, %d verifications in %.1f s%s", s["mean_acceptance_length"], 100 * s["acceptance_rate"],
                        ", ".join(f"{x:.2f}" for x in s["per_position"]), drafts, now - self.last_time, extra)
        elif extra:  # speculating, but every request turned down: said, not silent
            logger.info("spec decode: no drafts verified in %.1f s%s", now - self.last_time, extra)
        self.last_time = now
        self.last = stats
