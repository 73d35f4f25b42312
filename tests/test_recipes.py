"""Every bundled recipe validates; every CPU-sized one (builtin data only) runs end to end for a few steps; the
quickstart runs at reduced size and its summary has every stage's metrics."""
from __future__ import annotations

import json

import pytest
import yaml

from ssl_kit.cli import bundled_recipes, main
from ssl_kit.config import EVAL_METHODS
from ssl_kit.recipe_files import load_recipe
from ssl_kit.runner import run_recipe

BUILTIN = ("digits", "digits-printed", "digits-rotated")


def _is_cpu_sized(raw: dict) -> bool:
    datasets = [s["data"]["dataset"] if isinstance(s.get("data"), dict) else s.get("data", "digits")
                for s in raw["stages"]]
    return all(d.split(":")[0].split(",")[0] in BUILTIN for d in datasets)


def _few_step_overrides(raw: dict, steps: int = 2) -> list[str]:
    overrides = []
    for stage in raw["stages"]:
        name = stage["name"]
        if stage["method"] in EVAL_METHODS:
            if stage["method"] != "knn":
                overrides.append(f"{name}.epochs=2")
        else:
            overrides += [f"{name}.train.steps={steps}", f"{name}.train.progress=false",
                          f"{name}.train.eval_every_epochs=0"]
    return overrides


RECIPES = bundled_recipes()
CPU_RECIPES = [p for p in RECIPES if _is_cpu_sized(yaml.safe_load(p.read_text()))]


def test_every_recipe_validates_and_is_listed(capsys):
    assert len(RECIPES) >= 10 and len(CPU_RECIPES) >= 6
    for path in RECIPES:
        load_recipe(path)
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    for path in RECIPES:
        assert path.stem in listed


@pytest.mark.parametrize("path", CPU_RECIPES, ids=[p.stem for p in CPU_RECIPES])
def test_cpu_recipe_runs_a_few_steps(path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    recipe = load_recipe(path, _few_step_overrides(raw))
    _, summary = run_recipe(recipe, tmp_path / "run")
    for stage in recipe.stages:
        assert any(key.startswith(f"{stage.name}/") for key in summary), (path.stem, stage.name)
    assert (tmp_path / "run" / "report.md").is_file()


def test_quickstart_reduced_end_to_end(tmp_path, capsys):
    out = tmp_path / "quickstart"
    # overrides on both sides of an option, as users type them
    code = main(["run", "quickstart", "pretrain.train.epochs=2", "pretrain.train.progress=false",
                 "fixmatch.train.steps=30", "fixmatch.train.progress=false", "fixmatch.train.eval_every_epochs=0",
                 "--out", str(out), "linear_probe.epochs=10", "transfer.epochs=10"])
    assert code == 0
    printed = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["_completed_stages"] == ["pretrain", "fixmatch", "linear_probe", "knn", "transfer"]
    for key in ("pretrain/test/top1", "fixmatch/test/top1", "linear_probe/top1", "knn/top1",
                "transfer/source/top1", "transfer/digits-printed/top1", "transfer/digits-rotated:30/top1"):
        assert 0.0 <= summary[key] <= 1.0, key
    # the compact table names every stage and where the report is
    for stage in ("pretrain", "fixmatch", "linear_probe", "knn", "transfer"):
        assert stage in printed.out
    assert str(out / "report.md") in printed.err
    report = (out / "report.md").read_text()
    assert "## Headline" in report and "digits-printed" in report
