"""`ssl-kit run --from-bundle` reads an untrusted archive: member count, member size, total size, compression ratio
and header/name lengths are capped on the raw tar headers (a clear error naming the limit), hostile content is
refused before the re-run (exit 2 naming the member), and the extraction folder is always removed."""
from __future__ import annotations

import io
import tarfile
import tempfile

import pytest

from ssl_kit import bundle
from ssl_kit.cli import main
from ssl_kit.errors import ConfigError

GOOD = {"run/config.yaml": b"name: x\nstages: []\n", "run/summary.json": b'{"top1": 0.5}'}


def write_archive(path, files, fmt=tarfile.GNU_FORMAT):
    with tarfile.open(path, "w:gz", format=fmt) as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


@pytest.fixture
def small_limits(monkeypatch):
    monkeypatch.setitem(bundle.BUNDLE_LIMITS, "members", 5)
    monkeypatch.setitem(bundle.BUNDLE_LIMITS, "member_bytes", 1000)
    monkeypatch.setitem(bundle.BUNDLE_LIMITS, "total_bytes", 3000)
    monkeypatch.setitem(bundle.BUNDLE_LIMITS, "header_bytes", 1024)
    monkeypatch.setattr(bundle, "RATIO_ALLOWANCE", 0)


CAPPED = [  # (id, files, message part naming the limit)
    ("member-count", {**GOOD, **{f"run/f{i}": b"x" for i in range(10)}}, "more than 5 members; the limit is 5 (members)"),
    ("member-size", {**GOOD, "run/big": b"x" * 2000}, "member 'run/big' holds 2,000 bytes; the limit is 1,000"),
    ("total-size", {**GOOD, **{f"run/m{i}": (bytes(range(256)) * 4)[:999] for i in range(3)}}, "(total bytes)"),
    ("long-name-header", {**GOOD, "run/" + "n" * 5000: b"x"}, "a long-name/pax header of 5,005 bytes"),
]


@pytest.mark.parametrize("files,part", [c[1:] for c in CAPPED], ids=[c[0] for c in CAPPED])
def test_bundle_caps_name_the_limit(tmp_path, small_limits, files, part):
    archive = write_archive(tmp_path / "b.tar.gz", files)
    with pytest.raises(ConfigError, match="bundle .*b.tar.gz") as caught:
        bundle.extract_bundle(archive, tmp_path / "x")
    assert part in str(caught.value)
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_a_gzip_bomb_is_refused_by_its_ratio(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle, "RATIO_ALLOWANCE", 0)
    archive = write_archive(tmp_path / "bomb.tar.gz", {**GOOD, "run/zeros": bytes(4 << 20)})
    with pytest.raises(ConfigError, match=r"unpack to more than .* compressed; the limit is 100 \(ratio\)"):
        bundle.extract_bundle(archive, tmp_path / "x")


def test_a_long_member_name_is_refused(tmp_path):
    archive = write_archive(tmp_path / "b.tar.gz", {**GOOD, "run/" + "n" * 2000: b"x"}, tarfile.PAX_FORMAT)
    with pytest.raises(ConfigError, match=r"has 2,004 characters; the limit is 1,024 \(name chars\)"):
        bundle.extract_bundle(archive, tmp_path / "x")


def test_not_a_gzip_is_a_clear_error(tmp_path):
    (tmp_path / "b.tar.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ConfigError, match="is not a readable .tar.gz"):
        bundle.extract_bundle(tmp_path / "b.tar.gz", tmp_path / "x")


HOSTILE = [  # (id, files, member named in the error)
    ("summary-is-a-list", {**GOOD, "run/summary.json": b"[1, 2]"}, "run/summary.json is a JSON list"),
    ("summary-not-utf8", {**GOOD, "run/summary.json": b"\xff\xfe{}"}, "run/summary.json is not UTF-8"),
    ("summary-missing", {"run/config.yaml": GOOD["run/config.yaml"]}, "run/summary.json is missing"),
    ("split-not-json", {**GOOD, "run/splits/train.json": b"{oops"}, "run/splits/train.json is not JSON"),
    ("split-not-utf8", {**GOOD, "run/splits/train.json": b"\x80"}, "run/splits/train.json is not UTF-8"),
    ("config-not-utf8", {**GOOD, "run/config.yaml": b"\xff"}, "run/config.yaml is not UTF-8"),
    # env.json is optional, but the comparison after the re-run reads it when present
    ("env-is-a-list", {**GOOD, "run/env.json": b'["torch"]'}, "run/env.json is a JSON list"),
    ("env-not-json", {**GOOD, "run/env.json": b"{torch: 2"}, "run/env.json is not JSON"),
]


@pytest.mark.parametrize("files,part", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_bundle_content_is_refused_before_the_rerun(tmp_path, monkeypatch, capsys, files, part):
    import ssl_kit.runner

    def never(*args, **kwargs):
        raise AssertionError("the re-run must not start")

    monkeypatch.setattr(ssl_kit.runner, "run_recipe", never)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    archive = write_archive(tmp_path / "b.tar.gz", files)
    assert main(["run", "--from-bundle", str(archive), "--out", str(tmp_path / "rerun")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ssl-kit: error: bundle") and part in err
    assert not list(tmp_path.glob("ssl-kit-bundle-*"))  # the extraction folder is removed
    assert not (tmp_path / "rerun").exists()


def test_a_bundle_without_env_json_is_compared_without_an_environment(tmp_path):
    bundled, new = tmp_path / "bundled", tmp_path / "new"
    for run in (bundled, new):
        (run / "splits").mkdir(parents=True)
        (run / "summary.json").write_text('{"top1": 0.5}')
    (new / "env.json").write_text('{"torch": "2.14.1", "command": ["x"]}')
    comparison = bundle.compare_runs(bundled, new)
    assert comparison["matches"] and comparison["environment"] == {}
    (bundled / "env.json").write_text('{"torch": "2.13.0", "command": ["y"]}')
    assert bundle.compare_runs(bundled, new)["environment"] == {"torch": ["2.13.0", "2.14.1"]}
