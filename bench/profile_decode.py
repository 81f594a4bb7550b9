"""Where a decode step's time goes: cProfile of the engine loop for a batch of greedy requests (dummy weights).

    python bench/profile_decode.py --model qwen3-0.6b --batch-size 8 --output-len 128
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time

import torch

from vllm_lite.benchmarks.utils import add_bench_engine_args, kernel_profile, make_llm
from vllm_lite.sampling_params import SamplingParams


def _graph_replay_ms(llm, batch_size: int, iters: int = 50) -> float:
    """GPU time of replaying the decode graph of this batch size back to back (the model's share of a step)."""
    graphs = llm.model_runner().graphs
    if graphs is None:
        return float("nan")
    graph = graphs.graphs[graphs.padded_size(batch_size)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _decode_step_seconds(llm, batch: list[dict], temperature: float, n: int) -> float:
    """Wall time of one decode step: generating 2n tokens minus generating n, over n (the prefill cancels out)."""
    times = []
    for length in (n, 2 * n):
        params = SamplingParams(temperature=temperature, max_tokens=length, ignore_eos=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return (times[1] - times[0]) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    add_bench_engine_args(ap, "qwen3-0.6b")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="T1 samples at 1.0; the latency runs are greedy")
    args = ap.parse_args()
    llm = make_llm(args)
    rng = random.Random(0)
    batch = [{"prompt_token_ids": [rng.randrange(10000) for _ in range(args.input_len)]}
             for _ in range(args.batch_size)]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(batch, params, use_tqdm=False)
    plain = _decode_step_seconds(llm, batch, args.temperature, args.output_len)
    graph_ms = _graph_replay_ms(llm, args.batch_size)
    print(f"decode step without a profiler (prefill excluded): {plain * 1000:.3f} ms; one decode-graph replay alone "
          f"(GPU, events): "
          f"{graph_ms:.3f} ms; the difference is host time not hidden behind the GPU plus what runs outside the "
          f"graph (lm_head, sampler, copies)")
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    llm.generate(batch, params, use_tqdm=False)
    prof.disable()
    dt = time.perf_counter() - t0
    print(f"{args.output_len} steps in {dt * 1000:.1f} ms: {dt / args.output_len * 1000:.3f} ms/step")
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(30)
    short = SamplingParams(temperature=args.temperature, max_tokens=16, ignore_eos=True)
    table, busy_ms, wall_ms = kernel_profile(lambda: llm.generate(batch, short, use_tqdm=False))
    print(table)
    print(f"GPU busy {busy_ms:.1f} ms of {wall_ms:.1f} ms wall over 16 steps (prefill included): "
          f"{100 * busy_ms / wall_ms:.0f} % (low = host-bound or launch gaps)")

if __name__ == "__main__":
    main()
