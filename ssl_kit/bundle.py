"""Reproduction bundle: one .tar.gz with a run's config.yaml, env.json, metrics.jsonl, summary.json, report.md,
splits/ and an export (model.safetensors, config.json, README.md). `ssl-kit run --from-bundle` re-runs the config
and compares the new summary and splits with the bundled ones.

Archive layout: run/<the run files>, run/splits/*.json, export/<the export files>.
"""
from __future__ import annotations

import gzip
import json
import tarfile
import zlib
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


# caps on what a bundle may unpack (checked on the raw tar headers, before tarfile reads or writes anything)
BUNDLE_LIMITS = {
    "members": 10_000,            # entries in the archive
    "member_bytes": 8 << 30,      # one member (a backbone of MAX_PARAMS float32 weights)
    "total_bytes": 16 << 30,      # all members together
    "ratio": 100,                 # unpacked bytes per archive byte (+ RATIO_ALLOWANCE): a gzip bomb is refused
    "header_bytes": 64 << 10,     # a GNU long-name or pax header (tarfile holds it in memory)
    "name_chars": 1024,           # a member's name
}
RATIO_ALLOWANCE = 16 << 20
CHUNK = 1 << 20


def _refuse(archive: Path, what: str, limit_name: str) -> ConfigError:
    return ConfigError(f"bundle {str(archive)!r}: {what}; the limit is {BUNDLE_LIMITS[limit_name]:,} "
                       f"({limit_name.replace('_', ' ')}): not an ssl_kit bundle")


def _tar_number(field: bytes, archive: Path) -> int:
    """A tar header's size field: octal text, or base-256 when the first byte has its high bit set."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise ConfigError(f"bundle {str(archive)!r} is not a readable .tar.gz: a header has size field "
                          f"{field!r}") from None


def _skip(stream, count: int) -> None:
    while count > 0:
        chunk = stream.read(min(count, CHUNK))
        if not chunk:
            return
        count -= len(chunk)


def scan_bundle(archive: Path) -> None:
    """Walk the raw tar headers of a .tar.gz in bounded memory and refuse it (ConfigError naming the limit) when
    it has too many members, a member or a total too large, a total far beyond its compressed size (a gzip bomb),
    or an oversized long-name/pax header."""
    budget = BUNDLE_LIMITS["ratio"] * archive.stat().st_size + RATIO_ALLOWANCE
    members = total = 0
    with gzip.open(archive, "rb") as stream:
        while True:
            header = stream.read(512)
            if len(header) < 512 or not header.strip(b"\0"):
                return
            kind, size = header[156:157], _tar_number(header[124:136], archive)
            if kind in (b"L", b"K", b"x", b"g"):
                if size > BUNDLE_LIMITS["header_bytes"]:
                    raise _refuse(archive, f"a long-name/pax header of {size:,} bytes", "header_bytes")
            else:
                members += 1
                name = header[:100].split(b"\0")[0].decode("utf-8", "replace")
                if members > BUNDLE_LIMITS["members"]:
                    raise _refuse(archive, f"more than {BUNDLE_LIMITS['members']:,} members", "members")
                if size > BUNDLE_LIMITS["member_bytes"]:
                    raise _refuse(archive, f"member {name!r} holds {size:,} bytes", "member_bytes")
                total += size
                if total > BUNDLE_LIMITS["total_bytes"]:
                    raise _refuse(archive, f"its members hold more than {total:,} bytes", "total_bytes")
                if total > budget:
                    raise _refuse(archive, f"its members unpack to more than {total:,} bytes from "
                                           f"{archive.stat().st_size:,} compressed", "ratio")
            _skip(stream, (size + 511) // 512 * 512)


def _read_member(run: Path, name: str, archive: Path, decode_json: bool = True):
    """A bundled file's text (JSON-decoded); ConfigError naming the member when missing, not UTF-8 or not JSON."""
    path = run / name
    where = f"bundle {str(archive)!r}: run/{name}"
    if not path.is_file():
        raise ConfigError(f"{where} is missing: not a complete ssl_kit bundle")
    try:
        text = path.read_bytes().decode("utf-8")
        return json.loads(text) if decode_json else text
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not JSON: {exc}") from None
    except RecursionError:  # found by fuzzing: '[' * 100000 exhausts the JSON decoder's stack
        raise ConfigError(f"{where} nests JSON too deeply to be an ssl_kit file") from None


def _read_object(run: Path, name: str, archive: Path, what: str) -> dict:
    """A bundled JSON file that must hold an object (`what` it holds, for the error); ConfigError naming it."""
    value = _read_member(run, name, archive)
    if not isinstance(value, dict):
        raise ConfigError(f"bundle {str(archive)!r}: run/{name} is a JSON {type(value).__name__}, "
                          f"expected an object of {what}")
    return value


def validate_bundle(run: Path, archive: Path) -> None:
    """Everything the comparison after the re-run reads, checked before it: run/summary.json a JSON object,
    run/env.json a JSON object when present, run/config.yaml UTF-8, every run/splits/*.json UTF-8 JSON.
    ConfigError naming the member."""
    _read_object(run, "summary.json", archive, "metrics")
    if (run / "env.json").is_file():
        _read_object(run, "env.json", archive, "environment entries")
    _read_member(run, "config.yaml", archive, decode_json=False)
    for split in sorted((run / "splits").glob("*.json")):
        _read_member(run, f"splits/{split.name}", archive)


def extract_bundle(archive: str | Path, dest: Path) -> Path:
    """Unpack a bundle into dest (regular files under run/ and export/ only), within BUNDLE_LIMITS, and validate
    what the comparison reads (validate_bundle) -> dest / 'run'. The caller removes `dest`."""
    archive = Path(archive)
    if not archive.is_file():
        raise ConfigError(f"bundle {str(archive)!r} does not exist")
    try:
        scan_bundle(archive)
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.split("/")[0] in ("run", "export")
                       and ".." not in m.name.split("/") and not m.name.startswith("/")]
            long_names = [m.name for m in members if len(m.name) > BUNDLE_LIMITS["name_chars"]]
            if long_names:
                raise _refuse(archive, f"member name {long_names[0][:80]!r}... has {len(long_names[0]):,} "
                                       f"characters", "name_chars")
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **safe)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ConfigError(f"bundle {str(archive)!r} is not a readable .tar.gz: {exc}") from None
    if not (dest / "run" / "config.yaml").is_file():
        raise ConfigError(f"bundle {str(archive)!r} has no run/config.yaml: not an ssl_kit bundle")
    validate_bundle(dest / "run", archive)
    return dest / "run"


def environment_differences(bundled: Path, new: Path) -> dict:
    """env.json of the bundle vs the re-run: {key: [bundled, new]} for every entry that differs (library versions,
    Python, device, CPU, world size, ssl_kit version and commit; the command line is left out); {} for a bundle
    without env.json (validate_bundle checked it is an object when present). A difference does not make a re-run
    fail: it is what to look at first when the numbers do not reproduce."""
    if not (bundled / "env.json").is_file():
        return {}
    old_env, new_env = (json.loads((run / "env.json").read_text()) for run in (bundled, new))
    return {key: [old_env.get(key), new_env.get(key)] for key in sorted(set(old_env) | set(new_env))
            if key != "command" and old_env.get(key) != new_env.get(key)}


def compare_runs(bundled: Path, new: Path) -> dict:
    """Bundled vs re-run: every summary metric (timings excepted) and every split file, and the environment.
    -> {"matches": bool, "compared": n, "differences": {key: [bundled, new]},
        "environment": {env.json key: [bundled, new]} (see environment_differences; not part of "matches")}."""
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
    return {"matches": not differences, "compared": compared, "differences": differences,
            "environment": environment_differences(bundled, new)}
