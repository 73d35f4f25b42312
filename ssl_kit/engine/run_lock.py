"""One writer per run directory: an OS file lock (flock) on run_dir/.ssl-kit.lock, held for the run's life.

The kernel drops a flock when its holder dies (even on SIGKILL), so a lock left by a dead process is simply taken
over; the file's content (pid, host, start time) only serves to name the holder in messages. The lock file stays in
the run directory afterwards: removing it could let a third process lock an unlinked file.

The lock belongs to the training process alone. A flock belongs to the open file description, which a fork()ed child
(a DataLoader worker, a multiprocessing 'fork' child) shares: such a child would keep the run directory locked after
its parent is SIGKILLed, until it notices and exits, and an immediate resume (torchrun --max-restarts, a scheduler's
requeue) would be refused naming the dead process. So every forked child closes its inherited copy at once
(`os.register_at_fork`), which drops its reference without unlocking (LOCK_UN would unlock the parent too); an
exec()ed child never gets it (Python opens files close-on-exec). POSIX record locks (`fcntl.lockf`) are not
inherited either, but any close of any descriptor of the file by the holder drops them, and two locks of one
process never conflict: flock keeps the simpler semantics.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
import weakref
from pathlib import Path

from ..errors import ConfigError

LOCK_NAME = ".ssl-kit.lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not protected against a second writer there
    fcntl = None

_HELD: "weakref.WeakSet[RunLock]" = weakref.WeakSet()  # locks this process holds (see _forget_in_child)


def _forget_in_child() -> None:
    """In a freshly forked child: close the inherited handles of every held lock, without unlocking them (the
    parent still holds its lock; the child no longer keeps it alive)."""
    for lock in list(_HELD):
        lock._drop_inherited()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_holder(text: str) -> str:
    """'pid 123 on host-a since 2024-...' from the lock file's JSON content (or the raw text)."""
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']} (since {info['started']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


class RunLock:
    """Exclusive, non-blocking lock on a run directory. Use as a context manager; `acquire` raises ConfigError
    naming the holder when another live process has the directory."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._handle = None

    def acquire(self) -> "RunLock":
        if fcntl is None:
            return self
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            holder = describe_holder(handle.read())
            handle.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    f"run directory {str(self.path.parent)!r} is in use by {holder}: two runs must not write one "
                    f"run directory. Wait for it to finish (or stop it), or choose another --out") from None
            print(f"[ssl-kit] warning: cannot lock {self.path} ({exc.strerror}); this filesystem does not support "
                  f"file locks, so a second run on this directory would not be detected", file=sys.stderr)
            return self
        handle.seek(0)
        previous = handle.read()
        self._note_stale(previous)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        handle.flush()
        self._handle = handle
        _HELD.add(self)
        return self

    def _drop_inherited(self) -> None:
        """Close this process's copy of an inherited lock handle; never LOCK_UN (that would release the parent's)."""
        handle, self._handle = self._handle, None
        _HELD.discard(self)
        if handle is not None:
            try:
                handle.close()
            except OSError:
                pass

    def _note_stale(self, previous: str) -> None:
        """Report a lock file left by a process that died without releasing (the kernel already released it)."""
        try:
            info = json.loads(previous)
        except ValueError:
            return
        if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
            return
        same_host = info.get("host") == socket.gethostname()
        if info["pid"] != os.getpid() and not (same_host and _pid_alive(info["pid"])):
            print(f"[ssl-kit] taking over the lock of {describe_holder(previous)}, which is no longer running",
                  file=sys.stderr)

    def release(self) -> None:
        if self._handle is not None:
            _HELD.discard(self)
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
