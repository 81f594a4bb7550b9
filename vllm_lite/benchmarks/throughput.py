"""Throughput (T1): 256 requests, input and output lengths uniform in [100, 1024], token ids uniform in
[0, 10000), random.seed(0), ignore_eos, temperature 1.0; reports output and total tokens/s.

The timed workload runs --repeats times (default 3) after the small warm-up; the reported throughput is the median
run's, and every run's time is listed (runs on the H100 spread by ~3 %, more than most changes we measure).

    vllm-lite bench throughput --model qwen3-0.6b
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from vllm_lite.benchmarks.utils import add_bench_engine_args, bandwidth_floor, bench_model, make_llm, progress, report
from vllm_lite.sampling_params import SamplingParams


def workload(num_requests: int, lo: int, hi: int) -> tuple[list[dict], list[SamplingParams]]:
    random.seed(0)
    prompts, params = [], []
    for _ in range(num_requests):
        n_in, n_out = random.randint(lo, hi), random.randint(lo, hi)
        prompts.append({"prompt_token_ids": [random.randrange(10000) for _ in range(n_in)]})
        params.append(SamplingParams(temperature=1.0, max_tokens=n_out, ignore_eos=True))
    return prompts, params


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="vllm-lite bench throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_engine_args(ap, "qwen3-0.6b")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the whole workload (median reported)")
    args = ap.parse_args(argv)
    llm = make_llm(args)
    prompts, params = workload(args.num_requests, args.min_len, args.max_len)
    progress("warm-up")
    warm = min(8, len(prompts))
    llm.generate(prompts[:warm], [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * warm,
                 use_tqdm=False)
    runs = []
    for i in range(max(args.repeats, 1)):
        progress(f"timed run {i + 1} of {max(args.repeats, 1)}")
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=True)
        runs.append(time.perf_counter() - t0)
    elapsed = statistics.median(runs)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    result = {"workload": "T1", "model": bench_model(args), "num_requests": args.num_requests, "elapsed_s": elapsed,
              "runs_elapsed_s": [round(r, 4) for r in runs],
              "output_tokens": out_tokens, "input_tokens": in_tokens,
              "output_tokens_per_s": out_tokens / elapsed, "total_tokens_per_s": (in_tokens + out_tokens) / elapsed,
              "requests_per_s": args.num_requests / elapsed,
              "max_num_batched_tokens": llm.config.scheduler.max_num_batched_tokens,
              "max_num_seqs": llm.config.scheduler.max_num_seqs, **bandwidth_floor(llm)}
    return report(result, args.json)


if __name__ == "__main__":
    main()
