"""EAGLE proposals on the device (spec_decode/padded_proposal.py), CPU, float32, tiny random models.

A uniform greedy verification step's proposal runs from device tensors only (the catch-up over every verified row,
decode positions from the accepted counts); it must draft exactly what the host path drafts, and what the head
computes from scratch over the whole sequence, while greedy outputs stay those of the plain run.
"""
from __future__ import annotations

import pytest

from vllm_lite.sampling_params import SamplingParams

from spec_utils import make_core, record_drafts, run_core
from test_spec_models import BASE, _prompts, _reference_drafts, make_eagle1_head, make_eagle3_head

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def _head(tmp_path, method: str) -> str:
    if method == "eagle":
        return make_eagle1_head(str(tmp_path / "e1"))
    return make_eagle3_head(str(tmp_path / "e3"), aux_layers=[1, 0, 1])


def _core(target: str, head: str, method: str, padded: bool, k: int = 3, adaptive: bool = False, **kw):
    spec = {"method": method, "model": head, "num_speculative_tokens": k, "adaptive_draft_length": adaptive,
            "disable_padded_drafter_batch": not padded}
    return make_core(target, speculative_config=spec, **{**BASE, **kw})


def _tokens(results: dict) -> dict:
    return {r: v["tokens"] for r, v in results.items()}


@pytest.fixture(scope="module")
def plain(tiny_llama_path):
    prompts = _prompts(4)
    return prompts, _tokens(run_core(make_core(tiny_llama_path, **BASE), prompts, GREEDY))


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_padded_proposals_draft_what_the_host_path_drafts(tiny_llama_path, plain, tmp_path, method,
                                                          async_scheduling):
    prompts, want = plain
    head = _head(tmp_path, method)
    runs = {}
    for padded in (True, False):
        core = _core(tiny_llama_path, head, method, padded, async_scheduling=async_scheduling)
        seen = record_drafts(core)
        assert _tokens(run_core(core, prompts, GREEDY)) == want
        runs[padded] = (seen, core.executor.runner.drafting.drafter)
    (seen_padded, drafter), (seen_host, host_drafter) = runs[True], runs[False]
    assert drafter.padded is not None and host_drafter.padded is None
    assert drafter.padded.num_proposals > 10  # most steps of this run verify k drafts for every request
    assert len(seen_padded) > 20 and sorted(seen_padded) == sorted(seen_host)


def test_padded_drafts_equal_a_from_scratch_computation(tiny_llama_path, tmp_path):
    core = _core(tiny_llama_path, _head(tmp_path, "eagle3"), "eagle3", True, max_num_batched_tokens=16)
    seen = record_drafts(core)
    run_core(core, _prompts(3), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    runner = core.executor.runner
    assert runner.drafting.drafter.padded.num_proposals > 3
    for tokens, drafts in seen[::2][:10]:
        assert drafts == _reference_drafts(runner, tokens, 3)


def test_steps_that_do_not_qualify_take_the_host_path(tiny_llama_path, plain, tmp_path):
    """Sampled requests beside greedy ones, and more requests than a proposal graph holds: the host path proposes
    those steps, greedy outputs stay the plain run's."""
    prompts, want = plain
    core = _core(tiny_llama_path, _head(tmp_path, "eagle3"), "eagle3", True)
    padded = core.executor.runner.drafting.drafter.padded
    padded.max_batch = 2
    params = [GREEDY, SamplingParams(temperature=0.8, seed=3, max_tokens=20, ignore_eos=True), GREEDY, GREEDY]
    got = _tokens(run_core(core, prompts, params))
    assert all(got[r] == want[r] for r in ("0", "2", "3"))
    assert core.scheduler.make_stats().num_draft_tokens > 0
    assert core.executor.runner.drafting.drafter.num_proposals - padded.num_proposals > 5


def test_config_flag_validated():
    from vllm_lite.config import SpeculativeConfig
    with pytest.raises(ValueError, match="disable_padded_drafter_batch"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=2, disable_padded_drafter_batch="yes")


def test_unseeded_sampling_requests_propose_on_the_device(tiny_llama_path, tmp_path):
    """Sampled drafts come with their distributions (softmax of the head's logits / temperature) for the rejection
    sampler; the device path draws them like the host path (same global-generator draws, same shapes), so with one
    global seed both runs produce the same tokens."""
    import torch

    head = _head(tmp_path, "eagle3")
    params = [SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.3, max_tokens=20, ignore_eos=True)]
    runs = {}
    for padded in (True, False):
        core = _core(tiny_llama_path, head, "eagle3", padded)
        torch.manual_seed(11)
        runs[padded] = (_tokens(run_core(core, _prompts(3), params)), core)
    (got, core), (want, _) = runs[True], runs[False]
    drafter = core.executor.runner.drafting.drafter
    assert drafter.padded.num_proposals > 10
    assert core.scheduler.make_stats().num_accepted_tokens > 0
    assert got == want


def test_plain_decode_steps_propose_on_the_device(tiny_llama_path, plain, tmp_path):
    """With the adaptive rule a random head's drafts are soon turned off: its plain decode steps (one token per
    request) propose on the device too, and draft what the host path drafts."""
    prompts, want = plain
    head = _head(tmp_path, "eagle3")
    runs = {}
    for padded in (True, False):
        core = _core(tiny_llama_path, head, "eagle3", padded, adaptive=True)
        seen = record_drafts(core)
        widths = []
        if padded:
            dev = core.executor.runner.drafting.drafter.padded
            propose = dev.propose

            def counted(sampled, *a, **kw):
                widths.append(sampled.shape[1])
                return propose(sampled, *a, **kw)

            dev.propose = counted
        assert _tokens(run_core(core, prompts, GREEDY)) == want
        runs[padded] = (seen, widths)
    (seen_padded, widths), (seen_host, _) = runs[True], runs[False]
    assert widths.count(1) > 5  # plain decode steps
    assert sorted(seen_padded) == sorted(seen_host)
