"""Soak: a real `vllm-lite serve` under --concurrency clients for --duration seconds (not part of the CI run).

Each client loops over a mix of requests: greedy completions and chats, streamed and not, short and long prompts
(each checked against the same request sent alone before the soak), sampled requests with n > 1, streams aborted
after a few chunks, and bad requests (which must be 4xx). Pass: no 5xx, every good request complete and every greedy
one equal to its solo output, server RSS (API server + engine core + workers) growing under 10 % from the end of
the warm-up to the end, and /metrics back to 0 running, 0 waiting and 0 % KV cache in use once the load stops.

    python bench/soak.py --duration 600 --concurrency 64                 # default model, CPU, float32
    python bench/soak.py --duration 30 --model /path/to/tiny --concurrency 16 --json soak.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
from typing import Any

import httpx

from vllm_lite.evals.server import EvalServer

SHORT_PROMPTS = ["The capital of France is", "Once upon a time, in a quiet village,", "def fibonacci(n):",
                 "The three primary colours are", "Water boils at", "My favourite season is autumn because",
                 "To make a cup of tea, first", "The quick brown fox"]
QUESTIONS = ["What is 17 times 23?", "Name three planets.", "Write a haiku about rain.",
             "Explain what a prime number is in one sentence."]
PARAGRAPH = ("The river ran through the old town, past the mill and the market square, where traders had gathered "
             "every Thursday for three hundred years to sell bread, cloth, tools and news. ")
BAD_BODIES: list[tuple[str, Any]] = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}),
    ("/v1/completions", {"model": "no-such-model", "prompt": "hi"}),
    ("/v1/completions", {"prompt": "hi", "n": 100000}),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": "not a list"}),
    ("/v1/completions", b'{"prompt": "unterminated'),
]


def greedy_cases(long_prompt: str) -> list[dict[str, Any]]:
    """The greedy requests (path, body without `stream`) whose solo outputs the soak compares against."""
    cases: list[dict[str, Any]] = []
    for i, p in enumerate(SHORT_PROMPTS):
        cases.append({"path": "/v1/completions", "body": {"prompt": p, "max_tokens": 8 + 8 * (i % 4)}})
    for i, q in enumerate(QUESTIONS):
        cases.append({"path": "/v1/chat/completions",
                      "body": {"messages": [{"role": "user", "content": q}], "max_tokens": 16 + 8 * (i % 3)}})
    cases.append({"path": "/v1/completions", "body": {"prompt": long_prompt, "max_tokens": 16}})
    cases.append({"path": "/v1/chat/completions",
                  "body": {"messages": [{"role": "user", "content": long_prompt + "\nSummarise that."}],
                           "max_tokens": 16}})
    for c in cases:
        c["body"]["temperature"] = 0.0
    return cases


def _text(path: str, choice: dict[str, Any], stream: bool) -> str:
    if path.endswith("chat/completions"):
        part = choice.get("delta" if stream else "message") or {}
        return part.get("content") or ""
    return choice.get("text") or ""


async def request(http: httpx.AsyncClient, path: str, body: dict[str, Any], stream: bool,
                  abort_after: int = 0) -> dict[str, Any]:
    """One request; streams are read to [DONE] (or closed after `abort_after` data chunks). Returns status, the
    text and finish reason per choice index, usage, whether [DONE] came, and the error JSON if any."""
    out: dict[str, Any] = {"status": 0, "texts": {}, "finish": {}, "usage": None, "done": False, "chunks": 0}
    if not stream:
        resp = await http.post(path, json=body)
        out["status"] = resp.status_code
        data = resp.json()
        if resp.status_code != 200:
            out["error"] = data.get("error")
            return out
        for ch in data["choices"]:
            out["texts"][ch["index"]] = _text(path, ch, False)
            out["finish"][ch["index"]] = ch["finish_reason"]
        out["usage"] = data.get("usage")
        out["done"] = True
        return out
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", path, json=payload) as resp:
        out["status"] = resp.status_code
        if resp.status_code != 200:
            out["error"] = json.loads(await resp.aread()).get("error")
            return out
        async for line in resp.aiter_lines():
            if line == "data: [DONE]":
                out["done"] = True
                break
            if not line.startswith("data: "):
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                out["error"] = obj["error"]
                out["status"] = int(obj["error"].get("code") or 500)
                break
            out["chunks"] += 1
            out["usage"] = obj.get("usage") or out["usage"]
            for ch in obj.get("choices") or []:
                i = ch["index"]
                out["texts"][i] = out["texts"].get(i, "") + _text(path, ch, True)
                if ch.get("finish_reason"):
                    out["finish"][i] = ch["finish_reason"]
            if abort_after and out["chunks"] >= abort_after:
                break  # leaving the block closes the connection: the server must abort the request
    return out


class Soak:
    def __init__(self, args: argparse.Namespace, base_url: str, model: str, pids: Any) -> None:
        self.args = args
        self.base_url = base_url
        self.model = model
        self.pids = pids  # callable -> server pids for RSS, or None
        self.rng = random.Random(args.seed)
        self.counts: dict[str, int] = {}
        self.failures: list[str] = []
        self.refs: list[dict[str, Any]] = []
        self.rss: list[tuple[float, int]] = []

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def fail(self, what: str) -> None:
        self.count("failed")
        if len(self.failures) < 50:
            self.failures.append(what)

    async def references(self, http: httpx.AsyncClient) -> None:
        tok = await http.post("/tokenize", json={"prompt": PARAGRAPH})
        per = tok.json()["count"] if tok.status_code == 200 else 40
        long_prompt = PARAGRAPH * max(1, int(self.args.long_prompt_tokens / per))
        for case in greedy_cases(long_prompt):
            case["body"]["model"] = self.model
            solo = await request(http, case["path"], case["body"], stream=False)
            if solo["status"] != 200:
                raise RuntimeError(f"reference request failed: {solo}")
            case["text"], case["finish"] = solo["texts"][0], solo["finish"][0]
            case["tokens"] = solo["usage"]["completion_tokens"]
            self.refs.append(case)

    async def one(self, http: httpx.AsyncClient) -> None:
        """One request of a randomly chosen kind, checked."""
        kind = self.rng.choices(["greedy", "sampled", "abort", "bad"], weights=[50, 20, 15, 15])[0]
        stream = self.rng.random() < 0.5
        self.count(kind + ("-stream" if stream and kind in ("greedy", "sampled") else ""))
        if kind == "bad":
            path, body = self.rng.choice(BAD_BODIES)
            resp = await (http.post(path, content=body, headers={"Content-Type": "application/json"})
                          if isinstance(body, bytes) else http.post(path, json=body))
            if not 400 <= resp.status_code < 500:
                self.fail(f"bad request {body!r} answered {resp.status_code}: {resp.text[:200]}")
            return
        case = self.rng.choice(self.refs)
        if kind == "greedy":
            r = await request(http, case["path"], case["body"], stream)
            if self._check_status(r, case):
                ok = (r["texts"].get(0) == case["text"] and r["finish"].get(0) == case["finish"] and r["done"]
                      and r["usage"] and r["usage"]["completion_tokens"] == case["tokens"])
                if not ok:
                    self.fail(f"greedy {case['path']} stream={stream} differs from its solo run: "
                              f"{r['texts'].get(0)!r} vs {case['text']!r} ({r['finish']} vs {case['finish']})")
        elif kind == "sampled":
            n = self.rng.randint(2, 4)
            body = {**case["body"], "temperature": 0.8, "n": n, "seed": self.rng.randint(0, 2 ** 31)}
            r = await request(http, case["path"], body, stream)
            if self._check_status(r, case):
                max_total = n * body["max_tokens"]
                if (sorted(r["finish"]) != list(range(n)) or not r["done"] or not r["usage"]
                        or not 0 < r["usage"]["completion_tokens"] <= max_total):
                    self.fail(f"sampled n={n} stream={stream} incomplete: finish {r['finish']}, usage {r['usage']}")
        else:
            r = await request(http, case["path"], {**case["body"], "max_tokens": case["body"]["max_tokens"] + 16},
                              stream=True, abort_after=self.rng.randint(2, 4))
            self._check_status(r, case)

    def _check_status(self, r: dict[str, Any], case: dict[str, Any]) -> bool:
        if r["status"] >= 500:
            self.count("5xx")
        if r["status"] != 200:
            self.fail(f"{case['path']} answered {r['status']}: {r.get('error')}")
            return False
        return True

    async def client(self, http: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                await self.one(http)
                self.count("requests")
            except Exception as exc:  # noqa: BLE001 - a broken connection or bad JSON is a failure to report
                self.fail(f"{type(exc).__name__}: {exc}")

    def sample_rss(self, start: float) -> None:
        if self.pids is None:
            return
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    m = re.search(r"VmRSS:\s+(\d+) kB", f.read())
                total += int(m.group(1)) * 1024 if m else 0
            except OSError:
                pass
        self.rss.append((time.monotonic() - start, total))

    async def metrics(self, http: httpx.AsyncClient) -> dict[str, float]:
        text = (await http.get("/metrics")).text
        found = {}
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
            m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
            found[name.split(":")[1]] = float(m.group(1)) if m else float("nan")
        return found

    async def run(self) -> dict[str, Any]:
        a = self.args
        headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
        limits = httpx.Limits(max_connections=a.concurrency + 8)
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=a.request_timeout,
                                     limits=limits) as http:
            await self.references(http)
            start = time.monotonic()
            deadline = start + a.duration
            clients = [asyncio.ensure_future(self.client(http, deadline)) for _ in range(a.concurrency)]
            warm_end = min(a.warmup, a.duration / 3)
            last_print = 0.0
            while not all(c.done() for c in clients):
                await asyncio.sleep(1.0)
                now = time.monotonic() - start
                if not self.rss or now - self.rss[-1][0] >= 5 or (self.rss[-1][0] < warm_end <= now):
                    self.sample_rss(start)
                if now - last_print >= 30:
                    last_print = now
                    print(f"  {now:.0f} s: {self.counts.get('requests', 0)} requests, "
                          f"{self.counts.get('failed', 0)} failed", file=sys.stderr, flush=True)
            await asyncio.gather(*clients)
            self.sample_rss(start)
            end_metrics = {}
            for _ in range(40):  # the engine's last stats arrive with its last step
                end_metrics = await self.metrics(http)
                if all(v == 0 for v in end_metrics.values()):
                    break
                await asyncio.sleep(0.25)
        return self.report(warm_end, end_metrics)

    def _each_minute(self) -> list[tuple[float, int]]:
        """The first RSS sample of each minute, and the last one (to see a trend, not just two points)."""
        picked, minute = [], -1
        for t, r in self.rss:
            if int(t // 60) != minute:
                minute = int(t // 60)
                picked.append((t, r))
        return picked + self.rss[-1:] if self.rss and picked[-1] != self.rss[-1] else picked

    def report(self, warm_end: float, end_metrics: dict[str, float]) -> dict[str, Any]:
        after = [r for t, r in self.rss if t >= warm_end]
        growth = (after[-1] - after[0]) / after[0] if len(after) >= 2 and after[0] else None
        checks = {"no_5xx": self.counts.get("5xx", 0) == 0, "no_failures": not self.failures,
                  "rss_growth_under_10pct": growth is not None and growth < 0.10,
                  "idle_at_end": all(v == 0 for v in end_metrics.values())}
        return {"model": self.model, "duration_s": self.args.duration, "concurrency": self.args.concurrency,
                "counts": self.counts, "greedy_cases": len(self.refs), "failures": self.failures,
                "rss_mib_after_warmup": after[0] / 2 ** 20 if after else None,
                "rss_mib_end": after[-1] / 2 ** 20 if after else None,
                "rss_mib_max": max(after) / 2 ** 20 if after else None, "rss_growth": growth,
                "rss_mib_by_minute": {f"{t:.0f}s": round(r / 2 ** 20, 1) for t, r in self._each_minute()},
                "end_metrics": end_metrics, "checks": checks, "passed": all(checks.values())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the model to serve (with no --base-url)")
    ap.add_argument("--serve-args", default="--device cpu --dtype float32 --max-model-len 1024",
                    help="flags for the `vllm-lite serve` started here")
    ap.add_argument("--base-url", default=None, help="soak a running server instead (no RSS figures)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline (at most 1/3 of the "
                                                               "duration)")
    ap.add_argument("--long-prompt-tokens", type=int, default=600, help="about this many tokens in long prompts")
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the report here")
    args = ap.parse_args(argv)
    server = None
    if args.base_url is None:
        serve_args = args.serve_args + (f" --api-key {args.api_key}" if args.api_key else "")
        server = EvalServer(args.model, serve_args)
        print(f"server: {server.command} (log {server.log_path})", file=sys.stderr, flush=True)
    try:
        base_url = args.base_url or server.base_url.removesuffix("/v1")
        model = httpx.get(base_url + "/v1/models", timeout=30,
                          headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
                          ).json()["data"][0]["id"]
        pids = (lambda: _tree(server.proc.pid)) if server else None
        report = asyncio.run(Soak(args, base_url, model, pids).run())
    finally:
        if server is not None:
            server.close()
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def _tree(pid: int) -> list[int]:
    """pid and its live descendants (the engine core and the workers)."""
    found, todo = [pid], [pid]
    while todo:
        p = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
                found += kids
                todo += kids
        except OSError:
            pass
    return found


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
