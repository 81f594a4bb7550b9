"""Structured outputs on CUDA with the real default model (bf16, torch.compile, CUDA graphs, async scheduling, the
Triton bitmask kernel and the pinned staging buffers): every output that finishes with "stop" validates against its
schema, every output is a sequence its grammar accepts, speculative n-gram drafts change nothing greedy, and worker
processes (the server's executor) read the masks from shared memory with the same outputs."""
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


def test_worker_processes_read_the_masks_from_shared_memory(llm, tmp_path):
    """The server's executor on CUDA: worker processes read each step's mask from the engine core's shared-memory slot
    (vllm_lite/shared_masks.py) into their pinned staging buffer; greedy constrained outputs equal the in-process
    engine's (the same configuration, batch and kernels), and every mask went by name."""
    from spec_utils import run_core

    from vllm_lite.config import EngineConfig
    from vllm_lite.engine.core import EngineCore
    from vllm_lite.executor.multiproc import MultiprocExecutor
    from vllm_lite.model_loader import ModelInfo
    from vllm_lite.structured_output.manager import make_manager
    from vllm_lite.tokenizer import apply_chat_template

    items = workload(64)
    params = [SamplingParams(temperature=0.0, max_tokens=128, structured_outputs=StructuredOutputsParams(json=s))
              for _, s in items]
    llm.reset_prefix_cache()  # both engines compute every prompt (the same prefill steps)
    want = [o.outputs[0].token_ids for o in llm.chat([m for m, _ in items], params, use_tqdm=False)]
    tokenizer = llm.get_tokenizer()
    prompts = [apply_chat_template(tokenizer, m) for m, _ in items]
    config = EngineConfig.from_kwargs(model="smollm2-135m-instruct", max_model_len=2048, num_gpu_blocks_override=4096)
    executor = MultiprocExecutor(config, str(tmp_path))
    sent = []
    outgoing = executor._mask_slots.outgoing
    executor._mask_slots.outgoing = lambda g, f=outgoing: sent.append(f(g)) or sent[-1]
    try:
        desc, _ = executor.wait_model_description()
        info = ModelInfo.from_description(desc)
        core = EngineCore(config, info, executor, grammar=make_manager(config, info, lambda: tokenizer))
        got = run_core(core, prompts, params)
    finally:
        executor.shutdown()
    masks = [g for g in sent if g is not None]
    assert masks and all(g.shared and g.bitmask == b"" for g in masks)
    assert [got[str(i)]["tokens"] for i in range(len(items))] == want
