import pytest

from ssl_kit.config import validate_recipe

from ssl_kit.recipe_files import apply_overrides, load_recipe, parse_override
from ssl_kit.errors import ConfigError
from tests.conftest import tiny_stage


def raw(*stages):
    return {"seed": 0, "stages": list(stages)}


def test_unknown_key_names_full_path():
    stage = tiny_stage()
    stage["train"]["epocs"] = 3
    with pytest.raises(ConfigError, match=r"stages\[supervised\]\.train\.epocs: Extra inputs are not permitted"):
        validate_recipe(raw(stage))


def test_wrong_type_names_path_and_value():
    stage = tiny_stage()
    stage["train"]["batch_size"] = "many"
    with pytest.raises(ConfigError, match=r"stages\[supervised\]\.train\.batch_size: .*integer.*got 'many'"):
        validate_recipe(raw(stage))


def test_impossible_value_threshold_out_of_range():
    stage = tiny_stage("fixmatch", "fixmatch", threshold=1.5)
    with pytest.raises(ConfigError, match=r"stages\[fixmatch\]\.threshold: .*less than or equal to 1"):
        validate_recipe(raw(stage))


@pytest.mark.parametrize("method,own_keys", [("dino", "gaussian_blur, solarization_prob"),
                                             ("lejepa", "global_crop_scale, local_crop_scale"),
                                             ("emp_ssl", "patch_scale, blur_prob")])
def test_multi_crop_methods_refuse_the_shared_view_keys_they_would_ignore(method, own_keys):
    stage = tiny_stage(method, method, views={"solarize_prob": 0.3, "crop_scale": [0.5, 1.0]})
    with pytest.raises(ConfigError, match=rf"stages\[{method}\].*sets crop scales, blur and solarization per view: "
                                          rf"use {own_keys}.* instead of views\.\['crop_scale', 'solarize_prob'\]"):
        validate_recipe(raw(stage))
    validate_recipe(raw(tiny_stage(method, method, views={"jitter_prob": 0.5})))  # the keys it does read pass


def test_unknown_method_lists_allowed_values():
    stage = tiny_stage(method="no_such_method")
    with pytest.raises(ConfigError, match=r"supervised.*simclr.*fixmatch"):
        validate_recipe(raw(stage))


def test_literal_choice_lists_allowed_values():
    stage = tiny_stage(optimizer={"name": "adagrad"})
    with pytest.raises(ConfigError, match=r"optimizer\.name: .*'sgd', 'adam', 'adamw', 'rmsprop' or 'lars'"):
        validate_recipe(raw(stage))


def test_from_stage_must_be_earlier():
    first = tiny_stage("a")
    second = tiny_stage("b", init={"from_stage": "c"})
    with pytest.raises(ConfigError, match="takes its backbone from 'c'"):
        validate_recipe(raw(first, second))


def test_duplicate_stage_names():
    with pytest.raises(ConfigError, match="used twice"):
        validate_recipe(raw(tiny_stage("a"), tiny_stage("a")))


def test_batch_must_divide_accumulation():
    with pytest.raises(ConfigError, match="not divisible by accumulate 3"):
        validate_recipe(raw(tiny_stage(train={"batch_size": 32, "accumulate": 3})))


def test_overrides_address_stages_and_top_level():
    base = raw(tiny_stage("fixmatch", "fixmatch"))
    result = apply_overrides(base, ["seed=7", "fixmatch.threshold=0.9", "fixmatch.train.steps=3",
                                    "fixmatch.data.hflip=true", "fixmatch.views=[1, 2]"])
    assert result["seed"] == 7
    stage = result["stages"][0]
    assert stage["threshold"] == 0.9 and stage["train"]["steps"] == 3 and stage["data"]["hflip"] is True
    assert base["seed"] == 0  # the original is untouched


def test_override_of_unknown_stage_is_clear():
    with pytest.raises(ConfigError, match="neither a stage of this recipe"):
        apply_overrides(raw(tiny_stage("a")), ["b.train.steps=3"])


@pytest.mark.parametrize("text", ["novalue", "=3", "a..b=1"])
def test_malformed_overrides(text):
    with pytest.raises(ConfigError):
        parse_override(text)


def test_override_then_validation_reports_path(tmp_path):
    path = tmp_path / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw(tiny_stage())))
    with pytest.raises(ConfigError, match=r"stages\[supervised\]\.train\.steps: .*greater than or equal to 1"):
        load_recipe(path, ["supervised.train.steps=0"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo pwned']\nstages: []\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(path)


def test_overrides_may_follow_options_and_anything_else_left_over_is_refused(tmp_path, capsys):
    from ssl_kit.cli import build_parser, main, parse_command_line

    args = parse_command_line(build_parser(), ["run", "quickstart", "seed=1", "--out", "d", "a.b=2", "--json"])
    assert args.overrides == ["seed=1", "a.b=2"] and args.out == "d" and args.json
    out = tmp_path / "run"
    for stray in (["--bogus"], ["stray"], ["seed=1", "stray"]):
        assert main(["run", "quickstart", "--out", str(out), *stray]) == 2
        assert f"unrecognized arguments: {' '.join(stray)}" in capsys.readouterr().err
    assert main(["methods", "fixmatch", "seed=1"]) == 2  # a command without overrides takes none
    assert "unrecognized arguments: seed=1" in capsys.readouterr().err
    assert not out.exists()
