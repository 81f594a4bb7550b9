"""Where T1's time goes: the T1 workload with every engine step timed and classified, plus kernel profiles of
prefill steps (chunks of max_num_batched_tokens) and of pure-decode steps at T1's largest batch.

Per step: wall time (async scheduling: the step launches one batch and applies the previous one, so the wall time of
a step is the period of the pipeline), the part of it the host spent waiting for the device's sampled ids
(`get_output`: ~0 means the host, not the GPU, sets the pace, unless the host was blocked in kernel launches by a
full launch queue, as in eager prefill steps of hundreds of kernels), whether it carries prefill tokens, the decode
batch size and the KV tokens the decode attention reads. Summary: seconds in steps with prefill vs pure decode;
decode steps by batch size with the achieved bandwidth of (weights + KV read) per step, the number that says how far
decode is from the memory floor.

    python bench/tools/t1_breakdown.py --model qwen3-0.6b
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from vllm_lite.benchmarks.throughput import workload
from vllm_lite.benchmarks.utils import add_bench_engine_args, kernel_profile, make_llm
from vllm_lite.sampling_params import SamplingParams


class StepRecorder:
    """Wraps EngineCore.step, Scheduler.schedule and the model runner's get_output: one row per step (wall ms,
    tokens, decode reqs, KV tokens, ms waiting for the device)."""

    def __init__(self, llm) -> None:
        self.rows: list[tuple[float, int, int, int, float]] = []
        self._last: tuple[int, int, int] = (0, 0, 0)
        self._wait = 0.0
        engine, runner = llm.engine, llm.model_runner()
        sched, step = engine.scheduler.schedule, engine.step
        get_output = runner.get_output

        def timed_get_output():
            t0 = time.perf_counter()
            out = get_output()
            self._wait += time.perf_counter() - t0
            return out

        def schedule():
            so = sched()
            decodes = sum(1 for n in so.num_scheduled_tokens.values() if n == 1)
            kv = sum(r.num_computed_tokens for r in engine.scheduler.running)
            self._last = (so.total_num_scheduled_tokens, decodes, kv)
            return so

        def timed_step():
            self._last = (0, 0, 0)
            self._wait = 0.0
            t0 = time.perf_counter()
            out = step()
            self.rows.append(((time.perf_counter() - t0) * 1000, *self._last, self._wait * 1000))
            return out

        engine.scheduler.schedule = schedule
        engine.step = timed_step
        runner.get_output = timed_get_output
        self.profile_at: int | None = None


def summarise(rows: np.ndarray, weights: int, kv_bytes_per_token: int) -> None:
    ms, tokens, decodes, kv, wait = rows.T
    pure = (tokens == decodes) & (tokens > 0)
    print(f"{len(rows)} steps, {ms.sum() / 1000:.2f} s: {ms[~pure].sum() / 1000:.2f} s in {int((~pure).sum())} steps "
          f"with prefill tokens, {ms[pure].sum() / 1000:.2f} s in {int(pure.sum())} pure-decode steps")
    if (~pure).any():
        print(f"steps with prefill tokens: mean {ms[~pure].mean():.2f} ms/step, {tokens[~pure].mean():.0f} tokens/step "
              f"({decodes[~pure].mean():.0f} of them decodes), {wait[~pure].mean():.2f} ms/step waiting for the "
              f"device (~0: the host sets the pace, or it blocks in launches)")
    print("pure decode by batch size: steps, mean ms/step, mean KV tokens read, GB moved/step, achieved TB/s, "
          "ms/step waiting for the device, host ms/step (the rest)")
    for lo, hi in ((1, 32), (33, 64), (65, 128), (129, 192), (193, 256), (257, 1 << 20)):
        sel = pure & (decodes >= lo) & (decodes <= hi)
        if not sel.any():
            continue
        gb = (weights + kv[sel].mean() * kv_bytes_per_token) / 1e9
        mean_ms = ms[sel].mean()
        print(f"  {lo:4d}-{hi:<4d} {int(sel.sum()):5d} {mean_ms:7.3f} {kv[sel].mean():10.0f} {gb:7.2f} "
              f"{gb / mean_ms:6.2f} {wait[sel].mean():7.3f} {mean_ms - wait[sel].mean():7.3f}")
    total_gb = (pure.sum() * weights + (kv[pure] * kv_bytes_per_token).sum()) / 1e9
    print(f"pure decode moved {total_gb:.1f} GB in {ms[pure].sum() / 1000:.2f} s: "
          f"{total_gb / ms[pure].sum():.2f} TB/s average (the copy bandwidth is ~3.0 TB/s)")


def profile_steps(llm, steps: int, label: str) -> None:
    """Kernel table of the next `steps` engine steps."""
    if not torch.cuda.is_available():
        return

    def run() -> None:
        for _ in range(steps):
            llm.engine.step()

    table, busy, wall = kernel_profile(run, row_limit=30)
    print(table)
    print(f"{label} profile: {steps} steps, {wall / steps:.3f} ms/step under the profiler; GPU busy {busy:.1f} of "
          f"{wall:.1f} ms ({100 * busy / wall:.0f} %)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_bench_engine_args(ap, "qwen3-0.6b")
    ap.add_argument("--profile-steps", type=int, default=16)
    ap.add_argument("--warm-steps", type=int, default=64, help="steps before the profile (prefill + some decode)")
    ap.add_argument("--num-requests", type=int, default=256)
    args = ap.parse_args()
    llm = make_llm(args)
    prompts, params = workload(args.num_requests, 100, 1024)
    warm = min(8, len(prompts))
    llm.generate(prompts[:warm], [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * warm,
                 use_tqdm=False)
    engine = llm.engine
    rec = StepRecorder(llm)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    cfg = llm.info.hf_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
    print(f"T1: {out_tokens} output tokens in {elapsed:.2f} s = {out_tokens / elapsed:.0f} tok/s "
          f"(steps sum to {sum(r[0] for r in rec.rows) / 1000:.2f} s)")
    summarise(np.array(rec.rows), llm.weight_bytes(), kv_per_token)

    # The same regime for the profiler: 256 requests with T1's mean prompt, past their prefill.
    prompts2 = [{"prompt_token_ids": (p["prompt_token_ids"] * 2)[:560]} for p in prompts]
    long = SamplingParams(temperature=1.0, max_tokens=1000, ignore_eos=True)
    for i, p in enumerate(prompts2):
        for req in llm.processor.add_request(f"prof-{i}", None, p["prompt_token_ids"], long):
            engine.add_request(req)
    chunk = llm.config.scheduler.max_num_batched_tokens
    engine.step()
    profile_steps(llm, 4, f"prefill (chunks of {chunk} prompt tokens)")
    for _ in range(args.warm_steps - 5):  # the rest of the prefill (143k tokens) and some decode steps
        engine.step()
    profile_steps(llm, args.profile_steps, "decode")


if __name__ == "__main__":
    main()
