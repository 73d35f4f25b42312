"""The stages benchmarks/method_overhead.py builds from the GPU recipes (`--gpu-recipes`) are valid and carry the
recipes' ViT-S backbones and method keys; a method without such a recipe is refused by name. benchmarks/fixmatch_table.py's
`--set KEY=VALUE` changes the semi-supervised rows only, validates, names its rows, and refuses unknown keys."""
import pytest
import yaml

from benchmarks import fixmatch_table
from benchmarks.method_overhead import GPU_RECIPE_METHODS, RECIPES, stage_for
from ssl_kit.config import validate_recipe


def test_every_vit_method_with_a_gpu_recipe_is_measurable():
    assert set(GPU_RECIPE_METHODS) == {"dinov2", "ijepa", "msn", "capi"}


@pytest.mark.parametrize("method", GPU_RECIPE_METHODS)
def test_gpu_recipe_stage_is_the_recipes_backbone_and_keys(method):
    recipe = yaml.safe_load((RECIPES / f"{method}_vit_small_imagefolder.yaml").read_text())["stages"][0]
    stage = validate_recipe({"seed": 0, "stages": [stage_for(method, "vit_tiny", 8, 224, "cpu", 7, True)]}).stages[0]
    assert stage.backbone.name == recipe["backbone"]["name"] == "vit_small"
    assert stage.backbone.kwargs == recipe["backbone"]["kwargs"]
    assert stage.data.image_size == 224 and stage.train.batch_size == 8
    digits = validate_recipe({"seed": 0, "stages": [stage_for(method, "vit_tiny", 8, 32, "cpu", 7)]}).stages[0]
    assert digits.backbone.name == "vit_tiny"  # without the flag: the digits-scale ViT, as before


def test_a_method_without_gpu_recipe_is_refused_by_name():
    with pytest.raises(SystemExit, match="ibot has no GPU image-folder recipe"):
        stage_for("ibot", "vit_tiny", 8, 224, "cpu", 7, True)


def test_fixmatch_table_set_changes_the_semi_supervised_rows_only():
    overrides = fixmatch_table.parse_overrides(["ema_m=0.99", "rampup=linear"])
    assert overrides == {"ema_m": 0.99, "rampup": "linear"}  # JSON where it parses, a string otherwise
    ict = fixmatch_table.with_overrides(fixmatch_table.stages("digits", 4, 10, 16, 16, "ict", "cpu", 3), overrides)
    stage = validate_recipe({"seed": 0, "stages": ict}).stages[0]
    assert stage.ema_m == 0.99 and stage.rampup == "linear"
    supervised = fixmatch_table.stages("digits", 4, 10, 16, 16, None, "cpu", 3)
    assert fixmatch_table.with_overrides(supervised, overrides) == supervised
    assert fixmatch_table.row_name("ict", {"ema_m": 0.99}) == "ICT (ema_m=0.99)"
    assert fixmatch_table.row_name(None, {"ema_m": 0.99}) == "supervised only"


def test_fixmatch_table_set_refuses_unknown_keys_and_bad_pairs():
    fixmatch = fixmatch_table.stages("digits", 4, 10, 16, 16, "fixed", "cpu", 3)
    with pytest.raises(SystemExit, match="--set ema_m: not a key of method 'fixmatch'"):
        fixmatch_table.with_overrides(fixmatch, {"ema_m": 0.99})
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        fixmatch_table.parse_overrides(["ema_m"])


def test_fixmatch_table_names_each_kept_run_folder_after_its_row():
    assert fixmatch_table.run_folder("fashion-mnist", 4, 0, "Pseudo-Label") == "fashion-mnist-4-seed0-pseudo-label"
    assert fixmatch_table.run_folder("digits", 4, 1, "ICT (ema_m=0.99)") == "digits-4-seed1-ict-ema_m=0.99"
    assert fixmatch_table.run_folder("digits", 10, 2, "Π-model") == "digits-10-seed2-π-model"
