"""Structured outputs on CUDA with the real default model (bf16, torch.compile, CUDA graphs, async scheduling, the
Triton bitmask kernel and the pinned staging buffers): every output that finishes with "stop" validates against its
schema, every output is a sequence its grammar accepts, and speculative n-gram drafts change nothing greedy."""
from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from vllm_lite import LLM, SamplingParams, StructuredOutputsParams
from vllm_lite.benchmarks.structured import SCHEMAS, workload

pytestmark = pytest.mark.gpu
FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER


@pytest.fixture(scope="module")
def llm():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return LLM("smollm2-135m-instruct", max_model_len=2048, num_gpu_blocks_override=4096)


def _check(llm, items, outs) -> int:
    import xgrammar as xgr
    stopped = 0
    for (_, schema), out in zip(items, outs):
        for comp in out.outputs:
            params = StructuredOutputsParams(json=schema)
            matcher = xgr.GrammarMatcher(llm.engine.structured.compile_now(params))
            assert all(matcher.accept_token(t) for t in comp.token_ids), comp.text
            if comp.finish_reason == "stop":
                stopped += 1
                jsonschema.validate(json.loads(comp.text), schema, format_checker=FORMATS)
            else:  # nothing ends a constrained output early but its length limit
                assert comp.finish_reason == "length", comp.finish_reason
    return stopped


def test_batch_of_schemas_on_cuda(llm):
    items = workload(96)
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=256,
                             structured_outputs=StructuredOutputsParams(json=s)) for i, (_, s) in enumerate(items)]
    outs = llm.chat([m for m, _ in items], params, use_tqdm=False)
    stopped = _check(llm, items, outs)
    # The 135M model sometimes runs a string to the limit, more often when sampling: 86 of 96 stopped on the H200 at
    # 9cee9be (greedy `bench structured` json_schema: 243 of 256). A mask that forbade a schema's closing tokens
    # would leave far more at the limit.
    assert stopped >= 0.85 * len(items), f"{stopped} of {len(items)} finished with stop"
    assert len(llm.engine.structured.fill_times) > 0


def test_batch1_and_n2_on_cuda(llm):
    items = workload(len(SCHEMAS))
    for messages, schema in items:
        params = SamplingParams(n=2, temperature=0.7, seed=1, max_tokens=256,
                                structured_outputs=StructuredOutputsParams(json=schema))
        _check(llm, [(messages, schema)], llm.chat(messages, params, use_tqdm=False))


def test_ngram_drafts_keep_greedy_constrained_outputs():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    items = workload(16)
    params = [SamplingParams(temperature=0.0, max_tokens=192, structured_outputs=StructuredOutputsParams(json=s))
              for _, s in items]
    kw = dict(max_model_len=2048, num_gpu_blocks_override=2048, dtype="float32")
    plain = LLM("smollm2-135m-instruct", **kw)
    want = [o.outputs[0].token_ids for o in plain.chat([m for m, _ in items], params, use_tqdm=False)]
    del plain
    spec = LLM("smollm2-135m-instruct", **kw,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                                   "prompt_lookup_min": 1})
    got = [o.outputs[0].token_ids for o in spec.chat([m for m, _ in items], params, use_tqdm=False)]
    assert spec.engine.scheduler.make_stats().num_draft_tokens > 0
    # float32: verification and plain decode may still round differently at a near tie; demand near-total agreement
    same = sum(a == b for a, b in zip(got, want))
    assert same >= len(items) - 1, f"{same} of {len(items)} identical"
