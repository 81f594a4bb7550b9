"""Server throughput and process-hop overhead.

Starts `vllm-lite serve MODEL` (or uses --url), sends --num-requests concurrent short chats with the official
`openai` client, and reports requests/s and output tokens/s. Then it measures the time per decode step of one
streamed greedy request through the server and of the same request through the offline `LLM` in this process:
the difference is the cost of the process hops (API server <-> engine core <-> worker).

    python bench/serving.py --model smollm2-135m-instruct --device cpu
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx
from openai import AsyncOpenAI

from vllm_lite.entrypoints.args import add_engine_args, engine_argv, engine_kwargs_from_args

TOPICS = ["the sea", "a cat", "mountains", "coffee", "rain", "the moon", "trains", "books"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "vllm_lite", "serve", *engine_argv(engine_kwargs_from_args(args)), "--port", str(port)]
    proc = subprocess.Popen(cmd, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("server exited during startup")
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


async def _chats(client: AsyncOpenAI, model: str, n: int, max_tokens: int) -> tuple[float, int]:
    async def one(i: int) -> int:
        r = await client.chat.completions.create(
            model=model, max_tokens=max_tokens, temperature=0,
            messages=[{"role": "user", "content": f"Write one sentence about {TOPICS[i % len(TOPICS)]}."}])
        return r.usage.completion_tokens
    t0 = time.perf_counter()
    tokens = await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - t0, sum(tokens)


async def _stream_step_time(client: AsyncOpenAI, model: str, prompt_ids: list[int], n: int) -> float:
    """Decode step time of one streamed greedy request (ignore_eos): (last chunk - first chunk) / (n - 1).

    Chunk gaps themselves are not used: the server may coalesce several tokens into one chunk."""
    stamps = []
    stream = await client.completions.create(model=model, prompt=prompt_ids, max_tokens=n, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    async for _ in stream:
        stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (n - 1)


def _offline_step_time(args: argparse.Namespace, prompt_ids: list[int], n: int) -> float:
    from vllm_lite import LLM, SamplingParams
    llm = LLM(**engine_kwargs_from_args(args))  # the server's engine settings
    p = {"prompt_token_ids": prompt_ids}
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    llm.generate(p, full, use_tqdm=False)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        llm.generate(p, first, use_tqdm=False)
        t1 = time.perf_counter()
        llm.generate(p, full, use_tqdm=False)
        t2 = time.perf_counter()
        times.append((t2 - t1 - (t1 - t0)) / (n - 1))
    return statistics.median(times)


async def _bench(args: argparse.Namespace, url: str) -> dict:
    client = AsyncOpenAI(base_url=url + "/v1", api_key=args.api_key or "EMPTY")
    model = (await client.models.list()).data[0].id
    await _chats(client, model, 4, 8)  # warm-up
    runs = [await _chats(client, model, args.num_requests, args.max_tokens) for _ in range(args.repeats)]
    elapsed = statistics.median(r[0] for r in runs)
    tokens = statistics.median(r[1] for r in runs)
    prompt_ids = list(range(100, 164))
    await _stream_step_time(client, model, prompt_ids, 8)
    step = statistics.median([await _stream_step_time(client, model, prompt_ids, args.step_tokens)
                              for _ in range(3)])
    return {"model": model, "num_requests": args.num_requests, "max_tokens": args.max_tokens,
            "requests_per_s": args.num_requests / elapsed, "output_tokens_per_s": tokens / elapsed,
            "server_decode_step_ms": 1000 * step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap, model_help="the model to serve (default smollm2-135m-instruct); the engine flags are "
                                   "those of `vllm-lite serve`, for the server and the offline comparison alike")
    ap.set_defaults(model_flag="smollm2-135m-instruct", device="cpu", max_model_len=2048)
    ap.add_argument("--url", help="use a running server instead of starting one")
    ap.add_argument("--api-key")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--step-tokens", type=int, default=64)
    ap.add_argument("--no-offline", action="store_true", help="skip the offline comparison")
    args = ap.parse_args()
    proc = None
    url = args.url
    if url is None:
        proc, url = _start_server(args)
    try:
        result = asyncio.run(_bench(args, url))
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    if not args.no_offline and args.url is None:
        step = _offline_step_time(args, list(range(100, 164)), args.step_tokens)
        result["offline_decode_step_ms"] = 1000 * step
        result["process_hop_overhead_ms"] = result["server_decode_step_ms"] - result["offline_decode_step_ms"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
