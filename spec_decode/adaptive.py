"""How many drafts each request verifies per step: speculation turns itself down when it would not pay.

The rule (an expected-gain model):
- Batch limit: with more than `disable_by_batch_size` running requests no request drafts (the proposers are not
  even called); crossing the limit either way is logged.
- Per request, a step that verifies j drafts yields E(j) = 1 + a + a^2 + ... + a^j tokens in expectation, where a is
  the request's measured acceptance rate (each draft accepted given the ones before it were; an exponentially
  weighted estimate over its recent verifications, pulled back toward PRIOR_ACCEPTANCE while it does not draft, so a
  request that was turned off is retried later).
- Its cost relative to a plain step is c(j) = R(B, j) + O(B) * [j > 0] + DRAFT_OVERHEAD * j, where
  R(B, j) = max(1, B (1 + j) / S) / max(1, B / S) is the roofline factor of computing 1 + j tokens for each of the B
  running requests instead of one (S = adaptive_saturation_tokens: below S tokens a step streams the weights and
  extra tokens are nearly free; above, its time grows with the tokens). O(B), a verifying step's overhead, is the
  estimate VERIFY_OVERHEAD, or with adaptive_measured_costs it is measured from the engine's step times where plain
  and verifying steps both ran at that batch size (spec_decode/step_costs.py).
- Each request verifies the j in [0, k] that maximises E(j) / c(j); j = 0 (no drafts) when nothing beats a plain
  step. adaptive_draft_length=False skips this part (always k, the batch limit still holds).
- Where steps replay CUDA graphs (captured for 1 and 1 + k tokens per request only), the worker pads a step to
  1 + k tokens per request, so j drafts cost what k do and j is 0 or k.
Drafting needs all of a request's tokens, so a speculating request's step waits for its previous one (no async
overlap). A request that got no drafts (none proposed, or j = 0) runs ahead with async scheduling instead; while it
runs ahead the engine core probes the proposer on its known tokens and makes it wait again as soon as a draft shows
up (`spec_wait`), so a request with nothing to draft keeps the overlap. Probes that find nothing come further apart
(every 1, 2, 4, ... up to MAX_PROBE_INTERVAL of its steps; every step again after a hit), which keeps the proposers'
host time small for requests that never repeat. While the batch limit pauses speculation every request runs ahead.
"""
from __future__ import annotations

import functools
import logging
import weakref

import numpy as np

from vllm_lite.config import SpeculativeConfig
from vllm_lite.request import Request
from vllm_lite.spec_decode.step_costs import StepCosts

logger = logging.getLogger("vllm_lite.spec_decode")

PRIOR_ACCEPTANCE = 0.5  # acceptance assumed for a request with no history ...
PRIOR_WEIGHT = 0.5  # ... worth half a verified draft
DECAY = 0.85  # weight of the history per verification (about the last 7 count), and per step without drafts
VERIFY_OVERHEAD = 0.1  # a verifying step's fixed extra cost (rejection sampling, no async overlap), in steps
DRAFT_OVERHEAD = 0.02  # each draft's extra cost (proposing, attention over one more row), in steps
MAX_PROBE_INTERVAL = 4  # most steps between two probes of a request running ahead


class AdaptiveDraftLength:
    """Per-step draft lengths from the batch size and each request's measured acceptance."""

    def __init__(self, config: SpeculativeConfig, all_or_none: bool = False) -> None:
        """all_or_none: draft lengths are 0 or k (the runner pads verification steps to 1 + k tokens per request)."""
        self.k = config.num_speculative_tokens
        self.all_or_none = all_or_none
        self.batch_limit = config.disable_by_batch_size
        self.adaptive = config.adaptive_draft_length
        self.saturation = config.adaptive_saturation_tokens
        # request -> [accepted, trials], both exponentially decayed
        self._history: weakref.WeakKeyDictionary[Request, list[float]] = weakref.WeakKeyDictionary()
        # request running ahead -> [probe interval, steps until the next probe]
        self._probes: weakref.WeakKeyDictionary[Request, list[int]] = weakref.WeakKeyDictionary()
        self._disabled_by_batch = False
        self.num_turned_off = 0  # requests given no drafts by the gain rule in the last call
        self.costs = StepCosts() if self.adaptive and config.adaptive_measured_costs else None

    def allows(self, num_running: int) -> bool:
        """False while the batch is over `disable_by_batch_size` (the change is logged once each way)."""
        over = self.batch_limit is not None and num_running > self.batch_limit
        if over != self._disabled_by_batch:
            self._disabled_by_batch = over
            if over:
                logger.info("speculative decoding paused: %d running requests > disable_by_batch_size=%d",
                            num_running, self.batch_limit)
            else:
                logger.info("speculative decoding resumed: %d running requests <= disable_by_batch_size=%d",
                            num_running, self.batch_limit)
        return not over

    def observe_step(self, num_requests: int, num_drafts: int, seconds: float) -> None:
        """The engine's time for an applied step of `num_requests` requests that each computed 1 + num_drafts
        tokens (num_drafts: the step's longest draft; k where the worker pads verification steps)."""
        if self.costs is None:
            return
        if self.all_or_none and num_drafts:
            num_drafts = self.k
        share = roofline(num_requests, num_drafts, self.saturation) + DRAFT_OVERHEAD * num_drafts
        self.costs.observe(num_requests, share, num_drafts, seconds)

    def verify_overhead(self, num_running: int) -> float:
        """O(B) of the rule: measured at this batch size where it has been, else the estimate."""
        measured = None if self.costs is None else self.costs.overhead(num_running)
        return VERIFY_OVERHEAD if measured is None else round(measured, 2)

    def observe(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        """A verification of `num_drafts` drafts accepted the first `num_accepted` of them."""
        h = self._history.get(request)
        if h is None:
            h = self._history[request] = [0.0, 0.0]
        # Geometric model: every accepted draft is a success, the first rejected one (if any) a failure.
        h[0] = DECAY * h[0] + num_accepted
        h[1] = DECAY * h[1] + num_accepted + (num_accepted < num_drafts)

    def acceptance(self, request: Request) -> float:
        h = self._history.get(request)
        acc, trials = (0.0, 0.0) if h is None else h
        return (acc + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (trials + PRIOR_WEIGHT)

    def draft_lengths(self, requests: list[Request], num_running: int) -> np.ndarray:
        """Drafts to ask for, per request (0: none this step)."""
        n = len(requests)
        if not self.adaptive or n == 0:
            self.num_turned_off = 0
            return np.full(n, self.k, dtype=np.int64)
        a = np.fromiter((self.acceptance(r) for r in requests), dtype=np.float64, count=n)
        lengths = best_lengths(a, self.k, num_running, self.saturation, self.all_or_none,
                               self.verify_overhead(num_running))
        self.num_turned_off = int((lengths == 0).sum())
        return lengths

    def idle(self, requests: list[Request]) -> None:
        """These requests got no drafts for their next step: their history fades toward the prior, and they run
        ahead (async) until a probe finds drafts again."""
        for request in requests:
            h = self._history.get(request)
            if h is not None:
                h[0] *= DECAY
                h[1] *= DECAY
            request.spec_wait = False

    def drafted(self, request: Request) -> None:
        """The request verifies drafts next (or a probe found some): each of its steps waits for the previous one
        again, and its probes start over at every step."""
        self._probes.pop(request, None)
        request.spec_wait = True

    def probe_due(self, request: Request) -> bool:
        """One more step of a request running ahead: is it probed now?"""
        p = self._probes.get(request)
        if p is None:
            return True
        p[1] -= 1
        return p[1] <= 0

    def probe_missed(self, request: Request) -> None:
        """A probe found no drafts: the next one comes after twice the interval (at most MAX_PROBE_INTERVAL)."""
        p = self._probes.get(request)
        interval = 1 if p is None else min(2 * p[0], MAX_PROBE_INTERVAL)
        self._probes[request] = [interval, interval]


_SCALAR_MAX = 16  # up to this many requests the rule runs on Python floats (no numpy call overhead per step)


def roofline(num_running: int, num_drafts: int, saturation: int) -> float:
    """R(B, j): a step of 1 + j tokens per request against a plain step, from the token count alone."""
    return max(1.0, num_running * (1 + num_drafts) / saturation) / max(1.0, num_running / saturation)


@functools.lru_cache(maxsize=1024)
def _choices(k: int, num_running: int, saturation: int, all_or_none: bool,
             overhead: float) -> tuple[np.ndarray, np.ndarray]:
    """The draft lengths j considered and their costs c(j) (the module docstring's rule), per batch size and
    verifying overhead."""
    j = np.array([0, k]) if all_or_none else np.arange(k + 1)
    cost = np.array([roofline(num_running, int(x), saturation) for x in j]) + overhead * (j > 0) + DRAFT_OVERHEAD * j
    j.flags.writeable = cost.flags.writeable = False
    return j, cost


def best_lengths(acceptance: np.ndarray, k: int, num_running: int, saturation: int,
                 all_or_none: bool = False, overhead: float = VERIFY_OVERHEAD) -> np.ndarray:
    """argmax over j in [0, k] (or j in {0, k}) of E(j) / c(j) for each acceptance rate (the module docstring's
    rule; `overhead`: O(B)). The costs are cached per batch size; a few requests (batch-1 speculation: every step)
    are scored with Python floats, the same operations in the same order as the vectorised path
    (`_best_lengths_np`)."""
    j, cost = _choices(k, num_running, saturation, all_or_none, overhead)
    if len(acceptance) > _SCALAR_MAX:
        return _best_lengths_np(acceptance, k, j, cost)
    js, costs = j.tolist(), cost.tolist()
    out = []
    for a in acceptance.tolist():
        expected, total = [], 0.0
        for i in range(k + 1):
            total += a ** i
            expected.append(total)
        best, best_j = None, 0
        for jj, c in zip(js, costs):
            ratio = expected[jj] / c
            if best is None or ratio > best:
                best, best_j = ratio, jj
        out.append(best_j)
    return np.array(out, dtype=np.int64)


def _best_lengths_np(acceptance: np.ndarray, k: int, j: np.ndarray, cost: np.ndarray) -> np.ndarray:
    expected = np.cumsum(acceptance[:, None] ** np.arange(k + 1)[None, :], axis=1)[:, j]  # E(j) = sum_{i<=j} a^i
    return j[np.argmax(expected / cost[None, :], axis=1)].astype(np.int64)
