"""The whole engine against transformers' `generate`: token-exact greedy and matching top logprobs (fp32), for tiny
random Llama / Qwen2 / Qwen3 models, under every scheduling regime (small blocks, chunked prefill, prefix caching
with shared prefixes, preemption), with and without async scheduling."""
from __future__ import annotations

import random

import pytest
import torch

from vllm_lite import LLM, SamplingParams

MAX_NEW = 12
NUM_LOGPROBS = 5
REGIMES = {
    "default": dict(),
    "block4": dict(block_size=4),
    "chunked": dict(block_size=4, max_num_batched_tokens=48),
    "prefix": dict(block_size=4, enable_prefix_caching=True),
    # 256 tokens of context per sequence at most; 72 blocks of 4 hold barely more than one long request at once.
    "preempt": dict(block_size=4, num_gpu_blocks_override=72, max_num_batched_tokens=256),
}


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(3, vocab) for _ in range(40)]
    lengths = [1, 2, 7, 16, 33, 64, 120, 200]
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]
    # Shared prefixes (block-aligned and not) so prefix caching has hits to take.
    prompts += [shared + [rng.randrange(3, vocab) for _ in range(n)] for n in (0, 1, 5, 23)]
    return prompts


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def reference(request, tmp_path_factory):
    """(model path, prompts, HF greedy tokens, HF per-step log-softmax) computed once per architecture."""
    import sys
    import os
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_models import make_tiny_model
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path_factory.mktemp("ref"), request.param)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = _prompts(hf.config.vocab_size)
    tokens, logprobs = [], []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                              eos_token_id=None, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True)
        tokens.append(out.sequences[0, len(p):].tolist())
        logprobs.append(torch.log_softmax(torch.stack(out.logits)[:, 0].float(), dim=-1))
    return path, prompts, tokens, logprobs


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("regime", list(REGIMES))
def test_greedy_and_logprobs_match_transformers(reference, regime, async_scheduling):
    path, prompts, hf_tokens, hf_logprobs = reference
    llm = LLM(path, device="cpu", dtype="float32", max_model_len=256, seed=0, async_scheduling=async_scheduling,
              **REGIMES[regime])
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=NUM_LOGPROBS)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    if regime == "prefix":  # a second pass over the same prompts is served mostly from the prefix cache
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert sum(o.num_cached_tokens for o in outs) > 0
    if regime == "preempt":
        assert llm.engine.scheduler.num_preemptions > 0
    for i, out in enumerate(outs):
        comp = out.outputs[0]
        assert comp.token_ids == hf_tokens[i], f"prompt {i} (len {len(prompts[i])})"
        assert comp.finish_reason == "length"
        for step, entry in enumerate(comp.logprobs):
            ref = hf_logprobs[i][step]
            top = torch.topk(ref, NUM_LOGPROBS)
            ours = {t: lp.logprob for t, lp in entry.items()}
            for t, v in zip(top.indices.tolist(), top.values.tolist()):
                assert abs(ours[t] - v) < 1e-4
            sampled = comp.token_ids[step]
            assert abs(entry[sampled].logprob - ref[sampled].item()) < 1e-4
            assert entry[sampled].rank == 1
