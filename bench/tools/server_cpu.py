"""CPU time per streamed token of each `vllm-lite serve` process (API server, engine core, worker), with the
client-side ITL: where a served stream's per-token host time goes (issue 16's ITL gap at concurrency 1).

Starts the server, streams --num-requests completions of --output-len tokens one after another (token-id prompts,
greedy, ignore_eos), and reads utime + stime of every process of the server from /proc before and after. A process
whose CPU per token approaches the ITL sets the pace of the stream. The busy child is the engine core (the other
one is multiprocessing's resource tracker); grandchildren are GPU workers.

    python bench/tools/server_cpu.py --model smollm2-135m-instruct --serve-args "--load-format auto"
    python bench/tools/server_cpu.py --model smollm2-135m-instruct --serve-args "--load-format auto --skip-tokenizer-init"
    python bench/tools/server_cpu.py --model PATH --serve-args "--device cpu --dtype float32" --max-token-id 380
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")




def _stream(base: str, model: str, prompt: list[int], max_tokens: int) -> list[float]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    times = []
    with urllib.request.urlopen(req) as resp:
        for line in resp:
            if line.startswith(b"data: {") and b'"choices":[]' not in line:
                times.append(time.perf_counter())
    return [b - a for a, b in zip(times, times[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--serve-args", default="", help="extra `vllm-lite serve` flags (one shell string)")
    ap.add_argument("--port", type=int, default=8871)
    ap.add_argument("--num-requests", type=int, default=10)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=1, help="streams at once (threads of this client)")
    ap.add_argument("--max-token-id", type=int, default=20000, help="prompt ids are drawn below this (tiny models)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    server = subprocess.Popen([sys.executable, "-m", "vllm_lite", "serve", args.model, "--port", str(args.port),
                               *shlex.split(args.serve_args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(900):
            try:
                urllib.request.urlopen(f"{base}/health")
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited with code {server.returncode}")
                time.sleep(1)
        rng = random.Random(0)
        prompt = lambda: [rng.randrange(100, args.max_token_id) for _ in range(args.input_len)]  # noqa: E731
        for _ in range(3):  # warm-up
            _stream(base, args.model, prompt(), 32)
        # The API server; its children (the engine core, multiprocessing's resource tracker); theirs (the workers).
        names = {server.pid: "api server"}
        for child in _children(server.pid):
            names[child] = f"child {child}"
            names.update({g: f"grandchild {g} (worker)" for g in _children(child)})
        pids = list(names)
        before = {p: _cpu_s(p) for p in pids}
        itl: list[float] = []
        prompts = [prompt() for _ in range(args.num_requests)]
        t0 = time.perf_counter()
        if args.concurrency == 1:
            for p in prompts:
                itl += _stream(base, args.model, p, args.output_len)
        else:  # threads, each streaming its share of the requests one after another
            with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                for gaps in pool.map(lambda p: _stream(base, args.model, p, args.output_len), prompts):
                    itl += gaps
        wall = time.perf_counter() - t0
        tokens = args.num_requests * args.output_len
        per_token = {names[p]: round(1000 * (_cpu_s(p) - before[p]) / tokens, 4) for p in pids}
    finally:
        server.terminate()
        server.wait(60)
    result = {"model": args.model, "serve_args": args.serve_args, "concurrency": args.concurrency, "tokens": tokens,
              "output_tokens_per_s": round(tokens / wall, 1), "itl_p50_ms": round(1000 * statistics.median(itl), 4),
              "cpu_ms_per_token": per_token}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
