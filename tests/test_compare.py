"""`ssl-kit compare RUN [RUN ...]`: the final metrics of several runs side by side and one PNG of their curves."""
from __future__ import annotations

import json

import pytest

from conftest import tiny_stage
from ssl_kit import cli
from ssl_kit.config import validate_recipe
from ssl_kit.runner import run_recipe


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two short supervised runs that differ in their learning rate. -> (run folders, summaries)."""
    root = tmp_path_factory.mktemp("runs")
    folders, summaries = [], []
    for name, lr in (("slow", 0.01), ("fast", 0.1)):
        stage = tiny_stage(optimizer={"name": "sgd", "lr": lr, "lr_scaling": "none", "momentum": 0.9},
                           train={"steps": 4, "batch_size": 16})
        run_dir, summary = run_recipe(validate_recipe({"seed": 0, "name": name, "stages": [stage]}), root / name)
        folders.append(run_dir)
        summaries.append(summary)
    return folders, summaries


def test_compare_puts_each_runs_metrics_side_by_side(two_runs, capsys, tmp_path):
    folders, summaries = two_runs
    png = tmp_path / "cmp.png"
    assert cli.main(["compare", *map(str, folders), "--plot", str(png), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["runs"] == [f.name for f in folders]
    top1 = table["metrics"]["supervised/test/top1"]
    assert top1 == [pytest.approx(s["supervised/test/top1"]) for s in summaries]
    assert table["metrics"]["supervised/steps"] == [4, 4]
    assert table["plot"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"


def test_compare_text_table_and_missing_values(two_runs, capsys, tmp_path):
    folders, summaries = two_runs
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps({"extra/test/top1": 0.5, "_backbones": {}, "note": "text"}))
    assert cli.main(["compare", str(folders[0]), str(other), "--no-plot"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["metric", folders[0].name, "other"]
    row = next(line.split() for line in lines if line.startswith("supervised/test/top1"))
    assert row == ["supervised/test/top1", f"{summaries[0]['supervised/test/top1']:.4f}", "-"]
    assert next(line.split() for line in lines if line.startswith("extra/test/top1"))[1:] == ["-", "0.5000"]
    assert not any(line.startswith(("_backbones", "note")) for line in lines)


@pytest.mark.parametrize("content,message", [(None, "has no summary.json"), ("[1, 2]", "must hold a JSON object"),
                                             ("{not json", "is not valid JSON")])
def test_compare_refuses_what_is_not_a_run(content, message, capsys, tmp_path):
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    if content is not None:
        (folder / "summary.json").write_text(content)
    assert cli.main(["compare", str(folder), "--no-plot"]) == 2
    assert message in capsys.readouterr().err
