"""Exports load strictly in the target library with our outputs; impossible, corrupted and mismatched exports are
refused; `ssl-kit export --bundle` + `ssl-kit run --from-bundle` reproduce the run's summary."""
from __future__ import annotations

import json
import shutil

import cv2
import PIL
import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from ssl_kit.cli import main
from ssl_kit.errors import CheckpointError
from ssl_kit.models import export as export_module
from ssl_kit.models.export import build_exported, load_exported, write_export
from ssl_kit.models.registry import build_backbone


def record_of(arch, channels, size, kwargs):
    """A backbone record with random weights and random BatchNorm statistics."""
    torch.manual_seed(0)
    backbone = build_backbone(arch, channels, size, kwargs)
    for layer in backbone.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.normal_(0, 0.1)
            layer.running_var.uniform_(0.5, 1.5)
    data = {"channels": channels, "image_size": size, "mean": [0.5] * channels, "std": [0.25] * channels}
    return {"arch": arch, "kwargs": kwargs, "data": data, "state_dict": backbone.state_dict()}, backbone.eval()


def in_target_library(config: dict, out) -> nn.Module:
    """Rebuild the exported model with the target library's own calls (not ssl_kit's) and load it strictly."""
    kwargs = dict(config["kwargs"])
    if config["library"] == "timm":
        model = timm.create_model(config["model"], pretrained=False, **kwargs)
    else:
        model = torchvision.models.get_model(config["model"], weights=None, **kwargs)
        for path, spec in config["replace"].items():
            parent, _, child = path.rpartition(".")
            new = nn.Identity() if spec["type"] == "Identity" else nn.Conv2d(
                spec["in_channels"], spec["out_channels"], spec["kernel_size"], spec["stride"], spec["padding"],
                bias=spec["bias"])
            setattr(model.get_submodule(parent) if parent else model, child, new)
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    return model.eval()


CASES = [("resnet18", 1, 32, {}, "torchvision"),  # small-image stem: conv1 and maxpool rebuilt as recorded
         ("resnet18", 3, 32, {"small_stem": False}, "timm"),
         ("vit_tiny", 1, 16, {"depth": 2, "dim": 32, "heads": 2}, "timm"),
         ("vit_tiny", 3, 16, {"depth": 2, "dim": 32, "heads": 2, "global_pool": True}, "timm"),
         ("timm:vit_tiny_patch16_224", 1, 16, {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}, "timm"),
         ("timm:convnext_atto", 3, 32, {}, "timm"),
         ("torchvision:resnet18", 1, 32, {}, "torchvision"),
         ("torchvision:resnet18", 3, 32, {}, "timm")]


@pytest.mark.parametrize("arch,channels,size,kwargs,target", CASES, ids=[f"{c[0]}-{c[4]}" for c in CASES])
def test_export_loads_strict_in_the_target_library_with_equal_outputs(tmp_path, arch, channels, size, kwargs,
                                                                       target):
    record, ours = record_of(arch, channels, size, kwargs)
    result = write_export(record, target, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["library"] == target and config["input_size"] == [channels, size, size]
    model = in_target_library(config, tmp_path / "out")
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        assert torch.allclose(model(x), ours(x), atol=1e-5)
    assert result["max_abs_diff"] <= 1e-5
    card = (tmp_path / "out" / "README.md").read_text()
    assert result["sha256"] in card and f"`{target}` / `{config['model']}`" in card


def test_exports_without_a_counterpart_are_refused_and_safetensors_always_works(tmp_path):
    with pytest.raises(CheckpointError, match=r"cannot export 'resnet18' to timm: our small-image stem"):
        write_export(record_of("resnet18", 3, 32, {})[0], "timm", tmp_path / "a")
    for arch, kwargs in (("small_cnn", {"width": 8}), ("wide_resnet28_2", {})):
        record, ours = record_of(arch, 3, 32, kwargs)
        with pytest.raises(CheckpointError, match=f"cannot export '{arch}' to torchvision: it has no torchvision"):
            write_export(record, "torchvision", tmp_path / "b")
        assert write_export(record, "safetensors", tmp_path / arch)["max_abs_diff"] == 0.0
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(load_exported(tmp_path / arch)(x), ours(x))
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_verification_refuses_wrong_weights_and_leaves_no_files(tmp_path, monkeypatch):
    record, _ = record_of("torchvision:resnet18", 3, 32, {})
    real = export_module.export_layout

    def perturbed(rec, target):
        config, state = real(rec, target)
        state["layer4.1.conv2.weight"] = state["layer4.1.conv2.weight"] * 1.01
        return config, state

    monkeypatch.setattr(export_module, "export_layout", perturbed)
    with pytest.raises(CheckpointError, match=r"export refused: torchvision resnet18 outputs differ from ours by up"):
        write_export(record, "torchvision", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # a refused export into a new folder leaves none

    def missing_key(rec, target):
        config, state = real(rec, target)
        del state["bn1.running_mean"]
        return config, state

    monkeypatch.setattr(export_module, "export_layout", missing_key)
    with pytest.raises(CheckpointError, match=r"does not load strictly into torchvision resnet18: .*bn1\.running_mean"):
        write_export(record, "torchvision", tmp_path / "out")


READ_BACK = CASES + [("vit_tiny", 1, 16, {"depth": 2, "dim": 32, "heads": 2, "num_registers": 2}, "safetensors"),
                     ("resnet18", 1, 32, {}, "safetensors")]


@pytest.mark.parametrize("arch,channels,size,kwargs,target", READ_BACK, ids=[f"{c[0]}-{c[4]}" for c in READ_BACK])
def test_an_export_folder_reads_back_as_a_checkpoint_with_the_same_features(tmp_path, arch, channels, size, kwargs,
                                                                              target):
    """`--checkpoint EXPORT_DIR` on every evaluation command: the folder rebuilds a backbone with our features and
    the input format config.json records (a timm export as timm's model, the others as the backbone exported)."""
    from ssl_kit import load_backbone

    record, ours = record_of(arch, channels, size, kwargs)
    write_export(record, target, tmp_path / "out")
    back = load_backbone(tmp_path / "out")
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), atol=1e-5, rtol=1e-5)
    info = back.data_info
    assert (info["channels"], info["image_size"], info["mean"], info["std"]) == \
        (channels, size, [0.5] * channels, [0.25] * channels)


def test_an_export_folder_read_as_a_checkpoint_is_checked(tmp_path, capsys):
    from ssl_kit.engine.checkpoint import resolve_checkpoint

    write_export(record_of("vit_tiny", 1, 16, {"depth": 2, "dim": 32, "heads": 2})[0], "timm", tmp_path / "a")
    weights = tmp_path / "a" / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"x")
    assert main(["knn", "--checkpoint", str(tmp_path / "a"), "--data", "digits"]) == 2
    assert "model.safetensors does not match the sha256 recorded in config.json" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("{}")
    (tmp_path / "b" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"config.json is not an ssl-kit export's \(KeyError: 'library'\)"):
        resolve_checkpoint(tmp_path / "b")


def test_corrupted_or_swapped_export_is_refused(tmp_path):
    write_export(record_of("torchvision:resnet18", 3, 32, {})[0], "timm", tmp_path / "a")
    write_export(record_of("timm:convnext_atto", 3, 32, {})[0], "timm", tmp_path / "b")
    assert isinstance(load_exported(tmp_path / "a"), nn.Module)
    weights = tmp_path / "a" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="does not match the sha256 recorded in config.json"):
        load_exported(tmp_path / "a")
    (tmp_path / "b" / "model.safetensors").replace(weights)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["sha256"] = export_module.sha256_file(weights)  # even with a matching hash, the layout must fit
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not fit timm resnet18"):
        load_exported(tmp_path / "a")
    with pytest.raises(CheckpointError, match="unknown library 'keras'"):
        build_exported({**config, "library": "keras"})


def test_env_json_records_the_variables_that_change_cpu_numerics(tmp_path, monkeypatch):
    from ssl_kit.run_dir import NUMERICS_ENV_VARS, write_env

    for name in NUMERICS_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    write_env(tmp_path)
    assert json.loads((tmp_path / "env.json").read_text())["numerics_env"] == {}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SSL_KIT_UNRELATED", "x")
    write_env(tmp_path)
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["numerics_env"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    assert env["torch_threads"] == torch.get_num_threads()


def test_cli_export_bundle_reruns_to_the_same_summary(tmp_path, capsys, tiny_recipe):
    from ssl_kit.bundle import compare_runs
    from ssl_kit.runner import run_recipe
    from tests.conftest import tiny_stage

    run_dir, summary = run_recipe(tiny_recipe(tiny_stage(train={"steps": 6})), tmp_path / "run")
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert env["timm"] == timm.__version__ and env["world_size"] == 1 and isinstance(env["command"], list)
    assert env["pillow"] == PIL.__version__ and cv2.__version__.startswith(env["opencv"].rsplit(".", 1)[0])
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu"]
    assert env["torch_threads"] == torch.get_num_threads() and env["libc"].startswith("glibc")
    assert main(["export", "--checkpoint", str(run_dir), "--to", "safetensors", "--out", str(tmp_path / "exp"),
                 "--bundle", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["max_abs_diff"] == 0.0 and result["bundle"].endswith("bundle.tar.gz")
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "supervised: supervised" in card and "supervised/test/top1" in card
    assert main(["run", "--from-bundle", result["bundle"], "--out", str(tmp_path / "rerun"), "--json"]) == 0
    rerun = json.loads(capsys.readouterr().out)
    assert rerun["bundle_matches"] is True and rerun["bundle_environment_differences"] == {}
    assert rerun["supervised/test/top1"] == summary["supervised/test/top1"]
    tampered = tmp_path / "tampered"
    shutil.copytree(run_dir, tampered)
    changed = dict(summary, **{"supervised/test/top1": summary["supervised/test/top1"] + 0.01})
    (tampered / "summary.json").write_text(json.dumps(changed))
    (tampered / "env.json").write_text(json.dumps(dict(env, kornia="0.7.0", command=["elsewhere"])))
    comparison = compare_runs(tampered, tmp_path / "rerun")
    assert list(comparison["differences"]) == ["supervised/test/top1"]
    assert comparison["environment"] == {"kornia": ["0.7.0", env["kornia"]]}  # the command line is not compared
    assert main(["export", "--checkpoint", str(run_dir), "--to", "timm", "--out", str(tmp_path / "no")]) == 2
    assert "cannot export 'small_cnn' to timm" in capsys.readouterr().err
