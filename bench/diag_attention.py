"""Diagnostic: greedy tokens and first-token logprobs of a batch of chat prompts through the torch backend and
FlashInfer (auto = fa3 on H100, and fa2), batched and one at a time, eager, same weights. Prints a table.

    python bench/diag_attention.py [--model smollm2-135m-instruct]
"""
from __future__ import annotations

import argparse

import torch

from vllm_lite import LLM, SamplingParams

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
           "Explain what a GPU is in one sentence.", "Translate 'good morning' into Spanish."]


def _run(model: str, backend: str, prefill: str | None, batched: bool) -> list[tuple[list[int], dict]]:
    llm = LLM(model, dtype="bfloat16", enforce_eager=True, attention_backend=backend, max_model_len=1024,
              gpu_memory_utilization=0.2, enable_prefix_caching=False)
    if prefill is not None:
        import flashinfer
        be = llm.engine.executor.worker.runner.attn_ctx.backend
        be.prefill_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(be.workspace, "NHD", backend=prefill)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=3)
    outs = llm.chat(chats, params, use_tqdm=False) if batched else \
        [llm.chat(c, params, use_tqdm=False)[0] for c in chats]
    res = [(o.outputs[0].token_ids, {t: round(lp.logprob, 2) for t, lp in o.outputs[0].logprobs[0].items()})
           for o in outs]
    del llm
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    rows = {}
    for backend, prefill in (("torch", None), ("flashinfer", None), ("flashinfer", "fa2")):
        for batched in (True, False):
            try:
                rows[(backend, prefill, batched)] = _run(args.model, backend, prefill, batched)
            except Exception as e:  # a diagnostic: report and go on
                print(f"{backend}/{prefill}/batched={batched} failed: {type(e).__name__}: {e}")
    for i, p in enumerate(PROMPTS):
        print(p)
        for (backend, prefill, batched), r in rows.items():
            print(f"  {backend:10s} {prefill or 'auto':4s} batched={batched!s:5s} {r[i][0]} {r[i][1]}")


if __name__ == "__main__":
    main()
