"""The adaptive draft-length rule with measured step costs (spec_decode/step_costs.py): robust medians, expiry, and
an engine whose verifying steps cost far more than plain ones turning speculation off while staying exact."""
from __future__ import annotations

import numpy as np
import pytest

from vllm_lite.config import SpeculativeConfig
from vllm_lite.sampling_params import SamplingParams
from vllm_lite.spec_decode.adaptive import VERIFY_OVERHEAD, AdaptiveDraftLength, best_lengths
from vllm_lite.spec_decode.step_costs import EXPIRY_STEPS, MIN_PLAIN, MIN_VERIFY, StepCosts, batch_bucket

from spec_utils import OracleProposer, make_core, run_core

KW = dict(device="cpu", dtype="float32", max_model_len=256, seed=0, block_size=4)


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 64, 65)] == [1, 2, 4, 4, 8, 8, 16, 64, 128]


def test_overhead_is_the_median_excess_over_the_share():
    costs = StepCosts()
    for _ in range(MIN_PLAIN):
        costs.observe(1, 1.0, 0, 0.001)
    for _ in range(MIN_VERIFY - 1):
        costs.observe(1, 1.08, 4, 0.0023)
    assert costs.overhead(1) is None  # too few verifying steps yet
    costs.observe(1, 1.08, 4, 0.0023)
    assert costs.overhead(1) == pytest.approx(2.3 - 1.08)
    assert costs.overhead(2) is None  # another bucket, nothing measured
    costs.observe(1, 1.08, 4, 0.5)  # a first compile: dropped, the median does not move
    costs.observe(1, 1.08, 4, 0.0030)
    assert costs.overhead(1) == pytest.approx(2.3 - 1.08)


def test_verify_steps_before_plain_ones_are_not_samples():
    costs = StepCosts()
    for _ in range(10):
        costs.observe(1, 1.08, 4, 0.005)
    for _ in range(MIN_PLAIN):
        costs.observe(1, 1.0, 0, 0.001)
    assert costs.overhead(1) is None


def test_samples_expire_so_the_estimate_comes_back():
    costs = StepCosts()
    for _ in range(MIN_PLAIN):
        costs.observe(1, 1.0, 0, 0.001)
    for _ in range(MIN_VERIFY):
        costs.observe(1, 1.08, 4, 0.004)
    assert costs.overhead(1) == pytest.approx(4 - 1.08)
    for _ in range(EXPIRY_STEPS):
        costs.observe(1, 1.0, 0, 0.001)
    assert costs.overhead(1) is None


def test_policy_uses_the_measured_overhead():
    cfg = SpeculativeConfig(method="ngram", num_speculative_tokens=4, adaptive_measured_costs=True)
    policy = AdaptiveDraftLength(cfg, all_or_none=True)
    assert policy.verify_overhead(1) == VERIFY_OVERHEAD
    for _ in range(MIN_PLAIN):
        policy.observe_step(1, 0, 0.00098)
    for _ in range(MIN_VERIFY):
        policy.observe_step(1, 2, 0.00227)  # padded to k = 4 by the worker: charged as 4 drafts
    over = policy.verify_overhead(1)
    assert over == pytest.approx(2.27 / 0.98 - 1 - 0.08, abs=0.01)
    a = np.array([0.5, 0.9])
    assert best_lengths(a, 4, 1, 256, True).tolist() == [4, 4]  # the estimate: both pay
    assert best_lengths(a, 4, 1, 256, True, over).tolist() == [0, 4]  # measured: only the high acceptance pays
    off = AdaptiveDraftLength(SpeculativeConfig(method="ngram", num_speculative_tokens=4,
                                                adaptive_measured_costs=False), all_or_none=True)
    for _ in range(MIN_PLAIN):
        off.observe_step(1, 0, 0.001)
    for _ in range(MIN_VERIFY):
        off.observe_step(1, 4, 0.005)
    assert off.costs is None and off.verify_overhead(1) == VERIFY_OVERHEAD
    with pytest.raises(ValueError, match="adaptive_measured_costs"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=4, adaptive_measured_costs="yes")


class _HalfRight(OracleProposer):
    """Two right drafts then wrong ones (acceptance about 2/3); nothing on every third call (plain steps)."""

    def __init__(self, reference: dict[str, list[int]], vocab_size: int) -> None:
        super().__init__(reference)
        self.vocab_size = vocab_size
        self.calls = 0

    def propose(self, request, k: int) -> list[int]:
        self.calls += 1
        if self.calls % 3 == 0:
            return []
        right = super().propose(request, k)
        return right[:2] + [(t + 5) % self.vocab_size for t in right[2:]]


@pytest.mark.parametrize("measured", [True, False])
def test_costly_verification_turns_speculation_off_and_stays_exact(tiny_llama_path, measured):
    params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    prompt = [[5, 17, 99, 3, 250, 7, 8]]
    plain = run_core(make_core(tiny_llama_path, **KW), prompt, params)
    reference = {"0": plain["0"]["tokens"]}
    spec = dict(method="ngram", num_speculative_tokens=4, adaptive_measured_costs=measured)
    core = make_core(tiny_llama_path, proposer=_HalfRight(reference, 384), speculative_config=spec, **KW)
    clock = [0.0]
    kinds: list[bool] = []  # per launched step: does it verify drafts?
    execute, get_output = core.executor.execute_model, core.executor.get_output

    def timed_execute(so):
        kinds.append(bool(so.scheduled_spec_decode_tokens))
        return execute(so)

    def timed_get_output():
        clock[0] += 0.006 if kinds.pop(0) else 0.001  # a verification costs six plain steps
        return get_output()

    core.executor.execute_model, core.executor.get_output = timed_execute, timed_get_output
    core._clock = lambda: clock[0]
    verified: list[int] = []
    record = core.scheduler._count_verification

    def counting(num_drafts: int, num_accepted: int) -> None:
        verified.append(len(core.scheduler.requests["0"].output_token_ids))
        record(num_drafts, num_accepted)

    core.scheduler._count_verification = counting
    out = run_core(core, prompt, params)
    assert out["0"]["tokens"] == plain["0"]["tokens"]  # exact either way
    late = [n for n in verified if n > 60]
    if measured:
        assert core.draft_policy.verify_overhead(1) > 4
        assert verified and not late, verified  # it verified early on, then stopped
    else:
        assert late  # the estimate keeps speculating
