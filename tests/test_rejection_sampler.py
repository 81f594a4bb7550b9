"""The rejection sampler: the Triton verification kernel equals its torch reference (Triton's CPU interpreter),
accepted tokens follow the target distribution (chi-square over 100k+ samples, drafts with a point-mass q and with
a q distribution, with a check that the test rejects a slightly wrong distribution), penalties see the drafts
before each row, and seeded requests reproduce."""
from __future__ import annotations

import textwrap

import pytest
import torch

from vllm_lite.kernels.rejection_sampler import verify_drafts_torch
from vllm_lite.sample.metadata import SamplingMetadata
from vllm_lite.sampling_params import SamplingParams
from vllm_lite.spec_decode.rejection_sampler import rejection_sample

from test_kernels import _run_child

# chi-square critical value, 7 degrees of freedom (vocab 8), p = 1e-4; the draws are seeded, so no flakiness
CHI2_CRIT_DF7 = 29.88


def _meta(params: list[SamplingParams], vocab: int, outputs: list[list[int]] | None = None,
          generators: list[torch.Generator | None] | None = None) -> SamplingMetadata:
    n = len(params)
    return SamplingMetadata.build(params, [[]] * n, outputs or [[]] * n, generators or [None] * n, [set()] * n,
                                  "cpu", vocab)


# ---------------------------------------------------------------- kernel == reference (interpreter)
_CHILD = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    from vllm_lite.kernels.rejection_sampler import verify_drafts_torch, verify_drafts_triton
    g = torch.Generator().manual_seed(0)
    res = {}
    def case(name, s, k, v, mixed, with_q, point_mass=False):
        nd = torch.randint(0, k + 1, (s,), generator=g)
        nd[0] = k
        off = torch.cumsum(nd + 1, 0) - (nd + 1)
        r = int((nd + 1).sum())
        probs = (torch.randn(r, v, generator=g) * 2).softmax(-1)
        if point_mass:  # a row whose whole mass is on its draft: the draft cannot be rejected
            probs[0] = 0.0
        greedy = probs.argmax(-1)
        drafts = torch.randint(0, v, (s, k), generator=g)
        take = torch.rand(s, k, generator=g) < 0.6  # many drafts equal the argmax, so some runs are accepted
        rows = (off[:, None] + torch.arange(k)[None, :]).clamp(max=r - 1)
        drafts = torch.where(take, greedy[rows], drafts)
        if point_mass:
            probs[0, drafts[0, 0]] = 1.0
            greedy = probs.argmax(-1)
        isg = (torch.rand(s, generator=g) < 0.4) if mixed else None
        u = torch.rand(s, k, generator=g)
        noise = torch.empty(r, v).exponential_(generator=g)
        q = torch.rand(s, k, v, generator=g).pow(3).softmax(-1) if with_q else None
        args = (drafts, nd, off, greedy, isg, probs if mixed else None, q, u if mixed else None,
                noise if mixed else None)
        want = verify_drafts_torch(*args)
        got = verify_drafts_triton(*args, block_v=64)
        res[name] = bool(torch.equal(want, got)) or f"{want.tolist()} vs {got.tolist()}"
    for t in range(3):
        case(f"greedy_{t}", 6, 3, 100, False, False)
        case(f"mixed_point_mass_q_{t}", 9, 4, 150, True, False)
        case(f"mixed_draft_probs_{t}", 7, 3, 130, True, True)
    case("k1", 5, 1, 70, True, False)
    case("drafted_token_certain", 3, 2, 40, True, False, point_mass=True)
    print("RESULT" + json.dumps(res))
""")


@pytest.fixture(scope="module")
def kernel_results() -> dict:
    return _run_child(_CHILD)


def test_triton_kernel_equals_reference(kernel_results):
    assert len(kernel_results) == 11
    assert all(v is True for v in kernel_results.values()), kernel_results


# ---------------------------------------------------------------- distribution (chi-square)
def _chi2(samples: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=p.shape[0]).double()
    expected = p.double() * samples.shape[0]
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("with_q", [False, True])
def test_accepted_tokens_follow_the_target_distribution(with_q):
    """Every request verifies 3 drafts over 4 rows with fixed target distributions p_0..p_3. Drafts come from a
    distribution r unlike p (with_q: r is the drafter's q, passed as draft_probs; else drafts are point masses).
    Whenever a request's output reaches position j, its token there must be distributed as p_j."""
    gen = torch.Generator().manual_seed(1234)
    n, vocab, k = 120_000, 8, 3
    p = torch.rand(k + 1, vocab, generator=gen).pow(2) + 0.02
    p[torch.arange(k + 1), torch.randint(0, vocab, (k + 1,), generator=gen)] += 1.0  # a likely token per row
    p /= p.sum(-1, keepdim=True)
    r = torch.rand(k, vocab, generator=gen).pow(3) + 0.01
    # Drafts mostly the likely token (as a good drafter), otherwise spread unlike p: later rows are reached often.
    r = 0.2 * r / r.sum(-1, keepdim=True) + 0.8 * torch.nn.functional.one_hot(p[:k].argmax(-1), vocab)
    torch.manual_seed(99)
    drafts = torch.stack([torch.multinomial(r[j], n, replacement=True, generator=gen) for j in range(k)], dim=1)
    logits = p.log().repeat(n, 1)  # request i: rows 4i .. 4i + 3
    draft_probs = r.unsqueeze(0).expand(n, k, vocab).contiguous() if with_q else None
    tokens, _ = rejection_sample(logits, _meta([SamplingParams(temperature=1.0)] * n, vocab), drafts, [k] * n,
                                 draft_probs=draft_probs, use_kernel=False)
    assert (tokens[:, 0] >= 0).all()
    for j in range(k + 1):
        reached = tokens[:, j] >= 0
        assert reached.sum() > 2000, (j, int(reached.sum()))
        stat = _chi2(tokens[reached, j], p[j])
        assert stat < CHI2_CRIT_DF7, (j, stat)
    # The test has power: a distribution 0.02 away from p_0 is rejected by a wide margin.
    wrong = p[0].clone()
    wrong[0] += 0.02
    wrong[1] -= 0.02
    assert _chi2(tokens[:, 0], wrong) > 10 * CHI2_CRIT_DF7
    # Acceptance as theory says: sum_v min(p(v), r(v)) for the first draft with q = r; sum_v r(v) p(v) without
    # (a resampled token never equals the rejected draft: its residual weight is 0).
    accept_rate = float((tokens[:, 0] == drafts[:, 0]).double().mean())
    expected = float(torch.minimum(p[0], r[0]).sum()) if with_q else float((r[0] * p[0]).sum())
    assert accept_rate == pytest.approx(expected, abs=0.006)


def test_resample_after_rejection_excludes_the_point_mass_draft():
    """With q a point mass, a rejected draft never comes back as the resampled token."""
    torch.manual_seed(0)
    n, vocab = 20_000, 5
    p = torch.tensor([0.1, 0.5, 0.2, 0.15, 0.05])
    logits = p.log().repeat(2 * n, 1).view(n, 2, vocab).reshape(2 * n, vocab)
    drafts = torch.full((n, 1), 1)
    tokens, _ = rejection_sample(logits, _meta([SamplingParams(temperature=1.0)] * n, vocab), drafts, [1] * n,
                                 use_kernel=False)
    rejected = tokens[:, 1] < 0
    assert 0.45 < float(rejected.double().mean()) < 0.55
    assert (tokens[rejected, 0] != 1).all()


# ---------------------------------------------------------------- penalties, seeds, greedy
def test_penalised_rows_count_the_drafts_before_them():
    """Row 1 prefers token 3 unless the penalty counts draft 0 (= 3) as an output token; then it prefers 5."""
    vocab = 10
    logits = torch.full((3, vocab), -2.0)
    logits[0, 3] = 4.0
    logits[1, 3], logits[1, 5] = 4.0, 3.0
    logits[2, 7] = 4.0
    params = [SamplingParams(temperature=0.0, presence_penalty=2.0)]
    tokens, _ = rejection_sample(logits, _meta(params, vocab, outputs=[[1]]), torch.tensor([[3, 5]]), [2],
                                 use_kernel=False)
    assert tokens.tolist() == [[3, 5, 7]]


def test_seeded_requests_reproduce_and_unseeded_vary():
    vocab, n = 50, 6
    logits = torch.randn(n * 3, vocab, generator=torch.Generator().manual_seed(3))
    drafts = torch.randint(0, vocab, (n, 2), generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=1.0, seed=7)] * n

    def run(seed_rows: bool) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(7 + i) for i in range(n)] if seed_rows else None
        return rejection_sample(logits, _meta(params, vocab, generators=gens), drafts, [2] * n,
                                use_kernel=False)[0]

    assert torch.equal(run(True), run(True))
    assert any(not torch.equal(run(False), run(False)) for _ in range(5))


def test_greedy_reference_keeps_the_argmax_prefix():
    greedy = torch.tensor([4, 5, 6, 7, 1, 2, 3])
    drafts = torch.tensor([[4, 5, 9], [1, 2, -1]])
    out = verify_drafts_torch(drafts, torch.tensor([3, 2]), torch.tensor([0, 4]), greedy, None, None, None, None,
                              None)
    assert out.tolist() == [[4, 5, 6, -1], [1, 2, 3, -1]]


def test_plain_greedy_fast_path_equals_the_general_path():
    """All-greedy rows without constraints take the raw logits' argmax (bf16 too); a zero logit_bias, which changes
    no value, sends the same batch through the general path (float32 copy, per-row metadata): same tokens, same
    row tokens."""
    gen = torch.Generator().manual_seed(5)
    vocab, num_drafts = 50, [3, 0, 2, 1]
    logits = (torch.randn(sum(k + 1 for k in num_drafts), vocab, generator=gen) * 3).to(torch.bfloat16)
    argmax = logits.float().argmax(-1)
    offsets = [0, 4, 5, 8]
    drafts = torch.full((4, 3), -1, dtype=torch.int64)
    for i, (o, k) in enumerate(zip(offsets, num_drafts)):
        drafts[i, :k] = argmax[o: o + k]
    drafts[0, 1] = (argmax[1] + 1) % vocab  # request 0 rejects its second draft
    fast_meta = _meta([SamplingParams(temperature=0.0)] * 4, vocab)
    assert fast_meta.all_greedy and fast_meta.no_token_constraints and fast_meta.no_penalties
    slow_meta = _meta([SamplingParams(temperature=0.0, logit_bias={7: 0.0})] * 4, vocab)
    assert not slow_meta.no_token_constraints
    fast = rejection_sample(logits, fast_meta, drafts, num_drafts, use_kernel=False)
    slow = rejection_sample(logits, slow_meta, drafts, num_drafts, use_kernel=False)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    assert fast[0].tolist() == [[argmax[0].item(), argmax[1].item(), -1, -1], [argmax[4].item(), -1, -1, -1],
                                [argmax[5].item(), argmax[6].item(), argmax[7].item(), -1],
                                [argmax[8].item(), argmax[9].item(), -1, -1]]


@pytest.mark.parametrize("num_drafts", [[4], [2, 0, 3], [1, 1], [0, 4, 4, 2, 1]])
def test_verify_kernel_gets_16_byte_aligned_vectors(monkeypatch, num_drafts):
    """Triton specialises a kernel on each pointer's 16-byte alignment; the warm-up compiles aligned variants, so a
    misaligned per-request vector (a slice of one packed copy) would compile new variants mid-serving (seen on the
    H200: 3 compiles after warm-up)."""
    import vllm_lite.spec_decode.rejection_sampler as rs
    seen: list[torch.Tensor] = []
    real = rs.verify_drafts

    def spy(*args, **kwargs):
        seen.extend(a for a in args if isinstance(a, torch.Tensor))
        return real(*args, **kwargs)

    monkeypatch.setattr(rs, "verify_drafts", spy)
    vocab, k = 11, 4
    s = len(num_drafts)
    drafts = torch.full((s, k), -1, dtype=torch.int64)
    for i, n in enumerate(num_drafts):
        drafts[i, :n] = torch.arange(n)
    logits = torch.randn(sum(n + 1 for n in num_drafts), vocab)
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.8)):
        seen.clear()
        rejection_sample(logits, _meta([params] * s, vocab), drafts, num_drafts)
        assert len(seen) >= 4
        assert all(t.data_ptr() % 16 == 0 for t in seen), [t.data_ptr() % 16 for t in seen]
