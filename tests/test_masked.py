"""Masked image modeling: masks, patchify, layer-wise decay, MAE and SimMIM runs."""
import json

import pytest
import torch

from ssl_kit.config import validate_recipe
from ssl_kit.methods.param_groups import layer_decay_groups, vit_layer_id
from ssl_kit.models.masking import block_masking, patchify, random_masking, unpatchify
from ssl_kit.models.vit import VisionTransformer
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage


def test_random_masking_keeps_exact_count_differs_per_sample_and_restores():
    torch.manual_seed(0)
    keep, mask, restore = random_masking(6, 16, 0.75)
    assert keep.shape == (6, 4) and mask.sum(1).tolist() == [12.0] * 6
    assert len({tuple(row.tolist()) for row in mask}) > 1
    shuffle = torch.cat([keep, mask.argsort(1, descending=True)[:, :12]], dim=1)  # any order of the rest
    tokens = torch.arange(16).float().repeat(6, 1)
    kept_values = torch.gather(tokens, 1, keep)
    assert torch.all(torch.gather(mask, 1, keep) == 0)  # kept indices are exactly the unmasked ones
    assert torch.equal(kept_values.sort(1).values, (mask == 0).nonzero()[:, 1].view(6, 4).float())
    noise_order = torch.gather(torch.arange(16).repeat(6, 1), 1, restore.argsort(1))
    assert torch.equal(torch.gather(noise_order, 1, restore), torch.arange(16).repeat(6, 1))
    assert shuffle.shape == (6, 16)


def test_block_masking_exact_count_and_blocky():
    torch.manual_seed(0)
    keep, mask, restore = block_masking(4, 8, 0.5)
    assert mask.sum(1).tolist() == [32.0] * 4 and keep.shape == (4, 32)
    assert torch.all(torch.gather(mask, 1, keep) == 0)
    grid = mask.view(4, 8, 8)
    neighbours = (grid[:, 1:, :] == grid[:, :-1, :]).float().mean()
    assert neighbours > 0.6  # blocks: adjacent patches mostly share their state (random masks: ~0.5)


def test_patchify_unpatchify_identity():
    x = torch.rand(2, 3, 16, 16)
    patches = patchify(x, 4)
    assert patches.shape == (2, 16, 48)
    assert torch.equal(patches[0, 1], x[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(patches, 4, 3), x)


def test_layer_wise_decay_scales():
    vit = VisionTransformer(image_size=16, patch_size=4, in_channels=1, dim=32, depth=3, heads=2)
    assert vit_layer_id("cls_token", 3) == 0 and vit_layer_id("patch_embed.weight", 3) == 0 and vit_layer_id("reg_token", 3) == 0
    assert vit_layer_id("blocks.0.qkv.weight", 3) == 1 and vit_layer_id("blocks.2.mlp.0.bias", 3) == 3
    assert vit_layer_id("norm.weight", 3) == 4
    groups = {g.name: g.lr_scale for g in layer_decay_groups(vit, 0.5)}
    assert groups == pytest.approx({"layer0": 0.0625, "layer1": 0.125, "layer2": 0.25, "layer3": 0.5, "layer4": 1.0})


def mim_stage(method, backbone, **extra):
    return tiny_stage("pretrain", method, backbone=backbone, data={"dataset": "digits", "image_size": 16},
                      optimizer={"name": "adamw", "lr": 1e-3, "lr_scaling": "none", "weight_decay": 0.05,
                                 "betas": [0.9, 0.95]},
                      train={"steps": 40, "batch_size": 64, "log_every": 5}, **extra)


VIT = {"name": "vit_tiny", "kwargs": {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2}}


@pytest.mark.parametrize("method,backbone,extra", [
    ("mae", VIT, {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}),
    ("mae", VIT, {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2, "masking": "block"}),
    ("simmim", VIT, {"mask_ratio": 0.6}),
    ("simmim", {"name": "resnet18", "kwargs": {"small_stem": True}}, {"mask_ratio": 0.6, "train": {"steps": 10, "batch_size": 16, "log_every": 1}}),
])
def test_mim_reconstruction_loss_decreases(tmp_path, method, backbone, extra):
    stage = mim_stage(method, backbone, **{k: v for k, v in extra.items() if k != "train"})
    if "train" in extra:
        stage["train"] = {**stage["train"], **extra["train"]}
    run_dir, _ = run_recipe(validate_recipe({"seed": 0, "name": "m", "stages": [stage]}), tmp_path / "run")
    losses = [json.loads(line)["reconstruction_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"kind": "step"' in line]
    assert losses[-1] < losses[0]
    if method == "mae":
        assert (run_dir / "plots" / "reconstruction_pretrain.png").read_bytes()[:4] == b"\x89PNG"


def test_mae_needs_a_vit(tmp_path):
    from ssl_kit.errors import ConfigError

    stage = mim_stage("mae", {"name": "small_cnn"})
    with pytest.raises(ConfigError, match="MAE needs a ViT backbone"):
        run_recipe(validate_recipe({"seed": 0, "name": "m", "stages": [stage]}), tmp_path / "run")


def test_mae_encoder_sees_only_visible_patches():
    from ssl_kit.data.pipeline import DataInfo
    from ssl_kit.methods.masked import MAE

    cfg = validate_recipe({"seed": 0, "stages": [mim_stage("mae", VIT, decoder_dim=16, decoder_heads=2)]}).stages[0]
    vit = VisionTransformer(image_size=16, patch_size=4, in_channels=1, dim=32, depth=1, heads=2)
    method = MAE(cfg, vit, DataInfo(10, list("0123456789"), 1, 16, [0.5], [0.25], "digits"))
    encoded, mask, restore = method.encode_visible(torch.rand(3, 1, 16, 16))
    assert encoded.shape == (3, 1 + 4, 32)  # cls + 25% of 16 patches
    assert method.decode(encoded, restore).shape == (3, 16, 16)


@pytest.mark.slow
def test_fine_tuned_mae_beats_the_same_vit_from_scratch(tmp_path):
    from ssl_kit.recipe_files import load_yaml
    from ssl_kit.cli import find_recipe

    recipe = load_yaml(find_recipe("mae_digits"))
    pretrain, finetune = recipe["stages"][0], recipe["stages"][1]
    pretrain["train"].update(progress=False)  # the bundled recipe as is: 150 epochs, then 10 labels/class
    finetune["train"].update(progress=False)
    scratch = {**finetune, "name": "scratch", "init": {}, "backbone": pretrain["backbone"]}
    stages = [pretrain, finetune, scratch]
    _, summary = run_recipe(validate_recipe({"seed": 0, "name": "mae", "stages": stages}), tmp_path / "run")
    # measured: 0.869 vs 0.851 (deterministic on the CPU); with only 60 pretraining epochs MAE does not help yet
    assert summary["finetune/test/top1"] > summary["scratch/test/top1"], summary
