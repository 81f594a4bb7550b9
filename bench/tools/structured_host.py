"""The host's share of structured outputs at full batch, without the device: bench structured's json_schema run and
its unconstrained same-lengths run with the model's forward, lm_head and sampler replaced by stand-ins, timed by part
(StepBreakdown), so that what differs is the engine core's and the worker's Python for the grammars (matcher
advance, bitmask fill and its hand-off, mask staging), not the model. On the H200 machine a full-batch step of the
default model is host-bound, so these milliseconds are the ones that set issue 13's ratio there; here they are
measured without that machine's 1.6x swings in host speed.

The stand-in sampler emits each request's scripted answer (a valid JSON instance of its schema, tokenized, then EOS)
in both runs; a constrained row whose scripted token the mask forbids takes its lowest allowed token instead (the
count is printed: 0 expected). Logits are one column wide, so applying the mask on the device costs nothing here.

    python bench/tools/structured_host.py --num-requests 256 --max-tokens 64 --fill-threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))

from tiny_models import make_tiny_model_with_default_tokenizer  # noqa: E402

from vllm_lite import LLM  # noqa: E402
from vllm_lite.benchmarks.step_breakdown import StepBreakdown  # noqa: E402
from vllm_lite.benchmarks.utils import per_step_times  # noqa: E402
from vllm_lite.benchmarks.structured import SCHEMAS, SUBJECTS, run_mode, workload  # noqa: E402
from vllm_lite.sample.sampler import SamplerOutput  # noqa: E402
from vllm_lite.tokenizer import apply_chat_template  # noqa: E402


def _instance(name: str, subject: str, i: int) -> dict:
    """A valid answer of bench structured's schema `name`: what the model writes, roughly."""
    return {
        "person": {"name": "Ana Lopez", "age": 34, "email": f"ana{i}@example.com"},
        "order": {"order_id": f"ORD-{1000 + i % 9000}", "status": "paid",
                  "items": [{"sku": f"SKU-{i}", "qty": 2}, {"sku": "B-7", "qty": 1}]},
        "event": {"title": f"{subject} meetup", "date": "2024-05-17", "attendees": ["Ana", "Ben", "Chloe"]},
        "product": {"name": f"{subject} mug", "price": 12.5, "tags": ["kitchen", "gift"], "in_stock": True},
        "address": {"street": "12 Main Street", "city": "Springfield", "zip": "12345", "country": "US"},
        "weather": {"city": "Osaka", "temperature_c": 21.5, "condition": "sunny"},
        "book": {"title": f"The story of {subject}", "author": "Mary Shelley", "year": 1999,
                 "genres": ["fiction", "history"]},
        "tasks": {"tasks": [{"title": f"Plan {subject}", "done": False, "priority": 2},
                            {"title": "Buy supplies", "done": True, "priority": None}]},
    }[name]


def token_scripts(tokenizer, n: int, eos: int) -> dict[tuple[int, ...], list[int]]:
    """Request i's answer as token ids (json.dumps of a valid instance, then EOS), keyed by its prompt's token ids
    (the chat template applied as the LLM applies it)."""
    out = {}
    for i, (messages, _) in enumerate(workload(n)):
        name = SCHEMAS[i % len(SCHEMAS)][0]
        subject = SUBJECTS[(i // len(SCHEMAS)) % len(SUBJECTS)]
        ids = tokenizer.encode(json.dumps(_instance(name, subject, i)), add_special_tokens=False)
        out[tuple(apply_chat_template(tokenizer, messages))] = ids + [eos]
    return out


def stub_model(llm: LLM, scripts: dict[tuple[int, ...], list[int]]) -> dict[str, int]:
    """Forward, logits and sampler replaced. Every sampled row takes its request's next scripted token (the same in
    the constrained run and its same-lengths run, so that the stand-in sampler's own work is equal in both); a
    constrained row whose scripted token the mask forbids takes its lowest allowed token (counted in the returned
    dict's "off_script")."""
    runner = llm.model_runner()
    engine = llm.engine
    hidden = torch.zeros(1 << 16, runner.info.hf_config.hidden_size)
    runner.forward = lambda input_ids, positions: hidden[: input_ids.shape[0]]
    runner.model.compute_logits = lambda h: torch.zeros(h.shape[0], 1)
    seen: dict = {}
    stats = {"off_script": 0, "sampled": 0}
    where: dict[str, tuple[list[int], list[int]]] = {}  # req_id -> (script, [next position])
    apply, sample_tokens = runner.grammar_bitmask.apply, runner.sample_tokens

    def record(logits, grammar, req_ids, row_offsets):
        seen["grammar"] = grammar
        apply(logits, grammar, req_ids, row_offsets)

    def sample_tokens_seen(grammar=None):
        launch = runner._step.launch if runner._step is not None else None
        seen["req_ids"] = [] if launch is None else [launch.req_ids[i] for i in launch.rows]
        return sample_tokens(grammar)

    def script_of(req_id: str) -> tuple[list[int], list[int]]:
        entry = where.get(req_id)
        if entry is None:
            script = scripts.get(tuple(engine.scheduler.requests[req_id].prompt_token_ids), [7])
            entry = where[req_id] = (script, [0])
        return entry

    def sample(logits, meta, logits_owned=False):
        req_ids = seen.pop("req_ids")
        ids = np.empty(len(req_ids), dtype=np.int64)
        for j, req_id in enumerate(req_ids):
            script, pos = script_of(req_id)
            ids[j] = script[min(pos[0], len(script) - 1)]
            pos[0] += 1
        grammar = seen.pop("grammar", None)
        if grammar is not None:  # one row per request here (no drafts), in the sampled rows' order
            words = np.frombuffer(grammar.bitmask, dtype=np.int32).reshape(-1, grammar.num_words)
            if grammar.req_ids == req_ids:
                rows = np.arange(len(req_ids))
            else:
                at = {r: j for j, r in enumerate(req_ids)}
                rows = np.array([at[r] for r in grammar.req_ids], dtype=np.int64)
            allowed = (words[np.arange(len(rows)), ids[rows] >> 5] >> (ids[rows] & 31)) & 1
            for k in np.flatnonzero(allowed == 0).tolist():
                word = words[k][words[k] != 0][0].astype(np.int64) & 0xFFFFFFFF
                col = int(np.flatnonzero(words[k] != 0)[0])
                ids[int(rows[k])] = col * 32 + int(np.log2(word & -word))
                stats["off_script"] += 1
        stats["sampled"] += len(ids)
        return SamplerOutput(torch.from_numpy(ids))

    runner.grammar_bitmask.apply = record
    runner.sample_tokens = sample_tokens_seen
    runner.sampler = sample
    return stats


def advance_in_caller(manager) -> None:
    """The manager takes the grammars' deferred tokens on the caller's thread (one batch call), so that its fill
    thread, when deferred, only fills."""
    take = manager._take_deferred

    def take_and_advance():
        manager._advance(*take())
        return [], [], []

    manager._take_deferred = take_and_advance


def profile_pair(llm: LLM, counter: StepBreakdown, items: list, max_tokens: int, top: int = 25) -> None:
    """One more json_schema run and its same-lengths run under cProfile (the engine's thread only): own ms per step
    of the functions that grew most."""
    import cProfile

    own = []
    lengths = None
    for mode in ("json_schema", "unconstrained"):
        prof = cProfile.Profile()
        run, outs = run_mode(llm, mode, items, max_tokens, False, counter, lengths, profiler=prof)
        own.append({k: v for k, (v, _) in per_step_times(prof, max(run["engine_steps"], 1)).items()})
        lengths = [len(o.outputs[0].token_ids) for o in outs]
    extra = sorted(((k, v - own[1].get(k, 0.0)) for k, v in own[0].items()), key=lambda kv: -kv[1])[:top]
    print(f"cProfile, own ms per step: json_schema {sum(own[0].values()):.3f}, same lengths {sum(own[1].values()):.3f}")
    for name, ms in extra:
        print(f"  {ms:+.4f}  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--fill-threads", type=int, default=2)
    ap.add_argument("--defer-fill", choices=("on", "off"), default=None,
                    help="fill on a thread of its own (default: the engine's auto, on with 4 usable CPUs or more)")
    ap.add_argument("--fill-switch-interval-ms", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--advance-in-caller", action="store_true",
                    help="advance the matchers over the last step's tokens on the engine thread, before a deferred fill "
                         "is handed over (the fill thread then fills only: one hand-off of the interpreter lock less)")
    ap.add_argument("--profile", action="store_true",
                    help="then cProfile one more pair: the functions whose own time per step grew most")
    args = ap.parse_args()
    so_config = {"fill_threads": args.fill_threads}
    if args.defer_fill is not None:
        so_config["defer_fill"] = args.defer_fill == "on"
    if args.fill_switch_interval_ms is not None:
        so_config["fill_switch_interval_ms"] = args.fill_switch_interval_ms
    path = make_tiny_model_with_default_tokenizer(tempfile.mkdtemp(), num_hidden_layers=1)
    llm = LLM(path, device="cpu", dtype="float32", max_model_len=1024, max_num_seqs=args.num_requests,
              max_num_batched_tokens=1 << 16, async_scheduling=True, enable_prefix_caching=False,
              structured_outputs_config=so_config)
    tokenizer = llm.get_tokenizer()
    if args.advance_in_caller:
        advance_in_caller(llm.engine.structured)
    stats = stub_model(llm, token_scripts(tokenizer, args.num_requests, tokenizer.eos_token_id))
    counter = StepBreakdown(llm)
    items = workload(args.num_requests)
    run_mode(llm, "json_schema", items[:16], 16, False)  # warm-up: compiles the schemas
    pairs = []
    for _ in range(args.repeats):
        run, outs = run_mode(llm, "json_schema", items, args.max_tokens, False, counter)
        same, _ = run_mode(llm, "unconstrained", items, args.max_tokens, False, counter,
                           [len(o.outputs[0].token_ids) for o in outs])
        pairs.append((run, same))
    if args.profile:
        profile_pair(llm, counter, items, args.max_tokens)
    print(f"{args.num_requests} requests, max_tokens {args.max_tokens}, fill_threads {args.fill_threads}, defer_fill "
          f"{llm.engine.structured.config.defer_fill}, advance in caller {args.advance_in_caller}, "
          f"{run['output_tokens']} tokens, {run['engine_steps']} steps; validity {run['validity_rate']}; "
          f"{stats['off_script']} of {stats['sampled']} sampled tokens off the script (the mask forbade them)")
    parts = [k for k in pairs[0][0]["step_parts_ms"]]
    print(f"{'ms per step (median of ' + str(args.repeats) + ')':<26} {'json_schema':>12} {'same lengths':>13} "
          f"{'extra':>8}")
    for key in ["step_ms_mean"] + parts:
        a = statistics.median(r[key] if key == "step_ms_mean" else r["step_parts_ms"][key] for r, _ in pairs)
        b = statistics.median(s[key] if key == "step_ms_mean" else s["step_parts_ms"][key] for _, s in pairs)
        print(f"{key:<26} {a:>12.3f} {b:>13.3f} {a - b:>+8.3f}")


if __name__ == "__main__":
    main()
