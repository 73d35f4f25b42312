"""The stages benchmarks/method_overhead.py builds from the GPU recipes (`--gpu-recipes`) are valid and carry the
recipes' ViT-S backbones and method keys; a method without such a recipe is refused by name."""
import pytest
import yaml

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
