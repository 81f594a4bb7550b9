"""Diagnostic: final-position logits of a batch of chat prompts through FlashInfer and the torch backend (eager,
same weights), per request; and the greedy first token of each. Prints a small table.

    python bench/diag_attention.py [--model smollm2-135m-instruct]
"""
from __future__ import annotations

import argparse

import torch

from vllm_lite import LLM, SamplingParams

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
           "Explain what a GPU is in one sentence.", "Translate 'good morning' into Spanish."]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    rows = {}
    for backend in ("torch", "flashinfer"):
        for batched in (True, False):
            llm = LLM(args.model, dtype="bfloat16", enforce_eager=True, attention_backend=backend,
                      max_model_len=1024, gpu_memory_utilization=0.2, enable_prefix_caching=False)
            outs = llm.chat(chats, params, use_tqdm=False) if batched else \
                [llm.chat(c, params, use_tqdm=False)[0] for c in chats]
            rows[(backend, batched)] = [{t: round(lp.logprob, 3) for t, lp in o.outputs[0].logprobs[0].items()}
                                        for o in outs]
            del llm
            torch.cuda.empty_cache()
    for i, p in enumerate(PROMPTS):
        print(p)
        for key, r in rows.items():
            print(f"  {key[0]:10s} batched={key[1]!s:5s} {r[i]}")


if __name__ == "__main__":
    main()
