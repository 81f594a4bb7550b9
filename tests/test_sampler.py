"""Sampler tests (CPU, fast): greedy, seeds, filters, distribution, penalties, min_tokens, mask, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from vllm_lite.sample.metadata import SamplingMetadata
from vllm_lite.sample.sampler import Sampler
from vllm_lite.sample.topk_topp import apply_top_k_top_p
from vllm_lite.sampling_params import SamplingParams

V = 50


def build(params, prompts=None, outputs=None, gens=None, blocked=None, vocab=V, mask=None):
    b = len(params)
    return SamplingMetadata.build(
        params,
        prompts if prompts is not None else [[] for _ in range(b)],
        outputs if outputs is not None else [[] for _ in range(b)],
        gens if gens is not None else [None] * b,
        blocked if blocked is not None else [set() for _ in range(b)],
        "cpu", vocab, logits_mask=mask,
    )


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def known_logits(vocab: int = V) -> torch.Tensor:
    """A fixed, tie-free distribution: probabilities well separated so filter boundaries are unambiguous."""
    p = torch.tensor([0.5 ** (i / 2 + 1) for i in range(vocab)], dtype=torch.float64)
    p = p / p.sum()
    return p.log().float()


def draw_many(logits_row: torch.Tensor, sp: SamplingParams, n: int) -> torch.Tensor:
    """n independent samples for one request: one batch of n identical rows (one step)."""
    sampler = Sampler()
    meta = build([sp] * n)
    return sampler(logits_row.expand(n, -1).contiguous(), meta).sampled_token_ids


# ---------------------------------------------------------------- greedy / temperature


def test_greedy_equals_argmax():
    torch.manual_seed(0)
    logits = torch.randn(8, V)
    out = Sampler()(logits, build([SamplingParams(temperature=0.0)] * 8))
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.logprob_token_ids is None and out.ranks is None


def test_handed_over_logits_give_the_same_tokens_and_unowned_stay_untouched():
    """logits_owned=True lets the sampler work in place; tokens and logprobs are the same as with a copy."""
    params = [SamplingParams(temperature=0.7, top_k=10, top_p=0.9, min_p=0.02, seed=i, logprobs=2) for i in range(4)]
    params.append(SamplingParams(temperature=0.0, repetition_penalty=1.2))
    logits = torch.randn(5, V, generator=gen(3))
    before = logits.clone()
    a = Sampler()(logits, build(params, gens=[gen(i) for i in range(4)] + [None], outputs=[[1, 2]] * 5))
    assert torch.equal(logits, before)
    b = Sampler()(logits.clone(), build(params, gens=[gen(i) for i in range(4)] + [None], outputs=[[1, 2]] * 5),
                  logits_owned=True)
    assert torch.equal(a.sampled_token_ids, b.sampled_token_ids) and torch.equal(a.logprobs, b.logprobs)


def test_temperature_zero_equals_greedy_in_mixed_batch():
    torch.manual_seed(1)
    logits = torch.randn(6, V)
    orig = logits.clone()
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0, top_k=5 if i % 2 else 0) for i in range(6)]
    out = Sampler()(logits, build(params))
    assert torch.equal(out.sampled_token_ids[0::2], logits[0::2].argmax(-1))
    assert torch.equal(logits, orig), "sampler must not modify the caller's logits"


def test_greedy_ignores_filters_and_generator():
    logits = known_logits().expand(3, -1).contiguous()
    params = [SamplingParams(temperature=0.0, top_k=3, top_p=0.2, min_p=0.5, seed=1)] * 3
    meta = build(params, gens=[gen(1), gen(2), None])
    assert meta.all_greedy and not meta.generators
    assert Sampler()(logits, meta).sampled_token_ids.tolist() == [0, 0, 0]


# ---------------------------------------------------------------- seeds


def run_steps(batch_specs, steps: int, seed_of_interest_row: int) -> list[int]:
    """Simulate decode steps: each step draws fresh logits from a fixed stream, returns the tracked row's tokens."""
    logits_gen = gen(1234)
    tracked = []
    for _ in range(steps):
        base = torch.randn(V, generator=logits_gen)
        rows = len(batch_specs)
        logits = base.expand(rows, -1).contiguous()
        params = [sp for sp, _ in batch_specs]
        gens = [g for _, g in batch_specs]
        out = Sampler()(logits, build(params, gens=gens))
        tracked.append(int(out.sampled_token_ids[seed_of_interest_row]))
    return tracked


def test_seed_reproducible_alone_and_in_mixed_batch():
    sp = SamplingParams(temperature=1.0, seed=42)
    alone = run_steps([(sp, gen(42))], steps=12, seed_of_interest_row=0)
    torch.manual_seed(999)
    mixed = run_steps(
        [
            (SamplingParams(temperature=0.8), None),
            (SamplingParams(temperature=0.0), None),
            (sp, gen(42)),
            (SamplingParams(temperature=1.0, seed=7), gen(7)),
            (SamplingParams(temperature=1.5, top_p=0.9), None),
        ],
        steps=12, seed_of_interest_row=2,
    )
    torch.manual_seed(5)
    mixed2 = run_steps([(SamplingParams(temperature=1.0), None), (sp, gen(42))], steps=12, seed_of_interest_row=1)
    assert alone == mixed == mixed2
    assert len(set(alone)) > 1  # actually random, not degenerate
    # A different seed gives a different stream.
    other = run_steps([(SamplingParams(temperature=1.0, seed=43), gen(43))], steps=12, seed_of_interest_row=0)
    assert other != alone


def test_seeded_generator_advances_one_row_draw_per_step():
    g = gen(11)
    logits = torch.randn(3, V)
    params = [SamplingParams(), SamplingParams(seed=11), SamplingParams(temperature=0.0)]
    Sampler()(logits, build(params, gens=[None, g, None]))
    ref = gen(11)
    torch.empty(V).exponential_(generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


# ---------------------------------------------------------------- filters


def allowed_top_k(probs: torch.Tensor, k: int) -> set[int]:
    return set(torch.argsort(probs, descending=True)[:k].tolist())


def allowed_top_p(probs: torch.Tensor, p: float) -> set[int]:
    order = torch.argsort(probs, descending=True).tolist()
    allowed, mass = set(), 0.0
    for t in order:  # keep tokens while the mass *before* them is still below p
        if mass >= p:
            break
        allowed.add(t)
        mass += float(probs[t])
    return allowed


def allowed_min_p(probs: torch.Tensor, mp: float) -> set[int]:
    return {i for i in range(len(probs)) if float(probs[i]) >= mp * float(probs.max())}


@pytest.mark.parametrize(
    "kw",
    [dict(top_k=4), dict(top_p=0.8), dict(min_p=0.1), dict(top_k=6, top_p=0.7), dict(top_k=5, min_p=0.3),
     dict(top_p=0.6, temperature=0.7)],
)
def test_filters_stay_in_allowed_set(kw):
    torch.manual_seed(3)
    logits = known_logits()
    temp = kw.get("temperature", 1.0)
    probs = torch.softmax(logits.double() / temp, -1)
    allowed = set(range(V))
    if "min_p" in kw:
        allowed &= allowed_min_p(probs, kw["min_p"])
    if "top_k" in kw:
        allowed &= allowed_top_k(probs, kw["top_k"])
    if "top_p" in kw:
        # top-p applies to the distribution renormalised after top-k / min-p
        kept = torch.zeros_like(probs)
        idx = torch.tensor(sorted(allowed))
        kept[idx] = probs[idx]
        allowed &= allowed_top_p(kept / kept.sum(), kw["top_p"])
    assert 1 < len(allowed) < V
    draws = draw_many(logits, SamplingParams(**kw), 2000)
    seen = set(draws.tolist())
    assert seen <= allowed, f"emitted {seen - allowed} outside {allowed}"
    assert len(seen) > 1


def test_top_p_keeps_at_least_one_token():
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0]])
    out = apply_top_k_top_p(logits.clone(), None, torch.tensor([1e-6]))
    assert torch.isfinite(out).sum() == 1 and torch.isfinite(out[0, 0])


def test_top_k_mixed_rows_and_off():
    torch.manual_seed(4)
    logits = torch.randn(3, V)
    k = torch.tensor([0, 3, V + 10])
    out = apply_top_k_top_p(logits.clone(), k, None, max_k=3)
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    assert set(torch.nonzero(torch.isfinite(out[1])).view(-1).tolist()) == set(logits[1].topk(3).indices.tolist())
    # Same result through the sort-based path (top-p off = 1.0).
    out2 = apply_top_k_top_p(logits.clone(), k, torch.ones(3))
    assert torch.equal(torch.isfinite(out), torch.isfinite(out2))


def test_frequencies_match_renormalised_distribution():
    torch.manual_seed(5)
    logits = known_logits()
    n = 20000
    sp = SamplingParams(temperature=0.9, top_k=6)
    draws = draw_many(logits, sp, n)
    probs = torch.softmax(logits.double() / 0.9, -1)
    top = probs.topk(6)
    expected = torch.zeros(V, dtype=torch.float64)
    expected[top.indices] = top.values / top.values.sum()
    counts = torch.bincount(draws, minlength=V).double()
    idx = top.indices
    chi2 = float((((counts[idx] - n * expected[idx]) ** 2) / (n * expected[idx])).sum())
    # 5 degrees of freedom: P(chi2 > 30) ~ 1.5e-5.
    assert chi2 < 30, chi2
    assert counts.sum() == counts[idx].sum()


# ---------------------------------------------------------------- penalties


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(6)
    logits = torch.randn(2, V) * 3
    prompt = [[1, 2, 3, 3], [10]]
    output = [[4, 1], [11, 12, 10]]
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.7), SamplingParams(temperature=0.0,
                                                                                      repetition_penalty=0.6)]
    meta = build(params, prompts=prompt, outputs=output)
    penalised = Sampler.apply_constraints(logits.clone(), meta)
    for i, rp in enumerate([1.7, 0.6]):
        ids = torch.tensor([prompt[i] + output[i]])
        ref = RepetitionPenaltyLogitsProcessor(rp)(ids, logits[i:i + 1].clone())
        torch.testing.assert_close(penalised[i:i + 1], ref, rtol=0, atol=1e-6)
    assert torch.equal(Sampler()(logits, meta).sampled_token_ids, penalised.argmax(-1))


def test_presence_frequency_over_output_only():
    torch.manual_seed(7)
    logits = torch.randn(2, V)
    prompt = [[5, 6, 7], [1]]
    output = [[7, 7, 8, 9, 9, 9], []]
    params = [SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(temperature=0.0, presence_penalty=1.0, frequency_penalty=1.0)]
    penalised = Sampler.apply_constraints(logits.clone(), build(params, prompts=prompt, outputs=output))
    ref = logits.clone()
    for tok, cnt in {7: 2, 8: 1, 9: 3}.items():
        ref[0, tok] -= 0.5 + 0.25 * cnt
    # prompt tokens (5, 6; and row 1's token 1) untouched; row 1 has no output -> unchanged
    torch.testing.assert_close(penalised, ref, rtol=0, atol=1e-6)


def test_all_penalties_combined_and_neutral_rows():
    torch.manual_seed(8)
    logits = torch.randn(2, V)
    prompt, output = [[1, 2], [1, 2]], [[2, 3, 3], [2, 3, 3]]
    params = [SamplingParams(repetition_penalty=2.0, presence_penalty=0.3, frequency_penalty=0.2),
              SamplingParams()]
    meta = build(params, prompts=prompt, outputs=output)
    assert not meta.no_penalties and meta.prompt_token_ids is not None
    assert build([SamplingParams(presence_penalty=0.1)], prompts=[[1]]).prompt_token_ids is None
    out = Sampler.apply_constraints(logits.clone(), meta)
    ref = logits.clone()
    for t in (1, 2, 3):
        ref[0, t] = ref[0, t] / 2.0 if ref[0, t] > 0 else ref[0, t] * 2.0
    ref[0, 2] -= 0.3 + 0.2 * 1
    ref[0, 3] -= 0.3 + 0.2 * 2
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- min_tokens, logits mask


def test_min_tokens_blocking():
    logits = torch.zeros(3, V)
    logits[:, 2] = 10.0  # "EOS" is by far the best token
    logits[:, 5] = 5.0
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(temperature=0.0)]
    meta = build(params, blocked=[{2, 999}, {2, 5}, set()])  # 999 is out of vocab: ignored
    for _ in range(50):
        toks = Sampler()(logits, meta).sampled_token_ids.tolist()
        assert toks[0] == 5 and toks[1] not in (2, 5) and toks[2] == 2


def test_logits_mask_applied_first():
    torch.manual_seed(9)
    logits = torch.randn(2, V)
    mask = torch.zeros(2, V, dtype=torch.bool)
    mask[0, [3, 7]] = True
    mask[1, [11, 12, 13]] = True
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=1.0)]
    meta = build(params, mask=mask)
    for _ in range(100):
        out = Sampler()(logits, meta)
        toks = out.sampled_token_ids.tolist()
        assert toks[0] == (3 if logits[0, 3] > logits[0, 7] else 7)
        assert toks[1] in (11, 12, 13)
    # logprobs stay raw: the mask does not change them
    torch.testing.assert_close(out.logprobs[0, 0], torch.log_softmax(logits[0], -1)[toks[0]], rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        build(params, mask=torch.ones(2, V + 1, dtype=torch.bool))


# ---------------------------------------------------------------- logprobs


def test_logprobs_raw_topn_sampled_first_and_rank():
    torch.manual_seed(10)
    logits = torch.randn(4, V) * 2
    logits[3, 20] = logits[3, 21] = logits[3].max() + 1.0  # a tie at the top for rank semantics
    params = [SamplingParams(temperature=1.0, logprobs=3, repetition_penalty=1.5),
              SamplingParams(temperature=0.0, logprobs=1),
              SamplingParams(temperature=0.7, top_k=10),
              SamplingParams(temperature=0.0, logprobs=0)]
    meta = build(params, prompts=[[1, 2]] * 4, outputs=[[3]] * 4)
    assert meta.max_num_logprobs == 3
    out = Sampler()(logits, meta)
    ref = torch.log_softmax(logits, -1)
    assert out.logprob_token_ids.shape == (4, 4) and out.logprobs.shape == (4, 4)
    assert out.logprob_token_ids.dtype == torch.int64 and out.ranks.dtype == torch.int64
    sampled = out.sampled_token_ids
    assert torch.equal(out.logprob_token_ids[:, 0], sampled)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.logprob_token_ids), rtol=0, atol=1e-6)
    for i in range(4):
        top = out.logprob_token_ids[i, 1:]
        assert top.tolist() == ref[i].topk(3).indices.tolist()
        assert (out.logprobs[i, 1:].diff() <= 0).all()
        s = int(sampled[i])
        assert int(out.ranks[i]) == int((ref[i] > ref[i, s]).sum()) + 1
    # tie: the greedy row picks one of the tied tokens; its rank is 1 either way
    assert int(sampled[3]) in (20, 21) and int(out.ranks[3]) == 1


def test_logprobs_zero_gives_only_sampled():
    logits = torch.randn(2, V)
    out = Sampler()(logits, build([SamplingParams(temperature=0.0, logprobs=0)] * 2))
    assert out.logprob_token_ids.shape == (2, 1)
    assert torch.equal(out.ranks, torch.ones(2, dtype=torch.int64))
    assert math.isclose(float(out.logprobs[0, 0]), float(torch.log_softmax(logits[0], -1).max()), abs_tol=1e-6)


def test_flags():
    m = build([SamplingParams(temperature=0.0), SamplingParams(top_k=3)])
    assert not m.all_greedy and not m.all_random and m.no_penalties and not m.no_top_k
    assert m.no_top_p and m.no_min_p and m.max_num_logprobs is None and m.top_p is None
    m = build([SamplingParams(top_p=0.5, min_p=0.1)])
    assert m.all_random and m.no_top_k and not m.no_top_p and not m.no_min_p


def test_sampling_kernel_switch_reaches_the_filters(monkeypatch):
    """Sampler(KernelConfig) decides at construction whether min-p / top-k / top-p may use the Triton kernel; the
    flag is handed to the filters on every call (on the CPU they run the references either way)."""
    import vllm_lite.sample.sampler as sampler_mod
    from vllm_lite.config import KernelConfig
    seen = []
    for name in ("apply_min_p", "apply_top_k_top_p"):
        real = getattr(sampler_mod, name)
        monkeypatch.setattr(sampler_mod, name,
                            lambda *a, _real=real, **kw: seen.append(kw["use_kernel"]) or _real(*a, **kw))
    monkeypatch.delenv("VLLM_LITE_SAMPLING_KERNEL", raising=False)
    assert Sampler().use_sampling_kernel is False
    params = [SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=1)] * 2
    outs = []
    for flag in (True, False):
        sampler = Sampler(KernelConfig(sampling_kernel=flag))
        assert sampler.use_sampling_kernel is flag
        outs.append(sampler(known_logits().repeat(2, 1), build(params, gens=[gen(1), gen(2)])).sampled_token_ids)
    assert seen == [True, True, False, False]
    assert torch.equal(outs[0], outs[1])
    monkeypatch.setenv("VLLM_LITE_SAMPLING_KERNEL", "1")
    assert Sampler().use_sampling_kernel is True  # no config given: the environment's default
