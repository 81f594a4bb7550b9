"""Whether the host or the device sets the pace of prefill steps, and where their host time goes.

Queues 256 requests of 560 prompt tokens (prefill chunks of --max-num-batched-tokens), then over the prefill steps:
the wall time per step, the same steps with the device synchronised after each phase of a step (schedule, inputs,
forward, sampling: how long the host takes to issue each when it never waits on the GPU), torch's sync-debug
warnings (an operation that blocks the host on the device) and a cProfile table. Async and synchronised steps
taking the same time means overlapping host and device work gains nothing, which points to the device as the bound
(docs/PERF.md).

    python bench/tools/profile_prefill.py --model qwen3-0.6b

With --num-requests 1 (one prompt alone: the time-to-first-token step) the cProfile covers five fresh prefill
steps instead of the steps after them.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time
import warnings

import torch

from vllm_lite.benchmarks.utils import add_bench_engine_args, make_llm
from vllm_lite.sampling_params import SamplingParams


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _queue(llm, tag: str, n: int, input_len: int) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=64, ignore_eos=True)
    for i in range(n):
        ids = [(i * 7919 + j * 31) % 10000 for j in range(input_len)]
        for req in llm.processor.add_request(f"{tag}-{i}", None, ids, params):
            llm.engine.add_request(req)


def _ms_per_step(engine, steps: int, sync_each: bool) -> float:
    """Wall ms per engine step over `steps` steps (the device synchronised after each when sync_each)."""
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
        if sync_each:
            _sync()
    _sync()
    return (time.perf_counter() - t0) * 1000 / steps


def _drain(llm) -> None:
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    add_bench_engine_args(ap, "qwen3-0.6b")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=560)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    llm = make_llm(args)
    engine = llm.engine
    runner = llm.model_runner()
    _queue(llm, "warm", 32, args.input_len)
    _drain(llm)

    # 1. plain wall time per prefill step (async pipeline as in T1)
    _queue(llm, "a", args.num_requests, args.input_len)
    print(f"prefill steps: {_ms_per_step(engine, args.steps, sync_each=False):.2f} ms/step (async, as in T1)")
    _drain(llm)

    # 2. host time to issue each phase, the device idle before each (synchronised in between)
    phases = {"forward": 0.0, "compute_logits": 0.0, "sampler": 0.0, "stage": 0.0, "plan": 0.0}
    fwd, logits, sampler, stage = runner.forward, runner.model.compute_logits, runner.sampler, runner.stager.stage
    set_step = runner.attn_ctx.set_step

    def timed(name, fn):
        def wrapper(*a, **k):
            _sync()
            s = time.perf_counter()
            out = fn(*a, **k)
            phases[name] += time.perf_counter() - s
            return out
        return wrapper

    runner.forward, runner.model.compute_logits = timed("forward", fwd), timed("compute_logits", logits)
    runner.sampler, runner.stager.stage = timed("sampler", sampler), timed("stage", stage)
    runner.attn_ctx.set_step = timed("plan", set_step)
    _queue(llm, "b", args.num_requests, args.input_len)
    total = _ms_per_step(engine, args.steps, sync_each=True)
    print(f"synchronised steps: {total:.2f} ms/step; host time to issue, per step: "
          + ", ".join(f"{k} {v * 1000 / args.steps:.2f} ms" for k, v in phases.items()))
    runner.forward, runner.model.compute_logits, runner.sampler, runner.stager.stage = fwd, logits, sampler, stage
    runner.attn_ctx.set_step = set_step
    _drain(llm)

    # 3. operations that block the host on the device, then a cProfile of the async steps
    _queue(llm, "c", args.num_requests, args.input_len)
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            engine.step()
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode(0)
    print(f"sync-debug warnings in 2 steps: {len(caught)}")
    for w in caught[:8]:
        print("  ", str(w.message)[:200], f"({w.filename}:{w.lineno})")
    prof = cProfile.Profile()
    if args.num_requests == 1:  # one prompt alone (TTFT): profile its prefill step, a fresh request each time
        _drain(llm)
        for i in range(5):
            _queue(llm, f"d{i}", 1, args.input_len)
            prof.enable()
            engine.step()
            _sync()
            prof.disable()
            _drain(llm)
    else:
        prof.enable()
        for _ in range(args.steps - 2):
            engine.step()
        _sync()
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
