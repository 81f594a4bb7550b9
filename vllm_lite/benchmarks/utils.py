"""Shared pieces of the benchmarks: model-name lookup in bench/data, engine construction, the bandwidth floor and
the transformers baseline."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

_BENCH_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench",
                           "data")


def resolve_bench_model(name: str) -> str:
    """`qwen3-0.6b` / `llama-3.1-8b` name the config-only folders in bench/data (run with random weights)."""
    path = os.path.join(_BENCH_DATA, name)
    return path if os.path.isdir(path) else name


def add_engine_args(ap: argparse.ArgumentParser, model: str) -> None:
    ap.add_argument("--model", default=model, help="bench/data name, HF folder or default-model name")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="default: the LLM class's, like vLLM's (1024 on >= 70 GiB GPUs but the A100, else 256)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="default: the LLM class's, like vLLM's (16384 on >= 70 GiB GPUs but the A100, else 8192)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--json", help="also write the result to this file")


def make_llm(args: argparse.Namespace, **overrides: Any) -> Any:
    from vllm_lite import LLM
    kwargs = dict(device=args.device, dtype=args.dtype, load_format=args.load_format,
                  max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                  attention_backend=args.attention_backend, skip_tokenizer_init=args.load_format == "dummy",
                  enable_prefix_caching=False)
    kwargs.update(overrides)
    return LLM(resolve_bench_model(args.model), **kwargs)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


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
    runner = llm.engine.executor.worker.runner
    wbytes = weight_bytes(runner.model)
    bw = copy_bandwidth(runner.device)
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


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
