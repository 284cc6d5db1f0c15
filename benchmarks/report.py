"""Writing benchmark results: the printed table, the JSON file and the PNG plots, in one place.

Every result file carries the command line, the date and the machine (CPU count, torch version, GPU
when there is one), so a number can always be traced to how and where it was measured.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Column:
    """One column of a printed table: the row key, its header and a format spec (e.g. ".2f")."""

    key: str
    header: str
    fmt: str = ""


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt) if fmt else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A markdown table (readable as plain text) of ``rows``; missing or NaN values print as "-"."""
    cells = [[c.header for c in columns]] + [[_cell(r.get(c.key), c.fmt) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """Where the benchmark ran: CPU count, platform, Python, torch/transformers versions, GPU."""
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def result_header() -> dict[str, Any]:
    """Command line, UTC date and machine, for the top of every result file."""
    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", *_module_argv()]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
    }


def _module_argv() -> list[str]:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = spec.name if spec is not None else sys.argv[0]
    return [name, *sys.argv[1:]]


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (header first) as indented JSON, atomically (a tmp file then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({**result_header(), **payload}, indent=2, default=float) + "\n")
    tmp.replace(path)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_quality(path: Path, summary: Sequence[dict[str, Any]], title: str) -> Path:
    """Two bar panels per condition: concept coverage (%, with the refine/generation time ratio written
    on each bar) and median judge perplexity."""
    plt = _pyplot()
    names = [s["condition"] for s in summary]
    fig, (ax_cov, ax_ppl) = plt.subplots(1, 2, figsize=(max(10, 1.1 * len(names) + 4), 5))
    colors = ["#888888" if "+" not in n and not n.startswith("best_of") else "#1f77b4" for n in names]
    bars = ax_cov.bar(names, [100 * s["coverage"] for s in summary], color=colors)
    for bar, s in zip(bars, summary, strict=True):
        ratio = s.get("time_ratio_of_sums")
        if ratio is not None and not math.isnan(ratio) and ratio > 0:
            ax_cov.annotate(
                f"{ratio:.2f}x",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax_cov.set_ylabel("concept coverage (%)")
    ax_cov.set_title("labels: refine time / generation time", fontsize=9)
    ax_cov.set_ylim(0, 105)
    ax_ppl.bar(names, [s["judge_ppl_median"] for s in summary], color=colors)
    ax_ppl.set_ylabel("median judge perplexity (lower is better)")
    ax_ppl.set_title("judge: Gemma 3 270M", fontsize=9)
    for ax in (ax_cov, ax_ppl):
        ax.tick_params(axis="x", rotation=45)
        for label in ax.get_xticklabels():
            label.set_ha("right")
    return _save(plt, fig, path, title)


def plot_latency(path: Path, rows: Sequence[dict[str, Any]], title: str) -> Path:
    """Grouped stacked bars: for each output length, one bar per method with generation time (bottom)
    and refinement time (top), the ratio written above."""
    plt = _pyplot()
    groups = sorted({(r["arch"], r["device"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 4.5), squeeze=False)
    for ax, (arch, device) in zip(axes[0], groups, strict=True):
        sub = [r for r in rows if r["arch"] == arch and r["device"] == device]
        lengths = sorted({r["target_tokens"] for r in sub})
        methods = sorted({r["method"] for r in sub})
        width = 0.8 / max(1, len(methods))
        for m, method in enumerate(methods):
            xs, gen, ref = [], [], []
            for li, length in enumerate(lengths):
                match = [r for r in sub if r["method"] == method and r["target_tokens"] == length]
                if match:
                    xs.append(li + (m - (len(methods) - 1) / 2) * width)
                    gen.append(match[0]["generate_s"])
                    ref.append(match[0]["refine_s"])
            ax.bar(xs, gen, width, color="#bbbbbb", edgecolor="black", label="generation" if m == 0 else None)
            bars = ax.bar(xs, ref, width, bottom=gen, label=f"refine: {method}")
            for bar, g, r in zip(bars, gen, ref, strict=True):
                ax.annotate(
                    f"{r / g:.2f}x" if g else "",
                    (bar.get_x() + bar.get_width() / 2, g + r),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("output tokens")
        ax.set_ylabel("seconds per request")
        ax.set_title(f"{arch} on {device}")
        ax.legend(fontsize=8)
    return _save(plt, fig, path, title)


def plot_throughput(path: Path, rows: Sequence[dict[str, Any]], title: str) -> Path:
    """Requests/s and p95 latency against concurrency, one line per (batching, refinement) setting."""
    plt = _pyplot()
    fig, (ax_rps, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    settings = sorted({(r["batching"], r["refine"]) for r in rows})
    for batching, refine in settings:
        sub = sorted(
            (r for r in rows if r["batching"] == batching and r["refine"] == refine),
            key=lambda r: r["concurrency"],
        )
        label = f"batching {'on' if batching else 'off'}, {'refine' if refine else 'no refine'}"
        style = "-" if batching else "--"
        xs = [r["concurrency"] for r in sub]
        ax_rps.plot(xs, [r["requests_per_s"] for r in sub], style, marker="o", label=label)
        ax_lat.plot(xs, [r["latency_p95_s"] for r in sub], style, marker="o", label=label)
    for ax, ylabel in ((ax_rps, "requests / s"), (ax_lat, "p95 latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(plt, fig, path, title)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    xs = sorted(v for v in values if not math.isnan(v))
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float:
    xs = [v for v in values if not math.isnan(v)]
    return sum(xs) / len(xs) if xs else math.nan


def median_change_pct(pairs: np.ndarray) -> float:
    """The change of the median of column 1 against the median of column 0, in percent: the judge's
    statistic for (before, after) perplexity pairs."""
    return 100 * (float(np.median(pairs[:, 1])) / float(np.median(pairs[:, 0])) - 1)


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float],
    level: float = 0.95,
    resamples: int = 2000,
) -> tuple[float, float]:
    """The percentile bootstrap interval of ``statistic`` over ``values``, resampling rows (paired
    measurements stay together; NaN dropped from 1-D values; fixed seed)."""
    xs = np.asarray(values, dtype=float)
    if xs.ndim == 1:
        xs = xs[~np.isnan(xs)]
    if not len(xs):
        return math.nan, math.nan
    rng = np.random.default_rng(0)
    stats = [statistic(xs[rng.integers(0, len(xs), len(xs))]) for _ in range(resamples)]
    tail = (1 - level) / 2 * 100
    return float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail))
