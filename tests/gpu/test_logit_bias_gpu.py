"""logit_bias, allowed_token_ids and bad_words on CUDA: the sampler's device tensors (pinned copies, the allowed
mask built on the device) give the CPU's greedy picks on a full-size vocabulary, and the default model through the
offline LLM (float32, CUDA graphs, async scheduling) obeys them with and without n-gram speculation, identically."""
from __future__ import annotations

import pytest
import torch

from vllm_lite import LLM, SamplingParams
from vllm_lite.sample.metadata import SamplingMetadata
from vllm_lite.sample.sampler import Sampler

pytestmark = pytest.mark.gpu
V = 49152


def _meta(params, device, outputs=None):
    b = len(params)
    return SamplingMetadata.build(params, [[] for _ in range(b)], outputs or [[] for _ in range(b)], [None] * b,
                                  [set() for _ in range(b)], device, V)


def test_sampler_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    logits = torch.randn(6, V)
    top = logits.argmax(-1)
    params = [SamplingParams(temperature=0.0, logit_bias={123: 100.0}),
              SamplingParams(temperature=0.0, logit_bias={int(top[1]): -100.0, 7: 2.5}),
              SamplingParams(temperature=0.0, allowed_token_ids=[5, 900, 40000]),
              SamplingParams(temperature=0.0, bad_words_token_ids=[[int(top[3])], [11, int(top[4])]]),
              SamplingParams(temperature=0.0, bad_words_token_ids=[[11, int(top[4])]]),
              SamplingParams(temperature=0.0)]
    outputs = [[], [], [], [], [3, 11], []]
    cpu = Sampler()(logits.clone(), _meta(params, "cpu", outputs)).sampled_token_ids
    gpu = Sampler()(logits.cuda(), _meta(params, "cuda", outputs)).sampled_token_ids.cpu()
    assert torch.equal(cpu, gpu)
    assert gpu[0] == 123 and gpu[1] != top[1] and int(gpu[2]) in (5, 900, 40000)
    assert gpu[3] != top[3] and gpu[4] != top[4] and gpu[5] == top[5]
    random_rows = [SamplingParams(temperature=1.0, allowed_token_ids=[5, 900, 40000])] * 256
    drawn = Sampler()(torch.zeros(256, V, device="cuda"), _meta(random_rows, "cuda")).sampled_token_ids
    assert set(drawn.tolist()) == {5, 900, 40000}


@pytest.fixture(scope="module")
def llms():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    # A fixed KV cache: with gpu_memory_utilization each engine's share counts what the process already holds, and
    # the second engine (after other test files' engines in the same run) found none left.
    kw = dict(max_model_len=1024, dtype="float32", num_gpu_blocks_override=1024)
    plain = LLM("smollm2-135m-instruct", **kw)
    spec = LLM("smollm2-135m-instruct", speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                             "prompt_lookup_max": 3}, **kw)
    return plain, spec


def test_default_model_obeys_bias_allowed_and_bad_words_with_and_without_speculation(llms):
    plain, spec = llms
    tok = plain.get_tokenizer()
    prompts = ["one two three one two three one two three one two", "The capital of France is Paris. The capital of"]
    base = dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    ref = [list(o.outputs[0].token_ids) for o in plain.generate(prompts, SamplingParams(**base), use_tqdm=False)]
    banned = tok.decode(ref[1][:2]).strip()
    allowed = sorted(set(ref[0][:3]) | {tok.encode(" four", add_special_tokens=False)[0]})
    cases = [SamplingParams(logit_bias={ref[0][0]: -100.0, ref[1][0]: -100.0}, **base),
             SamplingParams(allowed_token_ids=allowed, **base),
             SamplingParams(bad_words=[banned], **base)]
    for params in cases:
        got = [list(o.outputs[0].token_ids) for o in plain.generate(prompts, params, use_tqdm=False)]
        assert got != ref
        if params.logit_bias:
            assert all(out[0] != r[0] for out, r in zip(got, ref))
        if params.allowed_token_ids:
            assert all(set(out) <= set(allowed) for out in got)
        for seq in params.bad_words_token_ids or ():  # filled by generate: the word's token sequences
            assert all(out[i:i + len(seq)] != seq for out in got for i in range(len(out)))
        drafted = [list(o.outputs[0].token_ids) for o in spec.generate(prompts, params, use_tqdm=False)]
        assert drafted == got
