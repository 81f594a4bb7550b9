"""`vllm-lite eval gsm8k` (or `python -m vllm_lite.evals.gsm8k`): GSM8K through the OpenAI-compatible server with
vLLM's recipe (tests/evals/gsm8k), so scores compare with vLLM's: an n-shot prefix of the first n TRAIN examples as
"Question: ...\\nAnswer: ...\\n\\n", then "Question: {q}\\nAnswer:"; /v1/completions at temperature 0, max_tokens
256, stop ["Question", "Assistant:", "<|separator|>"]; the answer is the last run of digits after commas are removed
(the sign is dropped, as in vLLM; the gold label goes through the same extraction). `--chat` sends the same text as
one user message to /v1/chat/completions. `--reference hf` runs the same prompts through transformers' greedy
`generate` and reports per-question agreement with the engine."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from typing import Any, Sequence

from vllm_lite.evals.client import Answer, complete, gather_bounded, make_client, served_model
from vllm_lite.evals.report import agreement_plot, bar_with_interval, wilson_interval, write_report
from vllm_lite.evals.server import add_server_args, server_for

INVALID = -9999999
STOP = ["Question", "Assistant:", "<|separator|>"]
MAX_TOKENS = 256
SEED = 42  # vLLM's script sends it; greedy answers do not depend on it
DATA_DIR_NAME = os.path.join("shared", "data", "gsm8k")


def find_data_dir(data: str | None) -> str:
    """--data, else shared/data/gsm8k beside or above the working directory or the source tree (never downloaded)."""
    if data:
        if not os.path.isfile(os.path.join(data, "test.jsonl")):
            raise FileNotFoundError(f"--data {data!r} has no test.jsonl (and train.jsonl)")
        return data
    here = os.path.dirname(os.path.abspath(__file__))
    roots = [os.getcwd(), os.path.dirname(os.getcwd()), os.path.dirname(here), os.path.dirname(os.path.dirname(here))]
    for root in roots:
        folder = os.path.join(root, DATA_DIR_NAME)
        if os.path.isfile(os.path.join(folder, "test.jsonl")):
            return folder
    raise FileNotFoundError(f"GSM8K data not found in {[os.path.join(r, DATA_DIR_NAME) for r in roots]}; pass "
                            f"--data FOLDER (with test.jsonl and train.jsonl from openai/grade-school-math)")


def load_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip() and not line.startswith("#")]


def extract_answer(text: str) -> int:
    """vLLM's get_answer_value: the last run of digits once commas are removed; INVALID when there is none."""
    numbers = re.findall(r"\d+", text.replace(",", ""))
    return int(numbers[-1]) if numbers else INVALID


def few_shot_prefix(train: Sequence[dict[str, Any]], num_shots: int) -> str:
    return "".join(f"Question: {ex['question']}\nAnswer: {ex['answer']}\n\n" for ex in train[:num_shots])


def build_prompts(train: Sequence[dict[str, Any]], test: Sequence[dict[str, Any]], num_shots: int) -> list[str]:
    prefix = few_shot_prefix(train, num_shots)
    return [f"{prefix}Question: {ex['question']}\nAnswer:" for ex in test]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-lite eval gsm8k", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("eval")
    g.add_argument("--data", default=None, help="folder with test.jsonl and train.jsonl (default: shared/data/gsm8k)")
    g.add_argument("--limit", type=int, default=None, help="only the first N test questions (default: all 1,319)")
    g.add_argument("--num-shots", type=int, default=5, help="few-shot examples (the first N training questions)")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user message to /v1/chat/completions")
    g.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="most tokens per answer")
    g.add_argument("--reference", choices=["hf"], default=None,
                   help="also run the prompts through transformers' greedy generate and report the agreement")
    g.add_argument("--reference-batch-size", type=int, default=None,
                   help="prompts per transformers generate call (default: 64 on CUDA, 4 on the CPU)")
    g.add_argument("--reference-dtype", default="auto",
                   help="reference dtype (auto: the engine's rule, float32 on the CPU, the checkpoint's on GPU)")
    g.add_argument("--num-logprobs", type=int, default=5,
                   help="top logprobs compared at the first divergence from the reference")
    add_server_args(p)
    return p


async def _ask_all(base_url: str, args: argparse.Namespace, prompts: list[str]) -> tuple[str, list[Answer], float]:
    client = make_client(base_url, args.api_key)
    try:
        model = await served_model(client, args.model if args.base_url else None)
        params = dict(temperature=0.0, max_tokens=args.max_tokens, stop=STOP, seed=SEED)
        num_lp = args.num_logprobs if args.reference else None
        start = time.perf_counter()
        answers = await gather_bounded(prompts, lambda p: complete(client, model, p, args.chat, num_lp, **params),
                                       args.max_concurrency, "gsm8k")
        return model, answers, time.perf_counter() - start
    finally:
        await client.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole eval: data, engine answers, optional reference, report. Returns the summary."""
    data_dir = find_data_dir(args.data)
    train = load_jsonl(os.path.join(data_dir, "train.jsonl"))
    test = load_jsonl(os.path.join(data_dir, "test.jsonl"))[:args.limit]
    prompts = build_prompts(train, test, args.num_shots)
    labels = [extract_answer(ex["answer"]) for ex in test]
    print(f"GSM8K: {len(prompts)} questions, {args.num_shots}-shot, {'chat' if args.chat else 'completions'}, "
          f"concurrency {args.max_concurrency}", file=sys.stderr, flush=True)
    with server_for(args) as base_url:
        model, answers, wall_s = asyncio.run(_ask_all(base_url, args, prompts))
    preds = [extract_answer(a.text) if a.error is None else INVALID for a in answers]
    records = [{"index": i, "question": ex["question"], "label": lab, "pred": pred, "correct": pred == lab,
                "response": a.text, "finish_reason": a.finish_reason, "prompt_tokens": a.prompt_tokens,
                "completion_tokens": a.completion_tokens, "latency_s": round(a.latency_s, 4), "error": a.error}
               for i, (ex, lab, pred, a) in enumerate(zip(test, labels, preds, answers))]
    n = len(records)
    correct = sum(r["correct"] for r in records)
    completion_tokens = sum(a.completion_tokens for a in answers)
    summary: dict[str, Any] = {
        "model": model, "questions": n, "num_shots": args.num_shots, "mode": "chat" if args.chat else "completions",
        "max_concurrency": args.max_concurrency, "accuracy": correct / n if n else 0.0,
        "accuracy_95ci": list(wilson_interval(correct, n)), "correct": correct,
        "invalid_rate": sum(p == INVALID for p in preds) / n if n else 0.0,
        "errors": sum(a.error is not None for a in answers), "wall_s": wall_s,
        "questions_per_s": n / wall_s if wall_s else 0.0,
        "prompt_tokens": sum(a.prompt_tokens for a in answers), "completion_tokens": completion_tokens,
        "output_tokens_per_s": completion_tokens / wall_s if wall_s else 0.0,
        "base_url": args.base_url or f"started: vllm-lite serve {args.model or 'smollm2-135m-instruct'} "
                                     f"{args.serve_args}".rstrip()}
    plots = [("gsm8k_accuracy.png", bar_with_interval(["engine"], [summary["accuracy"]],
                                                      [tuple(summary["accuracy_95ci"])],
                                                      f"GSM8K {args.num_shots}-shot, n={n}", "accuracy"))]
    if args.reference:
        agreement = add_reference(args, model, prompts, answers, labels, records, summary)
        plots[0] = ("gsm8k_accuracy.png", bar_with_interval(
            ["engine", "transformers"], [summary["accuracy"], summary["reference_accuracy"]],
            [tuple(summary["accuracy_95ci"]), tuple(summary["reference_accuracy_95ci"])],
            f"GSM8K {args.num_shots}-shot, n={n}", "accuracy"))
        plots.append(("gsm8k_agreement.png", agreement_plot(agreement, "engine vs transformers (greedy)")))
    paths = write_report(args.output, "gsm8k", f"GSM8K ({model})", summary, records, plots)
    print(json.dumps({k: v for k, v in summary.items()}, indent=1))
    print(f"report: {', '.join(paths.values())}", file=sys.stderr)
    return summary


def add_reference(args: argparse.Namespace, model: str, prompts: list[str], answers: list[Answer],
                  labels: list[int], records: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, int]:
    """Run the transformers reference; add per-question agreement to records and totals to summary."""
    from vllm_lite.evals.reference import HFReference, compare_tokens
    ref_model = args.model or model
    print(f"reference: transformers generate (greedy) on {ref_model}", file=sys.stderr, flush=True)
    ref = HFReference(ref_model, dtype=args.reference_dtype, num_logprobs=args.num_logprobs)
    batch = args.reference_batch_size or (64 if ref.device == "cuda" else 4)
    ref_answers = ref.generate(prompts, args.max_tokens, STOP, chat=args.chat, batch_size=batch)
    counts = {"same answer": 0, "identical tokens": 0, "near tie": 0, "mismatch": 0}
    ref_correct = 0
    for rec, a, r, lab in zip(records, answers, ref_answers, labels):
        ref_pred = extract_answer(r.text)
        kind, pos = compare_tokens(a.tokens, a.top_logprobs, r.tokens, r.top_logprobs)
        rec.update(reference_response=r.text, reference_pred=ref_pred, same_answer=ref_pred == rec["pred"],
                   token_agreement=kind, first_divergence=pos)
        ref_correct += ref_pred == lab
        counts["same answer"] += ref_pred == rec["pred"]
        counts[{"identical": "identical tokens", "near_tie": "near tie", "mismatch": "mismatch"}[kind]] += 1
    n = len(records)
    summary.update(reference="transformers generate (greedy)", reference_dtype=ref.dtype_name,
                   reference_accuracy=ref_correct / n if n else 0.0,
                   reference_accuracy_95ci=list(wilson_interval(ref_correct, n)),
                   same_answer=counts["same answer"], same_answer_rate=counts["same answer"] / n if n else 0.0,
                   identical_tokens=counts["identical tokens"], near_tie=counts["near tie"],
                   token_mismatch=counts["mismatch"], reference_wall_s=ref.wall_s)
    return counts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
