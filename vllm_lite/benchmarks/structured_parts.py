"""bench structured's measurements of the grammar machinery itself, beside its end-to-end runs: compile times (cold
and cached), the fill replay (a run's fills redone outside the engine with a Python loop and with xgrammar's thread
counts), the bitmask kernels on CUDA, and the engine core's fill diagnostics (bitmask() times, deferred fill phases).
"""
from __future__ import annotations

import json
import time
from typing import Any, Iterable

from vllm_lite.config import usable_cpus


def pct_ms(values: Iterable[float], q: float) -> float | None:
    """The q-quantile of seconds, in ms (None: no values)."""
    ordered = sorted(values)
    if not ordered:
        return None
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


def compile_times(llm: Any, schemas: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """Cold: a cache-less compiler per schema (the engine's tokenizer info); cached: the engine's compiler."""
    import xgrammar as xgr
    manager = llm.engine.structured
    compiler = manager.compiler
    cold, cached = [], []
    for _ in range(repeats):
        for schema in schemas:
            text = json.dumps(schema)
            fresh = xgr.GrammarCompiler(manager.tokenizer_info, cache_enabled=False)
            t0 = time.perf_counter()
            fresh.compile_json_schema(text)
            cold.append(time.perf_counter() - t0)
            compiler.compile_json_schema(text)
            t0 = time.perf_counter()
            compiler.compile_json_schema(text)
            cached.append(time.perf_counter() - t0)
    return {"compile_cold_ms_p50": pct_ms(cold, 0.5), "compile_cold_ms_max": pct_ms(cold, 1.0),
            "compile_cached_ms_p50": pct_ms(cached, 0.5), "engine_compile_ms": [round(1000 * t, 2)
                                                                            for t in manager.compile_times]}


def fill_replay(manager: Any, constraints: list[Any], outs: list, threads: tuple[int, ...] = (1, 2, 4, 8),
                stride: int = 8, repeats: int = 3) -> dict[str, Any]:
    """Replays a full-batch run's bitmask fills outside the engine: one matcher per request, advanced along that
    request's real output to step t (every `stride` steps), then the rows still running at t filled by a Python
    loop over the matchers (the manager's path below its batch threshold or with fill_threads 1) and by xgrammar's
    BatchGrammarMatcher at each thread count (counts above this machine's CPUs are left out: xgrammar clamps them).
    Also times bitmask.tobytes(): one copy of the rows, what each copy costs where they still travel inside a message
    (worker processes when shared memory is short). Milliseconds per fill, p50 / p99."""
    import numpy as np
    import xgrammar as xgr
    matchers, tokens = [], []
    for so, out in zip(constraints, outs):  # each request's StructuredOutputsParams and output
        matchers.append(xgr.GrammarMatcher(manager.compile_now(so)))
        tokens.append(list(out.outputs[0].token_ids))
    counts = [n for n in threads if n <= usable_cpus()]
    batches = {n: xgr.BatchGrammarMatcher(n) for n in counts}
    bitmask = np.zeros((len(matchers), manager.num_words), dtype=np.int32)
    times: dict[str, list[float]] = {"loop": [], **{f"threads_{n}": [] for n in counts}, "tobytes": []}
    rows, pos = [], 0
    for t in range(0, max((len(x) for x in tokens), default=0), stride):
        for matcher, toks in zip(matchers, tokens):
            for tok in toks[pos:t]:
                if matcher.is_terminated() or not matcher.accept_token(tok):
                    break
        pos = t
        live = [m for m, toks in zip(matchers, tokens) if t < len(toks) and not m.is_terminated()]
        if not live:
            break
        rows.append(len(live))
        view = bitmask[:len(live)]
        for _ in range(repeats):
            start = time.perf_counter()
            for i, matcher in enumerate(live):
                matcher.fill_next_token_bitmask(view, i)
            times["loop"].append(time.perf_counter() - start)
            for n, batch in batches.items():
                start = time.perf_counter()
                batch.batch_fill_next_token_bitmask(live, view)
                times[f"threads_{n}"].append(time.perf_counter() - start)
            start = time.perf_counter()
            view.tobytes()
            times["tobytes"].append(time.perf_counter() - start)
    result: dict[str, Any] = {"fills": len(rows), "rows_max": max(rows, default=0),
                              "rows_mean": round(sum(rows) / max(len(rows), 1), 1)}
    for name, values in times.items():
        result[f"{name}_ms_p50"] = pct_ms(values, 0.5)
        result[f"{name}_ms_p99"] = pct_ms(values, 0.99)
    return result


def kernel_times(vocab_size: int, rows: int = 256, constrained: int = 256, iters: int = 50) -> dict[str, float]:
    """CUDA only: microseconds to mask `constrained` of `rows` bf16 logits rows from packed words: the Triton kernel
    (kernels/bitmask.py), its torch reference and xgrammar's apply_token_bitmask_inplace (its own kernel)."""
    import torch
    import xgrammar as xgr

    from vllm_lite.kernels.bitmask import apply_bitmask_torch, apply_bitmask_triton
    words = torch.randint(-2**31, 2**31 - 1, (rows, -(-vocab_size // 32)), dtype=torch.int64,
                          device="cuda").to(torch.int32)
    logits = torch.randn(rows, vocab_size, dtype=torch.bfloat16, device="cuda")
    idx = torch.randperm(rows, device="cuda")[:constrained]
    sub, idx_list = words[idx].contiguous(), idx.tolist()

    def timed(fn: Any) -> float:
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return round(1000 * start.elapsed_time(end) / iters, 2)

    return {"triton_us": timed(lambda: apply_bitmask_triton(logits, sub, idx)),
            "torch_us": timed(lambda: apply_bitmask_torch(logits, sub, idx)),
            "xgrammar_us": timed(lambda: xgr.apply_token_bitmask_inplace(logits, words, vocab_size=vocab_size,
                                                                         indices=idx_list))}


def clear_fill_stats(manager: Any) -> None:
    manager.fill_times.clear()
    manager.fill_phases.clear()


def fill_stats(manager: Any) -> dict[str, Any]:
    """The engine core's bitmask() times of the run just done (ms), then cleared."""
    times = manager.fill_times
    stats = {"bitmask_ms_p50": pct_ms(times, 0.5), "bitmask_ms_p99": pct_ms(times, 0.99), "bitmask_steps": len(times)}
    times.clear()
    phases = list(zip(*manager.fill_phases))
    if phases:  # deferred fills: the wait for the thread to run (the interpreter's lock), the advance, the fill
        stats["deferred_fill_ms_p50"] = {k: pct_ms(v, 0.5) for k, v in zip(("to_thread", "advance", "fill"), phases)}
    manager.fill_phases.clear()
    return stats
