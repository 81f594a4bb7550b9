"""The Triton verification kernel on the GPU: equal to its torch reference at real vocabulary sizes (greedy, mixed,
with and without draft probabilities), the chi-square distribution check with the kernel doing the verification,
and n-gram speculation on the GPU engine token-identical to the plain run (float32)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from test_rejection_sampler import CHI2_CRIT_DF7, _chi2  # noqa: E402

from vllm_lite.kernels.rejection_sampler import verify_drafts_torch, verify_drafts_triton  # noqa: E402
from vllm_lite.sample.metadata import SamplingMetadata  # noqa: E402
from vllm_lite.sampling_params import SamplingParams  # noqa: E402
from vllm_lite.spec_decode.rejection_sampler import rejection_sample  # noqa: E402

DEV = "cuda"


@pytest.mark.parametrize("vocab", [151_936, 128_256, 1000])
@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("mode", ["greedy", "mixed", "draft_probs"])
def test_kernel_equals_reference(vocab, k, mode):
    g = torch.Generator(device=DEV).manual_seed(vocab + k)
    s = 37
    nd = torch.randint(0, k + 1, (s,), device=DEV, generator=g)
    off = torch.cumsum(nd + 1, 0) - (nd + 1)
    r = int((nd + 1).sum())
    probs = (torch.randn(r, vocab, device=DEV, generator=g) * 3).softmax(-1)
    greedy = probs.argmax(-1)
    rows = (off[:, None] + torch.arange(k, device=DEV)[None, :]).clamp(max=r - 1)
    drafts = torch.where(torch.rand(s, k, device=DEV, generator=g) < 0.7, greedy[rows],
                         torch.randint(0, vocab, (s, k), device=DEV, generator=g))
    isg = None if mode == "greedy" else torch.rand(s, device=DEV, generator=g) < 0.3
    q = torch.rand(s, k, vocab, device=DEV, generator=g).softmax(-1) if mode == "draft_probs" else None
    u = torch.rand(s, k, device=DEV, generator=g)
    noise = torch.empty(r, vocab, device=DEV).exponential_(generator=g)
    args = (drafts, nd, off, greedy, isg, None if isg is None else probs, q, u, noise)
    assert torch.equal(verify_drafts_torch(*args), verify_drafts_triton(*args))


@pytest.mark.parametrize("with_q", [False, True])
def test_kernel_keeps_the_target_distribution(with_q):
    torch.manual_seed(5)
    n, vocab, k = 150_000, 8, 3
    p = torch.rand(k + 1, vocab).pow(2) + 0.02
    p[torch.arange(k + 1), torch.randint(0, vocab, (k + 1,))] += 1.0
    p /= p.sum(-1, keepdim=True)
    r = 0.2 * torch.softmax(torch.randn(k, vocab), -1) + 0.8 * torch.nn.functional.one_hot(p[:k].argmax(-1), vocab)
    drafts = torch.stack([torch.multinomial(r[j], n, replacement=True) for j in range(k)], dim=1).to(DEV)
    logits = p.log().repeat(n, 1).to(DEV)
    q = r.unsqueeze(0).expand(n, k, vocab).contiguous().to(DEV) if with_q else None
    meta = SamplingMetadata.build([SamplingParams(temperature=1.0)] * n, [[]] * n, [[]] * n, [None] * n,
                                  [set()] * n, DEV, vocab)
    tokens, _ = rejection_sample(logits, meta, drafts, [k] * n, draft_probs=q, use_kernel=True)
    tokens = tokens.cpu()
    # P(draft j accepted): sum_d r(d) min(1, p(d) / q(d)); without draft probabilities q is one-hot at the draft.
    accept = [float(torch.minimum(r[j], p[j]).sum() if with_q else (r[j] * p[j]).sum()) for j in range(k)]
    for j in range(k + 1):
        reached = tokens[:, j] >= 0
        expected = n * torch.tensor(accept[:j]).prod().item()
        assert abs(reached.sum().item() - expected) < 5 * expected ** 0.5 + 1, (j, reached.sum().item(), expected)
        assert _chi2(tokens[reached, j], p[j]) < CHI2_CRIT_DF7, j


def test_ngram_on_the_gpu_engine_matches_plain_run(tiny_qwen3_path):
    from spec_utils import make_core, run_core
    from test_spec_decode import NGRAM, SUFFIX, _repetitive_prompts, _tokens
    kw = dict(device="cuda", dtype="float32", max_model_len=256)
    prompts = _repetitive_prompts(6)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    ref = run_core(make_core(tiny_qwen3_path, **kw), prompts, params)
    for spec in (NGRAM, SUFFIX):
        core = make_core(tiny_qwen3_path, speculative_config=spec, **kw)
        assert _tokens(run_core(core, prompts, params)) == _tokens(ref), spec["method"]
        assert core.scheduler.make_stats().num_accepted_tokens > 0


def _compiled_variants() -> int:
    from vllm_lite.kernels.rejection_sampler import _verify_kernel
    return sum(len(entry[0]) for entry in _verify_kernel.device_caches.values())


def test_warm_up_compiles_every_variant_a_verification_uses():
    """After warm_up_verify_kernel(k, V), verifications padded to k columns (as the model runner pads them: any
    number of drafts 0..k per request, greedy and random, with and without q) compile nothing more."""
    from vllm_lite.kernels.rejection_sampler import warm_up_verify_kernel
    k, vocab = 4, 1003
    warm_up_verify_kernel(k, vocab, torch.device(DEV), draft_probs=True)
    before = _compiled_variants()
    assert before >= 3
    g = torch.Generator(device=DEV).manual_seed(0)
    for num_drafts in ([4, 0, 2], [1], [3, 3]):
        s = len(num_drafts)
        drafts = torch.full((s, k), -1, dtype=torch.int64, device=DEV)
        for i, n in enumerate(num_drafts):
            drafts[i, :n] = torch.randint(0, vocab, (n,), device=DEV, generator=g)
        logits = torch.randn(sum(n + 1 for n in num_drafts), vocab, device=DEV, generator=g)
        for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.8)):
            meta = SamplingMetadata.build([params] * s, [[]] * s, [[]] * s, [None] * s, [set()] * s, DEV, vocab)
            q = torch.rand(s, k, vocab, device=DEV, generator=g).softmax(-1)
            for draft_probs in (None, q):
                tokens, _ = rejection_sample(logits, meta, drafts, num_drafts, draft_probs=draft_probs)
                assert tokens.shape == (s, k + 1)
    torch.cuda.synchronize()
    assert _compiled_variants() == before
