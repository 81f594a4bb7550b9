"""Eval reports: `<name>.json` (every per-question record and the summary), `<name>.md` (the summary as a table) and
PNG plots (matplotlib, the optional `evals` extra: `pip install 'vllm-lite[evals]'`; without it the plots are
skipped with a message, the JSON and Markdown are still written)."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Sequence

Plot = tuple[str, Callable[[Any], None]]  # (file name, draw(axes))


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sound at 0 and 1 and for small n, unlike the normal one)."""
    if n <= 0:
        return 0.0, 0.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """Normal-approximation 95 % interval of a mean of scores in [0, 1] (MRCR's graded scores)."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    return max(0.0, mean - half), min(1.0, mean + half)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    return str(value)


def markdown(title: str, summary: dict[str, Any], tables: Sequence[tuple[str, list[str], list[list[Any]]]] = ()
             ) -> str:
    """The summary as a two-column table, then any extra tables (caption, header, rows)."""
    lines = [f"# {title}", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in summary.items() if not isinstance(v, dict)]
    for caption, header, rows in tables:
        lines += ["", f"## {caption}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_plots(folder: str, plots: Sequence[Plot]) -> list[str]:
    """Draw each plot into folder/<file>; returns the paths written (none, with a message, without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'vllm-lite[evals]')")
        return []
    written = []
    for name, draw in plots:
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax)
        fig.tight_layout()
        path = os.path.join(folder, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def bar_with_interval(labels: Sequence[str], values: Sequence[float], intervals: Sequence[tuple[float, float]],
                      title: str, ylabel: str) -> Callable[[Any], None]:
    """A plot function: bars with 95 % interval whiskers, values printed on top."""
    def draw(ax: Any) -> None:
        lo = [max(0.0, v - i[0]) for v, i in zip(values, intervals)]
        hi = [max(0.0, i[1] - v) for v, i in zip(values, intervals)]
        ax.bar(list(labels), list(values), yerr=[lo, hi], capsize=6, color="#4c72b0")
        for x, v in enumerate(values):
            ax.text(x, v, f" {v:.3f}", ha="center", va="bottom")
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    return draw


def agreement_plot(counts: dict[str, int], title: str) -> Callable[[Any], None]:
    """A plot function: how many questions agree with the reference, by kind."""
    def draw(ax: Any) -> None:
        ax.bar(list(counts), list(counts.values()), color=["#55a868", "#dd8452", "#c44e52", "#8172b2"][:len(counts)])
        for x, v in enumerate(counts.values()):
            ax.text(x, v, f" {v}", ha="center", va="bottom")
        ax.set_title(title)
        ax.set_ylabel("questions")
    return draw


def write_report(folder: str, name: str, title: str, summary: dict[str, Any], records: list[dict[str, Any]],
                 plots: Sequence[Plot] = (), tables: Sequence[tuple[str, list[str], list[list[Any]]]] = ()
                 ) -> dict[str, str]:
    """Write <folder>/<name>.json, <name>.md and the plots; returns {kind: path}."""
    os.makedirs(folder, exist_ok=True)
    paths = {"json": os.path.join(folder, f"{name}.json"), "markdown": os.path.join(folder, f"{name}.md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"summary": summary, "records": records}, f, indent=1, ensure_ascii=False)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(markdown(title, summary, tables))
    for i, path in enumerate(write_plots(folder, plots)):
        paths[f"plot{i}"] = path
    return paths
