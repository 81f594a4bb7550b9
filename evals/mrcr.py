"""`vllm-lite eval mrcr` (or `python -m vllm_lite.evals.mrcr`): multi-round co-reference (openai/mrcr) through the
server's /v1/chat/completions at temperature 0. Each record is a long conversation in which one request ("write a
poem about tapirs") was made 2, 4 or 8 times; the last message asks to prepend a random string to the k-th of
those replies. Scored with the official grader (0 unless the answer starts with the string, else the
SequenceMatcher ratio with the expected reply), reported by needle count and by context bin (prompt tokens, counted
by the server's /tokenize). `--dataset` reads the public parquet/JSONL files; without it, records in the same format
come from the deterministic generator in mrcr_data.py, sized to each bin the model's context allows."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from vllm_lite.evals.client import complete, gather_bounded, make_client, served_model, tokenize_messages
from vllm_lite.evals.mrcr_data import generate_record, grade, load_dataset
from vllm_lite.evals.report import bar_with_interval, mean_interval, write_report
from vllm_lite.evals.server import add_server_args, server_for

DEFAULT_BINS = "4k-8k,8k-16k"
CALIBRATION_ATTEMPTS = 6


def parse_bins(text: str) -> list[tuple[int, int]]:
    """"4k-8k,8k-16k" -> [(4096, 8192), (8192, 16384)] (k = 1024 tokens; plain numbers are tokens)."""
    def tokens(part: str) -> int:
        part = part.strip().lower()
        return int(float(part[:-1]) * 1024) if part.endswith("k") else int(part)
    bins = []
    for item in text.split(","):
        lo, hi = item.split("-")
        bins.append((tokens(lo), tokens(hi)))
        if bins[-1][0] >= bins[-1][1]:
            raise argparse.ArgumentTypeError(f"bin {item!r} is empty")
    return bins


def bin_name(b: tuple[int, int]) -> str:
    return f"{b[0] // 1024}K-{b[1] // 1024}K" if b[0] % 1024 == 0 and b[1] % 1024 == 0 else f"{b[0]}-{b[1]}"


def usable_bins(bins: list[tuple[int, int]], max_model_len: int, max_tokens: int) -> list[tuple[int, int, int]]:
    """(lo, hi, largest prompt that still leaves max_tokens of room) for the bins the context window allows."""
    room = max_model_len - max_tokens
    return [(lo, hi, min(hi, room)) for lo, hi in bins if lo < room]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-lite eval mrcr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("eval")
    g.add_argument("--dataset", default=None,
                   help="openai/mrcr parquet or JSONL file (or a folder of them); default: generated records")
    g.add_argument("--needles", default="2,4,8", help="needle counts to run (comma-separated)")
    g.add_argument("--bins", default=DEFAULT_BINS, help="context bins by prompt tokens (k = 1024)")
    g.add_argument("--samples", type=int, default=10, help="records per (bin, needle count)")
    g.add_argument("--seed", type=int, default=0, help="generator seed (records are a function of it)")
    g.add_argument("--max-tokens", type=int, default=1024, help="most tokens per answer")
    add_server_args(p)
    return p


async def _count(http: Any, base_url: str, args: argparse.Namespace, model: str, rec: dict[str, Any]) -> int:
    count, _ = await tokenize_messages(http, base_url, args.api_key, model, json.loads(rec["prompt"]))
    return count


async def _generated(http: Any, base_url: str, args: argparse.Namespace, model: str, needles: list[int],
                     bins: list[tuple[int, int, int]]) -> list[tuple[dict[str, Any], int, tuple[int, int]]]:
    """Generated records sized into each bin: characters per token measured on one probe record, then each record
    regenerated (its size rescaled) until the server's token count lands in the bin."""
    probe = generate_record(args.seed, 2, 20000)
    chars_per_token = probe["n_chars"] / await _count(http, base_url, args, model, probe)

    async def one(job: tuple[int, int, tuple[int, int, int]]) -> tuple[dict[str, Any], int, tuple[int, int]]:
        n, i, (lo, hi, top) = job
        target = (lo + top) / 2
        chars = target * chars_per_token
        for _ in range(CALIBRATION_ATTEMPTS):
            rec = generate_record(args.seed * 100003 + i, n, int(chars))
            count = await _count(http, base_url, args, model, rec)
            if lo <= count <= top:
                return rec, count, (lo, hi)
            chars *= target / count
        raise RuntimeError(f"could not size a {n}-needle record into {lo}-{top} tokens (last: {count})")

    jobs = [(n, i, b) for b in bins for n in needles for i in range(args.samples)]
    return await gather_bounded(jobs, one, min(args.max_concurrency, 32), "mrcr: building prompts")


async def _from_dataset(http: Any, base_url: str, args: argparse.Namespace, model: str, needles: list[int],
                        bins: list[tuple[int, int, int]]) -> list[tuple[dict[str, Any], int, tuple[int, int]]]:
    """The first --samples records of each (bin, needles) from the public data."""
    records = [r for r in load_dataset(args.dataset) if r["n_needles"] in needles]
    counts = await gather_bounded(records, lambda r: _count(http, base_url, args, model, r),
                                  min(args.max_concurrency, 32), "mrcr: counting tokens")
    chosen, taken = [], {}
    for rec, count in zip(records, counts):
        for lo, hi, top in bins:
            key = (lo, rec["n_needles"])
            if lo <= count <= top and taken.get(key, 0) < args.samples:
                taken[key] = taken.get(key, 0) + 1
                chosen.append((rec, count, (lo, hi)))
    return chosen


async def _run(base_url: str, args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    needles = [int(n) for n in args.needles.split(",")]
    client = make_client(base_url, args.api_key)
    try:
        async with httpx.AsyncClient(timeout=600) as http:
            model = await served_model(client, args.model if args.base_url else None)
            probe_messages = [{"role": "user", "content": "hi"}]
            _, max_model_len = await tokenize_messages(http, base_url, args.api_key, model, probe_messages)
            bins = usable_bins(parse_bins(args.bins), max_model_len, args.max_tokens)
            if not bins:
                raise SystemExit(f"no bin of {args.bins} fits a context of {max_model_len} tokens with "
                                 f"--max-tokens {args.max_tokens}")
            skipped = [bin_name(b) for b in parse_bins(args.bins) if b[0] not in {lo for lo, _, _ in bins}]
            build = _from_dataset if args.dataset else _generated
            jobs = await build(http, base_url, args, model, needles, bins)
        print(f"MRCR: {len(jobs)} records, bins {[bin_name((lo, hi)) for lo, hi, _ in bins]} (context "
              f"{max_model_len}; skipped: {skipped or 'none'}), needles {needles}", file=sys.stderr, flush=True)

        async def ask(job: tuple[dict[str, Any], int, tuple[int, int]]) -> Any:
            rec, count, _ = job
            return await complete(client, model, json.loads(rec["prompt"]), True, None, temperature=0.0,
                                  max_tokens=min(args.max_tokens, max_model_len - count))
        start = time.perf_counter()
        answers = await gather_bounded(jobs, ask, args.max_concurrency, "mrcr")
        wall_s = time.perf_counter() - start
    finally:
        await client.close()
    return {"model": model, "max_model_len": max_model_len, "jobs": jobs, "answers": answers, "wall_s": wall_s,
            "skipped_bins": skipped}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole eval: records, answers, grades, report. Returns the summary."""
    with server_for(args) as base_url:
        res = asyncio.run(_run(base_url, args))
    records = []
    for i, ((rec, count, b), a) in enumerate(zip(res["jobs"], res["answers"])):
        score = grade(a.text, rec["answer"], rec["random_string_to_prepend"]) if a.error is None else 0.0
        records.append({"index": i, "bin": bin_name(b), "n_needles": rec["n_needles"], "prompt_tokens": count,
                        "n_chars": rec["n_chars"], "total_messages": rec["total_messages"],
                        "desired_msg_index": rec["desired_msg_index"], "score": score,
                        "starts_with_hash": a.error is None and a.text.startswith(rec["random_string_to_prepend"]),
                        "response": a.text, "answer": rec["answer"], "finish_reason": a.finish_reason,
                        "completion_tokens": a.completion_tokens, "latency_s": round(a.latency_s, 4),
                        "error": a.error})
    scores = [r["score"] for r in records]
    groups: dict[tuple[str, int], list[float]] = {}
    for r in records:
        groups.setdefault((r["bin"], r["n_needles"]), []).append(r["score"])
    by_needles = _group(records, "n_needles")
    by_bin = _group(records, "bin")
    wall_s = res["wall_s"]
    summary: dict[str, Any] = {
        "model": res["model"], "max_model_len": res["max_model_len"], "records": len(records),
        "source": args.dataset or f"generated (seed {args.seed})", "mean_score": _mean(scores),
        "mean_score_95ci": list(mean_interval(scores)),
        "starts_with_hash_rate": _mean([float(r["starts_with_hash"]) for r in records]), "errors": sum(r["error"] is not None for r in records),
        "wall_s": wall_s, "prompt_tokens": sum(r["prompt_tokens"] for r in records),
        "completion_tokens": sum(r["completion_tokens"] for r in records), "skipped_bins": res["skipped_bins"],
        "by_needles": {str(k): _mean(v) for k, v in by_needles.items()},
        "by_bin": {k: _mean(v) for k, v in by_bin.items()}}
    rows = [[b, n, len(v), _mean(v), list(mean_interval(v))] for (b, n), v in sorted(groups.items())]
    plots = [("mrcr_by_needles.png", bar_with_interval([f"{k} needles" for k in by_needles],
                                                       [_mean(v) for v in by_needles.values()],
                                                       [mean_interval(v) for v in by_needles.values()],
                                                       "MRCR score by needles", "mean score")),
             ("mrcr_by_bin.png", bar_with_interval(list(by_bin), [_mean(v) for v in by_bin.values()],
                                                   [mean_interval(v) for v in by_bin.values()],
                                                   "MRCR score by context bin", "mean score"))]
    paths = write_report(args.output, "mrcr", f"MRCR ({res['model']})", summary, records, plots,
                         [("score by bin and needles", ["bin", "needles", "records", "mean score", "95% CI"], rows)])
    print(json.dumps(summary, indent=1))
    print(f"report: {', '.join(paths.values())}", file=sys.stderr)
    return summary


def _group(records: list[dict[str, Any]], key: str) -> dict[Any, list[float]]:
    out: dict[Any, list[float]] = {}
    for r in records:
        out.setdefault(r[key], []).append(r["score"])
    return dict(sorted(out.items())) if key == "n_needles" else out  # bins: in ascending order already


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
