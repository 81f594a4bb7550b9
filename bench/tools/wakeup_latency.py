"""Request latency of a trivial FastAPI app (uvicorn + uvloop, as `vllm-lite serve` runs) back to back and after
idle pauses: how long an idle process takes to wake up on this host. On the 2-core development VM a GET takes ~1 ms
back to back but 13-70 ms after a 50-200 ms pause, which also shows up as served TTFT there (31-38 ms against 5 ms
offline for a tiny model); issue 16's served TTFT gap on the H200 (27.6 vs 16.6 ms offline) may share the cause.

    python bench/tools/wakeup_latency.py [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

APP = "from fastapi import FastAPI\napp = FastAPI()\n\n\n@app.get('/health')\ndef health():\n    return {}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "wake_app.py"), "w") as f:
        f.write(APP)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "wake_app:app", "--port", str(port), "--loop", "uvloop",
                             "--log-level", "warning"], cwd=folder)
    result = {}
    try:
        base = f"http://127.0.0.1:{port}/health"
        with httpx.Client() as client:
            for _ in range(100):
                try:
                    client.get(base)
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            for pause in (0.0, 0.005, 0.05, 0.2):
                times = []
                for _ in range(args.requests):
                    t0 = time.perf_counter()
                    client.get(base)
                    times.append(time.perf_counter() - t0)
                    time.sleep(pause)
                result[f"pause_{pause}s"] = {"median_ms": round(1000 * statistics.median(times), 3),
                                             "min_ms": round(1000 * min(times), 3)}
                print(f"after {pause * 1000:5.0f} ms idle: median {1000 * statistics.median(times):7.2f} ms, "
                      f"min {1000 * min(times):6.2f} ms", flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
