"""`ssl-kit export --to onnx`: the backbone as one ONNX graph (model.onnx), dynamic batch axis, verified with
onnxruntime against our PyTorch backbone before anything is written.

  graph        images (batch, C, H, W) float32 -> features (batch, F) float32 (pooled pre-logits); the batch axis
               is dynamic ('batch'), C/H/W are the trained input size.
  exporter     torch.onnx.export(dynamo=False), the TorchScript exporter: in torch 2.14 still shipped (deprecated
               since 2.9 in favour of the torch.export-based one), 4-6x faster on our backbones (0.2-1.8 s against
               4-8 s each on 2 CPU cores) and needs no onnxscript. When it is missing (a later torch), fails on a
               model, or the weights exceed EXTERNAL_DATA_BYTES, torch.onnx.export(dynamo=True) exports instead
               (needs onnxscript; weights in model.onnx.data). config.json records which one wrote the file.
  opset        ONNX_OPSET = 18: the dynamo exporter's own opset (its torchlib is written for 18: no version
               conversion), within the TorchScript exporter's range (<= 20), run by every onnxruntime since 1.14.
  verification onnxruntime (CPU) on seeded random batches of VERIFY_BATCHES images, sizes that differ from the
               traced one (2), so a batch size baked into the graph fails here; max |onnx - torch| divided by the
               largest |feature| of our backbone must stay within the tolerance (ONNX_TOLERANCE = 1e-4 relative).

Weights above EXTERNAL_DATA_BYTES go to model.onnx.data beside model.onnx (ONNX protobufs stop at 2 GiB).
The folder also holds config.json (input size, mean/std, opset, sha256 of the files, the measured difference)
and README.md (model card), as every export does.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import torch

from ..common.files import sha256_file
from ..errors import CheckpointError, SslKitError
from .model_card import model_card

ONNX_OPSET = 18
ONNX_TOLERANCE = 1e-4  # max |onnx - torch| / max |torch features|: float32 reorderings give ~1e-6 (measured)
TRACE_BATCH = 2
VERIFY_BATCHES = (1, 3)
EXTERNAL_DATA_BYTES = 1 << 30
INPUT_NAME, OUTPUT_NAME = "images", "features"
ONNX_PACKAGES = ("onnx", "onnxruntime")  # + onnxscript for the dynamo exporter (checked when it runs)
EXTRA_HINT = "pip install 'ssl_kit[onnx]' (onnx, onnxruntime, onnxscript)"


def require_onnx(packages: tuple[str, ...] = ONNX_PACKAGES) -> None:
    """A clear error naming the extra when a package of the ONNX export is missing."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise SslKitError(f"`--to onnx` needs {', '.join(missing)} (not installed): {EXTRA_HINT}")


def _torchscript_export(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """The TorchScript exporter (dynamo=False), batch axis named dynamic. Its deprecation notice and the tracer's
    warnings (Python bools/ints taken from shapes) are silenced: a shape baked into the graph is caught by the
    verification on other batch sizes than the traced one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


def _dynamo_export(model: torch.nn.Module, example: torch.Tensor, path: Path, external_data: bool) -> None:
    """The torch.export-based exporter (dynamo=True) with a dynamic batch dimension; its progress lines go to
    stderr (stdout is the CLI's --json channel)."""
    require_onnx(("onnxscript",))
    with contextlib.redirect_stdout(sys.stderr):
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=external_data,
                          verbose=False)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def export_graph(model: torch.nn.Module, example: torch.Tensor, path: Path, external_data: bool) -> str:
    """Write `path` (model.onnx) with the TorchScript exporter, or the dynamo exporter when that one is missing,
    fails, or the weights go to external data. -> the exporter's description for config.json. CheckpointError
    naming both failures when neither exports."""
    failures = []
    if not external_data:
        try:
            _torchscript_export(model, example, path)
            return f"torch.onnx.export(dynamo=False) (TorchScript), torch {torch.__version__}"
        except Exception as exc:  # removed from a later torch, or an operator it cannot translate
            failures.append(f"TorchScript exporter: {_first_line(exc)}")
            path.unlink(missing_ok=True)
    try:
        _dynamo_export(model, example, path, external_data)
        return f"torch.onnx.export(dynamo=True), torch {torch.__version__}"
    except SslKitError as exc:
        if not failures:
            raise
        failures.append(str(exc))
    except Exception as exc:  # the exporters raise many types; the first line names the operator
        failures.append(f"dynamo exporter: {_first_line(exc)}")
    raise CheckpointError(f"torch.onnx.export failed: {'; '.join(failures)}")


def onnx_outputs(path: str | Path, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run model.onnx with onnxruntime (CPU) on each batch -> the features as tensors."""
    import onnxruntime  # deferred: optional dependency (ssl_kit[onnx])

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]) for x in batches]


@torch.no_grad()
def verify_onnx(path: str | Path, reference: torch.nn.Module, input_size: list[int], tolerance: float,
                seed: int = 0) -> dict[str, float]:
    """Compare onnxruntime's outputs of `path` with `reference` (eval mode) on seeded random batches of each size in
    VERIFY_BATCHES. -> {"max_abs_diff", "max_rel_diff", "output_scale", "num_features"}; CheckpointError when a
    shape differs or max_rel_diff (= max_abs_diff / output_scale, the largest |feature| of ours) exceeds
    `tolerance`."""
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randn(n, *input_size, generator=generator) for n in VERIFY_BATCHES]
    ours = [reference.eval()(x).float() for x in batches]
    theirs = onnx_outputs(path, batches)
    for x, a, b in zip(batches, ours, theirs):
        if a.shape != b.shape:
            raise CheckpointError(f"export refused: onnxruntime gives features of shape {tuple(b.shape)} for a batch "
                                  f"of {x.shape[0]}, ours {tuple(a.shape)} (is the batch axis dynamic?)")
    difference = max(float((a - b.float()).abs().max()) for a, b in zip(ours, theirs))
    scale = max(float(a.abs().max()) for a in ours)
    relative = difference / max(scale, torch.finfo(torch.float32).tiny)
    if not relative <= tolerance:
        raise CheckpointError(f"export refused: onnxruntime outputs of model.onnx differ from ours by up to "
                              f"{difference:.3g} ({relative:.3g} of the largest feature {scale:.3g}; tolerance "
                              f"{tolerance:g} relative)")
    return {"max_abs_diff": difference, "max_rel_diff": relative, "output_scale": scale,
            "num_features": int(ours[0].shape[-1])}


def onnx_config(record: dict, num_features: int, external_data: bool, exporter: str) -> dict:
    """config.json of an ONNX export (before the sha256 and the measured differences are added)."""
    import onnxruntime  # deferred: optional dependency (ssl_kit[onnx])

    info = record["data"]
    size = [info["channels"], info["image_size"], info["image_size"]]
    return {"library": "onnx", "model": record["arch"], "kwargs": dict(record["kwargs"]), "input_size": size,
            "mean": list(info["mean"]), "std": list(info["std"]),
            "num_features": num_features,
            "ssl_kit": {"arch": record["arch"], "kwargs": dict(record["kwargs"])},
            "onnx": {"file": "model.onnx", "external_data": "model.onnx.data" if external_data else None,
                     "opset": ONNX_OPSET, "input": INPUT_NAME, "output": OUTPUT_NAME,
                     "input_shape": ["batch", *size], "output_shape": ["batch", num_features],
                     "exporter": exporter,
                     "verified_with": f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)",
                     "verified_batches": list(VERIFY_BATCHES)}}


def write_onnx_files(record: dict, staging: str | Path, reference: torch.nn.Module,
                     tolerance: float | None = None, context: dict | None = None) -> dict:
    """Export `reference` (our backbone of `record`, weights loaded) to STAGING/model.onnx (+ model.onnx.data for
    large models), verify it with onnxruntime, then write config.json + README.md there (write_export publishes
    the set; a refused export publishes nothing).
    -> {"library": "onnx", "model", "opset", "max_abs_diff", "max_rel_diff", "tolerance", "sha256"}."""
    require_onnx()
    import onnx  # deferred: optional dependency (ssl_kit[onnx])

    tolerance = ONNX_TOLERANCE if tolerance is None else tolerance
    reference = reference.eval()
    info = record["data"]
    size = [info["channels"], info["image_size"], info["image_size"]]
    weight_bytes = sum(t.numel() * t.element_size() for t in reference.state_dict().values())
    external_data = weight_bytes > EXTERNAL_DATA_BYTES
    staging = Path(staging)
    example = torch.randn(TRACE_BATCH, *size, generator=torch.Generator().manual_seed(1))
    try:
        exporter = export_graph(reference, example, staging / "model.onnx", external_data)
        onnx.checker.check_model(str(staging / "model.onnx"))
    except CheckpointError as exc:
        raise CheckpointError(f"cannot export {record['arch']!r} to onnx: {exc}; `--to safetensors` exports "
                              f"every ssl_kit backbone (loaded back with ssl_kit)") from None
    except onnx.checker.ValidationError as exc:
        raise CheckpointError(f"cannot export {record['arch']!r} to onnx: the exported model.onnx is not valid "
                              f"ONNX ({_first_line(exc)})") from None
    measured = verify_onnx(staging / "model.onnx", reference, size, tolerance)
    config = onnx_config(record, measured["num_features"], external_data, exporter)
    config["sha256"] = sha256_file(staging / "model.onnx")
    if external_data:
        config["onnx"]["external_data_sha256"] = sha256_file(staging / "model.onnx.data")
    else:
        (staging / "model.onnx.data").unlink(missing_ok=True)
    config["verified_max_abs_diff"] = measured["max_abs_diff"]
    config["verified_max_rel_diff"] = measured["max_rel_diff"]
    config["onnx"]["tolerance_relative"] = tolerance
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (staging / "README.md").write_text(model_card(config, context or {}))
    return {"library": "onnx", "model": config["model"], "opset": ONNX_OPSET,
            "max_abs_diff": measured["max_abs_diff"], "max_rel_diff": measured["max_rel_diff"],
            "tolerance": tolerance, "sha256": config["sha256"]}
