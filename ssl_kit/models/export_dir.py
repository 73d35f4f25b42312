"""Where an export lands: a new folder, or (with `overwrite`) the export's own files of an existing one replaced as
a set. Nothing the user owns is touched, no symlink is followed out of the folder.

  --out DIR        what happens
  missing          the files are staged in a temp folder beside DIR (same filesystem), then renamed to DIR
  empty folder     staged beside DIR, each file renamed into DIR
  not empty        refused, unless overwrite: OWNED files already in DIR move aside, the new set moves in; any
                   failure moves the old set back (nothing of it is lost), success deletes it. Other files stay.
  a file           refused (ConfigError naming it)
  OWNED name in DIR that is a symlink or a folder: refused, naming it (it would redirect a write outside DIR)

OWNED is every name an export or bundle writes; an --overwrite export removes the OWNED files it does not write
again (an earlier ONNX export's model.onnx.data, a bundle.tar.gz of the old weights): the folder holds one set.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError

OWNED = ("model.safetensors", "model.onnx", "model.onnx.data", "config.json", "README.md", "bundle.tar.gz")
STAGING_PREFIX = ".ssl-kit-export-"


def check_out_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuse an `out_dir` the export may not write (before any work): a file, a non-empty folder without
    `overwrite`, an OWNED name in it that is a symlink or a folder. -> the folder path (symlinks resolved)."""
    out = Path(out_dir)
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"export folder {str(out)!r} is a dangling symlink: give a folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export folder {str(out)!r} is a file, not a folder: give a new or empty folder")
    if not out.exists():
        return out
    out = out.resolve()
    entries = sorted(entry.name for entry in out.iterdir())
    if entries and not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(f"export folder {str(out)!r} is not empty ({shown}): give a new folder, or --overwrite "
                          f"to replace the export's own files ({', '.join(OWNED)}) and keep the others")
    for name in OWNED:
        path = out / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            kind = "a symlink" if path.is_symlink() else "not a regular file"
            raise ConfigError(f"export folder {str(out)!r}: {name} is {kind}; the export will not write through "
                              f"it (remove it, or export to another folder)")
    return out


def _make_staging(out: Path) -> Path:
    """A private temp folder beside `out` (same filesystem: the renames are atomic); inside `out` when only that
    one is writable."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out.parent))
    except PermissionError:
        if not out.is_dir():
            raise
        return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))


@contextlib.contextmanager
def staging_dir(out_dir: str | Path) -> Iterator[Path]:
    """A temp folder for the export's files; removed (with whatever is left in it) on exit."""
    staging = _make_staging(Path(out_dir))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _swap_set(staging: Path, out: Path, names: list[str]) -> None:
    """Move the OWNED files of `out` aside, the new `names` in; on any failure undo both (the old set is back)."""
    aside = Path(tempfile.mkdtemp(prefix=".previous-", dir=staging))
    moved_old: list[str] = []
    placed_new: list[str] = []
    try:
        for name in OWNED:
            if os.path.lexists(out / name):
                os.replace(out / name, aside / name)
                moved_old.append(name)
        for name in names:
            os.replace(staging / name, out / name)
            placed_new.append(name)
    except BaseException:
        for name in placed_new:
            with contextlib.suppress(OSError):
                os.replace(out / name, staging / name)
        for name in moved_old:
            os.replace(aside / name, out / name)
        raise


def publish(staging: Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Move the staged export files (OWNED names only) into `out_dir` as one set (see the module docstring).
    The folder is checked again first (it may have changed while the export was verified). -> the folder."""
    out = check_out_dir(out_dir, overwrite)
    names = sorted(entry.name for entry in staging.iterdir() if entry.name in OWNED)
    for name in names:
        os.chmod(staging / name, _umask_mode() & 0o666)
    if not out.exists():
        private = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=staging.parent))
        for name in names:
            os.replace(staging / name, private / name)
        os.chmod(private, _umask_mode())
        try:
            os.rename(private, out)  # atomic: the folder appears with the whole set, or not at all
            return out
        except OSError as exc:
            shutil.rmtree(private, ignore_errors=True)
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            raise ConfigError(f"export folder {str(out)!r} appeared while the export was written: run again "
                              f"(with --overwrite to replace its export files)") from None
    out.mkdir(parents=True, exist_ok=True)
    _swap_set(staging, out, names)
    return out
