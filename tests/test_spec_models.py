"""Model-based speculative decoding in the worker (draft_model, eagle, eagle3), CPU, float32, tiny random models.

Greedy output with any drafter is token-identical to the plain run: the target verifies every draft. A draft model
equal to the target drafts exactly the target's tokens (all accepted); a perturbed copy agrees often but not always
(partial acceptance, rejections and KV catch-up all exercised); EAGLE and EAGLE-3 heads with random weights in the
public checkpoint layouts load and run. Sampled drafts carry their probabilities to the rejection sampler; seeded
requests are reproducible.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_lite.sampling_params import SamplingParams

from spec_utils import make_core, run_core

BASE = dict(device="cpu", dtype="float32", block_size=4, max_model_len=256)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _prompts(n: int = 5, vocab: int = 384) -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(1, 30))] for _ in range(n)]


def _perturbed_copy(src: str, dst: str, scale: float, seed: int = 0) -> str:
    """The model at `src` with Gaussian noise (scale x each tensor's std) on its weights: a draft model that
    agrees with the target most of the time."""
    shutil.copytree(src, dst)
    weights = load_file(os.path.join(src, "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    noisy = {k: v + scale * v.float().std() * torch.randn(v.shape, generator=gen) if v.dim() == 2 else v
             for k, v in weights.items()}
    save_file(noisy, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def _speculate(target: str, draft: str, method: str = "draft_model", k: int = 3, **kw):
    return make_core(target, speculative_config={"method": method, "model": draft, "num_speculative_tokens": k},
                     **{**BASE, **kw})


@pytest.fixture(scope="module")
def plain(tiny_llama_path):
    prompts = _prompts()
    return prompts, run_core(make_core(tiny_llama_path, **BASE), prompts, GREEDY)


@pytest.fixture(scope="module")
def noisy_draft(tiny_llama_path, tmp_path_factory):
    return _perturbed_copy(tiny_llama_path, str(tmp_path_factory.mktemp("draft") / "noisy"), scale=0.03)


def _tokens(results: dict) -> dict:
    return {r: v["tokens"] for r, v in results.items()}


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_target_as_its_own_draft_accepts_everything(tiny_llama_path, plain, async_scheduling):
    prompts, ref = plain
    core = _speculate(tiny_llama_path, tiny_llama_path, async_scheduling=async_scheduling)
    got = run_core(core, prompts, GREEDY)
    assert _tokens(got) == _tokens(ref)
    stats = core.scheduler.make_stats()
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    assert core.executor.runner._launches < sum(len(v["tokens"]) for v in ref.values())


@pytest.mark.parametrize("k", [1, 4])
def test_draft_model_greedy_identical_with_partial_acceptance(tiny_llama_path, noisy_draft, plain, k):
    prompts, ref = plain
    core = _speculate(tiny_llama_path, noisy_draft, k=k)
    assert _tokens(run_core(core, prompts, GREEDY)) == _tokens(ref)
    stats = core.scheduler.make_stats()
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


def test_draft_model_with_chunked_prefill_and_stops(tiny_llama_path, noisy_draft):
    """Prefill chunks (the draft KV follows them), max_tokens 1..30, min_tokens, a stop id, prefix reuse."""
    prompts = _prompts(6)
    prompts[5] = prompts[4] + prompts[5]  # shares a prefix with prompt 4
    params = [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=min(n, 3), stop_token_ids=[7])
              for n in (1, 2, 5, 9, 17, 30)]
    kw = dict(max_num_batched_tokens=24)
    ref = run_core(make_core(tiny_llama_path, **BASE, **kw), prompts, params)
    got = run_core(_speculate(tiny_llama_path, noisy_draft, k=3, **kw), prompts, params)
    assert got == ref
