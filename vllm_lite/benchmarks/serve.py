"""`vllm-lite bench serve`: online serving latency and throughput against any OpenAI-compatible server (vLLM's
`vllm bench serve` as the reference, so the same tool measures both), or against a `vllm-lite serve` it launches.

Requests stream (SSE) with ignore_eos, so every output is exactly its requested length; they arrive as a Poisson
process at --request-rate (inf: all at once) and/or are held to --max-concurrency in flight (closed loop). Prompts
are random token ids (`--dataset random`, /v1/completions; lengths uniform in L*(1-r)..L*(1+r)) or GSM8K questions
as chats (`--dataset gsm8k`, /v1/chat/completions). Reported: TTFT, TPOT, ITL, end-to-end latency (mean, median,
p90, p99), request / token throughput, goodput under `--goodput ttft:MS tpot:MS`; `--json` writes the result and
`--sweep 1,2,4,inf` runs each rate in turn and plots latency percentiles against the achieved rate.

    vllm-lite bench serve --launch --model qwen3-0.6b --max-concurrency 1 --num-prompts 50
    vllm-lite bench serve --base-url http://127.0.0.1:8000 --dataset gsm8k --request-rate 8 --json r.json
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import shlex
import sys
import time
from typing import Any

import numpy as np

from vllm_lite import envs
from vllm_lite.benchmarks.serve_report import (RequestResult, format_table, parse_goodput, phase_sums, plot_sweep,
                                               server_phases, summarize)
from vllm_lite.benchmarks.utils import BENCH_DEFAULTS, resolve_bench_model
from vllm_lite.entrypoints.args import CLIENT_KEEP_ALIVE_S, add_engine_args, engine_argv, engine_kwargs_from_args

LAUNCH_MODEL = "qwen3-0.6b"  # --launch without --model: bench/data's config with random weights
TOKEN_ID_LOW = 100  # random prompts avoid the low ids, where special tokens usually sit


# ---- prompts --------------------------------------------------------------------------------------------------------

def _lengths(rng: np.random.Generator, n: int, mean: int, ratio: float) -> list[int]:
    low, high = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.integers(low, high + 1, size=n).tolist()


def build_requests(args: argparse.Namespace, model: str) -> list[tuple[str, dict[str, Any], int]]:
    """(endpoint path, JSON body without the streaming fields, expected output tokens) per prompt."""
    rng = np.random.default_rng(args.seed)
    outs = _lengths(rng, args.num_prompts, args.random_output_len, args.random_range_ratio)
    common = {"model": model, "temperature": 0.0, "ignore_eos": args.ignore_eos}
    if args.dataset == "random":
        ins = _lengths(rng, args.num_prompts, args.random_input_len, args.random_range_ratio)
        return [("/v1/completions", {**common, "prompt": rng.integers(TOKEN_ID_LOW, args.random_vocab_size,
                                                                       size=n_in).tolist(), "max_tokens": n_out},
                 n_out) for n_in, n_out in zip(ins, outs)]
    from vllm_lite.evals.gsm8k import find_data_dir, load_jsonl
    questions = [row["question"] for row in load_jsonl(os.path.join(find_data_dir(args.dataset_path), "test.jsonl"))]
    order = rng.permutation(len(questions))
    return [("/v1/chat/completions", {**common, "messages": [{"role": "user", "content": questions[order[i % len(
        questions)]]}], "max_tokens": n_out}, n_out) for i, n_out in enumerate(outs)]


# ---- one request ----------------------------------------------------------------------------------------------------

def _token_event(path: str, choice: dict[str, Any]) -> bool:
    """Whether a streamed choice carries generated output: any completions chunk (a token may have no text yet, or
    no tokenizer at all), a chat chunk with content or a finish (the first, role-only chunk is not a token)."""
    if path.endswith("/completions") and not path.endswith("chat/completions"):
        return True
    delta = choice.get("delta") or {}
    return bool(delta.get("content")) or choice.get("finish_reason") is not None


async def send_request(http: Any, path: str, body: dict[str, Any], expected: int) -> RequestResult:
    """Stream one request; timings from the client's side (perf_counter)."""
    r = RequestResult(expected_output_tokens=expected if body.get("ignore_eos") else 0)
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start = r.start = time.perf_counter()
    last = 0.0
    events = 0
    done = False
    try:
        async with http.stream("POST", path, json=payload) as resp:
            r.status = resp.status_code
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300].decode(errors='replace')}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                now = time.perf_counter()
                obj = json.loads(line[6:])
                if "error" in obj:
                    err = obj["error"]
                    r.status = int(err.get("code") or 500) if str(err.get("code", "")).isdigit() else 500
                    r.error = f"stream error: {err.get('message', err)}"
                    return r
                if obj.get("usage"):
                    r.prompt_tokens = obj["usage"]["prompt_tokens"]
                    r.output_tokens = obj["usage"]["completion_tokens"]
                choices = obj.get("choices") or []
                if choices and _token_event(path, choices[0]):
                    if events == 0:
                        r.ttft = now - start
                    else:
                        r.itl.append(now - last)
                    last = now
                    events += 1
    except Exception as exc:  # noqa: BLE001 - a broken connection is a failed request, reported with its reason
        r.error = f"{type(exc).__name__}: {exc}"
        return r
    r.latency = time.perf_counter() - start
    if not r.output_tokens:
        r.output_tokens = events
    r.success = done and events > 0
    if not r.success:
        r.error = "the stream ended without [DONE]" if not done else "no tokens streamed"
    return r


# ---- one run ---------------------------------------------------------------------------------------------------------

async def run_benchmark(args: argparse.Namespace, base_url: str, model: str, requests: list,
                        rate: float) -> dict[str, Any]:
    """All `requests` at Poisson arrivals of `rate`/s (inf: at once), at most --max-concurrency in flight."""
    import httpx
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=CLIENT_KEEP_ALIVE_S)
    rng = np.random.default_rng(args.seed + 1)
    gaps = [0.0] * len(requests) if math.isinf(rate) else rng.exponential(1.0 / rate, len(requests)).tolist()
    gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    results: list[RequestResult] = []
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=httpx.Timeout(args.timeout),
                                 limits=limits) as http:
        for path, body, expected in requests[:args.num_warmups]:  # untimed: connections, compile, caches
            warm = await send_request(http, path, body, expected)
            if not warm.success:
                raise RuntimeError(f"the warm-up request failed: {warm.error}")

        async def one(item: tuple) -> None:
            if gate is None:
                results.append(await send_request(http, *item))
                return
            async with gate:
                results.append(await send_request(http, *item))

        phases_before = await _phase_sums(http)
        progress = asyncio.ensure_future(_progress(results, len(requests), rate)) if args.progress else None
        start = time.perf_counter()
        tasks = []
        for gap, item in zip(gaps, requests):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.ensure_future(one(item)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if progress is not None:
            progress.cancel()
        phases_after = await _phase_sums(http)
    summary = summarize(results, duration, parse_goodput(args.goodput))
    if summary["completed"]:
        summary.update(server_phases(phases_before, phases_after, summary["mean_ttft_ms"]))
    summary.update(request_rate="inf" if math.isinf(rate) else rate, max_concurrency=args.max_concurrency, model=model, base_url=base_url)
    return summary


async def _phase_sums(http: Any) -> dict[str, tuple[float, float]]:
    """The server's request-phase histogram sums ({} where it has no /metrics or no such histograms)."""
    try:
        resp = await http.get("/metrics")
    except Exception:  # noqa: BLE001 - a server without /metrics: the report just lacks the phases
        return {}
    return phase_sums(resp.text) if resp.status_code == 200 else {}


async def _progress(results: list, total: int, rate: float) -> None:
    start = time.perf_counter()
    while True:
        await asyncio.sleep(2.0)
        failed = sum(1 for r in results if not r.success)
        print(f"  [rate {rate:g}/s] {len(results)}/{total} done ({failed} failed), "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


# ---- the server --------------------------------------------------------------------------------------------------------

def launch_server(args: argparse.Namespace, model: str) -> Any:
    """`vllm-lite serve` with the engine flags given here (vllm_lite.evals.server.EvalServer: its own process group,
    a log file, stopped with SIGTERM then SIGKILL by close())."""
    from vllm_lite.evals.server import EvalServer
    kwargs = engine_kwargs_from_args(args)
    kwargs["model"] = resolve_bench_model(model)
    kwargs["served_model_name"] = kwargs.get("served_model_name") or model
    if kwargs.get("load_format") == "dummy" and not kwargs.get("tokenizer"):
        kwargs["skip_tokenizer_init"] = True  # a config-only folder: token-id prompts, no text
    argv = engine_argv(kwargs) + (["--api-key", args.api_key] if args.api_key else [])
    print(f"launching vllm-lite serve {shlex.join(argv)}", file=sys.stderr, flush=True)
    server = EvalServer(argv[0], shlex.join(argv[1:]), startup_timeout=args.launch_timeout)
    server.model = kwargs["served_model_name"]
    print(f"  ready at {server.base_url} (log {server.log_path})", file=sys.stderr, flush=True)
    return server


async def _first_model(base_url: str, api_key: str | None) -> str:
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as http:
        resp = await http.get("/v1/models")
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]


# ---- command line -------------------------------------------------------------------------------------------------------

def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a request rate must be > 0 (or inf)")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vllm-lite bench serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap, model_help="the served model name to request (default: the server's first); with --launch "
                                   f"the model to serve (default {LAUNCH_MODEL}: bench/data config, random weights)")
    ap.set_defaults(**BENCH_DEFAULTS)
    g = ap.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="an OpenAI-compatible server (no /v1)")
    g.add_argument("--api-key", default=envs.api_key(), help="sent as a bearer token (default $VLLM_LITE_API_KEY)")
    g.add_argument("--launch", action="store_true",
                   help="start `vllm-lite serve` with the engine flags here (benchmark defaults: random bf16 weights, "
                        "4096-token context, no prefix caching) and stop it at the end")
    g.add_argument("--launch-timeout", type=float, default=900.0, help="seconds to wait for the launched server")
    g = ap.add_argument_group("workload")
    g.add_argument("--dataset", choices=("random", "gsm8k"), default="random",
                   help="random: token-id prompts to /v1/completions; gsm8k: questions as chats")
    g.add_argument("--dataset-path", default=None, help="GSM8K folder with test.jsonl (default: shared/data/gsm8k)")
    g.add_argument("--num-prompts", type=int, default=100)
    g.add_argument("--random-input-len", type=int, default=128)
    g.add_argument("--random-output-len", type=int, default=128, help="output tokens (both datasets)")
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [L*(1-r), L*(1+r)] (0: all exactly L)")
    g.add_argument("--random-vocab-size", type=int, default=10000,
                   help=f"random prompt ids are drawn from [{TOKEN_ID_LOW}, this)")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly the requested lengths (default on)")
    g.add_argument("--request-rate", type=_rate, default=math.inf, help="Poisson arrivals per second (inf: all at "
                                                                        "once)")
    g.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    g.add_argument("--num-warmups", type=int, default=1, help="untimed requests sent first, one at a time")
    g.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    g = ap.add_argument_group("report")
    g.add_argument("--goodput", nargs="+", metavar="NAME:MS", help="SLOs for goodput: ttft:MS tpot:MS e2el:MS")
    g.add_argument("--sweep", default=None, metavar="RATES",
                   help="comma-separated request rates run in turn (e.g. 1,2,4,8,inf), plotted to --plot")
    g.add_argument("--plot", default="bench_serve_sweep.png", help="the sweep's PNG (needs matplotlib)")
    g.add_argument("--json", default=None, help="write the result here")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress on stderr")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.num_prompts < 1 or (args.max_concurrency is not None and args.max_concurrency < 1):
        raise SystemExit("--num-prompts and --max-concurrency must be >= 1")
    try:
        parse_goodput(args.goodput)
        rates = [_rate(x) for x in args.sweep.split(",")] if args.sweep else [args.request_rate]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise SystemExit(str(exc)) from None
    server = launch_server(args, args.model_flag or LAUNCH_MODEL) if args.launch else None
    try:
        base_url = server.base_url.removesuffix("/v1") if server else args.base_url.rstrip("/").removesuffix("/v1")
        model = server.model if server else (args.model_flag or asyncio.run(_first_model(base_url, args.api_key)))
        requests = build_requests(args, model)
        runs = []
        for rate in rates:
            summary = asyncio.run(run_benchmark(args, base_url, model, requests, rate))
            label = f"(rate {rate:g}/s" + (f", concurrency {args.max_concurrency})" if args.max_concurrency else ")")
            print(format_table(summary, label), flush=True)
            runs.append(summary)
    finally:
        if server is not None:
            server.close()
    config = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dataset": args.dataset, "num_prompts": args.num_prompts, "random_input_len": args.random_input_len,
              "random_output_len": args.random_output_len, "random_range_ratio": args.random_range_ratio,
              "goodput": parse_goodput(args.goodput), "launched": bool(server)}
    result = {**config, **runs[0]} if len(runs) == 1 else {**config, "runs": runs}
    if len(runs) > 1:
        why_not = plot_sweep(runs, args.plot)
        print(why_not or f"plot written to {args.plot}", file=sys.stderr)
        result["plot"] = None if why_not else args.plot
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
