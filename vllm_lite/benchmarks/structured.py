"""Structured outputs (issue 13): chat requests asking for JSON that matches a schema, on the real default model.

Three modes on the same prompts, greedy: unconstrained, json_object and json_schema (each request's own schema,
from eight shapes: person, order, event, product, address, weather, book, task list). Each mode runs all
--num-requests at once (full batch), then --batch1-requests one at a time (batch 1). Reported per mode and
batch: output tokens/s, finish reasons, and the validity rate of the outputs that finished with "stop" (JSON of the
requested shape: parsed, an object for json_object, validated with `jsonschema` for json_schema when it is
installed); plus the engine core's per-step bitmask time (p50 / p99 ms, full batch, json_schema), grammar compile
times: cold (a compiler without cache, each schema) and cached (the engine's compiler again), p50 ms, and on CUDA
the bitmask kernels (Triton, torch reference, xgrammar's own) in microseconds.
Targets on the H200: json_schema >= 0.90x unconstrained tokens/s at full batch and >= 0.95x at batch 1; validity
100 %; cold compile p50 <= 50 ms.

    vllm-lite bench structured [--num-requests 256] [--batch1-requests 32] [--max-tokens 256] [--json out.json]
    vllm-lite bench structured --device cpu --num-requests 8 --batch1-requests 2 --max-tokens 48   # a quick check
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

from vllm_lite.benchmarks.utils import add_bench_engine_args, bench_model, make_llm, progress, report
from vllm_lite.config import DEFAULT_MODEL
from vllm_lite.sampling_params import SamplingParams, StructuredOutputsParams

_STR = {"type": "string"}
SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("person", {"type": "object", "properties": {"name": _STR, "age": {"type": "integer", "minimum": 0,
                                                                         "maximum": 120},
                                                 "email": {"type": "string", "format": "email"}},
                "required": ["name", "age"], "additionalProperties": False}),
    ("order", {"type": "object", "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"}, "status": {"enum": ["new", "paid", "shipped"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
            "type": "object", "properties": {"sku": _STR, "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["sku", "qty"], "additionalProperties": False}}},
               "required": ["order_id", "status", "items"], "additionalProperties": False}),
    ("event", {"type": "object", "properties": {"title": _STR, "date": {"type": "string", "format": "date"},
                                                "attendees": {"type": "array", "items": _STR, "maxItems": 5}},
               "required": ["title", "date", "attendees"], "additionalProperties": False}),
    ("product", {"type": "object", "properties": {"name": _STR, "price": {"type": "number", "minimum": 0},
                                                  "tags": {"type": "array", "items": _STR, "maxItems": 3},
                                                  "in_stock": {"type": "boolean"}},
                 "required": ["name", "price", "in_stock"], "additionalProperties": False}),
    ("address", {"$defs": {"line": _STR}, "type": "object", "properties": {
        "street": {"$ref": "#/$defs/line"}, "city": {"$ref": "#/$defs/line"},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "country": {"enum": ["US", "FR", "DE", "JP"]}},
                 "required": ["street", "city", "zip", "country"], "additionalProperties": False}),
    ("weather", {"type": "object", "properties": {"city": _STR, "temperature_c": {"type": "number", "minimum": -60,
                                                                                   "maximum": 60},
                                                  "condition": {"enum": ["sunny", "cloudy", "rain", "snow"]}},
                 "required": ["city", "temperature_c", "condition"], "additionalProperties": False}),
    ("book", {"type": "object", "properties": {"title": _STR, "author": _STR,
                                               "year": {"type": "integer", "minimum": 1450, "maximum": 2030},
                                               "genres": {"type": "array", "items": _STR, "minItems": 1,
                                                          "maxItems": 3}},
              "required": ["title", "author", "year"], "additionalProperties": False}),
    ("tasks", {"type": "object", "properties": {"tasks": {"type": "array", "minItems": 1, "maxItems": 5, "items": {
        "type": "object", "properties": {"title": _STR, "done": {"type": "boolean"},
                                         "priority": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 5},
                                                                {"type": "null"}]}},
        "required": ["title", "done"], "additionalProperties": False}}},
               "required": ["tasks"], "additionalProperties": False}),
]
SUBJECTS = ["a teacher", "a small bakery", "a music festival", "a hiking trip", "a science museum", "a chess club",
            "a coffee shop", "a space mission", "a farmers market", "a bookstore", "a city in Japan", "a robot"]
MODES = ("unconstrained", "json_object", "json_schema")


def workload(n: int) -> list[tuple[list[dict], dict[str, Any]]]:
    """n (chat messages, schema) pairs: the schema shapes in turn, with varied subjects."""
    out = []
    for i in range(n):
        name, schema = SCHEMAS[i % len(SCHEMAS)]
        subject = SUBJECTS[(i // len(SCHEMAS)) % len(SUBJECTS)]
        text = (f"Make up a {name} record related to {subject} (#{i}). Answer with one JSON object that matches "
                f"this JSON schema, and nothing else:\n{json.dumps(schema)}")
        out.append(([{"role": "user", "content": text}], schema))
    return out


def params_for(mode: str, schema: dict[str, Any], max_tokens: int) -> SamplingParams:
    so = None
    if mode == "json_object":
        so = StructuredOutputsParams(json_object=True)
    elif mode == "json_schema":
        so = StructuredOutputsParams(json=schema)
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=so)


def validity(mode: str, outs: list[Any], schemas: list[dict[str, Any]]) -> dict[str, Any]:
    """Finish reasons and the share of "stop" outputs that are JSON of the requested shape."""
    try:
        import jsonschema
        checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    except ImportError:  # a test dependency; without it json_schema outputs are only parsed
        jsonschema = None
    reasons: dict[str, int] = {}
    stopped = valid = 0
    for out, schema in zip(outs, schemas):
        comp = out.outputs[0]
        reasons[comp.finish_reason] = reasons.get(comp.finish_reason, 0) + 1
        if comp.finish_reason != "stop":
            continue
        stopped += 1
        try:
            value = json.loads(comp.text)
            if mode == "json_object" and not isinstance(value, dict):
                continue
            if mode == "json_schema" and jsonschema is not None:
                jsonschema.validate(value, schema, format_checker=checker)
            valid += 1
        except Exception:  # noqa: BLE001 (any parse or validation failure counts as invalid)
            continue
    return {"finish_reasons": reasons, "stopped": stopped, "valid": valid,
            "validity_rate": valid / stopped if stopped else None,
            "validated_with": "jsonschema" if mode == "json_schema" and jsonschema is not None else "json.loads"}


def run_mode(llm: Any, mode: str, items: list, max_tokens: int, one_at_a_time: bool) -> tuple[dict, list]:
    messages = [m for m, _ in items]
    params = [params_for(mode, s, max_tokens) for _, s in items]
    t0 = time.perf_counter()
    if one_at_a_time:
        outs = [llm.chat(m, p, use_tqdm=False)[0] for m, p in zip(messages, params)]
    else:
        outs = llm.chat(messages, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {"requests": len(items), "elapsed_s": round(elapsed, 4), "output_tokens": tokens,
              "output_tokens_per_s": tokens / elapsed, **validity(mode, outs, [s for _, s in items])}
    return result, outs


def _p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def compile_times(llm: Any, repeats: int) -> dict[str, Any]:
    """Cold: a cache-less compiler per schema (the engine's tokenizer info); cached: the engine's compiler."""
    import xgrammar as xgr
    manager = llm.engine.structured
    compiler = manager.compiler
    cold, cached = [], []
    for _ in range(repeats):
        for _, schema in SCHEMAS:
            text = json.dumps(schema)
            fresh = xgr.GrammarCompiler(manager.tokenizer_info, cache_enabled=False)
            t0 = time.perf_counter()
            fresh.compile_json_schema(text)
            cold.append(time.perf_counter() - t0)
            compiler.compile_json_schema(text)
            t0 = time.perf_counter()
            compiler.compile_json_schema(text)
            cached.append(time.perf_counter() - t0)
    return {"compile_cold_ms_p50": _p(cold, 0.5), "compile_cold_ms_max": _p(cold, 1.0),
            "compile_cached_ms_p50": _p(cached, 0.5), "engine_compile_ms": [round(1000 * t, 2)
                                                                            for t in manager.compile_times]}


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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="vllm-lite bench structured", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_engine_args(ap, DEFAULT_MODEL)
    ap.set_defaults(load_format="auto", dtype="auto", enable_prefix_caching=True)
    ap.add_argument("--num-requests", type=int, default=256, help="requests of the full-batch runs")
    ap.add_argument("--batch1-requests", type=int, default=32, help="requests run one at a time per mode")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    llm = make_llm(args, skip_tokenizer_init=False)
    items = workload(args.num_requests)
    progress("warm-up (every mode, a few requests; compiles the eight schemas)")
    for mode in modes:
        run_mode(llm, mode, items[:len(SCHEMAS)], 16, one_at_a_time=False)
    manager = llm.engine.structured
    result: dict[str, Any] = {"workload": "structured", "model": bench_model(args), "device": str(llm.device),
                              "max_tokens": args.max_tokens, "full_batch": {}, "batch1": {}}
    for mode in modes:
        progress(f"full batch: {mode}, {len(items)} requests")
        manager.fill_times.clear()
        result["full_batch"][mode], _ = run_mode(llm, mode, items, args.max_tokens, one_at_a_time=False)
        if mode == "json_schema":
            result["bitmask_ms_p50"] = _p(manager.fill_times, 0.5)
            result["bitmask_ms_p99"] = _p(manager.fill_times, 0.99)
            result["bitmask_steps"] = len(manager.fill_times)
    for mode in modes:
        progress(f"batch 1: {mode}, {args.batch1_requests} requests one at a time")
        manager.fill_times.clear()
        result["batch1"][mode], _ = run_mode(llm, mode, items[:args.batch1_requests], args.max_tokens,
                                             one_at_a_time=True)
        if mode == "json_schema":
            result["batch1_bitmask_ms_p50"] = _p(manager.fill_times, 0.5)
    for batch in ("full_batch", "batch1"):
        runs = result[batch]
        if "unconstrained" in runs:
            base = runs["unconstrained"]["output_tokens_per_s"]
            for mode in ("json_object", "json_schema"):
                if mode in runs:
                    runs[mode]["vs_unconstrained"] = round(runs[mode]["output_tokens_per_s"] / base, 4)
    progress("grammar compile times")
    result.update(compile_times(llm, repeats=5))
    if llm.device.type == "cuda":
        progress("bitmask kernels")
        vocab = llm.info.vocab_size
        try:  # an auxiliary measurement: its failure is reported, not allowed to lose the results above
            result["bitmask_kernel"] = {f"{c}_of_256_rows_vocab_{v}": kernel_times(v, 256, c)
                                        for v in (vocab, 151936) for c in (256, 32)}
        except Exception as exc:  # noqa: BLE001
            result["bitmask_kernel"] = f"failed: {exc!r}"
    result["targets"] = {"json_schema_vs_unconstrained_full_batch": ">= 0.90",
                         "json_schema_vs_unconstrained_batch1": ">= 0.95", "validity_rate": "1.0",
                         "compile_cold_ms_p50": "<= 50"}
    return report(result, args.json)


if __name__ == "__main__":
    main()
