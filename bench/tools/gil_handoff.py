"""Does work handed to a thread overlap the engine core's Python? The structured-output manager defers the grammar
bitmask fill to a thread (xgrammar releases the GIL inside it) while the caller handles the step's outputs in Python.
A thread needs the GIL to start and to return; a busy main thread gives it up only every `sys.getswitchinterval()`
(5 ms by default) or when it blocks, so the hand-off may make the fill wait for the caller's work instead of
overlapping it. Per step: the main thread's Python work (~`--py-ms`), the job alone, both serially, and the job on a
thread beside the Python work at several switch intervals.

    python bench/tools/gil_handoff.py                               # hashlib job (GIL-free C) of ~0.3 ms
    python bench/tools/gil_handoff.py --tokenizer PATH --rows 256   # xgrammar: accept + bitmask fill of 256 matchers
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import random
import sys
import time
from typing import Callable


def python_work(n: int) -> int:
    """Pure-Python bookkeeping like the engine's output handling (dicts, lists, attribute-free arithmetic)."""
    d: dict[int, str] = {}
    total = 0
    for i in range(n):
        d[i] = "x"
        total += i & 7
    return total


def calibrate(target_ms: float) -> int:
    n = 1000
    while True:
        t0 = time.perf_counter()
        python_work(n)
        dt = (time.perf_counter() - t0) * 1000
        if dt > 2 * target_ms or n > 10**7:
            return max(1, int(n * target_ms / dt))
        n *= 2


def hashlib_job(job_ms: float) -> Callable[[int], None]:
    data = bytes(1 << 20)
    t0 = time.perf_counter()
    for _ in range(20):
        hashlib.sha256(data).digest()
    per_mb = (time.perf_counter() - t0) / 20 * 1000
    size = max(4096, int((1 << 20) * job_ms / per_mb))
    chunk = bytes(size)

    def job(step: int) -> None:
        hashlib.sha256(chunk).digest()
    return job


def xgrammar_job(tokenizer: str, rows: int, steps: int) -> tuple[Callable[[int], None], Callable[[], None]]:
    """One step = batch_accept_token of each matcher's next token + batch_fill_next_token_bitmask, over `rows`
    matchers of bench structured's schemas, along paths of allowed tokens chosen at random beforehand."""
    import numpy as np
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from vllm_lite.benchmarks.structured import SCHEMAS
    tok = AutoTokenizer.from_pretrained(tokenizer)
    info = xgr.TokenizerInfo.from_huggingface(tok)
    compiler = xgr.GrammarCompiler(info)
    compiled = [compiler.compile_json_schema(json.dumps(s)) for _, s in SCHEMAS]
    stop = set(info.stop_token_ids)
    words = -(-info.vocab_size // 32)
    bitmask = np.zeros((rows, words), dtype=np.int32)
    rng = random.Random(0)

    def fresh() -> list:
        return [xgr.GrammarMatcher(compiled[i % len(compiled)]) for i in range(rows)]

    matchers, paths = fresh(), [[] for _ in range(rows)]
    one = xgr.BatchGrammarMatcher(1)
    for _ in range(steps):
        one.batch_fill_next_token_bitmask(matchers, bitmask)
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
        for i, m in enumerate(matchers):
            allowed = [int(a) for a in np.flatnonzero(bits[i])[:4000] if int(a) not in stop]
            t = rng.choice(allowed) if allowed else int(np.flatnonzero(bits[i])[0])
            paths[i].append(t)
            m.accept_token(t)
    state = {"matchers": fresh()}
    batch = xgr.BatchGrammarMatcher(4)

    def job(step: int) -> None:
        ms = state["matchers"]
        xgr.BatchGrammarMatcher.batch_accept_token(ms, [p[step] for p in paths])
        batch.batch_fill_next_token_bitmask(ms, bitmask)

    def reset() -> None:
        state["matchers"] = fresh()
    return job, reset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--py-ms", type=float, default=1.0, help="the main thread's Python work per step")
    ap.add_argument("--job-ms", type=float, default=0.3, help="hashlib job's length (without --tokenizer)")
    ap.add_argument("--tokenizer", default=None, help="an HF tokenizer folder: the job is xgrammar's instead")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--intervals-ms", default="5,1,0.5,0.2,0.1")
    args = ap.parse_args()
    n = calibrate(args.py_ms)
    reset: Callable[[], None] = lambda: None  # noqa: E731
    if args.tokenizer:
        job, reset = xgrammar_job(args.tokenizer, args.rows, args.steps)
        name = f"xgrammar accept + fill, {args.rows} rows"
    else:
        job, name = hashlib_job(args.job_ms), f"hashlib ~{args.job_ms} ms"
    pool = cf.ThreadPoolExecutor(1)
    pool.submit(lambda: None).result()

    def timed(fn: Callable[[int], None]) -> float:
        reset()
        t0 = time.perf_counter()
        for s in range(args.steps):
            fn(s)
        return (time.perf_counter() - t0) / args.steps * 1000

    default = sys.getswitchinterval()
    py = timed(lambda s: python_work(n))
    alone = timed(job)
    serial = timed(lambda s: (job(s), python_work(n)))
    print(f"job: {name}; per step: Python {py:.3f} ms, job {alone:.3f} ms, serial {serial:.3f} ms")
    for ms in (float(x) for x in args.intervals_ms.split(",")):
        sys.setswitchinterval(ms / 1000)

        def deferred(s: int) -> None:
            f = pool.submit(job, s)
            python_work(n)
            f.result()
        t = timed(deferred)
        print(f"  on a thread, switch interval {ms:g} ms: {t:.3f} ms per step (hidden: {serial - t:+.3f} ms)")
    sys.setswitchinterval(default)


if __name__ == "__main__":
    main()
