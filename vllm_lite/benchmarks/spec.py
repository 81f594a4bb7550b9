"""Speculative decoding benchmarks (issue 14), one scenario per run; each prints the mean acceptance length and the
per-position acceptance next to its times.

  verify  verification efficiency: greedy batches of random prompts (batch sizes --batch-sizes, default 1,8,32) on a
          plain engine, then on one with k = --num-speculative-tokens (default 3) whose proposer is a benchmark-only
          oracle that drafts the target's own greedy continuation, so every draft is accepted and the ratio of TPOTs
          is the cost of a 1 + k step against k + 1 plain steps. Both engines run the model "memoryless": random
          weights with every layer's output projections (o_proj, down_proj) zeroed, so the residual stream is the
          token's embedding and the next token depends on the current token alone. The work per step (every
          matmul, attention over the whole context) is unchanged, but the greedy continuation no longer depends on
          how a step's shape rounds bf16 near ties (with plain random weights it does: on the H200 the oracle lost
          the continuation after ~90 of 256 tokens and drafted in 1 step of 8). The oracle follows the successor
          map learned from the target's own outputs. identical_outputs counts spec outputs equal to the plain
          run's. Target: <= 0.30x at batch 1. Default model llama-3.1-8b.
  ngram   n-gram speculation on the real default model at batch 1: an edit workload (GSM8K questions from
          shared/data/gsm8k as passages, "repeat this passage with one small change"), TPOT plain / ngram (target
          >= 2x), and chat prompts that do not repeat (target: ngram no slower than 0.97x).
  t1      the T1 throughput workload (256 random-id requests, bench/throughput.py) with n-gram on vs off
          (target >= 0.97x).
  eagle3  a trained EAGLE-3 head (--head, e.g. from `vllm-lite train-draft`) on the real default model at batch 1:
          GSM8K test questions through the chat template, greedy; TPOT plain / eagle3 (target >= 1.5x), mean
          acceptance length and per-position acceptance at k = 3 without the adaptive draft length (target >= 2.0),
          identical outputs and identical final answers; the result goes into the head's model card. --batched: all
          prompts in one batch (outputs and acceptance only: the identity check in float32).
Each engine of a comparison runs in its own spawned process (the device is whole for each; results come back
through a pipe).

    vllm-lite bench spec verify [--batch-sizes 1,8,32] [engine flags]
    vllm-lite bench spec ngram [--speculative-config '{"method": "ngram", ...}'] [--data FOLDER]
    vllm-lite bench spec t1 [--repeats 3]
    vllm-lite bench spec eagle3 --head HEAD_DIR [--num-prompts 200] [--data FOLDER]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import time
import traceback
from typing import Any

from vllm_lite.benchmarks import throughput
from vllm_lite.benchmarks.utils import add_bench_engine_args, bench_model, make_llm, progress, report
from vllm_lite.config import DEFAULT_MODEL
from vllm_lite.sampling_params import SamplingParams
from vllm_lite.spec_decode.metrics import acceptance_summary

SCENARIOS = ("verify", "ngram", "t1", "eagle3")
DEFAULTS = {"verify": dict(model_flag="llama-3.1-8b"),
            "ngram": dict(model_flag=DEFAULT_MODEL, load_format="auto"),
            "eagle3": dict(model_flag=DEFAULT_MODEL, load_format="auto"),
            "t1": dict(model_flag="qwen3-0.6b")}
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
EDIT_PROMPT = ("Repeat the following passage word for word, changing only one number in it. Output only the "
               "passage.\n\n{passage}")
CHAT_PROMPTS = [
    "Write a short poem about the sea at night.", "Explain how a bicycle stays upright.",
    "Give three tips for learning a new language.", "What are the main causes of the seasons on Earth?",
    "Describe a busy market in a small town.", "Why do cats purr?", "Suggest a name for a coffee shop and say why.",
    "Tell me a fun fact about octopuses.", "How does a refrigerator keep food cold?",
    "Write a haiku about autumn leaves.", "What should I pack for a weekend hiking trip?",
    "Explain what a prime number is to a child.", "Invent a new board game in a few sentences.",
    "Why is the sky blue?", "Describe the taste of a lemon to someone who never had one.",
    "What makes a good friend?",
]


class SuccessorOracle:
    """Benchmark-only proposer for a memoryless model (`make_memoryless`): its greedy next token is a function of
    the current token, learned from the target's own outputs, so the drafts are the chain of successors from a
    request's last known token (as far as the map goes) and every one is accepted."""

    def __init__(self) -> None:
        self.successor: dict[int, int] = {}

    def learn(self, prompt: list[int], output: list[int]) -> int:
        """Adds the transitions of one greedy output; returns how many were new or changed."""
        changed = 0
        for a, b in zip([prompt[-1], *output[:-1]], output):
            if self.successor.get(a) != b:
                self.successor[a] = b
                changed += 1
        return changed

    def propose(self, request: Any, k: int) -> list[int]:
        token = (request.output_token_ids or request.prompt_token_ids)[-1]
        drafts: list[int] = []
        while len(drafts) < k and token in self.successor:
            token = self.successor[token]
            drafts.append(token)
        return drafts


def make_memoryless(llm: Any) -> int:
    """Zero every layer's writes to the residual stream (o_proj, down_proj; weights and biases) in place, so the
    hidden state entering the final norm is the current token's embedding: the benchmark's compute is unchanged
    and its greedy continuation is a chain no step shape can perturb. Returns the number of tensors zeroed."""
    zeroed = 0
    for name, param in llm.model_runner().model.named_parameters():
        if name.rsplit(".", 2)[-2] in ("o_proj", "down_proj"):
            param.data.zero_()
            zeroed += 1
    if not zeroed:
        raise RuntimeError("no o_proj/down_proj parameters found: the verify benchmark needs a decoder model")
    return zeroed


def _in_child(fn: Any, *args: Any) -> Any:
    """fn(*args) in a fresh spawned process: each engine of a comparison gets the whole device (and a clean
    allocator), whatever the previous one left behind. Results come back through a local pipe."""
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(sender, fn, args))
    proc.start()
    sender.close()
    try:
        ok, value = receiver.recv()
    except EOFError:
        ok, value = False, f"the benchmark process died (exit code {proc.join() or proc.exitcode})"
    proc.join()
    if not ok:
        raise RuntimeError(f"{fn.__name__} failed:\n{value}")
    return value


def _child_main(sender: Any, fn: Any, args: tuple) -> None:
    try:
        sender.send((True, fn(*args)))
    except BaseException:  # reported to the parent, which raises it
        sender.send((False, traceback.format_exc()))


def _stats(llm: Any) -> Any:
    return llm.engine.scheduler.make_stats()


def _acceptance(before: Any, after: Any) -> dict:
    per_pos = [n - (before.num_accepted_tokens_per_pos[i] if i < len(before.num_accepted_tokens_per_pos) else 0)
               for i, n in enumerate(after.num_accepted_tokens_per_pos)]
    s = acceptance_summary(after.num_drafts - before.num_drafts, after.num_draft_tokens - before.num_draft_tokens,
                           after.num_accepted_tokens - before.num_accepted_tokens, per_pos)
    return {"mean_acceptance_length": round(s["mean_acceptance_length"], 3),
            "acceptance_rate": round(s["acceptance_rate"], 4),
            "per_position_acceptance": [round(x, 4) for x in s["per_position"]],
            "num_drafts": after.num_drafts - before.num_drafts}


def _timed(llm: Any, prompts: list, params: SamplingParams, chat: bool = False) -> tuple[float, list]:
    t0 = time.perf_counter()
    outs = (llm.chat(prompts, params, use_tqdm=False) if chat else llm.generate(prompts, params, use_tqdm=False))
    return time.perf_counter() - t0, outs


# ---------------------------------------------------------------- verify
def _latency(llm: Any, batch: list[dict], output_len: int, warmup: int, iters: int) -> tuple[float, list]:
    """Median TPOT (ms) of a greedy batch (TTFT from a 1-token run subtracted) and the last run's outputs."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for _ in range(warmup):
        _timed(llm, batch, params)
    tpots, outs = [], []
    for _ in range(iters):
        ttft, _ = _timed(llm, batch, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        total, outs = _timed(llm, batch, params)
        tpots.append(1000 * (total - ttft) / (output_len - 1))
    return sorted(tpots)[len(tpots) // 2], outs


def _calibrate(llm: Any, oracle: SuccessorOracle, batch: list[dict], output_len: int, rounds: int = 8) -> int:
    """Teach the oracle the spec engine's own greedy outputs until a run adds nothing (the lm_head can still round
    a near tie differently in a verification step than in the plain run, and the map must follow the spec engine).
    Returns the runs until then (rounds + 1 if the map never settled: the report says so)."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for i in range(1, rounds + 1):
        outs = llm.generate(batch, params, use_tqdm=False)
        if not sum(oracle.learn(p["prompt_token_ids"], list(o.outputs[0].token_ids)) for p, o in zip(batch, outs)):
            return i
    return rounds + 1


def _verify_engine(args: argparse.Namespace, k: int, batches: dict, refs: dict | None) -> dict:
    """One engine's TPOT per batch size, memoryless (see the module docstring): plain (refs None; returns the outputs
    too) or with the successor oracle (taught the plain outputs, then calibrated on this engine's own)."""
    llm = make_llm(args, **({} if refs is None else {"speculative_config": {**NGRAM, "num_speculative_tokens": k}}))
    make_memoryless(llm)
    oracle = SuccessorOracle()
    if refs is not None:  # the ngram method makes the engine capture 1 + k graphs; the oracle replaces its proposer
        llm.engine.proposer = oracle
    rows = {}
    for b, batch in batches.items():
        name = "plain" if refs is None else f"oracle k={k}"
        calibration = None
        if refs is not None:
            for p, r in zip(batch, refs[b]):
                oracle.learn(p["prompt_token_ids"], list(r))
            calibration = _calibrate(llm, oracle, batch, args.output_len)
        before = _stats(llm)
        tpot, outs = _latency(llm, batch, args.output_len, args.num_iters_warmup, args.num_iters)
        tokens = [o.outputs[0].token_ids for o in outs]
        rows[b] = {"tpot_ms": round(tpot, 4), "tokens": tokens, "calibration_runs": calibration,
                   **_acceptance(before, _stats(llm))}
        progress(f"{name} batch {b}: TPOT {tpot:.3f} ms, mean acceptance length "
                 f"{rows[b]['mean_acceptance_length']}, per position {rows[b]['per_position_acceptance']}")
    return {"rows": rows, "device": str(llm.device), "vocab_size": llm.info.vocab_size}


def _vocab_size(args: argparse.Namespace) -> int:
    from vllm_lite.benchmarks.utils import resolve_bench_model
    from vllm_lite.config import EngineConfig
    from vllm_lite.model_loader import resolve_model
    from vllm_lite.entrypoints.args import engine_kwargs_from_args
    kwargs = engine_kwargs_from_args(args)
    config = EngineConfig.from_kwargs(**{**kwargs, "model": resolve_bench_model(kwargs["model"]),
                                         "speculative_config": None})
    return resolve_model(config.model, config.load, "cpu").vocab_size


def run_verify(args: argparse.Namespace) -> dict:
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    k = args.num_speculative_tokens
    vocab = min(10000, _vocab_size(args))
    rng = random.Random(0)
    batches = {b: [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(args.input_len)]} for _ in range(b)]
               for b in sizes}
    plain = _in_child(_verify_engine, args, k, batches, None)
    refs = {b: row["tokens"] for b, row in plain["rows"].items()}
    spec = _in_child(_verify_engine, args, k, batches, refs)
    rows = []
    for b in sizes:
        p, q = plain["rows"][b], spec["rows"][b]
        same = sum(x == y for x, y in zip(p["tokens"], q["tokens"]))
        rows.append({"batch_size": b, "plain_tpot_ms": p["tpot_ms"], "spec_tpot_ms": q["tpot_ms"],
                     "ratio": round(q["tpot_ms"] / p["tpot_ms"], 4), "identical_outputs": f"{same}/{b}",
                     **{key: q[key] for key in ("calibration_runs", "mean_acceptance_length", "acceptance_rate",
                                                "per_position_acceptance", "num_drafts")}})
        progress(f"batch {b}: oracle TPOT {q['tpot_ms']:.3f} ms = {rows[-1]['ratio']:.3f}x plain "
                 f"{p['tpot_ms']:.3f} ms")
    return {"scenario": "verify", "model": bench_model(args), "k": k, "input_len": args.input_len,
            "output_len": args.output_len, "device": spec["device"], "target": "ratio <= 0.30 at batch 1",
            "rows": rows}


# ---------------------------------------------------------------- ngram
def _passages(data: str | None, n: int) -> list[str]:
    from vllm_lite.evals.gsm8k import find_data_dir, load_jsonl
    return [r["question"] for r in load_jsonl(os.path.join(find_data_dir(data), "test.jsonl"))[:n]]


def _per_prompt_tpot(llm: Any, convs: list, max_tokens: int) -> tuple[float, list[list[int]]]:
    """Batch-1 decode time per output token over all prompts (ms): each prompt's 1-token time (prefill + first
    token) is subtracted from its full run's."""
    decode_s, decode_tokens, outs = 0.0, 0, []
    for conv in convs:
        first, _ = _timed(llm, [conv], SamplingParams(temperature=0.0, max_tokens=1), chat=True)
        total, out = _timed(llm, [conv], SamplingParams(temperature=0.0, max_tokens=max_tokens), chat=True)
        ids = out[0].outputs[0].token_ids
        outs.append(ids)
        if len(ids) > 1:
            decode_s += total - first
            decode_tokens += len(ids) - 1
    return 1000 * decode_s / max(decode_tokens, 1), outs


def _ngram_engine(args: argparse.Namespace, config: dict | None, edits: list, chats: list) -> dict:
    """One engine (plain: config None) over the edit and chat prompts: TPOT, outputs, acceptance."""
    llm = make_llm(args, **({} if config is None else {"speculative_config": config}))
    name = "plain" if config is None else "spec"
    _per_prompt_tpot(llm, edits[:1] + chats[:1], 16)  # warm-up
    result: dict[str, Any] = {"device": str(llm.device)}
    for workload, convs in (("edit", edits), ("chat", chats)):
        before = _stats(llm)
        tpot, outs = _per_prompt_tpot(llm, convs, args.output_len)
        result[workload] = {"tpot_ms": round(tpot, 4), "outputs": outs, "acceptance": _acceptance(before, _stats(llm))}
        progress(f"{name} {workload}: TPOT {tpot:.3f} ms")
    return result


def run_ngram(args: argparse.Namespace) -> dict:
    spec_config = args.speculative_config or NGRAM
    args.speculative_config = None
    edits = [[{"role": "user", "content": EDIT_PROMPT.format(passage=p)}]
             for p in _passages(args.data, args.num_passages)]
    chats = [[{"role": "user", "content": c}] for c in CHAT_PROMPTS[:args.num_chat]]
    plain = _in_child(_ngram_engine, args, None, edits, chats)
    spec = _in_child(_ngram_engine, args, spec_config, edits, chats)
    result: dict[str, Any] = {"scenario": "ngram", "model": bench_model(args), "speculative_config": spec_config,
                              "max_tokens": args.output_len, "device": spec["device"]}
    for workload in ("edit", "chat"):
        p, q = plain[workload], spec[workload]
        same = sum(a == b for a, b in zip(p["outputs"], q["outputs"]))
        result.update({f"{workload}_plain_tpot_ms": p["tpot_ms"], f"{workload}_spec_tpot_ms": q["tpot_ms"],
                       f"{workload}_speedup": round(p["tpot_ms"] / q["tpot_ms"], 4),
                       f"{workload}_identical_outputs": f"{same}/{len(p['outputs'])}",
                       f"{workload}_acceptance": q["acceptance"]})
    result["targets"] = "edit_speedup >= 2, chat_speedup >= 0.97"
    progress(f"edit: {result['edit_speedup']}x, chat: {result['chat_speedup']}x; edit acceptance "
             f"{result['edit_acceptance']}")
    return result


# ---------------------------------------------------------------- eagle3
def _eagle3_engine(args: argparse.Namespace, config: dict | None, convs: list) -> dict:
    """One engine (plain: config None) over the GSM8K chat prompts at batch 1: TPOT, outputs, answers, acceptance."""
    from vllm_lite.evals.gsm8k import extract_answer
    llm = make_llm(args, **({} if config is None else {"speculative_config": config}))
    before = _stats(llm)
    if args.batched:  # every prompt in one generate call: outputs and acceptance, no TPOT
        _, out = _timed(llm, convs, SamplingParams(temperature=0.0, max_tokens=args.output_len), chat=True)
        tpot, outs = None, [o.outputs[0].token_ids for o in out]
    else:
        _per_prompt_tpot(llm, convs[:2], 16)  # warm-up
        before = _stats(llm)
        tpot, outs = _per_prompt_tpot(llm, convs, args.output_len)
        progress(f"{'plain' if config is None else 'eagle3'}: TPOT {tpot:.3f} ms")
    tok = llm.get_tokenizer()
    drafting = getattr(llm.model_runner(), "drafting", None) if config is not None else None
    padded = getattr(getattr(drafting, "drafter", None), "padded", None)
    return {"tpot_ms": None if tpot is None else round(tpot, 4), "outputs": outs, "device": str(llm.device),
            "device_proposals": None if padded is None else padded.num_proposals,
            "answers": [extract_answer(tok.decode(o, skip_special_tokens=True)) for o in outs],
            "acceptance": _acceptance(before, _stats(llm))}


def run_eagle3(args: argparse.Namespace) -> dict:
    from vllm_lite.spec_decode.train.export import record_acceptance
    config = {"method": "eagle3", "model": args.head, "num_speculative_tokens": args.num_speculative_tokens,
              "adaptive_draft_length": False}
    if args.batched:  # every prompt in one batch: above the default batch limit (64) nothing would draft
        config["disable_by_batch_size"] = None
    args.speculative_config = None
    convs = [[{"role": "user", "content": q}] for q in _passages(args.data, args.num_prompts)]
    plain = _in_child(_eagle3_engine, args, None, convs)
    spec = _in_child(_eagle3_engine, args, config, convs)
    n = len(convs)
    result = {"scenario": "eagle3", "model": bench_model(args), "speculative_config": config, "num_prompts": n,
              "max_tokens": args.output_len, "device": spec["device"], "batched": args.batched,
              "plain_tpot_ms": plain["tpot_ms"], "spec_tpot_ms": spec["tpot_ms"],
              "speedup": None if args.batched else round(plain["tpot_ms"] / spec["tpot_ms"], 4),
              "identical_outputs": f"{sum(a == b for a, b in zip(plain['outputs'], spec['outputs']))}/{n}",
              "identical_answers": f"{sum(a == b for a, b in zip(plain['answers'], spec['answers']))}/{n}",
              **spec["acceptance"], "device_proposals": spec["device_proposals"],
              "targets": "mean_acceptance_length >= 2.0, speedup >= 1.5"}
    # Identical outputs show nothing when no draft was verified.
    result["identity_shown"] = spec["acceptance"]["num_drafts"] > 0
    progress(f"eagle3: {result['speedup']}x, mean acceptance length {result['mean_acceptance_length']}, per "
             f"position {result['per_position_acceptance']}, identical outputs {result['identical_outputs']}")
    if args.batched:  # the card records the batch-1 measurement
        return result
    record_acceptance(args.head, f"Acceptance (`vllm-lite bench spec eagle3`, {n} GSM8K test questions, chat "
                                 f"template, greedy, batch 1, k = {args.num_speculative_tokens}, {result['device']}):"
                                 f" mean acceptance length {result['mean_acceptance_length']}, per position "
                                 f"{result['per_position_acceptance']}; TPOT {result['spec_tpot_ms']} ms vs "
                                 f"{result['plain_tpot_ms']} ms without speculation ({result['speedup']}x); "
                                 f"identical outputs {result['identical_outputs']}, answers "
                                 f"{result['identical_answers']}.")
    return result


# ---------------------------------------------------------------- t1
def _t1_engine(args: argparse.Namespace, config: dict | None) -> dict:
    """T1 on one engine (plain: config None): median output tokens/s and acceptance."""
    prompts, params = throughput.workload(args.num_requests, args.min_len, args.max_len)
    llm = make_llm(args, **({} if config is None else {"speculative_config": config}))
    name = "plain" if config is None else "spec"
    warm = min(8, len(prompts))
    llm.generate(prompts[:warm], [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * warm,
                 use_tqdm=False)
    before = _stats(llm)
    runs, tokens = [], 0
    for i in range(max(args.repeats, 1)):
        elapsed, outs = _timed(llm, prompts, params)
        runs.append(elapsed)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        progress(f"{name} run {i + 1}: {tokens / elapsed:.1f} output tokens/s")
    return {"output_tokens_per_s": round(tokens / sorted(runs)[len(runs) // 2], 2), "device": str(llm.device),
            "acceptance": _acceptance(before, _stats(llm))}


def run_t1(args: argparse.Namespace) -> dict:
    spec_config = args.speculative_config or NGRAM
    args.speculative_config = None
    plain = _in_child(_t1_engine, args, None)
    spec = _in_child(_t1_engine, args, spec_config)
    return {"scenario": "t1", "model": bench_model(args), "speculative_config": spec_config,
            "num_requests": args.num_requests, "device": spec["device"],
            "plain_output_tokens_per_s": plain["output_tokens_per_s"],
            "spec_output_tokens_per_s": spec["output_tokens_per_s"],
            "ratio": round(spec["output_tokens_per_s"] / plain["output_tokens_per_s"], 4),
            "acceptance": spec["acceptance"], "target": "ratio >= 0.97"}


def main(argv: list[str] | None = None) -> dict:
    argv = list(argv or [])
    if not argv or argv[0] not in SCENARIOS:
        raise SystemExit(f"usage: vllm-lite bench spec {{{','.join(SCENARIOS)}}} [options]; see --help after the "
                         f"scenario\n\n{__doc__}")
    scenario = argv.pop(0)
    ap = argparse.ArgumentParser(prog=f"vllm-lite bench spec {scenario}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_engine_args(ap)
    ap.set_defaults(**DEFAULTS[scenario])
    if scenario == "verify":
        ap.add_argument("--batch-sizes", default="1,8,32")
        ap.add_argument("--num-speculative-tokens", type=int, default=3)
        ap.add_argument("--input-len", type=int, default=128)
        ap.add_argument("--output-len", type=int, default=256)
        ap.add_argument("--num-iters-warmup", type=int, default=1)
        ap.add_argument("--num-iters", type=int, default=3)
    elif scenario == "ngram":
        ap.add_argument("--data", default=None, help="GSM8K folder with test.jsonl (default: shared/data/gsm8k)")
        ap.add_argument("--num-passages", type=int, default=20)
        ap.add_argument("--num-chat", type=int, default=len(CHAT_PROMPTS))
        ap.add_argument("--output-len", type=int, default=256, help="max_tokens per prompt (EOS may end it)")
    elif scenario == "eagle3":
        ap.add_argument("--head", required=True, help="the EAGLE-3 head folder (vllm-lite train-draft --out)")
        ap.add_argument("--data", default=None, help="GSM8K folder with test.jsonl (default: shared/data/gsm8k)")
        ap.add_argument("--num-prompts", type=int, default=200)
        ap.add_argument("--num-speculative-tokens", type=int, default=3)
        ap.add_argument("--output-len", type=int, default=256, help="max_tokens per prompt (EOS may end it)")
        ap.add_argument("--batched", action="store_true",
                        help="all prompts in one batch: identical outputs and acceptance only, no TPOT (a quick "
                             "identity check, e.g. in float32)")
    else:
        ap.add_argument("--num-requests", type=int, default=256)
        ap.add_argument("--min-len", type=int, default=100)
        ap.add_argument("--max-len", type=int, default=1024)
        ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    result = {"verify": run_verify, "ngram": run_ngram, "t1": run_t1, "eagle3": run_eagle3}[scenario](args)
    if args.json:
        result["command"] = "vllm-lite bench spec " + scenario + " " + json.dumps(argv)
    return report(result, args.json)


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
