"""The run directory's lifecycle, apart from what runs in it: a new run gets an empty dir, `--resume` an existing
one whose config.yaml agrees with the recipe; one writer per run dir (an OS lock); half-written temp files of a
killed writer are removed; env.json records what produced the run. Under torchrun rank 0 decides and every rank
gets its decision."""
from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ._version import __version__
from .config import Recipe, validate_recipe
from .common.versions import library_versions
from .config_diff import format_differences, is_harmless, recipe_differences
from .engine import distributed as dist
from .engine.run_lock import LOCK_NAME, RunLock
from .errors import ConfigError
from .recipe_files import load_yaml


def finite_or_none(value):
    """NaN/inf -> None, recursively, so JSON output stays strict (json.dumps would write NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


OUR_TEMP_FILES = re.compile(  # what our writers leave when killed mid-write; nothing else is ever removed
    r"^(\.(summary\.json|backbone\.pt|config\.yaml)\.tmp|metrics\.jsonl\.tmp"
    r"|\.[\w.\-]+\.(pt|json|jsonl|md|yaml|png|npz)\.[a-z0-9_]{8}\.tmp)$")
RESUME_CHANGES = "resume_changes.jsonl"


def prepare_run_dir(out: Path, resume: bool) -> None:
    """A new run needs an empty or absent dir; --resume needs an existing one. Nothing is ever overwritten silently."""
    if resume:
        if not (out / "config.yaml").is_file():
            raise ConfigError(f"--resume: {str(out)!r} is not a run directory (no config.yaml)")
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file, not a directory: choose another --out")
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        if not made_no_progress(out):
            raise ConfigError(f"run directory {str(out)!r} exists and is not empty: pass --resume to continue it, "
                              f"or choose another --out")
        _clear_no_progress(out)
        log(f"[ssl-kit] {out}: its last run stopped before its first step (nothing but its config.yaml, env.json, "
            f"split lists and bad-image log); starting afresh in it")
    out.mkdir(parents=True, exist_ok=True)


# What a run has written before its first step (bad_images.txt: the files that stopped it); a dir holding only
# these (metrics.jsonl empty, splits/ only the stages' split lists) holds no progress.
NO_PROGRESS_FILES = frozenset({"config.yaml", "env.json", "metrics.jsonl", "splits", "bad_images.txt", LOCK_NAME})


def made_no_progress(out: Path) -> bool:
    """Whether run dir `out` holds a run that stopped before its first step (a data spec without a root, a missing
    folder): its lock file (so a run held it, and the caller now holds it: a live run keeps it locked), nothing
    outside NO_PROGRESS_FILES (regular files but splits/), an empty metrics.jsonl and only split lists (*.json) in
    splits/. Such a dir is reused for a new run instead of refused, so that fixing the recipe and running the same
    command again works; anything else in it is kept and refused."""
    names = {p.name for p in out.iterdir()}
    metrics, splits = out / "metrics.jsonl", out / "splits"
    files = [out / name for name in names - {"splits"}]
    return LOCK_NAME in names and names <= NO_PROGRESS_FILES and \
        all(f.is_file() and not f.is_symlink() for f in files) and \
        (not metrics.exists() or metrics.stat().st_size == 0) and \
        (not splits.exists() or (splits.is_dir() and not splits.is_symlink()
                                 and all(f.is_file() and not f.is_symlink() and f.suffix == ".json"
                                         for f in splits.iterdir())))


def _clear_no_progress(out: Path) -> None:
    """Remove what made_no_progress(out) found (its files, the split lists and their folder), the lock excepted."""
    for entry in out.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.name == "splits":
            for split in entry.iterdir():
                split.unlink()
            entry.rmdir()
        else:
            entry.unlink()


def write_env(run_dir: Path) -> None:
    """env.json: ssl_kit version and git commit (when run from a checkout), library versions, the C library, device,
    CPU, torch's intra-op threads, the environment variables that change CPU numerics, world size and the command
    line, so a run's numbers can be traced to what produced them."""
    versions = library_versions()
    commit = _checkout_commit()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    env = {"ssl_kit": __version__, "git_commit": commit, "python": platform.python_version(), **versions,
           "device": device, **cpu_numerics(), "world_size": dist.world_size(), "command": sys.argv}
    (run_dir / "env.json").write_text(json.dumps(env, indent=2))


# Environment variables that change a CPU run's bits: the oneDNN instruction set (convolutions), torch's kernel
# dispatch, and the thread counts (how reductions are split). A convolution's gradient on this project's CPU
# machines differs bitwise between ONEDNN_MAX_CPU_ISA=AVX2 and the default, and between 1 and 2 torch threads.
NUMERICS_ENV_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS",
                     "MKL_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG")


def numerics_environment() -> dict[str, str]:
    """{name: value} of the NUMERICS_ENV_VARS that are set."""
    return {name: os.environ[name] for name in NUMERICS_ENV_VARS if name in os.environ}


def cpu_numerics() -> dict:
    """What decides the bits of this process's CPU kernels beside the library versions: the C library (libm), the
    CPU model, the instruction set torch dispatches on, torch's intra-op threads and the NUMERICS_ENV_VARS set."""
    return {"libc": " ".join(platform.libc_ver()).strip() or None, "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
            "numerics_env": numerics_environment()}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform reports). With cpu_capability (the
    instruction set torch's CPU kernels dispatch on: AVX2, AVX512, ...) it tells two machines apart whose vectorised
    kernels may round differently, which a long run can amplify."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _checkout_commit() -> Optional[str]:
    """HEAD of the git checkout ssl_kit runs from, or None for an installed wheel: the package's own files must be
    tracked there, so a site-packages inside some other repository's tree (a project's .venv) records no commit."""
    here = str(Path(__file__).resolve().parent)
    try:
        tracked = subprocess.run(["git", "-C", here, "ls-files", "--error-unmatch", "_version.py"],
                                 capture_output=True, timeout=5).returncode == 0
        if not tracked:
            return None
        return subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def remove_our_temp_files(run_dir: Path) -> None:
    """Delete the half-written temp files of a killed writer (OUR_TEMP_FILES only); complete files are intact."""
    for stale in sorted(run_dir.rglob("*.tmp")):
        if stale.is_file() and OUR_TEMP_FILES.match(stale.name):
            log(f"[ssl-kit] removing {stale} (left by an interrupted write)")
            stale.unlink()


def check_resume_config(run_dir: Path, recipe: Recipe, allow_change: bool) -> list[dict]:
    """Compare `recipe` with the run's config.yaml before anything is touched. -> the differences (possibly
    harmless ones). Raises ConfigError listing the differences that change what is trained, unless allow_change."""
    path = run_dir / "config.yaml"
    stored = load_yaml(path)
    try:
        old = validate_recipe(stored, f"{path}").model_dump(mode="json")  # today's defaults on both sides
    except ConfigError:
        old = stored
    changes = recipe_differences(old, recipe.model_dump(mode="json"))
    refused = [c for c in changes if not is_harmless(c["key"])]
    if refused and not allow_change:
        raise ConfigError(
            f"--resume: this recipe differs from the run's {str(path)!r} in {len(refused)} setting(s) that change "
            f"what is trained:\n{format_differences(refused)}\nResume with the run's own settings, start a new "
            f"run (another --out), or pass --allow-config-change to continue anyway (the differences are recorded "
            f"in {RESUME_CHANGES}); config.yaml was left as it was")
    return changes


def record_resume_changes(run_dir: Path, changes: list[dict]) -> None:
    """Append one JSON line {time, changes} to run_dir/resume_changes.jsonl."""
    if not changes:
        return
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": finite_or_none(changes)}, default=str)
    with open(run_dir / RESUME_CHANGES, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
    log(f"[ssl-kit] resuming with {len(changes)} changed setting(s), recorded in {run_dir / RESUME_CHANGES}:\n"
        f"{format_differences(changes)}")


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_run_dir(recipe: Recipe) -> Optional[Path]:
    """The newest runs/<recipe name>-<timestamp> dir with a config.yaml (an elastic restart without --out)."""
    runs = sorted(p for p in Path("runs").glob(f"{recipe.name or 'run'}-*") if (p / "config.yaml").is_file())
    return runs[-1] if runs else None


def is_global_rank0() -> bool:
    return dist.is_main() if dist.is_distributed() else int(os.environ.get("RANK", "0")) == 0


def _decide_run_dir(recipe: Recipe, out: Optional[Path], resume: bool,
                    allow_config_change: bool) -> tuple[Path, bool, RunLock]:
    """Rank 0's choice: the run dir (given, or a new timestamped one) and whether to resume it; after an elastic
    restart, the run being restarted is resumed. Takes the run dir's lock (held for the whole run: one writer per
    run dir), then prepares the dir — on resume only after the recipe was compared with the run's config.yaml."""
    run_dir = Path(out) if out is not None else default_run_dir(recipe)
    if dist.restart_count() > 0 and not resume:
        if out is None:
            run_dir = latest_run_dir(recipe) or run_dir
        if (run_dir / "config.yaml").is_file():
            resume = True
            log(f"[ssl-kit] elastic restart {dist.restart_count()}: resuming {run_dir}")
    if resume or not (run_dir / LOCK_NAME).exists():  # a dir that held a run: its lock holder is named first
        prepare_run_dir(run_dir, resume)
    lock = RunLock(run_dir).acquire()
    try:
        if resume:
            changes = check_resume_config(run_dir, recipe, allow_config_change)
            remove_our_temp_files(run_dir)
            record_resume_changes(run_dir, changes)
        else:
            prepare_run_dir(run_dir, resume)  # under the lock: another run may have started in between
    except BaseException:
        lock.release()
        raise
    return run_dir, resume, lock


def agree_on_run_dir(recipe: Recipe, out: Optional[Path], resume: bool,
                     allow_config_change: bool = False) -> tuple[Path, bool, Optional[RunLock]]:
    """Every rank gets rank 0's decision (its error too). With --out each node keeps its own path (the same string
    on a shared filesystem; only rank 0 writes there); without it all ranks use the name rank 0 chose.
    -> (run dir, resume?, the lock rank 0 holds — None on other ranks)."""
    decision: tuple = (None, resume, None)
    lock = None
    if is_global_rank0():
        try:
            run_dir, resume, lock = _decide_run_dir(recipe, out, resume, allow_config_change)
            decision = (str(run_dir), resume, None)
        except ConfigError as exc:
            decision = (None, resume, str(exc))
            if not dist.is_distributed():
                raise
    decision = dist.broadcast_object(decision)
    if decision[2] is not None:
        raise ConfigError(decision[2])
    return (Path(out) if out is not None else Path(decision[0])), decision[1], lock
