"""timm and torchvision models as trained backbones: the timm ViT adapter matches timm's own forward and serves
MAE; timm/torchvision backbones train under SimCLR, FixMatch and DINO and reload from backbone.pt alone."""
from __future__ import annotations

import json

import pytest
import timm
import torch

import ssl_kit
from ssl_kit.config import validate_recipe
from ssl_kit.errors import ConfigError
from ssl_kit.models.registry import build_backbone
from ssl_kit.models.vit import VisionTransformer
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage

TIMM_RESNET = {"name": "timm:resnet18", "kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}}
TORCHVISION_NET = {"name": "torchvision:shufflenet_v2_x0_5", "kwargs": {}}
TIMM_VIT_KWARGS = {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}


def test_timm_vit_adapter_is_timms_model_with_our_vit_interface():
    from ssl_kit.methods.param_groups import layer_decay_groups

    ours = build_backbone("timm:vit_tiny_patch16_224", 1, 16, TIMM_VIT_KWARGS).eval()
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, in_chans=1, img_size=16,
                                  **TIMM_VIT_KWARGS).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)  # the adapter's keys are timm's own
    x = torch.randn(3, 1, 16, 16)
    assert isinstance(ours, VisionTransformer) and ours.num_features == 32 and (ours.grid, ours.patch_size) == (4, 4)
    assert torch.allclose(ours(x), reference(x), atol=1e-6)
    assert torch.allclose(ours.encode(ours.embed(x)), reference.forward_features(x), atol=1e-6)
    visible = ours.embed(x)[:, :5]
    assert ours.encode(visible).shape == (3, 6, 32)  # cls + the 5 visible tokens only
    assert ours.embed(torch.randn(2, 1, 8, 8)).shape == (2, 4, 32)  # other grids: position table resampled
    scales = {g.name: g.lr_scale for g in layer_decay_groups(ours, 0.5)}
    assert scales == pytest.approx({"layer0": 0.125, "layer1": 0.25, "layer2": 0.5, "layer3": 1.0})


def test_library_backbone_kwargs_and_errors():
    net = build_backbone("timm:resnet18", 2, 32, {**TIMM_RESNET["kwargs"], "drop_path_rate": 0.1})
    assert net(torch.randn(2, 2, 32, 32)).shape == (2, 64) and net.model.conv1.in_channels == 2
    tv = build_backbone("torchvision:resnet18", 1, 32, {})
    assert tv.num_features == 512 and tv.model.conv1.in_channels == 1 and tv.classifier_name == "fc"
    with pytest.raises(ConfigError, match="unknown timm model 'resnet19'"):
        build_backbone("timm:resnet19", 3, 32)
    with pytest.raises(ConfigError, match="kwarg 'num_classes' is set by ssl_kit"):
        build_backbone("timm:resnet18", 3, 32, {"num_classes": 10})
    with pytest.raises(ConfigError, match="unknown torchvision model 'resnet19'"):
        build_backbone("torchvision:resnet19", 3, 32)
    with pytest.raises(ConfigError, match="no class token"):
        build_backbone("timm:vit_tiny_patch16_224", 3, 16, {**TIMM_VIT_KWARGS, "class_token": False,
                                                            "global_pool": "avg"})


@pytest.mark.parametrize("no_embed_class", [False, True], ids=["classic-table", "no-embed-class"])
def test_timm_vit_with_registers_is_timms_forward(no_embed_class):
    """timm ViTs with register tokens, with a position row per prefix token (timm's classic layout) or none
    (DINOv2's no_embed_class): the adapter's state dict is timm's, its features equal timm's, encode drops the
    registers (cls + patches, as our ViT), other grids resample the patch rows only, reg_token is layer 0."""
    import timm

    from ssl_kit.methods.param_groups import layer_decay_groups
    from ssl_kit.models.foreign import position_grid

    kwargs = {**TIMM_VIT_KWARGS, "reg_tokens": 3, "no_embed_class": no_embed_class}
    ours = build_backbone("timm:vit_tiny_patch16_224", 1, 16, kwargs).eval()
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, in_chans=1, img_size=16,
                                  **kwargs).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    assert ours.num_registers == 3 and ours.pos_embed.shape[1] == (16 if no_embed_class else 20)
    with torch.no_grad():
        ours.reg_token.normal_(std=1.0)  # registers that matter: a wrong position or order changes the features
        reference.reg_token.copy_(ours.reg_token)
    x = torch.randn(3, 1, 16, 16)
    assert torch.allclose(ours(x), reference(x), atol=1e-5)
    full = reference.forward_features(x)  # (N, 1 + 3 + 16, D)
    assert torch.allclose(ours.encode(ours.embed(x)), torch.cat([full[:, :1], full[:, 4:]], dim=1), atol=1e-5)
    assert ours.encode(ours.embed(x)[:, :5]).shape == (3, 6, 32)
    assert ours.embed(torch.randn(2, 1, 8, 8)).shape == (2, 4, 32)
    layer0 = next(g for g in layer_decay_groups(ours, 0.5) if g.name == "layer0")
    assert any(p is ours.reg_token for p in layer0.params)
    assert position_grid({k: v for k, v in ours.state_dict().items()}) == 4


def _train(tmp_path, method, backbone, **extra):
    stage = tiny_stage("pretrain", method, backbone=backbone,
                       train={"steps": 2, "batch_size": 16, "checkpoint_every_steps": 2}, **extra)
    recipe = validate_recipe({"seed": 0, "name": "interop", "stages": [stage]})
    return run_recipe(recipe, tmp_path / "run")


METHOD_EXTRA = {"simclr": {"proj_hidden_dim": 16, "proj_dim": 8},
                "fixmatch": {"data": {"dataset": "digits", "image_size": 16, "labels_per_class": 4}},
                "dino": {"out_dim": 16, "head_hidden_dim": 16, "bottleneck_dim": 8}}


@pytest.mark.parametrize("method", ["simclr", "fixmatch", "dino"])
@pytest.mark.parametrize("backbone", [TIMM_RESNET, TORCHVISION_NET], ids=["timm", "torchvision"])
def test_library_backbones_train_and_reload_from_backbone_pt(tmp_path, method, backbone):
    run_dir, summary = _train(tmp_path, method, backbone, **METHOD_EXTRA[method])
    assert summary["pretrain/steps"] == 2
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"kind": "step"' in line]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    record = torch.load(run_dir / "backbone.pt", weights_only=True)
    assert record["arch"] == backbone["name"] and record["kwargs"] == backbone["kwargs"]
    loaded = ssl_kit.load_backbone(run_dir)
    for key, value in record["state_dict"].items():
        assert torch.equal(loaded.state_dict()[key], value), key
    fresh = build_backbone(backbone["name"], 1, 16, backbone["kwargs"])
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in record["state_dict"].items()
               if v.is_floating_point())
    assert loaded(torch.rand(2, 1, 16, 16)).shape == (2, loaded.num_features)


def test_mae_trains_a_timm_vit_on_visible_patches_only(tmp_path):
    from ssl_kit.data.pipeline import DataInfo
    from ssl_kit.methods.masked import MAE

    backbone = {"name": "timm:vit_tiny_patch16_224", "kwargs": TIMM_VIT_KWARGS}
    extra = {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2,
             "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}}
    stage = tiny_stage("pretrain", "mae", backbone=backbone, **extra)
    cfg = validate_recipe({"seed": 0, "stages": [stage]}).stages[0]
    vit = build_backbone(backbone["name"], 1, 16, backbone["kwargs"])
    method = MAE(cfg, vit, DataInfo(10, list("0123456789"), 1, 16, [0.5], [0.25], "digits"))
    encoded, mask, restore = method.encode_visible(torch.rand(3, 1, 16, 16))
    assert encoded.shape == (3, 1 + 4, 32) and mask.sum(1).tolist() == [12, 12, 12]  # 25% of 16 patches encoded
    assert method.decode(encoded, restore).shape == (3, 16, 16)
    run_dir, summary = _train(tmp_path, "mae", backbone, **extra)
    losses = [json.loads(line)["reconstruction_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"kind": "step"' in line]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses)
    loaded = ssl_kit.load_backbone(run_dir / "backbone.pt")
    assert type(loaded).__name__ == "TimmViT" and loaded.arch == "timm:vit_tiny_patch16_224"
