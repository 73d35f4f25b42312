"""One writer per run directory, honest --resume, and full or read-only disks on real filesystems (issue 18)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from ssl_kit.config import validate_recipe
from ssl_kit.engine.checkpoint import atomic_save, safe_load
from ssl_kit.errors import ConfigError
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fault_worker.py")


def cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssl_kit.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, **kwargs)


def write_recipe(path: Path, steps: int = 10) -> Path:
    stage = tiny_stage(train={"steps": steps, "checkpoint_every_steps": 5})
    path.write_text(yaml.safe_dump({"seed": 0, "name": "lock", "stages": [
        stage, {"name": "linear_probe", "method": "linear_probe", "epochs": 3}]}))
    return path


# ------------------------------------------------------------------------------------------------ lock
@pytest.mark.slow
def test_second_writer_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    recipe, run, marker = write_recipe(tmp_path / "r.yaml"), tmp_path / "run", tmp_path / "marker"
    holder = subprocess.Popen([sys.executable, str(WORKER), "eval", str(marker), "--", "run", str(recipe),
                               "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = __import__("time").time() + 120
        while not marker.exists():  # the holder has trained and sits in its evaluation stage, lock held
            assert holder.poll() is None and __import__("time").time() < deadline, holder.stderr.read()
            __import__("time").sleep(0.05)
        for extra in ([], ["--resume"]):
            before = sorted(p.name for p in run.rglob("*"))
            second = cli("run", str(recipe), "--out", str(run), "--json", *extra)
            assert second.returncode == 2 and "Traceback" not in second.stderr
            message = json.loads(second.stdout)["error"]["message"]
            assert f"is in use by pid {holder.pid} on " in message and "two runs must not write one" in message
            assert sorted(p.name for p in run.rglob("*")) == before  # nothing written or deleted
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    resumed = cli("run", str(recipe), "--out", str(run), "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert f"taking over the lock of pid {holder.pid} on" in resumed.stderr
    assert 0 <= json.loads(resumed.stdout)["linear_probe/top1"] <= 1


def test_lock_blocks_a_second_writer_in_process(tmp_path):
    from ssl_kit.engine.run_lock import RunLock

    (tmp_path / "run").mkdir()
    with RunLock(tmp_path / "run"):
        probe = subprocess.run([sys.executable, "-c", "import sys; from ssl_kit.engine.run_lock import RunLock; "
                                "RunLock(sys.argv[1]).acquire()", str(tmp_path / "run")],
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert probe.returncode == 1 and f"is in use by pid {os.getpid()}" in probe.stderr
    # released: a new run may not start there (the dir holds the lock file only), a fresh lock works
    recipe = validate_recipe({"seed": 0, "name": "l", "stages": [tiny_stage(train={"steps": 2})]})
    run_recipe(recipe, tmp_path / "run")


HOLDER_WITH_FORKED_CHILD = """
import multiprocessing, os, sys, time
from pathlib import Path
from ssl_kit.engine.run_lock import RunLock

def child_body(marker):
    Path(marker).write_text(str(os.getpid()))  # written by the child: its at-fork hooks have run
    time.sleep(60)

lock = RunLock(sys.argv[1]).acquire()  # held (referenced) until killed
child = multiprocessing.get_context("fork").Process(target=child_body, args=(sys.argv[2],))  # as a DataLoader worker
child.start()
time.sleep(60)
"""


def test_a_forked_child_does_not_keep_the_lock_of_a_killed_holder(tmp_path):
    """The lock belongs to the training process alone: SIGKILL the holder while its forked child (a DataLoader
    worker) lives on, and the run directory can be locked again at once (no 'in use by pid N' of the dead pid)."""
    from ssl_kit.engine.run_lock import RunLock

    (tmp_path / "run").mkdir()
    marker = tmp_path / "child.pid"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_WITH_FORKED_CHILD, str(tmp_path / "run"), str(marker)],
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child = None
    try:
        deadline = __import__("time").time() + 60
        while not (marker.exists() and marker.read_text()):
            assert holder.poll() is None and __import__("time").time() < deadline
            __import__("time").sleep(0.02)
        child = int(marker.read_text())
        with pytest.raises(ConfigError, match=f"in use by pid {holder.pid}"):
            RunLock(tmp_path / "run").acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        os.kill(child, 0)  # the forked child is still alive ...
        RunLock(tmp_path / "run").acquire().release()  # ... and the lock is free at once
    finally:
        if holder.poll() is None:
            holder.kill()
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------------------------------- honest resume
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    recipe = {"seed": 0, "name": "honest", "stages": [tiny_stage(train={"steps": 6, "checkpoint_every_steps": 3})]}
    run_recipe(validate_recipe(recipe), folder / "run")
    return recipe, folder / "run"


def copy_run(finished_run, tmp_path) -> Path:
    shutil.copytree(finished_run[1], tmp_path / "run")
    return tmp_path / "run"


def test_resume_with_changed_training_settings_is_refused(finished_run, tmp_path):
    raw, _ = finished_run
    run = copy_run(finished_run, tmp_path)
    config_before = (run / "config.yaml").read_bytes()
    (run / ".last.pt.abcd1234.tmp").write_bytes(b"half")  # would be cleaned by an accepted resume
    changed = validate_recipe({**raw, "stages": [tiny_stage(train={"steps": 6, "batch_size": 16},
                                                            backbone={"name": "small_cnn", "kwargs": {"width": 4}})]})
    with pytest.raises(ConfigError) as info:
        run_recipe(changed, run, resume=True)
    message = str(info.value)
    assert "differs from the run's" in message and "in 2 setting(s) that change what is trained" in message
    assert "stages[supervised].backbone.kwargs.width: 8 -> 4" in message
    assert "stages[supervised].train.batch_size: 32 -> 16" in message and "--allow-config-change" in message
    assert (run / "config.yaml").read_bytes() == config_before  # untouched, and so is everything else
    assert (run / ".last.pt.abcd1234.tmp").exists() and not (run / "resume_changes.jsonl").exists()


def test_harmless_changes_resume_and_are_recorded(finished_run, tmp_path):
    raw, _ = finished_run
    run = copy_run(finished_run, tmp_path)
    ours, theirs = run / "checkpoints" / ".last.pt.abcd1234.tmp", run / ".notes.tmp"
    ours.write_bytes(b"half")
    theirs.write_text("the user's file")
    stage = tiny_stage(train={"steps": 6, "checkpoint_every_steps": 3, "log_every": 2})
    run_recipe(validate_recipe({**raw, "description": "x", "stages": [stage]}), run, resume=True)
    record = json.loads((run / "resume_changes.jsonl").read_text())
    assert [c["key"] for c in record["changes"]] == ["description", "stages[supervised].train.log_every"]
    assert not ours.exists() and theirs.read_text() == "the user's file"  # only our own temp files are removed
    assert yaml.safe_load((run / "config.yaml").read_text())["stages"][0]["train"]["log_every"] == 2


def test_allow_config_change_records_the_differences(finished_run, tmp_path):
    raw, _ = finished_run
    run = copy_run(finished_run, tmp_path)
    stages = [tiny_stage(train={"steps": 6, "checkpoint_every_steps": 3}),
              {"name": "knn", "method": "knn", "k": 5}]
    result = cli("run", str(_write(tmp_path / "r.yaml", {**raw, "stages": stages})), "--out", str(run), "--resume",
                 "--json")
    assert result.returncode == 2 and "stages[knn]: '<absent>' -> 'stage'" in json.loads(result.stdout)["error"]["message"]
    result = cli("run", str(tmp_path / "r.yaml"), "--out", str(run), "--resume", "--allow-config-change", "--json")
    assert result.returncode == 0, result.stderr
    assert 0 <= json.loads(result.stdout)["knn/top1"] <= 1
    changes = json.loads((run / "resume_changes.jsonl").read_text())["changes"]
    assert changes == [{"key": "stages[knn]", "old": "<absent>", "new": "stage"}]


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_out_that_is_a_file_and_resume_of_a_non_run(tmp_path):
    (tmp_path / "file").write_text("x")
    recipe = validate_recipe({"seed": 0, "stages": [tiny_stage()]})
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        run_recipe(recipe, tmp_path / "file")
    with pytest.raises(ConfigError, match="is not a run directory"):
        run_recipe(recipe, tmp_path, resume=True)


def test_resume_checkpoint_with_wrong_types_names_the_slot(finished_run, tmp_path):
    raw, _ = finished_run
    run = copy_run(finished_run, tmp_path)
    state = safe_load(run / "checkpoints" / "last.pt")
    atomic_save({**state, "step": "three"}, run / "checkpoints" / "last.pt")
    (run / "summary.json").write_text("{}")
    with pytest.raises(Exception, match=r"resume checkpoint '.*last.pt': 'stage' and 'step' must be a name and an "
                                        r"integer, got 'supervised' and 'three'"):
        run_recipe(validate_recipe(raw), run, resume=True)


# --------------------------------------------------------------------------------- full and read-only disks
def mount_tmpfs(target: Path, size: str) -> None:
    target.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                            capture_output=True, text=True)
    if result.returncode:
        target.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'no privileges'}); the read-only "
                    f"variant below still runs")


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs mounts are Linux")
def test_disk_full_on_a_real_filesystem(tmp_path):
    """A 400 kB tmpfs: the run dir, config and first checkpoints fit, later writes hit ENOSPC for real."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "400k")
    try:
        recipe = _write(tmp_path / "r.yaml", {"seed": 0, "name": "full", "stages": [
            tiny_stage(train={"steps": 40, "checkpoint_every_steps": 5, "keep_last": 20},
                       backbone={"name": "small_cnn", "kwargs": {"width": 8}})]})
        result = cli("run", str(recipe), "--out", str(disk / "run"), "--json")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        message = json.loads(result.stdout)["error"]["message"]
        assert "No space left on device" in message and "previous file is intact" in message, message
        assert safe_load(disk / "run" / "checkpoints" / "last.pt")["step"] % 5 == 0  # still a complete checkpoint
        assert not list((disk / "run").rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs mounts are Linux")
def test_read_only_filesystem_on_a_real_mount(tmp_path):
    disk = tmp_path / "ro"
    mount_tmpfs(disk, "1m")
    try:
        (disk / "run").mkdir()
        (disk / "run" / "config.yaml").write_text("seed: 0\n")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        recipe = _write(tmp_path / "r.yaml", {"seed": 0, "stages": [tiny_stage()]})
        result = cli("run", str(recipe), "--out", str(disk / "new"), "--json")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "the filesystem is read-only" in json.loads(result.stdout)["error"]["message"]
        assert (disk / "run" / "config.yaml").read_text() == "seed: 0\n"
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_file_size_limit_everywhere(tmp_path):
    """Runs for any user: RLIMIT_FSIZE makes the kernel refuse writes past 300 kB (EFBIG), like a full disk,
    partway through torch's own checkpoint writing; the last complete checkpoint stays, no temp file is left."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    recipe = _write(tmp_path / "r.yaml", {"seed": 0, "name": "fsize", "stages": [
        tiny_stage(train={"steps": 30, "checkpoint_every_steps": 5}, backbone={"name": "small_cnn",
                                                                               "kwargs": {"width": 24}})]})
    result = cli("run", str(recipe), "--out", str(tmp_path / "run"), "--json", preexec_fn=limit_file_size)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    message = json.loads(result.stdout)["error"]["message"]
    assert "last.pt" in message and "File too large; the previous file is intact" in message, message
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_read_only_directory_everywhere():
    """chmod 555 on the folder. Root ignores permissions, so as root the writer runs in a child process that drops
    to the 'nobody' user first (skipped only where that is impossible)."""
    folder = Path(tempfile.mkdtemp(prefix="ssl-kit-ro-"))
    try:
        os.chmod(folder, 0o755)
        (folder / "summary.json").write_text("previous")
        os.chmod(folder, 0o555)
        code = ("import sys; from ssl_kit.engine.checkpoint import atomic_write_text, atomic_save\n"
                "from ssl_kit.errors import CheckpointError\n"
                "for write in (lambda: atomic_write_text(sys.argv[1] + '/summary.json', 'new'),\n"
                "              lambda: atomic_save({'a': 1}, sys.argv[1] + '/last.pt')):\n"
                "    try:\n        write()\n    except CheckpointError as exc:\n        print(exc)\n")
        drop = None
        if os.geteuid() == 0:
            drop = lambda: (os.setgid(65534), os.setuid(65534))  # noqa: E731
        env = {**os.environ, "PYTHONPATH": str(REPO), "MPLCONFIGDIR": str(folder), "HOME": "/nonexistent"}
        try:
            result = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
                                    env=env, preexec_fn=drop, timeout=120)
        except PermissionError as exc:
            pytest.skip(f"root here, and the 'nobody' user cannot run this Python ({exc}); the read-only tmpfs "
                        f"test covers this case")
        if result.returncode and "Permission denied" in result.stderr:
            pytest.skip(f"the 'nobody' user cannot read the code: {result.stderr.splitlines()[-1]}")
        lines = result.stdout.splitlines()
        assert result.returncode == 0 and len(lines) == 2, result.stderr
        assert all("Permission denied; the previous file is intact" in line for line in lines)
        assert (folder / "summary.json").read_text() == "previous" and sorted(os.listdir(folder)) == ["summary.json"]
    finally:
        os.chmod(folder, 0o755)
        shutil.rmtree(folder)
