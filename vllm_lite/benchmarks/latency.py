"""Latency (L1: batch 1, L8: batch 8): random token-id prompts, greedy, ignore_eos; median TTFT and TPOT.

Each iteration times a one-token run (TTFT) and a full run; TPOT is (full - TTFT) / (output_len - 1).

    vllm-lite bench latency --model qwen3-0.6b --batch-size 1 --input-len 128 --output-len 512 [--baseline hf]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from vllm_lite.benchmarks.utils import (add_bench_engine_args, bandwidth_floor, bench_model, hf_latency, make_llm,
                                       progress, report, resolve_bench_model)
from vllm_lite.sampling_params import SamplingParams


def _timed(llm, batch: list[dict], max_tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate(batch, params, use_tqdm=False)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="vllm-lite bench latency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_engine_args(ap, "qwen3-0.6b")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--num-iters-warmup", type=int, default=2)
    ap.add_argument("--num-iters", type=int, default=5)
    ap.add_argument("--baseline", choices=["none", "hf"], default="none")
    args = ap.parse_args(argv)
    llm = make_llm(args)
    rng = random.Random(0)
    batch = [{"prompt_token_ids": [rng.randrange(10000) for _ in range(args.input_len)]}
             for _ in range(args.batch_size)]
    for i in range(args.num_iters_warmup):
        progress(f"warm-up {i + 1}/{args.num_iters_warmup}")
        _timed(llm, batch, args.output_len)
    ttfts, tpots = [], []
    for i in range(args.num_iters):
        ttft = _timed(llm, batch, 1)
        total = _timed(llm, batch, args.output_len)
        ttfts.append(ttft)
        tpots.append((total - ttft) / (args.output_len - 1))
        progress(f"run {i + 1}/{args.num_iters}: TTFT {1000 * ttft:.2f} ms, TPOT {1000 * tpots[-1]:.3f} ms")
    model = bench_model(args)
    result = {"workload": f"L{args.batch_size}", "model": model, "device": str(llm.device),
              "batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
              "ttft_ms": 1000 * statistics.median(ttfts), "tpot_ms": 1000 * statistics.median(tpots),
              **bandwidth_floor(llm)}
    if args.baseline == "hf":
        dtype, device = llm.info.dtype, llm.device
        del llm
        progress("transformers baseline")
        result.update(hf_latency(resolve_bench_model(model), device, dtype, args.batch_size, args.input_len,
                                 args.output_len, 3))
    return report(result, args.json)


if __name__ == "__main__":
    main()
