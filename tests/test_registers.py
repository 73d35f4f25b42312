"""Register tokens (num_registers, Darcet et al. 2024) on ssl_kit's ViT: 0 is the old model bit for bit; with R > 0
encode keeps its (N, 1 + L', D) contract, the registers learn, and the token methods train with them."""
import math

import pytest
import torch

from ssl_kit.config import validate_recipe
from ssl_kit.data.loader import Batch
from ssl_kit.data.pipeline import prepare_data
from ssl_kit.methods import build_method
from ssl_kit.methods.base import Progress
from ssl_kit.models.registry import build_backbone
from ssl_kit.models.vit import VisionTransformer

KW = {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2}


def vit(**extra):
    torch.manual_seed(0)
    return VisionTransformer(16, 4, 1, dim=32, depth=2, heads=2, **extra)


def test_zero_registers_is_the_old_model():
    old, new = vit(), vit(num_registers=0)
    assert list(old.state_dict()) == list(new.state_dict())
    for a, b in zip(old.state_dict().values(), new.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(old(x), new(x))
    assert new.reg_token is None and "reg_token" not in new.state_dict()


def test_registers_keep_the_contract_and_learn():
    model = vit(num_registers=4)
    assert model.reg_token.shape == (1, 4, 32)
    x = torch.randn(3, 1, 16, 16)
    assert model(x).shape == (3, 32)
    assert model.encode(model.embed(x)).shape == (3, 1 + 16, 32)
    assert model.encode(model.embed(x)[:, :5]).shape == (3, 6, 32)  # a visible subset (MAE)
    model(x).pow(2).sum().backward()
    assert model.reg_token.grad is not None and model.reg_token.grad.abs().sum() > 0
    with torch.no_grad():  # the registers are attended to: changing them changes the features
        before = model(x)
        model.reg_token.add_(1.0)
        assert not torch.allclose(before, model(x))
    # the non-register parameters are initialised as without registers
    plain = vit()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name])
    with pytest.raises(ValueError, match="num_registers"):
        vit(num_registers=-1)


@pytest.mark.parametrize("method,extra", [
    ("dinov2", dict(out_dim=16, patch_out_dim=12, head_hidden_dim=16, bottleneck_dim=8, local_crops=2,
                    local_crop_size=0.5, warmup_teacher_temp_epochs=0)),
    ("ibot", dict(out_dim=16, patch_out_dim=16, local_crops=0)),
    ("mae", {}),
])
def test_token_methods_train_with_registers(method, extra):
    backbone = {"name": "vit_tiny", "kwargs": {**KW, "num_registers": 2}}
    stage = {"name": "p", "method": method, "backbone": backbone, "data": {"dataset": "digits", "image_size": 16},
             **extra}
    cfg = validate_recipe({"seed": 0, "stages": [stage]}).stages[0]
    data = prepare_data(cfg.data, 0)
    torch.manual_seed(0)
    model = build_method(method)(cfg, build_backbone("vit_tiny", 1, 16, backbone["kwargs"]), data.info)
    assert model.backbone.num_registers == 2
    out = model.training_step(Batch(x=data.train.images[:8], y=data.train.labels[:8]), Progress(0, 2, 0, 2))
    assert math.isfinite(out["loss"].item())
    out["loss"].backward()
    assert model.backbone.reg_token.grad is not None


def registers_record():
    from tests.test_export import record_of
    kwargs = {"depth": 2, "dim": 32, "heads": 2, "num_registers": 3}
    record, ours = record_of("vit_tiny", 1, 16, kwargs)
    torch.manual_seed(1)  # registers far from their ~0 initialisation, so that dropping them would show
    record["state_dict"]["reg_token"] = torch.randn(1, 3, 32)
    ours.load_state_dict(record["state_dict"])
    return record, ours


def test_backbone_pt_round_trip(tmp_path, capsys):
    from ssl_kit.cli import main
    from ssl_kit.engine.checkpoint import BACKBONE_FORMAT, atomic_save, backbone_record, load_backbone
    _, ours = registers_record()
    data = {"channels": 1, "image_size": 16, "mean": [0.5], "std": [0.25]}
    record = backbone_record("vit_tiny", {"depth": 2, "dim": 32, "heads": 2, "num_registers": 3}, data, ours)
    assert record["format"] == BACKBONE_FORMAT and record["state_dict"]["reg_token"].shape == (1, 3, 32)
    atomic_save(record, tmp_path / "backbone.pt")
    assert main(["info", "--checkpoint", str(tmp_path / "backbone.pt")]) in (0, None)
    assert "arch: vit_tiny" in capsys.readouterr().out  # info prints no kwargs; it reads the record
    loaded = load_backbone(tmp_path / "backbone.pt")
    assert loaded.num_registers == 3
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), ours(x))


def test_timm_export_carries_the_registers(tmp_path):
    import json

    from ssl_kit.models.export import write_export
    from tests.test_export import in_target_library
    record, ours = registers_record()
    result = write_export(record, "timm", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["kwargs"]["reg_tokens"] == 3
    model = in_target_library(config, tmp_path / "out")  # timm.create_model(..., reg_tokens=3), strict load
    assert model.num_prefix_tokens == 4 and torch.equal(model.reg_token, record["state_dict"]["reg_token"])
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), ours(x), atol=1e-5)
    assert result["max_abs_diff"] <= 1e-5
