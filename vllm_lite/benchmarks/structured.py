"""Structured outputs (issue 13): chat requests asking for JSON that matches a schema, on the real default model.

Three modes on the same prompts, greedy: unconstrained, json_object and json_schema (each request's own schema,
from eight shapes: person, order, event, product, address, weather, book, task list). Each mode runs all
--num-requests at once (full batch), then --batch1-requests one at a time (batch 1). Reported per mode and batch:
output tokens/s, engine steps and wall ms per step, finish reasons, the validity rate of the outputs that finished
with "stop" (JSON of the requested shape: parsed, an object for json_object, validated with `jsonschema` for
json_schema when it is installed) and, for the constrained modes, the engine core's bitmask() time per step
(p50 / p99 ms; the engine's fill_threads and defer_fill are reported beside it) and, for deferred fills, the p50 of
their three phases: the wait for the fill thread to run (it needs the interpreter's lock from the busy engine
thread), the matchers' advance and the fill.

The fair comparison. A constrained run's outputs differ from the unconstrained run's in length (a JSON schema
stops most answers at ~80 tokens), so raw tokens/s mixes the grammar's cost with fixed costs (prefill, TTFT) spread
over fewer tokens and with a long tail of a few long requests. So each constrained mode also gets an "unconstrained,
same lengths" run: the same prompts, request i with max_tokens = the constrained run's output length of request i
and ignore_eos, which is the same work token for token (same prefills, same batch at every step) without a grammar.
Every run (at batch 1 every request) starts from an empty prefix cache: otherwise the same-lengths run, coming
second, would find the prompts cached and skip the prefills the constrained run paid for.
`vs_unconstrained_same_lengths` = constrained tokens/s / same-lengths tokens/s is the ratio the targets mean, at
full batch and at batch 1 alike (at batch 1 both runs pay the same TTFT per request, so nothing is subtracted;
subtracting a separately timed TTFT would add its noise to both). `vs_unconstrained` (the raw ratio) is kept.

The fill replay (`fill_replay`, benchmarks/structured_parts.py, with the grammar machinery's other measurements): each
constrained full-batch run's fills are replayed outside the engine (matchers advanced along the real outputs) with a
Python loop and with xgrammar's BatchGrammarMatcher at 1/2/4/8 threads, plus the cost of one copy of the rows
(bitmask.tobytes()): what the choice of fill_threads rests on. Compare it with step_ms_mean of the same-lengths run
(the step the fill must hide under); `step_overhead_ms` (constrained minus same-lengths ms per step) well above the
bitmask time points at the rest of the constrained step (the wait for the previous step's token before the mask, the
matchers' advance), not at the fill; `step_parts_overhead_ms` says which part of the engine core's step grew
(benchmarks/step_breakdown.py: schedule, execute_model, bitmask, sample_tokens, get_output, update_from_output, the
rest, and the LLM's work between steps). Also grammar compile times: cold (a compiler without cache, each schema) and
cached (the engine's compiler again), p50 ms, and on CUDA the bitmask kernels (Triton, torch reference, xgrammar's
own) in microseconds.
Targets on the H200: json_schema vs_unconstrained_same_lengths >= 0.90 at full batch and >= 0.95 at batch 1;
validity 100 %; cold compile p50 <= 50 ms.

    vllm-lite bench structured [--num-requests 256] [--batch1-requests 32] [--max-tokens 256] [--json out.json]
    vllm-lite bench structured --device cpu --num-requests 8 --batch1-requests 2 --max-tokens 48   # a quick check
    vllm-lite bench structured --fill-only --modes json_object,json_schema   # full batch + fill replay only
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from vllm_lite.benchmarks.step_breakdown import StepBreakdown
from vllm_lite.benchmarks.structured_parts import (clear_fill_stats, compile_times, fill_replay, fill_stats,
                                                   kernel_times)
from vllm_lite.benchmarks.utils import add_bench_engine_args, bench_model, make_llm, per_step_times, progress, report
from vllm_lite.config import DEFAULT_MODEL, usable_cpus
from vllm_lite.sampling_params import SamplingParams, StructuredOutputsParams
from vllm_lite.structured_output.manager import BATCH_FILL_MIN_ROWS

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


def run_mode(llm: Any, mode: str, items: list, max_tokens: int, one_at_a_time: bool,
             counter: StepBreakdown | None = None, lengths: list[int] | None = None,
             profiler: Any = None) -> tuple[dict, list]:
    """One run of `items` in `mode`. lengths: the unconstrained same-lengths run, request i producing exactly
    lengths[i] tokens (max_tokens = lengths[i], ignore_eos), so it does the constrained run's work token for token.
    profiler: a cProfile.Profile enabled around the generation only (not the outputs' validation)."""
    messages = [m for m, _ in items]
    if lengths is None:
        params = [params_for(mode, s, max_tokens) for _, s in items]
    else:
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    # Every run, and at batch 1 every request, computes its prompts: the prefix cache is emptied first (untimed), so
    # that a run after another of the same prompts does not skip the prefills the first one paid for.
    llm.reset_prefix_cache()
    if counter is not None:
        counter.take()  # start counting here
    if profiler is not None:
        profiler.enable()
    if one_at_a_time:
        outs, elapsed = [], 0.0
        for m, p in zip(messages, params):
            llm.reset_prefix_cache()
            t0 = time.perf_counter()
            outs.append(llm.chat(m, p, use_tqdm=False)[0])
            elapsed += time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        outs = llm.chat(messages, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
    if profiler is not None:
        profiler.disable()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result: dict[str, Any] = {"requests": len(items), "elapsed_s": round(elapsed, 4), "output_tokens": tokens,
                              "output_tokens_per_s": tokens / elapsed}
    if counter is not None:
        parts = counter.take()
        steps = int(parts.pop("steps"))
        result.update(engine_steps=steps, step_ms_mean=round(1000 * elapsed / max(steps, 1), 4), step_parts_ms=parts)
    if lengths is None:
        result.update(validity(mode, outs, [s for _, s in items]))
    elif [len(o.outputs[0].token_ids) for o in outs] != list(lengths):
        result["lengths_mismatch"] = True  # should not happen: ignore_eos + max_tokens fix every length
    return result, outs


def run_batch(llm: Any, counter: StepBreakdown, modes: list[str], items: list, max_tokens: int, one_at_a_time: bool,
              same_lengths: bool, repeats: int = 1) -> tuple[dict[str, Any], dict[str, list]]:
    """Every mode on `items` (full batch or one at a time); each constrained mode also gets its unconstrained
    same-lengths run and both ratios. repeats > 1: that pair runs again (back to back, so that both halves of a pair
    see the same machine) and the ratio of every pair and their median are kept too: a host-bound run's speed moves
    with the machine's (1.6x between two calls of one session on the H200 machine). Returns the results and each
    mode's outputs (the first run's)."""
    manager = llm.engine.structured
    runs: dict[str, Any] = {}
    outputs: dict[str, list] = {}
    for mode in modes:
        progress(f"{'batch 1' if one_at_a_time else 'full batch'}: {mode}, {len(items)} requests")
        clear_fill_stats(manager)
        runs[mode], outputs[mode] = run_mode(llm, mode, items, max_tokens, one_at_a_time, counter)
        if mode != "unconstrained":
            runs[mode].update(fill_stats(manager))
        if mode == "unconstrained" or not same_lengths:
            continue
        lengths = [len(o.outputs[0].token_ids) for o in outputs[mode]]
        progress(f"  unconstrained with {mode}'s output lengths (ignore_eos)")
        same, _ = run_mode(llm, "unconstrained", items, max_tokens, one_at_a_time, counter, lengths)
        runs[mode]["unconstrained_same_lengths"] = same
        runs[mode]["vs_unconstrained_same_lengths"] = round(
            runs[mode]["output_tokens_per_s"] / same["output_tokens_per_s"], 4)
        runs[mode]["step_overhead_ms"] = round(runs[mode]["step_ms_mean"] - same["step_ms_mean"], 4)
        runs[mode]["step_parts_overhead_ms"] = {k: round(v - same["step_parts_ms"][k], 4)
                                                for k, v in runs[mode]["step_parts_ms"].items()}
        if repeats > 1 and one_at_a_time:
            runs[mode].update(_interleaved_pairs(llm, mode, items, max_tokens, repeats, runs[mode]))
        elif repeats > 1:
            runs[mode].update(_repeated_pairs(llm, counter, mode, items, max_tokens, one_at_a_time, repeats,
                                              runs[mode]))
    if "unconstrained" in runs:
        base = runs["unconstrained"]["output_tokens_per_s"]
        for mode in modes:
            if mode != "unconstrained":
                runs[mode]["vs_unconstrained"] = round(runs[mode]["output_tokens_per_s"] / base, 4)
    return runs, outputs


def _repeated_pairs(llm: Any, counter: StepBreakdown, mode: str, items: list, max_tokens: int, one_at_a_time: bool,
                    repeats: int, first: dict[str, Any]) -> dict[str, Any]:
    """The constrained run and its same-lengths run `repeats - 1` more times: every pair's ratio and step times
    (the first pair's included), their median ratio."""
    ratios = [first["vs_unconstrained_same_lengths"]]
    steps = [[first["step_ms_mean"], first["unconstrained_same_lengths"]["step_ms_mean"]]]
    for i in range(1, repeats):
        progress(f"  repeat {i + 1}/{repeats}: {mode} and its same-lengths run")
        run, outs = run_mode(llm, mode, items, max_tokens, one_at_a_time, counter)
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        same, _ = run_mode(llm, "unconstrained", items, max_tokens, one_at_a_time, counter, lengths)
        ratios.append(round(run["output_tokens_per_s"] / same["output_tokens_per_s"], 4))
        steps.append([run["step_ms_mean"], same["step_ms_mean"]])
    clear_fill_stats(llm.engine.structured)
    return {"ratio_repeats": ratios, "step_ms_repeats": steps,
            "vs_unconstrained_same_lengths_median": round(statistics.median(ratios), 4)}


def _interleaved_pairs(llm: Any, mode: str, items: list, max_tokens: int, repeats: int,
                       first: dict[str, Any]) -> dict[str, Any]:
    """Batch 1, `repeats - 1` more rounds: each request constrained, then at once unconstrained with the same output
    length, so that every pair sees the same machine (a batch-1 run's speed moved 1.6x between two runs of one call
    on the H200 machine). A round's ratio is its constrained tokens/s over its unconstrained tokens/s; the median
    is over the rounds, the first (not interleaved) round's ratio included."""
    ratios = [first["vs_unconstrained_same_lengths"]]
    for i in range(1, repeats):
        progress(f"  round {i + 1}/{repeats}: {mode} and unconstrained, request by request")
        spent = [0.0, 0.0]
        for item in items:
            llm.reset_prefix_cache()  # both compute the prompt (see run_mode)
            t0 = time.perf_counter()
            out = llm.chat(item[0], params_for(mode, item[1], max_tokens), use_tqdm=False)[0]
            spent[0] += time.perf_counter() - t0
            n = len(out.outputs[0].token_ids)
            llm.reset_prefix_cache()
            t1 = time.perf_counter()
            llm.chat(item[0], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
            spent[1] += time.perf_counter() - t1
        ratios.append(round(spent[1] / spent[0], 4))  # equal tokens: the time ratio is the tokens/s ratio
    clear_fill_stats(llm.engine.structured)
    return {"ratio_repeats": ratios, "vs_unconstrained_same_lengths_median": round(statistics.median(ratios), 4)}


def profile_extra(llm: Any, counter: StepBreakdown, mode: str, items: list, max_tokens: int,
                  top: int = 20) -> dict[str, Any]:
    """Where a constrained full-batch run's extra host time goes: the run and its unconstrained same-lengths run,
    each under cProfile (the generation only, not the outputs' validation; the engine's thread: the fill thread's
    work shows as the wait for it), and the functions whose own time per engine step grew most (ms per step,
    profiler overhead included)."""
    import cProfile

    def profiled(lengths: list[int] | None) -> tuple[dict[str, float], list, int]:
        prof = cProfile.Profile()
        run, outs = run_mode(llm, mode if lengths is None else "unconstrained", items, max_tokens, False, counter,
                             lengths=lengths, profiler=prof)
        steps = max(run["engine_steps"], 1)
        return {name: own for name, (own, _) in per_step_times(prof, steps).items()}, outs, steps

    progress(f"profile: {mode} full batch and its unconstrained same-lengths run under cProfile")
    constrained, outs, steps = profiled(None)
    plain, _, plain_steps = profiled([len(o.outputs[0].token_ids) for o in outs])
    extra = sorted(((k, v - plain.get(k, 0.0)) for k, v in constrained.items()), key=lambda kv: -kv[1])[:top]
    for name, ms in extra:
        progress(f"  +{ms:.4f} ms/step  {name}")
    return {"mode": mode, "steps": steps, "unconstrained_steps": plain_steps,
            "own_ms_per_step_total": round(sum(constrained.values()), 4),
            "unconstrained_own_ms_per_step_total": round(sum(plain.values()), 4),
            "top_extra_own_ms_per_step": {k: round(v, 4) for k, v in extra}}


def _summary(result: dict[str, Any]) -> None:
    """One line per constrained run: the target ratio, the step time against its same-lengths run, the fill."""
    for batch in ("full_batch", "batch1"):
        for mode, run in result.get(batch, {}).items():
            same = run.get("unconstrained_same_lengths")
            if same is None:
                continue
            progress(f"{batch} {mode}: {run['vs_unconstrained_same_lengths']}x same-lengths unconstrained "
                     f"(raw {run.get('vs_unconstrained')}x); step {run['step_ms_mean']} ms vs "
                     f"{same['step_ms_mean']} ms; bitmask p50 {run['bitmask_ms_p50']} / p99 "
                     f"{run['bitmask_ms_p99']} ms (fill_threads {result['fill_threads']}, defer_fill "
                     f"{result['defer_fill']})")
            if "deferred_fill_ms_p50" in run:
                phases = run["deferred_fill_ms_p50"]
                progress("  deferred fill p50 ms: " + ", ".join(f"{k} {v}" for k, v in phases.items()))
            if "ratio_repeats" in run:
                progress(f"  median of {len(run['ratio_repeats'])} pairs {run['vs_unconstrained_same_lengths_median']}x "
                         f"(pairs {', '.join(str(r) for r in run['ratio_repeats'])})")
            grown = sorted(run["step_parts_overhead_ms"].items(), key=lambda kv: -kv[1])
            progress("  extra ms per step by part: " + ", ".join(f"{k} {v:+.3f}" for k, v in grown))
    for mode, replay in result.get("fill_replay", {}).items():
        fills = ", ".join(f"{k[:-7]} {v}" for k, v in replay.items() if k.endswith("_ms_p50"))
        progress(f"fill replay {mode} ({replay['rows_mean']} rows): p50 ms {fills}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="vllm-lite bench structured", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_engine_args(ap, DEFAULT_MODEL)
    ap.set_defaults(load_format="auto", dtype="auto", enable_prefix_caching=True)
    ap.add_argument("--num-requests", type=int, default=256, help="requests of the full-batch runs")
    ap.add_argument("--batch1-requests", type=int, default=32, help="requests run one at a time per mode")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1,
                    help="constrained runs and their same-lengths runs this many times (median ratio; at batch 1 "
                         "the later rounds alternate the two request by request)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    ap.add_argument("--fill-only", action="store_true",
                    help="only the full-batch runs and the bitmask fill replay (no same-lengths runs, batch 1, "
                         "compile times or kernels)")
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile json_schema's full-batch run against its same-lengths unconstrained run")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    llm = make_llm(args, skip_tokenizer_init=False)
    counter = StepBreakdown(llm)
    items = workload(args.num_requests)
    progress("warm-up (every mode, a few requests; compiles the eight schemas)")
    for mode in modes:
        run_mode(llm, mode, items[:len(SCHEMAS)], 16, one_at_a_time=False)
    manager = llm.engine.structured
    result: dict[str, Any] = {"workload": "structured", "model": bench_model(args), "device": str(llm.device),
                              "max_tokens": args.max_tokens, "cpus": usable_cpus(),
                              "fill_threads": manager.config.fill_threads, "defer_fill": manager.config.defer_fill,
                              "batch_fill_min_rows": BATCH_FILL_MIN_ROWS}
    result["full_batch"], outputs = run_batch(llm, counter, modes, items, args.max_tokens, False,
                                              not args.fill_only, args.repeats)
    if not args.fill_only:
        result["batch1"], _ = run_batch(llm, counter, modes, items[:args.batch1_requests], args.max_tokens, True,
                                        True, args.repeats)
    progress("bitmask fill replay of the full-batch runs (threads)")
    result["fill_replay"] = {mode: fill_replay(manager, [params_for(mode, schema, 1).structured_outputs
                                                        for _, schema in items], outputs[mode])
                             for mode in modes if mode != "unconstrained"}
    if not args.fill_only:
        progress("grammar compile times")
        result.update(compile_times(llm, [schema for _, schema in SCHEMAS], repeats=5))
    if llm.device.type == "cuda" and not args.fill_only:
        progress("bitmask kernels")
        vocab = llm.info.vocab_size
        try:  # an auxiliary measurement: its failure is reported, not allowed to lose the results above
            result["bitmask_kernel"] = {f"{c}_of_256_rows_vocab_{v}": kernel_times(v, 256, c)
                                        for v in (vocab, 151936) for c in (256, 32)}
        except Exception as exc:  # noqa: BLE001
            result["bitmask_kernel"] = f"failed: {exc!r}"
    result["targets"] = {"json_schema_vs_unconstrained_same_lengths_full_batch": ">= 0.90",
                         "json_schema_vs_unconstrained_same_lengths_batch1": ">= 0.95",
                         "ratio": "json_schema output tokens/s over the unconstrained same-lengths run's (same "
                                  "prompts, same output length per request, ignore_eos): vs_unconstrained_same_lengths",
                         "validity_rate": "1.0", "compile_cold_ms_p50": "<= 50"}
    if args.json:  # kept even if the profile below runs out of time
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.profile and "json_schema" in modes:
        result["profile"] = profile_extra(llm, counter, "json_schema", items, args.max_tokens)
    report(result, args.json)
    _summary(result)  # after the JSON: the lines a log's tail shows
    return result


if __name__ == "__main__":
    main()
