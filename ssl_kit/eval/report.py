"""report.md: a table of every stage's metrics, per-class accuracy and the pictures in plots/."""
from __future__ import annotations

import json
from pathlib import Path

from ..common import plots
from .transfer import lodo_rows


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


HEADLINE_METRICS = ("test/top1", "top1", "test/balanced_accuracy", "test/minority_recall")
HEADLINE_EXTRAS = (("adabn_top1", "AdaBN"), ("fixmatch_adapted_top1", "FixMatch-adapted"), ("oracle_top1", "oracle"))


def headline_rows(summary: dict, stages) -> list[tuple[str, str, str]]:
    """One (stage, what, value) row per stage's headline number: a training stage's test top-1, an evaluation's
    top-1, and for transfer every target's top-1 with its gap to the source."""
    rows = []
    for stage in stages:
        name = stage.name
        for metric in HEADLINE_METRICS:
            if isinstance(summary.get(f"{name}/{metric}"), float):
                rows.append((name, f"{stage.method} {metric}", f"{summary[f'{name}/{metric}']:.4f}"))
        if isinstance(summary.get(f"{name}/source/top1"), float):
            rows.append((name, "source top1", f"{summary[f'{name}/source/top1']:.4f}"))
        for key, value in summary.items():
            if not key.startswith(f"{name}/") or not isinstance(value, float):
                continue
            inner = key[len(name) + 1:]
            if inner.endswith("/gap") and "+" not in inner:  # a target domain (corruptions are summarised below)
                target = inner[:-len("/gap")]
                found = [(label, summary.get(f"{name}/{target}/{field}")) for field, label in HEADLINE_EXTRAS]
                extra = "".join(f"; {label} {number:.4f}" for label, number in found if isinstance(number, float))
                top1 = summary[f"{name}/{target}/top1"]
                rows.append((name, f"{target} top1", f"{top1:.4f} (gap {value:+.4f}{extra})"))
            elif inner.startswith("corruption_mean/") or inner == "lodo/average/top1":
                rows.append((name, inner, f"{value:.4f}"))
    return rows


def format_headline(rows: list[tuple[str, str, str]]) -> str:
    """Fixed-width text table of headline_rows for the terminal."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(("stage", "result", "value"))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(("stage", "result", "value")), line(["-" * w for w in widths])] + [line(r) for r in rows])


TARGET_COLUMNS = (("top1", "top-1"), ("gap", "gap to source"), ("oracle_top1", "target oracle"),
                  ("adabn_top1", "AdaBN"), ("fixmatch_source_only_top1", "fine-tune on source"),
                  ("fixmatch_adapted_top1", "FixMatch adaptation"))


def transfer_tables(stage_dir: Path) -> list[str]:
    """Markdown tables of a transfer stage's transfer.json and leave_one_domain_out.json (when present)."""
    lines = []
    path = stage_dir / "transfer.json"
    if path.is_file():
        full = json.loads(path.read_text())
        targets = full["targets"]
        columns = [(k, t) for k, t in TARGET_COLUMNS if any(k in m for m in targets.values())]
        lines += [f"## {stage_dir.name}: transfer from {full['source']['spec']} "
                  f"(source test top-1 {full['source']['top1']:.4f})", "", full["protocol"], "",
                  "| target | " + " | ".join(t for _, t in columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for target, metrics in targets.items():
            lines.append(f"| {target} | " + " | ".join(_format(metrics.get(k, "-")) for k, _ in columns) + " |")
        lines.append("")
    path = stage_dir / "leave_one_domain_out.json"
    if path.is_file():
        lodo = json.loads(path.read_text())
        lines += [f"## {stage_dir.name}: leave-one-domain-out", "", lodo["protocol"], "",
                  "| held-out domain | top-1 | target oracle |", "|---|---|---|"]
        for domain, row in lodo_rows(lodo):
            label = "**average**" if domain == "average" else domain
            lines.append(f"| {label} | {_format(row['top1'])} | {_format(row['oracle_top1'])} |")
        lines.append("")
    return lines


def write_report(run_dir: Path, recipe, summary: dict) -> Path:
    plot_dir = run_dir / "plots"
    records = plots.read_metrics(run_dir / "metrics.jsonl")
    lines = [f"# Report: {recipe.name}", "", recipe.description or "", "", f"Seed {recipe.seed}. "
             "All accuracies are final-epoch numbers on the test split (no selection on test).", "",
             "## Headline", "", "| stage | result | value |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in headline_rows(summary, recipe.stages)]
    lines += ["", "## All metrics", ""] + summary_table(summary) + [""]
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
            labeled = details.get("labeled_counts") or ["-"] * len(details["classes"])
            lines += [f"## {stage.name}: per-class test accuracy (recall)", "",
                      "| class | accuracy | labeled training images |", "|---|---|---|"]
            lines += [f"| {c} | {_format(a) if a is not None else '-'} | {n} |"
                      for c, a, n in zip(details["classes"], details["per_class"], labeled)]
            lines += ["", f"![confusion]({'plots/' + name})", ""]
        pseudo = plots.plot_pseudo_labels(records, stage.name, plot_dir / f"pseudo_labels_{stage.name}.png")
        if pseudo:
            lines += [f"## {stage.name}: pseudo-label quantity and quality", "",
                      f"![pseudo labels](plots/pseudo_labels_{stage.name}.png)", ""]
        lines += transfer_tables(run_dir / "stages" / stage.name)
        for kind in ("threshold_sweep", "reconstruction", "domains", "tsne"):
            if (plot_dir / f"{kind}_{stage.name}.png").is_file():
                lines += [f"## {stage.name}: {kind.replace('_', ' ')}", "",
                          f"![{kind}](plots/{kind}_{stage.name}.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
