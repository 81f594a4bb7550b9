"""What `vllm-lite bench serve` reports, from per-request timings: TTFT, TPOT, ITL and end-to-end latency (mean,
median, p90, p99 in ms), request and token throughput, goodput under SLOs (`--goodput ttft:MS tpot:MS e2el:MS`),
the printed table and the latency-vs-request-rate plot of a sweep (matplotlib optional)."""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_NAMES = {"ttft": "Time to first token", "tpot": "Time per output token (excl. 1st)",
                "itl": "Inter-token latency", "e2el": "End-to-end latency"}


@dataclasses.dataclass
class RequestResult:
    """One request as the client saw it (seconds; `itl` holds the gaps between streamed chunks after the first)."""
    success: bool = False
    error: str = ""
    status: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    expected_output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    start: float = 0.0

    @property
    def tpot(self) -> float:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:200", "tpot:50"] -> {"ttft": 200.0, "tpot": 50.0} (milliseconds; the request must meet all)."""
    slos: dict[str, float] = {}
    for item in items or ():
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"--goodput {item!r}: the metric must be ttft, tpot or e2el")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: expected NAME:MILLISECONDS") from None
        if not slos[name] > 0:
            raise ValueError(f"--goodput {item!r}: the limit must be > 0 ms")
    return slos


def _stats(values_s: list[float]) -> dict[str, float]:
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    if arr.size == 0:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std()),
            **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


def summarize(results: list[RequestResult], duration_s: float, slos: dict[str, float]) -> dict[str, Any]:
    """vLLM's `bench serve` result fields (names kept, so the JSON files compare), plus the failure reasons."""
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    good = [r for r in ok if all((r.ttft if k == "ttft" else r.tpot if k == "tpot" else r.latency) * 1000 <= v
                                 for k, v in slos.items())]
    errors: dict[str, int] = {}
    for r in results:
        if not r.success:
            errors[r.error[:200]] = errors.get(r.error[:200], 0) + 1
    summary: dict[str, Any] = {
        "duration": duration_s, "completed": len(ok), "failed": len(results) - len(ok), "errors": errors,
        "server_errors_5xx": sum(1 for r in results if r.status >= 500),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "exact_output_lengths": all(r.output_tokens == r.expected_output_tokens for r in ok
                                    if r.expected_output_tokens),
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "request_goodput": len(good) / duration_s if slos and duration_s > 0 else None,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s if duration_s > 0 else 0.0,
    }
    series = {"ttft": [r.ttft for r in ok], "tpot": [r.tpot for r in ok if r.output_tokens > 1],
              "itl": [g for r in ok for g in r.itl], "e2el": [r.latency for r in ok]}
    for name in METRICS:
        for stat, value in _stats(series[name]).items():
            summary[f"{stat}_{name}_ms"] = value
    return summary


PHASES = ("queue", "prefill", "decode")


def phase_sums(metrics_text: str) -> dict[str, tuple[float, float]]:
    """(count, sum) of the server's vllm:request_{queue,prefill,decode}_time_seconds histograms (vLLM's names; any
    server that exports them), summed over label sets; {} when it has none."""
    found: dict[str, list[float]] = {}
    for m in re.finditer(r"^vllm:request_(queue|prefill|decode)_time_seconds_(count|sum)(?:\{[^}]*\})? (\S+)$",
                         metrics_text, re.M):
        entry = found.setdefault(m.group(1), [0.0, 0.0])
        entry[0 if m.group(2) == "count" else 1] += float(m.group(3))
    return {k: (v[0], v[1]) for k, v in found.items()}


def server_phases(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]],
                  mean_ttft_ms: float) -> dict[str, float]:
    """The run's mean queue / prefill / decode time by the server's own clock, and the part of the client's mean
    TTFT spent outside the engine (HTTP, the API server, the hops to and from the engine core)."""
    out: dict[str, float] = {}
    for name in PHASES:
        if name in after:
            count = after[name][0] - before.get(name, (0.0, 0.0))[0]
            if count > 0:
                out[f"server_mean_{name}_ms"] = 1000 * (after[name][1] - before.get(name, (0.0, 0.0))[1]) / count
    if "server_mean_queue_ms" in out and "server_mean_prefill_ms" in out:
        out["ttft_outside_engine_ms"] = mean_ttft_ms - out["server_mean_queue_ms"] - out["server_mean_prefill_ms"]
    return out


def format_table(summary: dict[str, Any], label: str = "") -> str:
    """A human-readable block in the shape of vLLM's."""
    lines = [f"{' Serving Benchmark Result ' + label + ' ':=^60}"]

    def row(name: str, value: Any) -> None:
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<44}{shown:>16}")
    row("Successful requests:", summary["completed"])
    row("Failed requests:", summary["failed"])
    row("Benchmark duration (s):", summary["duration"])
    row("Total input tokens:", summary["total_input_tokens"])
    row("Total generated tokens:", summary["total_output_tokens"])
    row("Request throughput (req/s):", summary["request_throughput"])
    if summary.get("request_goodput") is not None:
        row("Request goodput (req/s):", summary["request_goodput"])
    row("Output token throughput (tok/s):", summary["output_throughput"])
    row("Total token throughput (tok/s):", summary["total_token_throughput"])
    for name in METRICS:
        lines.append(f"{' ' + METRIC_NAMES[name] + ' ':-^60}")
        row(f"Mean {name.upper()} (ms):", summary[f"mean_{name}_ms"])
        row(f"Median {name.upper()} (ms):", summary[f"median_{name}_ms"])
        for p in PERCENTILES[1:]:
            row(f"P{p} {name.upper()} (ms):", summary[f"p{p}_{name}_ms"])
    if "server_mean_prefill_ms" in summary:
        lines.append(f"{' Server phases (its /metrics, means) ':-^60}")
        for name in PHASES:
            if f"server_mean_{name}_ms" in summary:
                row(f"Server {name} time (ms):", summary[f"server_mean_{name}_ms"])
        if "ttft_outside_engine_ms" in summary:
            row("TTFT outside the engine (ms):", summary["ttft_outside_engine_ms"])
    for message, count in summary["errors"].items():
        lines.append(f"error x{count}: {message}")
    lines.append("=" * 60)
    return "\n".join(lines)


def plot_sweep(runs: list[dict[str, Any]], path: str) -> str | None:
    """Latency percentiles (TTFT, TPOT, ITL, E2E) against the achieved request rate, one panel each; returns None,
    or a message saying why there is no plot (matplotlib missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib); the JSON result has the numbers"
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4), constrained_layout=True)
    xs = [r["request_throughput"] for r in runs]
    for ax, name in zip(axes, METRICS):
        for stat, style in (("median", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(xs, [r[f"{stat}_{name}_ms"] for r in runs], style, label=stat)
        ax.set_title(METRIC_NAMES[name])
        ax.set_xlabel("achieved request rate (req/s)")
        ax.set_ylabel("ms")
        ax.grid(True, alpha=0.3)
        ax.legend()
    offered = ", ".join(str(r["request_rate"]) for r in runs)
    fig.suptitle(f"{runs[0].get('model', '')}: latency vs request rate (offered: {offered} req/s)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
