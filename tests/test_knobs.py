"""One parser for every SSL_KIT_* environment variable (limits.knob): a bad value is a ConfigError naming the
variable, the value and the range, and the CLI fails with it first (exit 2); an unusable SSL_KIT_CACHE is an
error naming it on every path."""
from __future__ import annotations

import pytest

from ssl_kit import limits
from ssl_kit.cli import main
from ssl_kit.errors import ConfigError

BAD = [("SSL_KIT_DIST_TIMEOUT_MIN", value) for value in ("abc", "0", "-5", "nan", "inf", "1e9")] + \
      [("SSL_KIT_MAX_IMAGE_PIXELS", value) for value in ("lots", "0", "-1", "1.5", "NaN", "0x10")] + \
      [("SSL_KIT_EVAL_CHUNK_ROWS", value) for value in ("-3", "many")]


@pytest.mark.parametrize("variable,value", BAD, ids=[f"{v}={x}" for v, x in BAD])
def test_a_bad_knob_names_the_variable_value_and_range(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        limits.knob(variable)
    message = str(caught.value)
    assert f"environment variable {variable}={value!r} is not" in message and " in [" in message


@pytest.mark.parametrize("variable,value", BAD[:1] + BAD[6:7], ids=["timeout-abc", "pixels-lots"])
def test_the_cli_refuses_a_bad_knob_before_any_work(monkeypatch, capsys, variable, value):
    monkeypatch.setenv(variable, value)
    assert main(["recipes"]) == 2
    assert capsys.readouterr().err.startswith(f"ssl-kit: error: environment variable {variable}={value!r}")


def test_good_values_and_defaults(monkeypatch):
    monkeypatch.delenv("SSL_KIT_DIST_TIMEOUT_MIN", raising=False)
    assert limits.knob("SSL_KIT_DIST_TIMEOUT_MIN") == 60.0
    monkeypatch.setenv("SSL_KIT_DIST_TIMEOUT_MIN", " 2.5 ")
    assert limits.knob("SSL_KIT_DIST_TIMEOUT_MIN") == 2.5
    monkeypatch.setenv("SSL_KIT_MAX_DATA_BYTES", "64e9")
    assert limits.limit("MAX_DATA_BYTES") == 64_000_000_000
    monkeypatch.setenv("SSL_KIT_MAX_DATA_BYTES", "")
    assert limits.limit("MAX_DATA_BYTES") == limits.DEFAULTS["MAX_DATA_BYTES"]


def test_an_unusable_cache_folder_is_one_clear_error(tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "cache"
    a_file.write_text("not a folder")
    monkeypatch.setenv("SSL_KIT_CACHE", str(a_file))
    with pytest.raises(ConfigError, match="SSL_KIT_CACHE=.* is a file, not a folder"):
        limits.cache_root(tmp_path / "default")
    assert main(["recipes"]) == 2
    assert "SSL_KIT_CACHE" in capsys.readouterr().err and a_file.read_text() == "not a folder"
    monkeypatch.setenv("SSL_KIT_CACHE", str(a_file / "below"))
    with pytest.raises(ConfigError, match="cannot be created"):
        limits.cache_root(tmp_path / "default")
    monkeypatch.setenv("SSL_KIT_CACHE", str(tmp_path / "ok"))
    assert limits.cache_root(tmp_path / "default") == tmp_path / "ok" and (tmp_path / "ok").is_dir()
