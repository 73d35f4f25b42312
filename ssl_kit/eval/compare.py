"""`ssl-kit compare RUN [RUN ...]`: the summary metrics of several finished runs side by side (a table, or JSON) and
one PNG with their training curves and their accuracies, for the person who runs a method sweep offline. Reads only
what every run writes: summary.json (final metrics) and metrics.jsonl (per-step losses)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..common import plots
from ..errors import ConfigError

SUMMARY_LIMIT_BYTES = 64 * 1024 * 1024  # a summary.json is kilobytes; refuse to parse anything absurd


@dataclass
class RunResult:
    """One run folder's name, final metrics {stage/metric: number} and metrics.jsonl records."""

    name: str
    metrics: dict[str, float]
    records: list[dict]


def _numbers(summary: dict) -> dict[str, float]:
    """The finite numeric entries of a summary (internal `_` keys, lists and strings left out)."""
    return {key: float(value) for key, value in summary.items()
            if not key.startswith("_") and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


def load_run(folder: str | Path) -> RunResult:
    """A finished run's folder -> RunResult. A folder without a readable summary.json (not a run, or one that has
    not finished a stage) is a ConfigError naming it."""
    folder = Path(folder)
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        raise ConfigError(f"{str(folder)!r} is not a run folder with results: it has no summary.json (runs are "
                          "under runs/; a run writes summary.json when its first stage finishes)")
    if summary_path.stat().st_size > SUMMARY_LIMIT_BYTES:
        raise ConfigError(f"{str(summary_path)!r} is larger than {SUMMARY_LIMIT_BYTES >> 20} MiB: not a summary")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{str(summary_path)!r} is not valid JSON: {error}") from None
    if not isinstance(summary, dict):
        raise ConfigError(f"{str(summary_path)!r} must hold a JSON object of metrics, got {type(summary).__name__}")
    return RunResult(folder.name, _numbers(summary), plots.read_metrics(folder / "metrics.jsonl"))


def unique_names(runs: list[RunResult]) -> list[str]:
    """Column names: each run's folder name, made unique with #2, #3 when two folders share a name."""
    seen: dict[str, int] = {}
    names = []
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        names.append(run.name if seen[run.name] == 1 else f"{run.name}#{seen[run.name]}")
    return names


def comparison(runs: list[RunResult]) -> dict:
    """{"runs": [names], "metrics": {metric: [value or None per run]}}: every metric any run has, in first-seen
    order."""
    keys = list(dict.fromkeys(key for run in runs for key in run.metrics))
    return {"runs": unique_names(runs), "metrics": {key: [run.metrics.get(key) for run in runs] for key in keys}}


def format_table(table: dict) -> str:
    """Fixed-width text table: one row per metric, one column per run ('-' where a run lacks the metric)."""
    header = ["metric", *table["runs"]]
    rows = [[key, *("-" if v is None else f"{v:.4f}" if abs(v) < 1e6 and v != int(v) else f"{v:g}" for v in values)]
            for key, values in table["metrics"].items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def accuracy_keys(table: dict) -> list[str]:
    """The metrics plotted as bars: test/probe top-1, balanced accuracy and minority recall of every stage."""
    wanted = ("top1", "balanced_accuracy", "minority_recall")
    return [key for key in table["metrics"] if key.rsplit("/", 1)[-1] in wanted]


def plot_comparison(runs: list[RunResult], table: dict, out: Path) -> Path:
    """One PNG: left, each run's training loss per step (one line per run and stage); right, grouped bars of the
    accuracy metrics (one group per metric, one bar per run)."""
    figure_api = plots.pyplot()
    fig, (curves, bars) = figure_api.subplots(1, 2, figsize=(12, 4))
    positive = True
    for name, run in zip(table["runs"], runs):
        steps = [r for r in run.records if r.get("kind") == "step" and isinstance(r.get("loss"), (int, float))]
        for stage in dict.fromkeys(r.get("stage") for r in steps):
            points = [(r["step"], r["loss"]) for r in steps if r.get("stage") == stage]
            positive = positive and all(loss > 0 for _, loss in points)
            curves.plot(*zip(*points), label=f"{name}: {stage}")
    curves.set_xlabel("step")
    curves.set_ylabel("training loss")
    if curves.lines and positive:
        curves.set_yscale("log")
    if curves.lines:
        curves.legend(fontsize=7)
    curves.grid(alpha=0.3)
    keys = accuracy_keys(table)
    width = 0.8 / max(len(runs), 1)
    for i, name in enumerate(table["runs"]):
        values = [table["metrics"][key][i] for key in keys]
        bars.bar([k + i * width for k in range(len(keys))], [v if v is not None else 0.0 for v in values],
                 width=width, label=name)
    bars.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], keys, rotation=30, ha="right", fontsize=7)
    bars.set_ylim(0, 1)
    bars.set_ylabel("accuracy")
    if keys:
        bars.legend(fontsize=7)
    bars.grid(axis="y", alpha=0.3)
    return plots.save_figure(fig, out)


def compare_runs(folders: list[str | Path], out: Path | None = None) -> dict:
    """Load the runs, tabulate their metrics and (out given) draw the PNG. -> comparison() + {"plot": path or None}."""
    runs = [load_run(folder) for folder in folders]
    table = comparison(runs)
    table["plot"] = str(plot_comparison(runs, table, out)) if out is not None else None
    return table
