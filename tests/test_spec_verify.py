"""Verifying 1 + k tokens per request in one step (the foundation of speculative decoding), with test-only
proposers: drafts equal to the target's own greedy tokens are all accepted, wrong drafts are all rejected, and the
outputs equal the plain run's token for token either way (sync and async scheduling, chunked prefill, small blocks,
logprobs, min_tokens, stop ids). The rejection sampler's random path keeps the target distribution exactly."""
from __future__ import annotations

import random

import pytest
import torch

from vllm_lite.sample.metadata import SamplingMetadata
from vllm_lite.sampling_params import SamplingParams
from vllm_lite.spec_decode.rejection_sampler import rejection_sample

from spec_utils import AllowOnly, OracleProposer, WrongProposer, make_core, run_core

BASE = dict(device="cpu", dtype="float32", block_size=4, max_model_len=256)


def _prompts(n: int = 5, vocab: int = 384) -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


@pytest.fixture(scope="module")
def plain(tiny_qwen3_path):
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2)
    prompts = _prompts()
    return prompts, params, run_core(make_core(tiny_qwen3_path, **BASE), prompts, params)


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_oracle_drafts_all_accepted_and_outputs_identical(tiny_qwen3_path, plain, async_scheduling, k):
    prompts, params, ref = plain
    proposer = OracleProposer({r: v["tokens"] for r, v in ref.items()})
    core = make_core(tiny_qwen3_path, proposer=proposer, async_scheduling=async_scheduling,
                     num_speculative_tokens=k, **BASE)
    got = run_core(core, prompts, params)
    assert {r: v["tokens"] for r, v in got.items()} == {r: v["tokens"] for r, v in ref.items()}
    for r in ref:  # logprobs of every verified position match the plain run's
        for mine, theirs in zip(got[r]["logprobs"], ref[r]["logprobs"]):
            assert [t for t, _, _ in mine] == [t for t, _, _ in theirs]
            assert [lp for _, lp, _ in mine] == pytest.approx([lp for _, lp, _ in theirs], abs=1e-4)
    stats = core.scheduler.make_stats()
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    # Fewer steps than tokens: several tokens per step.
    assert core.executor.runner._launches < sum(len(v["tokens"]) for v in ref.values())


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_wrong_drafts_all_rejected_and_outputs_identical(tiny_qwen3_path, plain, async_scheduling):
    prompts, params, ref = plain
    proposer = WrongProposer({r: v["tokens"] for r, v in ref.items()}, vocab_size=384)
    core = make_core(tiny_qwen3_path, proposer=proposer, async_scheduling=async_scheduling,
                     num_speculative_tokens=3, **BASE)
    got = run_core(core, prompts, params)
    assert {r: v["tokens"] for r, v in got.items()} == {r: v["tokens"] for r, v in ref.items()}
    stats = core.scheduler.make_stats()
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == 0


def test_verification_with_chunked_prefill_stops_and_min_tokens(tiny_llama_path):
    prompts = _prompts(6)
    params = [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=min(n, 3)) for n in (1, 2, 5, 9, 17, 30)]
    kw = dict(BASE, max_num_batched_tokens=24)
    ref = run_core(make_core(tiny_llama_path, **kw), prompts, params)
    proposer = OracleProposer({r: v["tokens"] for r, v in ref.items()})
    got = run_core(make_core(tiny_llama_path, proposer=proposer, num_speculative_tokens=4, **kw), prompts, params)
    assert got == ref


def test_grammar_bitmask_constrains_plain_and_verified_steps(tiny_qwen3_path):
    prompts = _prompts(3)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    allowed = {11, 42, 77, 300}
    grammar = AllowOnly(allowed, 384, constrained={"0", "2"})
    ref = run_core(make_core(tiny_qwen3_path, grammar=grammar, **BASE), prompts, params)
    assert grammar.calls > 0
    assert set(ref["0"]["tokens"]) <= allowed and set(ref["2"]["tokens"]) <= allowed
    free = run_core(make_core(tiny_qwen3_path, **BASE), prompts, params)
    assert ref["1"] == free["1"] and not set(free["0"]["tokens"]) <= allowed
    # The same constrained outputs when the steps verify drafts (the mask covers every verified row).
    proposer = OracleProposer({r: v["tokens"] for r, v in ref.items()})
    grammar2 = AllowOnly(allowed, 384, constrained={"0", "2"})
    got = run_core(make_core(tiny_qwen3_path, proposer=proposer, grammar=grammar2, num_speculative_tokens=2,
                             **BASE), prompts, params)
    assert got == ref


def _meta(temps: list[float], vocab: int) -> SamplingMetadata:
    return SamplingMetadata.build([SamplingParams(temperature=t) for t in temps], [[]] * len(temps),
                                  [[]] * len(temps), [None] * len(temps), [set()] * len(temps), "cpu", vocab)


def test_rejection_sampler_greedy_accepts_the_matching_prefix():
    logits = torch.full((7, 10), -5.0)
    # request 0: 3 drafts; target argmax per row 4, 5, 6, 7 -> drafts [4, 5, 9] accept 2, then 6.
    for row, t in enumerate([4, 5, 6, 7]):
        logits[row, t] = 5.0
    # request 1: 2 drafts, target 1, 2, 3 -> drafts [1, 2] all accepted + bonus 3.
    for row, t in zip((4, 5, 6), (1, 2, 3)):
        logits[row, t] = 5.0
    drafts = torch.tensor([[4, 5, 9], [1, 2, -1]])
    tokens, rows = rejection_sample(logits, _meta([0.0, 0.0], 10), drafts, [3, 2])
    assert tokens.tolist() == [[4, 5, 6, -1], [1, 2, 3, -1]]
    assert rows.tolist()[:3] == [4, 5, 6] and rows.tolist()[4:] == [1, 2, 3]


def test_rejection_sampler_random_path_keeps_the_target_distribution():
    torch.manual_seed(0)
    n, vocab = 20000, 6
    p0 = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])
    p1 = torch.tensor([0.3, 0.1, 0.1, 0.2, 0.2, 0.1])
    logits = torch.stack([p0.log(), p1.log()] * n)  # each request: 1 draft row + the bonus row
    drafts = torch.full((n, 1), 3)  # always draft token 3 (accepted with probability p0[3])
    tokens, _ = rejection_sample(logits, _meta([1.0] * n, vocab), drafts, [1] * n)
    first = torch.bincount(tokens[:, 0], minlength=vocab).float() / n
    assert torch.allclose(first, p0, atol=0.012)
    accepted = tokens[:, 0] == 3
    second = torch.bincount(tokens[accepted, 1], minlength=vocab).float() / accepted.sum()
    assert torch.allclose(second, p1, atol=0.02)
    assert (tokens[~accepted, 1] == -1).all()


def test_speculative_tokens_without_a_proposer_are_refused(tiny_qwen3_path):
    from vllm_lite import LLM
    with pytest.raises(ValueError, match="needs a draft proposer"):
        LLM(tiny_qwen3_path, device="cpu", num_speculative_tokens=2)
