"""`ssl-kit export --out DIR` loses no user data: a new folder, or a non-empty one refused unless --overwrite, which
replaces only the export's own files, as one set (a failure half-way restores the old set); no symlink in DIR is
written through; an --out that is a file is a clear error. The user's files are compared byte for byte."""
from __future__ import annotations

import json
import os

import pytest

from ssl_kit.cli import main
from ssl_kit.engine.checkpoint import atomic_save, backbone_record
from ssl_kit.errors import CheckpointError, ConfigError
from ssl_kit.models import export_dir
from ssl_kit.models.export import write_export
from ssl_kit.models.registry import build_backbone

USER_FILES = {"README.md": b"my notes\n", "config.json": b'{"mine": true}\n', "model.safetensors": b"old weights",
              "notes.txt": b"keep me"}


def small_record():
    backbone = build_backbone("small_cnn", 1, 8, {"width": 2})
    data = {"channels": 1, "image_size": 8, "mean": [0.5], "std": [0.25]}
    return {"arch": "small_cnn", "kwargs": {"width": 2}, "data": data, "state_dict": backbone.state_dict()}, backbone


@pytest.fixture
def checkpoint(tmp_path):
    record, backbone = small_record()
    path = tmp_path / "backbone.pt"
    atomic_save(backbone_record("small_cnn", {"width": 2}, record["data"], backbone), path)
    return path


def user_folder(folder, files=USER_FILES):
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    return folder


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


def no_staging_left(parent):
    return not [p for p in parent.iterdir() if p.name.startswith(export_dir.STAGING_PREFIX)]


def export(checkpoint, out, *extra):
    return main(["export", "--checkpoint", str(checkpoint), "--to", "safetensors", "--out", str(out), *extra])


def test_a_non_empty_folder_is_refused_without_overwrite(tmp_path, checkpoint, capsys):
    out = user_folder(tmp_path / "mine")
    assert export(checkpoint, out) == 2
    err = capsys.readouterr().err
    assert f"ssl-kit: error: export folder {str(out)!r} is not empty" in err and "--overwrite" in err
    assert snapshot(out) == USER_FILES and no_staging_left(tmp_path)


def test_overwrite_replaces_only_the_export_files_as_a_set(tmp_path, checkpoint):
    out = user_folder(tmp_path / "mine", {**USER_FILES, "model.onnx.data": b"old onnx weights"})
    assert export(checkpoint, out, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "notes.txt"]
    assert (out / "notes.txt").read_bytes() == b"keep me"  # not the export's: untouched
    assert json.loads((out / "config.json").read_text())["library"] == "ssl_kit"
    assert (out / "model.safetensors").read_bytes() != USER_FILES["model.safetensors"]
    assert no_staging_left(tmp_path)


def test_a_new_or_empty_folder_needs_no_overwrite(tmp_path, checkpoint):
    assert export(checkpoint, tmp_path / "a" / "new") == 0
    (tmp_path / "empty").mkdir()
    assert export(checkpoint, tmp_path / "empty") == 0
    for folder in (tmp_path / "a" / "new", tmp_path / "empty"):
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert no_staging_left(tmp_path) and no_staging_left(tmp_path / "a")


@pytest.mark.parametrize("name", ["bundle.tar.gz", "config.json", "model.safetensors"])
def test_a_symlinked_export_file_is_refused_and_its_target_untouched(tmp_path, checkpoint, capsys, name):
    precious = tmp_path / "precious.bin"
    precious.write_bytes(b"do not overwrite")
    out = user_folder(tmp_path / "mine", {k: v for k, v in USER_FILES.items() if k != name})
    (out / name).symlink_to(precious)
    assert export(checkpoint, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert f"{name} is a symlink" in err and str(out) in err
    assert precious.read_bytes() == b"do not overwrite" and (out / name).is_symlink()
    assert snapshot(out) == {k: v for k, v in USER_FILES.items() if k != name} and no_staging_left(tmp_path)


def test_out_that_is_a_file_is_a_clear_error(tmp_path, checkpoint, capsys):
    target = tmp_path / "a_file"
    target.write_bytes(b"data")
    assert export(checkpoint, target, "--overwrite") == 2
    assert f"ssl-kit: error: export folder {str(target)!r} is a file" in capsys.readouterr().err
    assert target.read_bytes() == b"data" and no_staging_left(tmp_path)


def test_a_failure_while_swapping_restores_the_old_set(tmp_path, monkeypatch):
    out = user_folder(tmp_path / "mine")
    real, calls = os.replace, []

    def fail_on_the_second_new_file(src, dst):
        calls.append(dst)
        if str(dst).startswith(str(out.resolve())) and len([c for c in calls if str(c).startswith(str(out))]) == 2:
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(export_dir.os, "replace", fail_on_the_second_new_file)
    with pytest.raises(OSError, match="No space left"):
        write_export(small_record()[0], "safetensors", out, overwrite=True)
    monkeypatch.undo()
    assert snapshot(out) == USER_FILES and no_staging_left(tmp_path)


def test_a_refused_export_leaves_the_old_set(tmp_path, monkeypatch):
    out = user_folder(tmp_path / "mine")

    def refuse(*args, **kwargs):
        raise CheckpointError("export refused: outputs differ")

    monkeypatch.setattr("ssl_kit.models.export.verify_export", refuse)
    with pytest.raises(CheckpointError, match="outputs differ"):
        write_export(small_record()[0], "safetensors", out, overwrite=True)
    assert snapshot(out) == USER_FILES and no_staging_left(tmp_path)


def test_a_dangling_out_symlink_is_refused(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="dangling symlink"):
        write_export(small_record()[0], "safetensors", tmp_path / "link")
    assert not (tmp_path / "nowhere").exists()
