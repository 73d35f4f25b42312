"""Other repos' checkpoint layouts: each is written exactly as that repo saves it, loaded through
resolve_checkpoint / the CLI, and the features must equal the source module's; errors name keys and shapes."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from ssl_kit.cli import main
from ssl_kit.engine.checkpoint import build_from_record, resolve_checkpoint
from ssl_kit.errors import CheckpointError
from ssl_kit.models.registry import build_backbone

SMALL_TIMM = "timm:resnet18,channels=[8,16,32,64],stem_width=8"


def _randomise_bn(module: nn.Module) -> nn.Module:
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.normal_(0, 0.1)
            layer.running_var.uniform_(0.5, 1.5)
    return module.eval()


def _tiny_timm_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
                             depth=2, embed_dim=32, num_heads=2).eval()


def _small_timm_resnet(num_classes=0):
    return _randomise_bn(timm.create_model("resnet18", pretrained=False, num_classes=num_classes,
                                           channels=[8, 16, 32, 64], stem_width=8))


def _source_and_file(layout, tmp_path):
    """-> (the module whose features the loaded backbone must reproduce, input size, reference, layout forced?)"""
    path = tmp_path / f"{layout}.pth"
    if layout == "mae":
        vit = _tiny_timm_vit()
        state = {**vit.state_dict(), "mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 32),
                 "decoder_pos_embed": torch.zeros(1, 17, 16), "decoder_pred.bias": torch.zeros(48)}
        torch.save({"model": state, "optimizer": {}, "epoch": 399}, path)
        return vit, 16, f"{path}@timm:vit_tiny_patch16_224,depth=2,embed_dim=32,num_heads=2"
    if layout == "dino":
        net = _small_timm_resnet()
        head = {"head.mlp.0.weight": torch.zeros(4, 64), "head.last_layer.weight_g": torch.ones(8, 1)}
        teacher = {**{f"backbone.{k}": v for k, v in net.state_dict().items()}, **head}
        student = {f"module.{k}": torch.zeros_like(v) for k, v in teacher.items()}
        torch.save({"student": student, "teacher": teacher, "epoch": 100}, path)
        return net, 32, f"{path}@{SMALL_TIMM}"
    if layout == "mocov3":
        net = _randomise_bn(torchvision.models.resnet18(weights=None))
        net.fc = nn.Sequential(nn.Linear(512, 16), nn.ReLU(), nn.Linear(16, 8))  # MoCo v3's projector replaces fc
        state = {f"module.base_encoder.{k}": v for k, v in net.state_dict().items()}
        state.update({f"module.momentum_encoder.{k}": v for k, v in net.state_dict().items()})
        state["module.predictor.0.weight"] = torch.zeros(16, 8)
        torch.save({"epoch": 300, "arch": "resnet18", "state_dict": state, "optimizer": {}}, path)
        net.fc = nn.Identity()
        return net, 32, str(path)  # the file records 'arch': resnet18 -> torchvision:resnet18
    if layout == "solo-learn":
        ours = _randomise_bn(build_backbone("resnet18", 3, 32, {"small_stem": True}))
        state = {f"backbone.{k[len('net.'):]}": v for k, v in ours.state_dict().items()}
        state.update({"projector.0.weight": torch.zeros(8, 512), "classifier.weight": torch.zeros(10, 512),
                      "momentum_backbone.conv1.weight": torch.zeros(64, 3, 3, 3)})
        torch.save({"epoch": 999, "global_step": 1, "pytorch-lightning_version": "2.0.0", "state_dict": state}, path)
        return ours, 32, f"{path}@resnet18"
    if layout == "lightly":
        from lightly.models.modules import SimCLRProjectionHead

        resnet = _randomise_bn(torchvision.models.resnet18(weights=None))

        class LightlySimCLR(nn.Module):  # as lightly's tutorials build it
            def __init__(self):
                super().__init__()
                self.backbone = nn.Sequential(*list(resnet.children())[:-1])
                self.projection_head = SimCLRProjectionHead(512, 16, 8)

        model = LightlySimCLR().eval()
        torch.save(model.state_dict(), path)
        return nn.Sequential(model.backbone, nn.Flatten()), 32, f"{path}@torchvision:resnet18"
    if layout == "torchvision":
        net = _randomise_bn(torchvision.models.resnet18(weights=None))
        torch.save(net.state_dict(), path)  # with its ImageNet classifier fc.*
        net.fc = nn.Identity()
        return net, 32, f"{path}@torchvision:resnet18"
    if layout == "timm-safetensors":
        net = _small_timm_resnet(num_classes=10)
        save_file(net.state_dict(), str(tmp_path / "model.safetensors"))
        net.reset_classifier(0)
        return net, 32, f"{tmp_path / 'model.safetensors'}@{SMALL_TIMM}"
    raise AssertionError(layout)


EXPECTED_LAYOUT = {"timm-safetensors": "state-dict", "torchvision": "state-dict"}


@pytest.mark.parametrize("layout", ["mae", "dino", "mocov3", "solo-learn", "lightly", "torchvision",
                                    "timm-safetensors"])
def test_each_layout_loads_with_the_source_features(tmp_path, layout):
    source, size, reference = _source_and_file(layout, tmp_path)
    record = resolve_checkpoint(reference)
    assert record["source"]["layout"] == EXPECTED_LAYOUT.get(layout, layout)
    backbone = build_from_record(record).eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(backbone(x), source(x), atol=1e-5)
    assert record["data"]["image_size"] == size if layout == "mae" else record["data"]["channels"] == 3


def test_layout_prefix_forces_and_dino_student(tmp_path):
    _, _, reference = _source_and_file("dino", tmp_path)
    record = resolve_checkpoint("dino-student:" + reference)  # the student (module.backbone.) is all zeros here
    assert record["source"]["layout"] == "dino-student"
    assert all(float(v.abs().sum()) == 0 for k, v in record["state_dict"].items() if v.is_floating_point())
    assert "head.mlp.0.weight" in record["source"]["dropped"]


def test_foreign_errors_name_what_is_wrong(tmp_path):
    _, _, reference = _source_and_file("solo-learn", tmp_path)
    path = reference.split("@")[0]
    with pytest.raises(CheckpointError, match=r"does not record its architecture: pass --arch timm:NAME"):
        resolve_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"missing keys: net\.layer1\.2\.conv1\.weight"):
        resolve_checkpoint(path, arch="resnet34")
    state = torch.load(path, weights_only=True)
    state["state_dict"]["backbone.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.ckpt")
    with pytest.raises(CheckpointError, match=r"unexpected keys: net\.extra\.weight"):
        resolve_checkpoint(f"{tmp_path / 'extra.ckpt'}@resnet18")
    _, _, timm_reference = _source_and_file("timm-safetensors", tmp_path)
    wider = timm_reference.replace("64]", "128]")
    with pytest.raises(CheckpointError, match=r"shape mismatch at 'model\.layer4\.0\.conv1\.weight': the file has "
                                              r"\(64, 32, 3, 3\), timm:resnet18,.* expects \(128, 32, 3, 3\)"):
        resolve_checkpoint(wider)
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.layer1\.0\.downsample"):
        resolve_checkpoint(timm_reference.split("@")[0] + "@timm:resnet18")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        resolve_checkpoint(f"{tmp_path / 'bad.safetensors'}@resnet18")


def test_cli_knn_and_recipe_init_from_a_dino_checkpoint(tmp_path, capsys):
    from ssl_kit.config import validate_recipe
    from ssl_kit.runner import run_recipe
    from tests.conftest import tiny_stage

    _, _, reference = _source_and_file("dino", tmp_path)
    path, arch = reference.split("@")
    assert main(["knn", "--checkpoint", f"dino:{path}", "--arch", arch, "--data", "digits", "--image-size", "16",
                 "--k", "5", "--json"]) == 0
    assert 0.1 < json.loads(capsys.readouterr().out)["top1"] <= 1
    stage = tiny_stage("finetune", "supervised", backbone={"name": "timm:resnet18", "kwargs": {}},
                       data={"dataset": "digits", "image_size": 16, "channels": 3},
                       init={"checkpoint": f"dino:{path}@{arch}"}, train={"steps": 2, "batch_size": 16})
    run_dir, summary = run_recipe(validate_recipe({"seed": 0, "name": "ft", "stages": [stage]}), tmp_path / "run")
    record = torch.load(run_dir / "backbone.pt", weights_only=True)
    assert record["arch"] == "timm:resnet18" and record["kwargs"] == {"channels": [8, 16, 32, 64], "stem_width": 8}
    assert 0 <= summary["finetune/test/top1"] <= 1


@pytest.mark.parametrize("kwargs", [{"reg_tokens": 2}, {"reg_tokens": 4, "no_embed_class": True}],
                         ids=["classic-table", "dinov2-table"])
def test_timm_vit_with_registers_loads_with_its_size_and_features(tmp_path, kwargs):
    """A timm ViT with register tokens saved as safetensors (DINOv2-reg's table has no cls/register rows): the
    image size is read from the position table's patch rows, and the loaded backbone's features equal timm's."""
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, embed_dim=32,
                               depth=2, num_heads=2, **kwargs).eval()
    with torch.no_grad():
        source.reg_token.normal_()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "reg.safetensors")
    arch = "timm:vit_tiny_patch16_224," + ",".join(f"{k}={v}" for k, v in
                                                   {"embed_dim": 32, "depth": 2, "num_heads": 2, **kwargs}.items())
    record = resolve_checkpoint(f"{tmp_path / 'reg.safetensors'}@{arch}")
    assert record["data"]["image_size"] == 32
    backbone = build_from_record(record).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(backbone(x), source(x), atol=1e-5)
