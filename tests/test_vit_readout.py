"""DINOv2's linear-evaluation features of a ViT (n_last_blocks, avgpool): equal to the [cls] tokens of the last blocks
and the patch mean computed by hand, registers skipped, the defaults the backbone's own forward, refused by name where
they cannot apply, and reachable from the evaluation commands and recipe stages."""
import json

import pytest
import torch
from conftest import saved_vit

from ssl_kit.cli import main as cli_main
from ssl_kit.config import validate_recipe
from ssl_kit.errors import ConfigError
from ssl_kit.eval.vit_readout import ViTReadout, vit_readout
from ssl_kit.models.registry import build_backbone
from ssl_kit.models.vit import VisionTransformer

DATA = {"channels": 1, "image_size": 16, "mean": [0.5], "std": [0.25]}
KWARGS = {"patch_size": 4, "dim": 32, "depth": 3, "heads": 2}


def vit(**extra) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(16, 4, 1, dim=32, depth=3, heads=2, **extra).eval()
    if model.reg_token is not None:
        with torch.no_grad():
            model.reg_token.normal_()  # far from ~0, so that reading a register as a patch would show
    return model


def by_hand(model: VisionTransformer, x: torch.Tensor, n: int, avgpool: bool) -> torch.Tensor:
    """Every block's output through the final norm, [cls] of the last n, the last one's patch mean."""
    tokens = model.embed(x)
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    prefix = [cls] if model.reg_token is None else [cls, model.reg_token.expand(x.shape[0], -1, -1)]
    h = torch.cat(prefix + [tokens], dim=1)
    outs = []
    for block in model.blocks:
        h = block(h)
        outs.append(model.norm(h))
    parts = [o[:, 0] for o in outs[-n:]]
    if avgpool:
        parts.append(outs[-1][:, 1 + model.num_registers:].mean(dim=1))
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("registers", [0, 2])
@pytest.mark.parametrize("n, avgpool", [(1, True), (2, False), (3, True)])
def test_readout_equals_the_tokens_read_by_hand(registers, n, avgpool):
    model = vit(num_registers=registers)
    x = torch.randn(4, 1, 16, 16)
    readout = ViTReadout(model, n, avgpool)
    with torch.no_grad():
        got, expected = readout(x), by_hand(model, x, n, avgpool)
    assert got.shape == (4, 32 * (n + avgpool)) and readout.num_features == 32 * (n + avgpool)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the last [cls] is the backbone's own feature, and no hook is left behind
        torch.testing.assert_close(got[:, 32 * (n - 1):32 * n], model(x), rtol=1e-5, atol=1e-5)
    assert all(not block._forward_hooks for block in model.blocks)


def test_the_defaults_are_the_backbone_itself_and_misuse_is_refused_by_name():
    model = vit()
    assert vit_readout(model) is model and vit_readout(model, 1, False) is model
    cnn = build_backbone("small_cnn", 1, 16, {"width": 4})
    cnn.arch = "small_cnn"
    with pytest.raises(ConfigError, match="backbone 'small_cnn' has no transformer blocks"):
        vit_readout(cnn, 4)
    with pytest.raises(ConfigError, match="between 1 and the backbone's 3 blocks, got 4"):
        vit_readout(model, 4)


@pytest.fixture
def vit_checkpoint(tmp_path):
    return saved_vit(tmp_path / "backbone.pt", KWARGS, DATA)


def probe(capsys, checkpoint, *flags) -> dict:
    code = cli_main(["linear-probe", "--checkpoint", str(checkpoint), "--data", "digits", "--labels-per-class", "4",
                     "--epochs", "5", "--device", "cpu", "--json", *flags])
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_linear_probe_and_knn_commands_read_the_last_blocks(vit_checkpoint, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_KIT_CACHE", str(tmp_path / "cache"))
    plain = probe(capsys, vit_checkpoint)
    again = probe(capsys, vit_checkpoint, "--n-last-blocks", "1")
    dinov2 = probe(capsys, vit_checkpoint, "--n-last-blocks", "3", "--avgpool")
    assert plain["top1"] == again["top1"]  # 1 block without avgpool: the backbone's own features
    assert dinov2["top1"] != plain["top1"]  # 4 x 32 features, another probe
    assert cli_main(["knn", "--checkpoint", str(vit_checkpoint), "--data", "digits", "--device", "cpu",
                     "--n-last-blocks", "2", "--json"]) == 0
    assert 0.0 < json.loads(capsys.readouterr().out)["top1"] <= 1.0
    assert cli_main(["knn", "--checkpoint", str(vit_checkpoint), "--data", "digits", "--n-last-blocks", "0"]) == 2
    assert "--n-last-blocks: 0 is outside [1, 64]" in capsys.readouterr().err  # the parser bounds the count
    assert cli_main(["linear-probe", "--checkpoint", str(vit_checkpoint), "--data", "digits",
                     "--n-last-blocks", "9"]) == 2
    assert "between 1 and the backbone's 3 blocks, got 9" in capsys.readouterr().err


def test_recipe_eval_stages_take_the_keys():
    recipe = validate_recipe({"stages": [
        {"name": "probe", "method": "linear_probe", "checkpoint": "x.pt", "data": "digits", "n_last_blocks": 4,
         "avgpool": True},
        {"name": "knn", "method": "knn", "checkpoint": "x.pt", "data": "digits"}]}, "test")
    assert (recipe.stages[0].n_last_blocks, recipe.stages[0].avgpool) == (4, True)
    assert (recipe.stages[1].n_last_blocks, recipe.stages[1].avgpool) == (1, False)
    with pytest.raises(ConfigError, match="n_last_blocks"):
        validate_recipe({"stages": [{"name": "probe", "method": "linear_probe", "checkpoint": "x.pt",
                                     "n_last_blocks": 0}]}, "test")


def test_a_recipe_reading_the_last_blocks_of_what_it_trains_is_checked_before_training(tmp_path):
    """A CNN, or more blocks than the trained ViT has, is refused before the training stage runs (no run dir)."""
    from ssl_kit.runner import check_readouts, run_recipe

    def recipe(backbone: dict, **keys):
        return validate_recipe({"stages": [
            {"name": "pretrain", "method": "simclr", "data": {"dataset": "digits", "image_size": 16},
             "backbone": backbone},
            {"name": "probe", "method": "linear_probe", **keys}]}, "test")

    cnn = {"name": "small_cnn", "kwargs": {"width": 4}}
    with pytest.raises(ConfigError, match=r"^stages\[probe\]: n_last_blocks / avgpool .* backbone 'small_cnn' has no"):
        run_recipe(recipe(cnn, avgpool=True), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    vit2 = {"name": "vit_tiny", "kwargs": {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2}}
    with pytest.raises(ConfigError, match=r"^stages\[probe\]: .*between 1 and the backbone's 2 blocks, got 3"):
        check_readouts(recipe(vit2, n_last_blocks=3))
    check_readouts(recipe(vit2, n_last_blocks=2, avgpool=True))  # fits
    check_readouts(recipe(cnn))  # the defaults read any backbone


def test_a_checkpoint_read_after_training_is_checked_before_training(tmp_path):
    """An evaluation stage's own `checkpoint` is read before the training stage before it runs: a CNN, too many
    blocks, or a missing file is refused at once, naming the stage."""
    from ssl_kit.engine.checkpoint import atomic_save, backbone_record
    from ssl_kit.runner import check_readouts, run_recipe

    cnn = build_backbone("small_cnn", 1, 16, {"width": 4})
    atomic_save(backbone_record("small_cnn", {"width": 4}, DATA, cnn), tmp_path / "cnn.pt")
    vit_path = saved_vit(tmp_path / "vit.pt", KWARGS, DATA)

    def recipe(checkpoint, **keys):
        return validate_recipe({"stages": [
            {"name": "pretrain", "method": "simclr", "data": {"dataset": "digits", "image_size": 16},
             "backbone": {"name": "small_cnn", "kwargs": {"width": 4}}},
            {"name": "probe", "method": "linear_probe", "checkpoint": str(checkpoint), "data": "digits",
             **keys}]}, "test")

    with pytest.raises(ConfigError, match=r"^stages\[probe\]: n_last_blocks / avgpool .* backbone 'small_cnn' has"):
        run_recipe(recipe(tmp_path / "cnn.pt", avgpool=True), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"^stages\[probe\]: .*between 1 and the backbone's 3 blocks, got 4"):
        check_readouts(recipe(vit_path, n_last_blocks=4))
    with pytest.raises(Exception, match=r"stages\[probe\]\.checkpoint"):
        check_readouts(recipe(tmp_path / "missing.pt", n_last_blocks=2))
    check_readouts(recipe(vit_path, n_last_blocks=3, avgpool=True))  # fits
    check_readouts(recipe(tmp_path / "missing.pt"))  # the defaults are not checked before training
