"""Where a speculative engine's steps go: every engine step classified by what it launched (plain decode, a
verification of d drafts, prefill), with its wall time, whether a CUDA graph ran, and the time spent blocked on the
device (executor.get_output) vs on the host (schedule + input preparation + launches, drafting).

    python bench/tools/spec_trace.py --workload edit   [--spec ngram|none] [--async-scheduling/--no-...]
    python bench/tools/spec_trace.py --workload gsm8k --spec eagle3 --head HEAD_DIR --k 3   [--spec none: plain]
        (issue 17's workload: GSM8K test questions through the chat template, the default model, batch 1)
    python bench/tools/spec_trace.py --workload oracle [--spec ngram|none] --batch-size 1 [--model smollm2-135m]
        (a bench/data config with random weights; default qwen3-0.6b)
    --profile: also run torch.profiler over the traced run; each engine step is a record_function range named by
        its kind, and the JSON gains per-kind device/host totals plus the top ops by self device and self host time
    --cprofile: cProfile over the traced run instead: the Python functions with the most own and cumulative time
        per engine step (where the host's serial work between verification steps goes)

edit: the default model on bench/spec's edit prompts (GSM8K passages), batch 1; oracle: random prompts on a dummy
model made memoryless (bench spec verify) whose proposer drafts the target's own greedy continuation. With an in-worker
drafter (EAGLE-3) each step also gets draft_ms, the worker's drafting after sampling, and of it draft_wait_ms, the
wait for the verified tokens the drafter starts from (the rest is the head's host work and launches).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import json
import random
import statistics
import time
from typing import Any

import torch

from vllm_lite.benchmarks.spec import EDIT_PROMPT, NGRAM, SuccessorOracle, _passages, make_memoryless
from vllm_lite.benchmarks.utils import per_step_times
from vllm_lite.sampling_params import SamplingParams


class StepTrace:
    """Wraps an LLM's engine core: per step, the kind launched, wall time, device wait, graph use."""

    def __init__(self, llm: Any) -> None:
        self.engine = llm.engine
        self.runner = llm.engine.executor.runner
        self.rows: list[dict] = []
        self._cur: dict | None = None
        engine, executor = self.engine, self.engine.executor
        step, execute, get_output = engine.step, executor.execute_model, executor.get_output
        proposer = engine.proposer
        propose = getattr(proposer, "propose", None)

        def traced_execute(so: Any) -> Any:
            spec = getattr(so, "scheduled_spec_decode_tokens", {}) or {}
            n = so.num_scheduled_tokens
            drafts = sorted(len(v) for v in spec.values())
            q = max(n.values()) if n else 0
            kind = ("prefill" if q > 1 + max(drafts, default=0) else
                    f"verify d={'/'.join(map(str, sorted(set(drafts))))} q={q}" if drafts else "decode")
            self._cur["kind"] = f"{kind} reqs={len(n)}"
            before = self._replays()
            out = execute(so)
            self._cur["graph"] = self._replays() > before
            return out

        def traced_get_output() -> Any:
            t0 = time.perf_counter()
            out = get_output()
            self._cur["wait_ms"] += 1000 * (time.perf_counter() - t0)
            return out

        def traced_propose(request: Any, k: int) -> Any:
            t0 = time.perf_counter()
            out = propose(request, k)
            self._cur["propose_ms"] += 1000 * (time.perf_counter() - t0)
            return out

        def traced_step() -> Any:
            self._cur = {"kind": "none", "graph": False, "wait_ms": 0.0, "propose_ms": 0.0}
            t0 = time.perf_counter()
            with torch.profiler.record_function(f"step#{len(self.rows)}"):
                out = step()
            self._cur["ms"] = 1000 * (time.perf_counter() - t0)
            self._cur["tokens"] = sum(len(o.new_token_ids) for o in out.outputs)
            self.rows.append(self._cur)
            return out

        engine.step, executor.execute_model, executor.get_output = traced_step, traced_execute, traced_get_output
        if propose is not None:
            proposer.propose = traced_propose
        if getattr(self.runner, "drafting", None) is not None:
            self._trace_worker_drafting()

    def _trace_worker_drafting(self) -> None:
        runner = self.runner
        draft, resolve_all = runner._propose_drafts, runner._resolve_all

        def traced_draft(*args: Any) -> Any:
            t0 = time.perf_counter()
            out = draft(*args)
            self._cur["draft_ms"] = self._cur.get("draft_ms", 0.0) + 1000 * (time.perf_counter() - t0)
            return out

        def traced_resolve_all() -> Any:
            t0 = time.perf_counter()
            out = resolve_all()
            self._cur["draft_wait_ms"] = self._cur.get("draft_wait_ms", 0.0) + 1000 * (time.perf_counter() - t0)
            return out

        runner._propose_drafts, runner._resolve_all = traced_draft, traced_resolve_all

    def _replays(self) -> int:
        graphs = getattr(self.runner, "graphs", None)
        return sum(graphs.num_replays.values()) if graphs is not None else 0

    def summary(self) -> dict:
        by: dict[tuple[str, bool], list[dict]] = collections.defaultdict(list)
        for r in self.rows:
            by[r["kind"], r["graph"]].append(r)
        total_ms = sum(r["ms"] for r in self.rows)
        tokens = sum(r["tokens"] for r in self.rows)
        table = []
        for (kind, graph), rows in sorted(by.items(), key=lambda kv: -sum(r["ms"] for r in kv[1])):
            table.append({"kind": kind, "graph": graph, "steps": len(rows),
                          "ms_mean": round(statistics.fmean(r["ms"] for r in rows), 3),
                          "ms_p50": round(statistics.median(r["ms"] for r in rows), 3),
                          "wait_ms_mean": round(statistics.fmean(r["wait_ms"] for r in rows), 3),
                          "propose_ms_mean": round(statistics.fmean(r["propose_ms"] for r in rows), 3),
                          "draft_ms_mean": round(statistics.fmean(r.get("draft_ms", 0.0) for r in rows), 3),
                          "draft_wait_ms_mean": round(statistics.fmean(r.get("draft_wait_ms", 0.0) for r in rows), 3),
                          "share": round(sum(r["ms"] for r in rows) / max(total_ms, 1e-9), 3)})
        out = {"steps": len(self.rows), "tokens": tokens, "total_ms": round(total_ms, 1),
               "ms_per_token": round(total_ms / max(tokens, 1), 4), "tokens_per_step": round(tokens / max(
                   len(self.rows), 1), 3), "by_kind": table}
        drafter = getattr(getattr(self.runner, "drafting", None), "drafter", None)
        padded = getattr(drafter, "padded", None)
        if padded is not None:  # the worker's proposals: on the device (padded_proposal.py) vs the host path
            out["device_proposals"] = padded.num_proposals
            out["host_proposals"] = drafter.num_proposals - padded.num_proposals
        return out


def profile_tables(prof: Any, rows: list[dict], top: int = 20) -> dict:
    """Per step kind: host and device time summed over the steps' ranges (events inside a step range are that
    step's), and the top ops by self device time and by self host time over the whole run."""
    kinds: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"steps": 0, "host_ms": 0.0,
                                                                           "device_ms": 0.0})
    for evt in prof.events():
        if not evt.name.startswith("step#"):
            continue
        i = int(evt.name[5:])
        if i >= len(rows):
            continue
        k = kinds[rows[i]["kind"]]
        k["steps"] += 1
        k["host_ms"] += evt.cpu_time_total / 1000
        k["device_ms"] += getattr(evt, "device_time_total", getattr(evt, "cuda_time_total", 0)) / 1000
    avgs = prof.key_averages()
    dev = "self_device_time_total" if hasattr(avgs[0], "self_device_time_total") else "self_cuda_time_total"

    def table(attr: str) -> list[dict]:
        ranked = sorted((a for a in avgs if not a.key.startswith("step#")), key=lambda a: -getattr(a, attr))[:top]
        return [{"op": a.key[:80], "calls": a.count, "self_host_ms": round(a.self_cpu_time_total / 1000, 3),
                 "self_device_ms": round(getattr(a, dev) / 1000, 3)} for a in ranked]

    return {"by_kind": {k: {m: round(v, 3) for m, v in d.items()} for k, d in kinds.items()},
            "top_device": table(dev), "top_host": table("self_cpu_time_total")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["edit", "oracle", "gsm8k"], default="edit")
    ap.add_argument("--spec", choices=["ngram", "eagle3", "none"], default="ngram")
    ap.add_argument("--head", default=None, help="--spec eagle3: the head folder (vllm-lite train-draft --out)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--model", default="qwen3-0.6b", help="oracle workload: a bench/data config (random weights)")
    ap.add_argument("--data", default=None, help="the GSM8K folder (default: ../shared/data/gsm8k)")
    ap.add_argument("--model-path", default=None, help="edit / gsm8k: another model than the default one (tests)")
    ap.add_argument("--dtype", default=None, help="edit / gsm8k: the model dtype (default: the engine's)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="torch.profiler tables of the traced run (see above)")
    ap.add_argument("--cprofile", action="store_true", help="cProfile tables of the traced run (see above)")
    args = ap.parse_args(argv)
    from vllm_lite import LLM
    spec = {**NGRAM, "num_speculative_tokens": args.k} if args.spec == "ngram" else None
    if args.spec == "eagle3":
        if not args.head:
            raise SystemExit("--spec eagle3 needs --head HEAD_DIR")
        if args.workload == "oracle":
            raise SystemExit("--workload oracle replaces the engine's proposer: use it with --spec ngram or none")
        spec = {"method": "eagle3", "model": args.head, "num_speculative_tokens": args.k,
                "adaptive_draft_length": False}
    common = dict(async_scheduling=args.async_scheduling, max_num_seqs=max(8, args.batch_size),
                  gpu_memory_utilization=0.5, **({"dtype": args.dtype} if args.dtype else {}))
    if args.workload in ("edit", "gsm8k"):
        llm = LLM(args.model_path or "smollm2-135m-instruct", speculative_config=spec, **common)
        template = EDIT_PROMPT if args.workload == "edit" else "{passage}"
        convs = [[{"role": "user", "content": template.format(passage=p)}]
                 for p in _passages(args.data, args.num_prompts)]
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
        llm.chat(convs[:1], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)  # warm-up
        trace = StepTrace(llm)
        prof = _profiler(args.profile, args.cprofile)
        t0 = time.perf_counter()
        with prof:
            for conv in convs:
                llm.chat([conv], params, use_tqdm=False)
    else:
        from vllm_lite.benchmarks.utils import resolve_bench_model
        llm = LLM(resolve_bench_model(args.model), load_format="dummy", skip_tokenizer_init=True,
                  speculative_config=spec, **{"dtype": "bfloat16", **common})
        rng = random.Random(0)
        batches = [[{"prompt_token_ids": [rng.randrange(10000) for _ in range(128)]} for _ in range(args.batch_size)]
                   for _ in range(args.num_prompts)]
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        make_memoryless(llm)  # plain and spec alike: the oracle's continuation cannot drift (bench spec verify)
        if spec is not None:  # the plain outputs first, for the oracle to learn
            oracle = SuccessorOracle()
            for batch in batches:
                outs = llm.generate(batch, params, use_tqdm=False)
                for p, o in zip(batch, outs):
                    oracle.learn(p["prompt_token_ids"], list(o.outputs[0].token_ids))
            llm.engine.proposer = oracle
        llm.generate(batches[0], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
        trace = StepTrace(llm)
        prof = _profiler(args.profile, args.cprofile)
        t0 = time.perf_counter()
        with prof:
            for batch in batches:
                llm.generate(batch, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    result = {"workload": args.workload, "spec": args.spec, "k": args.k, "batch_size": args.batch_size,
              "async_scheduling": args.async_scheduling, "wall_s": round(wall, 3), **trace.summary()}
    if args.profile:
        result["profile"] = profile_tables(prof, trace.rows)
    if args.cprofile:
        result["cprofile"] = cprofile_tables(prof, max(result["steps"], 1))
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def cprofile_tables(prof: cProfile.Profile, steps: int, top: int = 30) -> dict:
    """ms per engine step: the functions with the most own time, and with the most cumulative time."""
    times = per_step_times(prof, steps)

    def table(i: int) -> list[list]:
        return [[name, round(t[i], 4)] for name, t in sorted(times.items(), key=lambda kv: -kv[1][i])[:top]]
    return {"steps": steps, "own_ms_per_step": table(0), "cumulative_ms_per_step": table(1)}


def _profiler(on: bool, cprofile: bool = False) -> Any:
    """torch.profiler over CPU (+ CUDA when there), cProfile (a context manager too), or a no-op context."""
    if cprofile:
        return cProfile.Profile()
    if not on:
        return contextlib.nullcontext()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=acts)


if __name__ == "__main__":
    main()
