"""Reproduction bundle: one .tar.gz with a run's config.yaml, env.json, metrics.jsonl, summary.json, report.md,
splits/ and an export (model.safetensors, config.json, README.md). `ssl-kit run --from-bundle` re-runs the config
and compares the new summary and splits with the bundled ones.

Archive layout: run/<the run files>, run/splits/*.json, export/<the export files>.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Optional

import yaml

from .errors import ConfigError

RUN_FILES = ("config.yaml", "env.json", "metrics.jsonl", "summary.json", "report.md")
EXPORT_FILES = ("model.safetensors", "model.onnx", "model.onnx.data", "config.json", "README.md")
TIMING_WORDS = ("seconds", "per_s")


def find_run_dir(checkpoint: str | Path) -> Optional[Path]:
    """The run directory a checkpoint belongs to (itself, or up to three levels above: stages/<name>/backbone.pt,
    checkpoints/last.pt), recognised by its config.yaml; None for files outside a run."""
    path = Path(checkpoint)
    for candidate in [path, *list(path.parents)[:3]]:
        if candidate.is_dir() and (candidate / "config.yaml").is_file() and (candidate / "summary.json").is_file():
            return candidate
    return None


def run_context(run_dir: Path) -> dict:
    """Recipe name, stage methods, dataset and final metrics of a run, for the model card."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    summary = json.loads((run_dir / "summary.json").read_text())
    stages = config.get("stages", [])
    datasets = [s["data"]["dataset"] for s in stages if isinstance(s.get("data"), dict) and "dataset" in s["data"]]
    return {"recipe": config.get("name"), "methods": {s.get("name"): s.get("method") for s in stages},
            "dataset": ", ".join(dict.fromkeys(datasets)) or None,
            "metrics": {k: v for k, v in summary.items() if not k.startswith("_")}}


def write_bundle(run_dir: Path, export_dir: Path, archive: Path) -> Path:
    """Pack the run's files, its splits and the export into `archive` (.tar.gz). -> archive."""
    missing = [name for name in ("config.yaml", "summary.json") if not (run_dir / name).is_file()]
    if missing:
        raise ConfigError(f"{str(run_dir)!r} is not a finished run directory (missing {', '.join(missing)})")
    with tarfile.open(archive, "w:gz") as tar:
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                tar.add(run_dir / name, f"run/{name}")
        for split in sorted((run_dir / "splits").glob("*.json")):
            tar.add(split, f"run/splits/{split.name}")
        for name in EXPORT_FILES:
            if (export_dir / name).is_file():
                tar.add(export_dir / name, f"export/{name}")
    return archive


def extract_bundle(archive: str | Path, dest: Path) -> Path:
    """Unpack a bundle into dest (regular files under run/ and export/ only) -> dest / 'run'."""
    archive = Path(archive)
    if not archive.is_file():
        raise ConfigError(f"bundle {str(archive)!r} does not exist")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.split("/")[0] in ("run", "export")
                       and ".." not in m.name.split("/") and not m.name.startswith("/")]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **safe)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ConfigError(f"bundle {str(archive)!r} is not a readable .tar.gz: {exc}") from None
    if not (dest / "run" / "config.yaml").is_file():
        raise ConfigError(f"bundle {str(archive)!r} has no run/config.yaml: not an ssl_kit bundle")
    return dest / "run"


def compare_runs(bundled: Path, new: Path) -> dict:
    """Bundled vs re-run: every summary metric (timings excepted) and every split file.
    -> {"matches": bool, "compared": n, "differences": {key: [bundled, new]}}."""
    old_summary = json.loads((bundled / "summary.json").read_text())
    new_summary = json.loads((new / "summary.json").read_text())
    differences, compared = {}, 0
    for key in sorted(set(old_summary) | set(new_summary)):
        if key.startswith("_") or any(word in key for word in TIMING_WORDS):
            continue
        compared += 1
        if old_summary.get(key) != new_summary.get(key):
            differences[key] = [old_summary.get(key), new_summary.get(key)]
    for split in sorted((bundled / "splits").glob("*.json")):
        compared += 1
        other = new / "splits" / split.name
        if not other.is_file() or json.loads(split.read_text()) != json.loads(other.read_text()):
            differences[f"splits/{split.name}"] = ["bundled", "differs" if other.is_file() else "missing"]
    return {"matches": not differences, "compared": compared, "differences": differences}
