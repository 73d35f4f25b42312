"""`ssl-kit export --to onnx`: model.onnx (opset 18, dynamic batch) runs in onnxruntime with our backbone's outputs
for every architecture family; a large difference, a missing package and a failing exporter are handled; a
`--to timm` folder loads by name with timm.create_model("local-dir:OUT", pretrained=True), without the hub."""
from __future__ import annotations

import json
import socket

import onnx
import onnxruntime
import pytest
import timm
import torch

from ssl_kit.cli import main
from ssl_kit.engine.checkpoint import atomic_save, backbone_record
from ssl_kit.errors import CheckpointError
from ssl_kit.models import onnx_export
from ssl_kit.models.export import load_exported, sha256_file, write_export
from tests.test_export import record_of


def saved_backbone(tmp_path, arch, channels, size, kwargs):
    """backbone.pt of a freshly initialised backbone (random BatchNorm statistics) -> (path, our backbone)."""
    record, ours = record_of(arch, channels, size, kwargs)
    path = tmp_path / "backbone.pt"
    atomic_save(backbone_record(arch, kwargs, record["data"], ours), path)
    return path, ours


def run_onnx(path, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(session.run(["features"], {"images": x.numpy()})[0]) for x in batches]


CASES = [("small_cnn", 3, 16, {"width": 8}),
         ("resnet18", 1, 16, {}),  # our small-image stem
         ("vit_tiny", 3, 16, {"depth": 2, "dim": 32, "heads": 2, "global_pool": True}),
         ("timm:vit_tiny_patch16_224", 1, 16, {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}),
         ("torchvision:mobilenet_v3_small", 1, 32, {})]  # the stem rebuilt for 1 channel; hardswish, SE


@pytest.mark.parametrize("arch,channels,size,kwargs", CASES, ids=[c[0] for c in CASES])
def test_cli_onnx_export_runs_in_onnxruntime_with_our_outputs_at_any_batch_size(tmp_path, capsys, arch, channels,
                                                                                 size, kwargs):
    checkpoint, ours = saved_backbone(tmp_path, arch, channels, size, kwargs)
    out = tmp_path / "onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--to", "onnx", "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout: exactly the JSON object (the exporter's chatter went elsewhere)
    assert result["library"] == "onnx" and result["opset"] == onnx_export.ONNX_OPSET == 18
    assert result["tolerance"] == onnx_export.ONNX_TOLERANCE and 0 <= result["max_rel_diff"] <= 1e-4
    assert "onnxruntime runs model.onnx (opset 18, dynamic batch)" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.onnx"]
    config = json.loads((out / "config.json").read_text())
    assert config["sha256"] == sha256_file(out / "model.onnx") == result["sha256"]
    assert config["onnx"]["opset"] == 18 and config["input_size"] == [channels, size, size]
    assert config["verified_max_abs_diff"] == result["max_abs_diff"]
    model = onnx.load(str(out / "model.onnx"))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    batches = [torch.randn(batch, channels, size, size) for batch in (1, 3)]  # the traced batch was 2
    for x, got in zip(batches, run_onnx(out / "model.onnx", batches)):
        with torch.no_grad():
            expected = ours(x)
        assert got.shape == expected.shape == (x.shape[0], config["num_features"])
        assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    card = (out / "README.md").read_text()
    assert "opset 18" in card and result["sha256"] in card and "onnxruntime" in card
    with pytest.raises(CheckpointError, match="is an ONNX export: run model.onnx with onnxruntime"):
        load_exported(out)


def test_onnx_export_is_refused_above_the_tolerance_and_leaves_no_files(tmp_path, capsys, monkeypatch):
    checkpoint, _ = saved_backbone(tmp_path, "small_cnn", 3, 16, {"width": 4})
    real = onnx_export.onnx_outputs

    def off_by_a_thousandth(path, batches):  # onnxruntime's outputs moved by 1e-3 of their scale
        outputs = real(path, batches)
        scale = max(float(o.abs().max()) for o in outputs)
        return [o + 1e-3 * scale for o in outputs]

    monkeypatch.setattr(onnx_export, "onnx_outputs", off_by_a_thousandth)
    out = tmp_path / "refused"
    assert main(["export", "--checkpoint", str(checkpoint), "--to", "onnx", "--out", str(out), "--json"]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["type"] == "CheckpointError"
    assert error["message"].startswith("export refused: onnxruntime outputs of model.onnx differ from ours by up to")
    assert "tolerance 0.0001 relative" in error["message"]
    assert not out.exists()  # a refused export into a new folder leaves none
    # a looser --tolerance (relative) accepts the same difference
    assert main(["export", "--checkpoint", str(checkpoint), "--to", "onnx", "--out", str(out), "--json",
                 "--tolerance", "1e-2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tolerance"] == 1e-2 and 5e-4 < result["max_rel_diff"] < 2e-3


def test_missing_onnx_packages_name_the_extra(tmp_path, capsys, monkeypatch):
    checkpoint, _ = saved_backbone(tmp_path, "small_cnn", 3, 16, {"width": 4})
    real = onnx_export.importlib.util.find_spec
    monkeypatch.setattr(onnx_export.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert main(["export", "--checkpoint", str(checkpoint), "--to", "onnx", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "`--to onnx` needs onnxruntime (not installed): pip install 'ssl_kit[onnx]'" in err
    assert not (tmp_path / "o").exists()


def test_a_failing_exporter_is_refused_naming_both_exporters(tmp_path, monkeypatch):
    """The TorchScript exporter failing falls back to the dynamo one; both failing is a clear refusal (the dynamo
    exporter itself is not run here: seconds per model)."""
    record, _ = record_of("small_cnn", 3, 16, {"width": 4})

    def unsupported(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator foo\nmore detail")

    monkeypatch.setattr(onnx_export, "_torchscript_export", unsupported)
    monkeypatch.setattr(onnx_export, "_dynamo_export", unsupported)
    with pytest.raises(CheckpointError, match=r"cannot export 'small_cnn' to onnx: torch.onnx.export failed: "
                                              r"TorchScript exporter: RuntimeError: Unsupported: ONNX export of "
                                              r"operator foo; dynamo exporter: RuntimeError: Unsupported"):
        write_export(record, "onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # a refused export into a new folder leaves none


TIMM_CASES = [("vit_tiny", 1, 16, {"depth": 2, "dim": 32, "heads": 2}),  # our ViT -> timm VisionTransformer
              ("timm:test_resnet", 3, 32, {})]


@pytest.mark.parametrize("arch,channels,size,kwargs", TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
def test_timm_export_loads_by_name_from_a_local_dir_without_the_hub(tmp_path, monkeypatch, arch, channels, size,
                                                                     kwargs):
    record, ours = record_of(arch, channels, size, kwargs)
    write_export(record, "timm", tmp_path / "out")

    def no_network(*args, **kwargs):
        raise AssertionError("local-dir: must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = torch.randn(3, channels, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), ours(x))  # every weight loaded (timm loads strictly here)
    data = timm.data.resolve_data_config({}, model=model)  # timm's own preprocessing reads our input format
    assert data["input_size"] == (channels, size, size)
    assert tuple(data["mean"]) == (0.5,) * channels and tuple(data["std"]) == (0.25,) * channels
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == config["model"] and config["num_classes"] == 0
    assert config["num_features"] == ours.num_features
    assert 'timm.create_model("local-dir:' in (tmp_path / "out" / "README.md").read_text()
    with torch.no_grad():  # the ssl_kit loader still reads the same folder
        assert torch.equal(load_exported(tmp_path / "out")(x), ours(x))
