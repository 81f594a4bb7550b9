"""logit_bias, allowed_token_ids and bad_words (CPU): the sampler against hand-computed references, the offline LLM
token-exact against a greedy loop over transformers' fp32 logits with the same edits, the speculative path (drafts
verified with the edits applied to every row), and the validation errors."""
from __future__ import annotations

import pytest
import torch

from vllm_lite.sample.metadata import SamplingMetadata, banned_by_bad_words
from vllm_lite.sample.sampler import Sampler
from vllm_lite.sampling_params import SamplingParams

from spec_utils import OracleProposer, make_core, run_core

V = 64
PROMPTS = [[5, 17, 42, 99, 7, 250], [300, 12, 8], [44, 45, 46, 47, 48, 49, 50, 51]]
MAX_TOKENS = 10


def _meta(params: list[SamplingParams], outputs: list[list[int]] | None = None) -> SamplingMetadata:
    b = len(params)
    return SamplingMetadata.build(params, [[] for _ in range(b)], outputs or [[] for _ in range(b)],
                                  [None] * b, [set() for _ in range(b)], "cpu", V)


def test_sampler_bias_allowed_and_bad_words_match_hand_reference():
    torch.manual_seed(0)
    logits = torch.randn(4, V)
    top = logits.argmax(-1)
    params = [SamplingParams(temperature=0.0, logit_bias={3: 100.0}),
              SamplingParams(temperature=0.0, logit_bias={int(top[1]): -100.0, 9: 0.5}),
              SamplingParams(temperature=0.0, allowed_token_ids=[1, 2, 30]),
              SamplingParams(temperature=0.0)]
    got = Sampler()(logits.clone(), _meta(params)).sampled_token_ids
    ref1 = logits[1].clone()
    ref1[int(top[1])] -= 100.0
    ref1[9] += 0.5
    assert got.tolist() == [3, int(ref1.argmax()), [1, 2, 30][int(logits[2, [1, 2, 30]].argmax())], int(top[3])]


def test_random_rows_sample_only_allowed_ids_and_never_bad_words():
    logits = torch.zeros(512, V)
    allowed = SamplingParams(temperature=1.0, allowed_token_ids=[4, 8, 15])
    out = Sampler()(logits, _meta([allowed] * 512)).sampled_token_ids
    assert set(out.tolist()) == {4, 8, 15}
    banned = SamplingParams(temperature=1.0, bad_words_token_ids=[[7], [3, 5]])
    # [3, 5]: 5 is banned only right after a 3; [7] always
    out = Sampler()(logits, _meta([banned] * 256 + [banned] * 256, [[3]] * 256 + [[4]] * 256)).sampled_token_ids
    assert 7 not in out.tolist() and 5 not in out[:256].tolist() and 5 in out[256:].tolist()


def test_bad_word_rule_and_batches_without_constraints_build_nothing():
    assert banned_by_bad_words([[1], [2, 3], [4, 5, 6]], []) == [1]
    assert banned_by_bad_words([[1], [2, 3], [4, 5, 6]], [9, 4, 5]) == [1, 6]
    assert banned_by_bad_words([[2, 3]], [2]) == [3]
    meta = _meta([SamplingParams(temperature=0.0), SamplingParams(temperature=0.5)])
    assert meta.no_token_constraints and meta.allowed_mask is None and meta.bias_rows is None


def test_validation_names_the_field():
    for kwargs, field in ((dict(logit_bias={1: 100.5}), "logit_bias"), (dict(logit_bias={-1: 1.0}), "logit_bias"),
                          (dict(logit_bias={1: float("nan")}), "logit_bias"),
                          (dict(logit_bias={"1": 1.0}), "logit_bias"),
                          (dict(allowed_token_ids=[]), "allowed_token_ids"),
                          (dict(allowed_token_ids=[3, -2]), "allowed_token_ids"), (dict(bad_words=[" "]), "bad_words"),
                          (dict(bad_words=["\ud800"]), "bad_words")):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    p = SamplingParams(logit_bias={3: -100.0, 100: 100.0}, allowed_token_ids=[1, 2])
    p.check_vocab(101)
    with pytest.raises(ValueError, match=r"logit_bias is invalid: token id 100 is out of the vocabulary \(size 100\)"):
        p.check_vocab(100)
    with pytest.raises(ValueError, match="allowed_token_ids is invalid: token id 2"):
        SamplingParams(allowed_token_ids=[1, 2]).check_vocab(2)


# ---------------------------------------------------------------- engine vs transformers

@pytest.fixture(scope="module")
def hf(tiny_qwen3_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_path, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_qwen3_path)


def hf_greedy(model, prompt: list[int], edit=None, n: int = MAX_TOKENS) -> list[int]:
    """Greedy decoding over transformers' logits, `edit(logits, outputs)` applied to each step's logits."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([prompt + out])).logits[0, -1].float()
            if edit is not None:
                logits = edit(logits.clone(), out)
            out.append(int(logits.argmax()))
    return out


def _bias_edit(bias: dict[int, float]):
    def edit(logits, out):
        for t, b in bias.items():
            logits[t] += b
        return logits
    return edit


def _allowed_edit(allowed: list[int]):
    def edit(logits, out):
        keep = torch.full_like(logits, float("-inf"))
        keep[allowed] = 0.0
        return logits + keep
    return edit


def _bad_words_edit(seqs: list[list[int]]):
    def edit(logits, out):
        for seq in seqs:
            if len(seq) == 1 or out[len(out) - len(seq) + 1:] == seq[:-1]:
                logits[seq[-1]] = float("-inf")
        return logits
    return edit


@pytest.fixture(scope="module")
def cases(hf):
    """(params, reference outputs per prompt) for each feature; every reference differs from plain greedy."""
    model, tok = hf
    plain = [hf_greedy(model, p) for p in PROMPTS]
    base = dict(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    bias = {plain[0][0]: -100.0, plain[1][2]: -3.0, 77: 4.0}
    allowed = [t for t in range(10, 120) if t not in {p[0] for p in plain}]
    word = tok.decode(plain[2][3:5])
    bad = SamplingParams(bad_words=[word], **base)
    bad.resolve_bad_words(tok)
    out = []
    for params, edit in ((SamplingParams(logit_bias=bias, **base), _bias_edit(bias)),
                         (SamplingParams(allowed_token_ids=allowed, **base), _allowed_edit(allowed)),
                         (bad, _bad_words_edit(bad.bad_words_token_ids))):
        ref = [hf_greedy(model, p, edit) for p in PROMPTS]
        assert ref != plain
        out.append((params, ref))
    return plain, out


def test_offline_llm_equals_transformers_with_bias_allowed_and_bad_words(tiny_qwen3_path, cases, hf):
    from vllm_lite import LLM
    plain, feature_cases = cases
    llm = LLM(tiny_qwen3_path, device="cpu", dtype="float32", max_model_len=128, seed=0)
    plain_params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for params, ref in feature_cases:
        # each constrained prompt beside plain ones in one batch: the plain outputs stay unchanged
        prompts = [{"prompt_token_ids": p} for p in PROMPTS] * 2
        outs = llm.generate(prompts, [params] * len(PROMPTS) + [plain_params] * len(PROMPTS), use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        assert got[:len(PROMPTS)] == ref
        assert got[len(PROMPTS):] == plain
    bad_params, bad_ref = feature_cases[2]
    for seq in bad_params.bad_words_token_ids:
        for out in bad_ref:
            assert all(out[i:i + len(seq)] != seq for i in range(len(out)))
    with pytest.raises(ValueError, match="logit_bias is invalid: token id 384 is out of the vocabulary"):
        llm.generate("hi", SamplingParams(logit_bias={384: 1.0}), use_tqdm=False)
    with pytest.raises(ValueError, match="allowed_token_ids is invalid"):
        llm.generate("hi", SamplingParams(allowed_token_ids=[1, 400]), use_tqdm=False)


def test_speculative_verification_applies_bias_allowed_and_bad_words(tiny_qwen3_path, cases):
    """Oracle drafts of the constrained reference are all accepted, wrong ones (the plain run's) rejected where
    the constraint changed the token: the verified rows see the same edits as a plain step."""
    plain, feature_cases = cases
    kw = dict(device="cpu", dtype="float32", block_size=4, max_model_len=128)
    for params, ref in feature_cases:
        if params.has_multi_token_bad_words:  # not speculated (the rows would not see the drafts before them)
            continue
        reference = {str(i): r for i, r in enumerate(ref)}
        core = make_core(tiny_qwen3_path, proposer=OracleProposer(reference), num_speculative_tokens=3, **kw)
        got = run_core(core, PROMPTS, params)
        assert {r: v["tokens"] for r, v in got.items()} == reference
        stats = core.scheduler.make_stats()
        assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
        wrong = OracleProposer({str(i): r for i, r in enumerate(plain)})
        got = run_core(make_core(tiny_qwen3_path, proposer=wrong, num_speculative_tokens=3, **kw), PROMPTS, params)
        assert {r: v["tokens"] for r, v in got.items()} == reference
