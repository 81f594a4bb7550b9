"""Verifying 1 + k tokens per request on CUDA, with the test-only proposers of tests/spec_utils.py: the torch backend
(float32) and FlashInfer (bf16), eager and compiled with CUDA graphs (uniform 1 + k steps replay their own graphs),
async scheduling on and off. Drafts equal to the plain run's greedy tokens are all accepted, wrong drafts none, and
the outputs equal the plain run's token for token.

In float32 (torch backend) that holds exactly. In bf16 a verification step runs other kernels than a plain decode
step (FlashInfer's paged prefill kernel for 1 + k query rows instead of its decode kernel, GEMMs of 4x the rows), so
their rounding differs and a near tie can flip: there each request must be identical up to its first difference,
where each run's token is among the other run's top-5 (vLLM's check_logprobs_close rule, as in
test_engine_gpu.py); the proposers draft only while a request still follows the plain run, so the wrong drafts must all be rejected
and the oracle's all accepted but in the step where a request's near tie flips."""
from __future__ import annotations

import random

import pytest
import torch

from vllm_lite.sampling_params import SamplingParams

from spec_utils import OracleProposer, WrongProposer, make_core, run_core

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

K = 3
SETUPS = {
    "torch-fp32-eager": dict(attention_backend="torch", dtype="float32", enforce_eager=True),
    "flashinfer-bf16-eager": dict(attention_backend="flashinfer", dtype="bfloat16", enforce_eager=True),
    "flashinfer-bf16-graphs": dict(attention_backend="flashinfer", dtype="bfloat16"),
    # verification steps attend as one-token requests: FlashInfer's decode kernel, decode graphs
    "flashinfer-bf16-graphs-vad": dict(attention_backend="flashinfer", dtype="bfloat16", verify_as_decode=True),
}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    import sys
    import os
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    from tiny_models import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("spec"), "qwen3", head_dim=64)


def _prompts() -> list[list[int]]:
    rng = random.Random(2)
    return [[rng.randrange(3, 384) for _ in range(rng.randrange(1, 60))] for _ in range(6)]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_verification_is_exact(model_path, setup, async_scheduling):
    kw = dict(SETUPS[setup], device="cuda", max_model_len=512, max_num_seqs=8, gpu_memory_utilization=0.2,
              async_scheduling=async_scheduling)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=5)
    prompts = _prompts()
    ref = run_core(make_core(model_path, **kw), prompts, params)
    tokens = {r: v["tokens"] for r, v in ref.items()}
    exact = kw["dtype"] == "float32"
    for proposer in (OracleProposer(tokens), WrongProposer(tokens, 384)):
        core = make_core(model_path, proposer=proposer, num_speculative_tokens=K, **kw)
        got = run_core(core, prompts, params)
        identical = _assert_close(got, ref, exact)
        stats = core.scheduler.make_stats()
        print(f"{setup} {type(proposer).__name__}: {identical}/{len(ref)} identical, "
              f"{stats.num_accepted_tokens}/{stats.num_draft_tokens} drafts accepted")
        # Drafts are proposed while a request follows the plain run: none accepted (wrong), all accepted (oracle)
        # but in the step where a near tie flips (at most K drafts per request that differs).
        assert stats.num_draft_tokens > 0
        if isinstance(proposer, WrongProposer):
            assert stats.num_accepted_tokens == 0
        else:
            assert stats.num_draft_tokens - stats.num_accepted_tokens <= (len(ref) - identical) * K
        graphs = core.executor.runner.graphs
        if setup.endswith("graphs"):
            assert graphs.num_replays[1 + K] > 0, graphs.num_replays  # uniform verification steps replayed
        elif setup.endswith("vad"):  # verification steps replay decode graphs of one row per token (no 1 + k graphs)
            assert graphs.num_replays[1] > 0 and 1 + K not in graphs.num_replays, graphs.num_replays
            assert max(graphs.token_sizes[1]) >= 8 * (1 + K)
        core.shutdown()
        del core
        torch.cuda.empty_cache()


def _assert_close(got: dict, ref: dict, exact: bool, max_gap: float | None = None) -> int:
    """Identical (exact) or identical up to a near tie; returns how many requests were identical. max_gap: the
    sampled tokens' logprobs agree within it up to a request's first difference, and there the two tokens' logprobs
    in the plain run differ by at most it (a float32 tie that other GEMM shapes' rounding may flip)."""
    identical = 0
    for r, want in ref.items():
        a, b = got[r]["tokens"], want["tokens"]
        j = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        if max_gap is not None:
            for i in range(j):
                assert abs(got[r]["logprobs"][i][0][1] - want["logprobs"][i][0][1]) <= max_gap, (r, i)
        if a == b:
            identical += 1
            continue
        assert not exact, (r, a, b)
        top_a = {t for t, _, _ in got[r]["logprobs"][j]}
        top_b = {t for t, _, _ in want["logprobs"][j]}
        assert b[j] in top_a and a[j] in top_b, (r, j, got[r]["logprobs"][j], want["logprobs"][j])
        if max_gap is not None:
            lp = {t: lp for t, lp, _ in want["logprobs"][j]}
            assert abs(lp[a[j]] - lp[b[j]]) <= max_gap, (r, j, want["logprobs"][j])
    return identical


def _max_logprob_gap(got: dict, ref: dict) -> float:
    """The largest difference of the sampled tokens' logprobs between two runs, up to each request's first
    different token."""
    gap = 0.0
    for r, want in ref.items():
        a, b = got[r]["tokens"], want["tokens"]
        j = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        for i in range(j):
            gap = max(gap, abs(got[r]["logprobs"][i][0][1] - want["logprobs"][i][0][1]))
    return gap


def test_mixed_verification_steps_replay_the_padded_graph(model_path):
    """Requests that verify k drafts, one draft or none in the same step: the runner pads the step to 1 + k tokens
    per request and replays that graph (no step without a graph); outputs equal the plain run's up to a near tie."""

    class Mixed(OracleProposer):
        def propose(self, request, k):
            right = super().propose(request, k)
            return {0: right, 1: right[:1]}.get(int(request.request_id) % 3, [])

    kw = dict(SETUPS["flashinfer-bf16-graphs"], device="cuda", max_model_len=512, max_num_seqs=8,
              gpu_memory_utilization=0.2)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=5)
    prompts = _prompts()
    ref = run_core(make_core(model_path, **kw), prompts, params)
    core = make_core(model_path, proposer=Mixed({r: v["tokens"] for r, v in ref.items()}), num_speculative_tokens=K,
                     **kw)
    runner = core.executor.runner
    assert runner.pad_verification
    padded = []
    choose = runner._verification_padding
    runner._verification_padding = lambda *a: padded.append(choose(*a)) or padded[-1]
    got = run_core(core, prompts, params)
    _assert_close(got, ref, exact=False)
    assert sum(1 for q in padded if q) > 5 and core.scheduler.make_stats().num_accepted_tokens > 0
    assert runner.graphs.num_replays[1 + K] >= sum(1 for q in padded if q)
    core.shutdown()


HOST_METHODS = {"ngram": {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 3,
                          "prompt_lookup_min": 1},
                "suffix": {"method": "suffix", "num_speculative_tokens": 4}}


@pytest.mark.parametrize("method", list(HOST_METHODS))
@pytest.mark.parametrize("setup", ["torch-fp32-eager", "flashinfer-bf16-graphs"])
def test_ngram_and_suffix_match_the_plain_run(model_path, setup, method):
    """The real host proposers (vLLM's n-gram prompt lookup, the suffix tree), async scheduling, on prompts that
    repeat themselves: drafts are proposed and accepted, and the outputs are the plain run's (exactly in float32,
    up to a near tie in bf16); with graphs the verification steps replay theirs."""
    kw = dict(SETUPS[setup], device="cuda", max_model_len=512, max_num_seqs=8, gpu_memory_utilization=0.2,
              async_scheduling=True)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=5)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 384) for _ in range(rng.randrange(4, 12))] * 4 for _ in range(6)]
    ref = run_core(make_core(model_path, **kw), prompts, params)
    max_gap = None
    if kw["dtype"] == "float32":
        # These prompts make the random model repeat a token; a verification step's GEMMs (4x the rows, other cuBLAS
        # kernels) round otherwise than a decode step's. The tolerance is the plain run's own: the same requests
        # beside 26 others (decode GEMMs of 32 rows, as verification's 8 x (1 + 3)), up to each one's first
        # different token.
        filler = [[rng.randrange(3, 384) for _ in range(8)] for _ in range(26)]
        wide = run_core(make_core(model_path, **dict(kw, max_num_seqs=32)), prompts + filler, params)
        noise = _max_logprob_gap({r: wide[r] for r in ref}, ref)
        max_gap = max(1e-5, 4 * noise)
        print(f"float32 rounding of the plain run at 32 rows: logprobs within {noise:.2e}")
    core = make_core(model_path, speculative_config=HOST_METHODS[method], **kw)
    got = run_core(core, prompts, params)
    print(f"{setup} {method}: logprobs within {_max_logprob_gap(got, ref):.2e} of the plain run's")
    identical = _assert_close(got, ref, False, max_gap)
    stats = core.scheduler.make_stats()
    print(f"{setup} {method}: {identical}/{len(ref)} identical, {stats.num_accepted_tokens}/"
          f"{stats.num_draft_tokens} drafts accepted")
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
    if setup.endswith("graphs"):
        assert any(q > 1 and n > 0 for q, n in core.executor.runner.graphs.num_replays.items())
    core.shutdown()
    del core
    torch.cuda.empty_cache()
