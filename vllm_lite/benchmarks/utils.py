"""Shared pieces of the benchmarks: the engine flags with the benchmarks' defaults, model-name lookup in bench/data,
engine construction, the bandwidth floor and the transformers baseline."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

from vllm_lite.entrypoints.args import add_engine_args, engine_kwargs_from_args

_BENCH_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench",
                           "data")


def resolve_bench_model(name: str) -> str:
    """`qwen3-0.6b` / `llama-3.1-8b` name the config-only folders in bench/data (run with random weights)."""
    path = os.path.join(_BENCH_DATA, name)
    return path if os.path.isdir(path) else name


# The benchmarks' defaults on top of the engine flags (entrypoints/args.py): random bf16 weights, a 4096-token
# context, no prefix caching (random prompts share nothing), and the LLM class's max_num_seqs /
# max_num_batched_tokens (vLLM's offline defaults: 1024 / 16384 on >= 70 GiB GPUs but the A100, else 256 / 8192).
BENCH_DEFAULTS: dict[str, Any] = dict(dtype="bfloat16", load_format="dummy", max_model_len=4096,
                                      enable_prefix_caching=False, max_num_seqs=None, max_num_batched_tokens=None)


def add_bench_engine_args(ap: argparse.ArgumentParser, model: str = "qwen3-0.6b") -> argparse.ArgumentParser:
    """The engine flags of `vllm-lite serve` with the benchmarks' defaults, plus --json."""
    add_engine_args(ap, model_help=f"bench/data name (qwen3-0.6b, llama-3.1-8b: config only, run with "
                                   f"--load-format dummy), HF folder or default-model name (default {model})")
    ap.set_defaults(model_flag=model, **BENCH_DEFAULTS)
    ap.add_argument("--json", help="also write the result to this file")
    return ap


def bench_model(args: argparse.Namespace) -> str:
    """The model name as given (reported in the results)."""
    return engine_kwargs_from_args(args)["model"]


def make_llm(args: argparse.Namespace, **overrides: Any) -> Any:
    """An LLM from the parsed engine flags (no tokenizer with dummy weights: the prompts are token ids)."""
    from vllm_lite import LLM
    kwargs = engine_kwargs_from_args(args)
    kwargs["model"] = resolve_bench_model(kwargs["model"])
    kwargs["skip_tokenizer_init"] = kwargs.get("skip_tokenizer_init") or kwargs.get("load_format") == "dummy"
    kwargs.update(overrides)
    return LLM(**kwargs)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float | None:
    """Device-to-device copy bandwidth in bytes/s, counting the read and the write (None on CPU)."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1000 / iters
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / seconds


def bandwidth_floor(llm: Any) -> dict:
    """The decode-step floor: every bf16 weight read once per step at the measured copy bandwidth."""
    wbytes = llm.weight_bytes()
    bw = copy_bandwidth(llm.device)
    return {"weight_bytes": wbytes, "copy_bandwidth_TBps": bw / 1e12 if bw else None,
            "floor_ms": 1000 * wbytes / bw if bw else None}


def hf_latency(model_path: str, device: torch.device, dtype: torch.dtype, batch_size: int, input_len: int,
               output_len: int, iters: int) -> dict:
    """transformers' `generate` on the same config (random weights), greedy, for the same shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(model_path)
    with torch.device(device):  # random init on the device itself: an 8B model would take minutes on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ids = torch.randint(0, 10000, (batch_size, input_len), device=device)
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                           eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        return time.perf_counter() - t0

    gen(4)
    ttft = sorted(gen(1) for _ in range(iters))[iters // 2]
    total = sorted(gen(output_len) for _ in range(iters))[iters // 2]
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"hf_ttft_ms": 1000 * ttft, "hf_tpot_ms": 1000 * (total - ttft) / (output_len - 1)}


def report(result: dict, json_path: str | None) -> dict:
    print(json.dumps(result, indent=2))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result


def kernel_profile(run: Any, row_limit: int = 25) -> tuple[str, float, float]:
    """Profile `run()` with the torch profiler (CPU + CUDA): (kernel table, GPU-busy ms, wall ms).

    GPU busy = kernel time summed over the window (one stream's kernels do not overlap) against its wall time: low
    means host-bound or launch gaps."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1000
    events = prof.key_averages()
    # Only the device's own rows: a Python-launched kernel also has a host-side row carrying the same device time.
    busy_ms = sum(e.self_device_time_total for e in events
                  if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA) / 1000
    return events.table(sort_by="cuda_time_total", row_limit=row_limit, max_name_column_width=70), busy_ms, wall_ms


def per_step_times(prof: Any, steps: int) -> dict[str, tuple[float, float]]:
    """A cProfile.Profile's functions as "name (file:line)" -> (own, cumulative) ms per engine step."""
    import pstats
    return {f"{name} ({os.path.basename(file)}:{line})": (1000 * own / steps, 1000 * cum / steps)
            for (file, line, name), (_, _, own, cum, _) in pstats.Stats(prof).stats.items()}


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
