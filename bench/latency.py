"""Offline latency: a batch of random token-id prompts, greedy, ignore_eos; reports TTFT, TPOT and tokens/s.

    python bench/latency.py --model smollm2-135m-instruct --device cpu --batch-size 1 --input-len 128 --output-len 64
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

from vllm_lite import LLM, SamplingParams


def _run(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[float, float]:
    """(time to first token, total time) for one batch."""
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    batch = [{"prompt_token_ids": p} for p in prompts]
    t0 = time.perf_counter()
    llm.generate(batch, first, use_tqdm=False)
    t1 = time.perf_counter()
    llm.generate(batch, full, use_tqdm=False)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--num-iters-warmup", type=int, default=2)
    ap.add_argument("--num-iters", type=int, default=5)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, load_format=args.load_format,
              enforce_eager=args.enforce_eager, enable_prefix_caching=False,
              skip_tokenizer_init=args.load_format == "dummy")
    rng = random.Random(0)
    vocab = min(llm.info.hf_config.vocab_size, 10000)
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.batch_size)]
    for i in range(args.num_iters_warmup):
        print(f"warm-up {i + 1}/{args.num_iters_warmup}", file=sys.stderr)
        _run(llm, prompts, min(args.output_len, 8))
    ttfts, tpots, totals = [], [], []
    for i in range(args.num_iters):
        ttft, total = _run(llm, prompts, args.output_len)
        ttfts.append(ttft)
        totals.append(total)
        tpots.append((total - ttft) / max(args.output_len - 1, 1))
        print(f"run {i + 1}/{args.num_iters}: {total:.3f} s", file=sys.stderr)
    total = statistics.median(totals)
    result = {
        "model": args.model, "device": str(llm.engine.executor.worker.device), "batch_size": args.batch_size,
        "input_len": args.input_len, "output_len": args.output_len,
        "ttft_ms": 1000 * statistics.median(ttfts), "tpot_ms": 1000 * statistics.median(tpots),
        "output_tokens_per_s": args.batch_size * args.output_len / total,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
