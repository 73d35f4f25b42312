"""report.md: a table of every stage's metrics, per-class accuracy and the pictures in plots/."""
from __future__ import annotations

import json
from pathlib import Path

from . import plots


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def summary_table(summary: dict) -> list[str]:
    """Markdown rows: stage | metric | value (internal '_' keys skipped)."""
    rows = ["| stage | metric | value |", "|---|---|---|"]
    for key, value in summary.items():
        if key.startswith("_") or isinstance(value, (list, dict)):
            continue
        stage, _, metric = key.partition("/")
        rows.append(f"| {stage} | {metric} | {_format(value)} |")
    return rows


def write_report(run_dir: Path, recipe, summary: dict) -> Path:
    plot_dir = run_dir / "plots"
    records = plots.read_metrics(run_dir / "metrics.jsonl")
    lines = [f"# Report: {recipe.name}", "", recipe.description or "", "", f"Seed {recipe.seed}. "
             "All accuracies are final-epoch numbers on the test split (no selection on test).", "",
             "## Results", ""] + summary_table(summary) + [""]
    curves = plots.plot_training_curves(records, plot_dir / "training_curves.png")
    if curves:
        lines += ["## Training curves", "", "![training curves](plots/training_curves.png)", ""]
    for stage in recipe.stages:
        eval_path = run_dir / "stages" / stage.name / "eval.json"
        details = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
        if "confusion" in details and "classes" in details:
            name = f"confusion_{stage.name}.png"
            plots.plot_confusion(details["confusion"], details["classes"], f"{stage.name}: test confusion",
                                 plot_dir / name)
            lines += [f"## {stage.name}: per-class test accuracy", "", "| class | accuracy |", "|---|---|"]
            lines += [f"| {c} | {_format(a) if a is not None else '-'} |" for c, a in zip(details["classes"],
                                                                                           details["per_class"])]
            lines += ["", f"![confusion]({'plots/' + name})", ""]
        pseudo = plots.plot_pseudo_labels(records, stage.name, plot_dir / f"pseudo_labels_{stage.name}.png")
        if pseudo:
            lines += [f"## {stage.name}: pseudo-label quantity and quality", "",
                      f"![pseudo labels](plots/pseudo_labels_{stage.name}.png)", ""]
        for kind in ("threshold_sweep", "reconstruction"):
            if (plot_dir / f"{kind}_{stage.name}.png").is_file():
                lines += [f"## {stage.name}: {kind.replace('_', ' ')}", "",
                          f"![{kind}](plots/{kind}_{stage.name}.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
