"""A backbone record in another library's layout: weights under the target library's own key names, a config.json
that rebuilds the target model from that library alone, and one verification (strict load + equal outputs).

  target       what                                          from (arch of the record)
  timm         timm.create_model(model, **kwargs)            timm:NAME; our vit_* (-> timm VisionTransformer);
                                                             our ImageNet-stem resnet*, torchvision:resnet*
  torchvision  torchvision.models.get_model(model, **kwargs) torchvision:NAME; our resnet* (the small-image stem
               with the modules in config['replace'] rebuilt  is rebuilt as conv1 3x3/1 + maxpool Identity)
  safetensors  ssl_kit's build_backbone(arch, ...)           every ssl_kit backbone (our own key names)
  onnx         onnxruntime.InferenceSession("model.onnx")    every ssl_kit backbone torch.onnx exports (onnx_export.py)

config.json = {"library", "model", "kwargs", "replace" (torchvision), "input_size": [C, H, W], "mean", "std",
"num_features", "ssl_kit": {"arch", "kwargs"}}. The features are the model's pooled pre-logits (num_classes=0 in
timm, the classifier replaced by an identity in torchvision).

A timm export's config.json is also timm's own hub layout ("architecture", "num_classes", "num_features",
"model_args", "pretrained_cfg"), so `timm.create_model("local-dir:OUT", pretrained=True)` rebuilds the model and
loads model.safetensors strictly, without the hub.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from safetensors.torch import save_file
from torch import Tensor, nn

from ..common.files import sha256_file
from ..errors import CheckpointError
from .bounds import check_architecture
from .export_dir import check_out_dir, publish, staging_dir
from .foreign import check_export_weights, read_export_folder, read_safetensors
from .model_card import model_card
from .registry import build_backbone

TARGETS = ("torchvision", "timm", "safetensors", "onnx")
TOLERANCE = 1e-5  # max abs difference of the library targets (onnx: onnx_export.ONNX_TOLERANCE, relative)
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
OUR_VITS = ("vit_tiny", "vit_small", "vit_base")


def _strip(state: dict, prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v.detach().cpu().contiguous() for k, v in state.items()}


def _refuse(arch: str, target: str, why: str) -> CheckpointError:
    return CheckpointError(f"cannot export {arch!r} to {target}: {why}; `--to safetensors` exports every ssl_kit "
                           f"backbone (loaded back with ssl_kit)")


def _our_vit_to_timm(record: dict) -> tuple[dict, dict]:
    """Our VisionTransformer -> timm VisionTransformer kwargs and keys (qkv/proj under attn., mlp.0/2 -> fc1/fc2,
    the fixed sin-cos table stored as timm's pos_embed)."""
    info = record["data"]
    vit = build_backbone(record["arch"], info["channels"], info["image_size"], record["kwargs"])
    heads = vit.blocks[0].heads
    kwargs = {"img_size": info["image_size"], "patch_size": vit.patch_size, "in_chans": info["channels"],
              "embed_dim": vit.num_features, "depth": vit.depth, "num_heads": heads, "num_classes": 0,
              "mlp_ratio": vit.blocks[0].mlp[0].out_features / vit.num_features,
              "global_pool": "avg" if vit.global_pool else "token", "fc_norm": False}
    renames = [(r"^patch_embed\.(weight|bias)$", r"patch_embed.proj.\1"),
               (r"^(blocks\.\d+)\.(qkv|proj)\.", r"\1.attn.\2."), (r"^(blocks\.\d+)\.mlp\.0\.", r"\1.mlp.fc1."),
               (r"^(blocks\.\d+)\.mlp\.2\.", r"\1.mlp.fc2.")]
    state = {}
    for key, value in record["state_dict"].items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        state[key] = value.detach().cpu().contiguous()
    pos = vit.pos_embed.detach().clone()
    registers = getattr(vit, "num_registers", 0)
    if registers:  # timm's reg_tokens (kept as `reg_token`); timm's table has a row per prefix token: zeros, as
        kwargs["reg_tokens"] = registers  # ours gives the registers no position embedding
        pos = torch.cat([pos[:, :1], pos.new_zeros(1, registers, pos.shape[-1]), pos[:, 1:]], dim=1)
    state["pos_embed"] = pos.contiguous()
    return {"model": f"{record['arch']}_patch16_224", "kwargs": kwargs}, state  # kwargs override the name's


def _to_timm(record: dict) -> tuple[dict, dict]:
    arch, kwargs, info = record["arch"], dict(record["kwargs"]), record["data"]
    if arch.startswith("timm:"):
        import timm  # deferred: heavy optional import (timm, ~2 s), only for timm exports

        name = arch[len("timm:"):]
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None and getattr(cfg, "fixed_input_size", False) and "img_size" not in kwargs:
            kwargs["img_size"] = info["image_size"]
        return {"model": name, "kwargs": {**kwargs, "in_chans": info["channels"], "num_classes": 0}}, \
            _strip(record["state_dict"], "model.")
    if arch in OUR_VITS:
        return _our_vit_to_timm(record)
    if arch.startswith("torchvision:") and arch.split(":", 1)[1] in RESNETS and not kwargs:
        return {"model": arch.split(":", 1)[1], "kwargs": {"in_chans": info["channels"], "num_classes": 0}}, \
            _strip(record["state_dict"], "model.")
    if arch in RESNETS:
        if kwargs.get("small_stem", True):
            raise _refuse(arch, "timm", "our small-image stem (3×3 stride-1 conv, no max-pool) has no timm ResNet "
                                        "counterpart (timm stems are 7×7/2 or 3-conv 'deep'); use `--to torchvision` "
                                        "(the stem rebuilt as recorded in config.json)")
        return {"model": arch, "kwargs": {"in_chans": info["channels"], "num_classes": 0}}, \
            _strip(record["state_dict"], "net.")
    raise _refuse(arch, "timm", "it has no timm counterpart")


# pretrained_cfg fields that describe how to use the weights; the others name the original weights' source (url,
# hub id, tag, license, test-time sizes, labels) and do not apply to an ssl_kit backbone
TIMM_CFG_KEPT = ("architecture", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "first_conv",
                 "classifier")


def timm_hub_fields(config: dict, num_features: int | None) -> dict:
    """timm's hub config.json fields for a timm export (what `timm.create_model("local-dir:OUT", pretrained=True)`
    reads): architecture, num_classes 0, model_args (= config['kwargs']) and a pretrained_cfg with our input size,
    mean and std; custom_load False (model.safetensors holds timm's own key names)."""
    import timm  # deferred: heavy optional import (timm, ~2 s), only for timm exports

    cfg = timm.models.get_pretrained_cfg(config["model"])
    source = cfg.to_dict() if cfg is not None else {}
    pretrained_cfg = {key: source[key] for key in TIMM_CFG_KEPT if source.get(key) is not None}
    pretrained_cfg.update({"architecture": config["model"], "custom_load": False, "input_size": config["input_size"],
                           "mean": config["mean"], "std": config["std"], "num_classes": 0})
    fields = {"architecture": config["model"], "num_classes": 0, "model_args": dict(config["kwargs"]),
              "pretrained_cfg": pretrained_cfg}
    if num_features is not None:
        fields["num_features"] = num_features
    return fields


def _conv_spec(conv: nn.Conv2d) -> dict[str, Any]:
    return {"type": "Conv2d", "in_channels": conv.in_channels, "out_channels": conv.out_channels,
            "kernel_size": list(conv.kernel_size), "stride": list(conv.stride), "padding": list(conv.padding),
            "bias": conv.bias is not None}


def _to_torchvision(record: dict) -> tuple[dict, dict]:
    arch, kwargs, info = record["arch"], dict(record["kwargs"]), record["data"]
    if arch in RESNETS:
        backbone = build_backbone(arch, info["channels"], info["image_size"], kwargs)
        replace = {"fc": {"type": "Identity"}}
        if backbone.net.conv1.kernel_size != (7, 7) or info["channels"] != 3:
            replace["conv1"] = _conv_spec(backbone.net.conv1)
        if isinstance(backbone.net.maxpool, nn.Identity):
            replace["maxpool"] = {"type": "Identity"}
        return {"model": arch, "kwargs": {}, "replace": replace}, _strip(record["state_dict"], "net.")
    if arch.startswith("torchvision:"):
        backbone = build_backbone(arch, info["channels"], info["image_size"], kwargs)
        replace = {backbone.classifier_name: {"type": "Identity"}}
        if backbone.stem_name:
            replace[backbone.stem_name] = _conv_spec(backbone.model.get_submodule(backbone.stem_name))
        if arch.split(":", 1)[1].startswith("vit_") and "image_size" not in kwargs:
            kwargs["image_size"] = info["image_size"]
        return {"model": arch.split(":", 1)[1], "kwargs": kwargs, "replace": replace}, \
            _strip(record["state_dict"], "model.")
    raise _refuse(arch, "torchvision", "it has no torchvision counterpart with the same layout")


def export_layout(record: dict, target: str) -> tuple[dict, dict[str, Tensor]]:
    """A backbone record -> (config.json content, state dict under the target library's key names)."""
    info = record["data"]
    if target == "timm":
        config, state = _to_timm(record)
    elif target == "torchvision":
        config, state = _to_torchvision(record)
    elif target == "safetensors":
        config = {"model": record["arch"], "kwargs": dict(record["kwargs"])}
        state = _strip(record["state_dict"], "")
    else:
        raise CheckpointError(f"export target must be one of {', '.join(TARGETS)}, got {target!r}")
    library = "ssl_kit" if target == "safetensors" else target
    return {"library": library, **config, "input_size": [info["channels"], info["image_size"], info["image_size"]],
            "mean": list(info["mean"]), "std": list(info["std"]),
            "ssl_kit": {"arch": record["arch"], "kwargs": dict(record["kwargs"])}}, state


def _replace_module(model: nn.Module, path: str, spec: dict) -> None:
    if spec["type"] == "Identity":
        module: nn.Module = nn.Identity()
    elif spec["type"] == "Conv2d":
        module = nn.Conv2d(spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]),
                           tuple(spec["stride"]), tuple(spec["padding"]), bias=spec["bias"])
    else:
        raise CheckpointError(f"config.json: replace[{path!r}] has unknown type {spec['type']!r}")
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def build_exported(config: dict) -> nn.Module:
    """The target library's model from config.json alone (no weights): timm.create_model / torchvision get_model
    with config['replace'] applied / ssl_kit build_backbone. -> images (N, C, H, W) -> features (N, F)."""
    library, name, kwargs = config["library"], config["model"], dict(config["kwargs"])
    if library == "timm":
        import timm  # deferred: heavy optional import (timm, ~2 s), only for timm exports

        return timm.create_model(name, pretrained=False, **kwargs)
    if library == "torchvision":
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        for path, spec in config.get("replace", {}).items():
            _replace_module(model, path, spec)
        return model
    if library == "ssl_kit":
        channels, size, _ = config["input_size"]
        return build_backbone(name, channels, size, kwargs)
    raise CheckpointError(f"config.json: unknown library {library!r} (expected timm, torchvision or ssl_kit)")


@torch.no_grad()
def verify_export(config: dict, weights: str | Path, reference: nn.Module, tolerance: float = 1e-5,
                  batch: int = 4, seed: int = 0) -> float:
    """Load `weights` strictly into build_exported(config), compare its outputs with `reference` (our backbone) on
    seeded random input (batch, *config['input_size']) in eval mode. -> max |difference|; CheckpointError naming
    the keys when the load fails, or the difference when it exceeds `tolerance`."""
    target = build_exported(config).eval()
    try:
        target.load_state_dict(read_safetensors(weights), strict=True)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        raise CheckpointError(f"export refused: {weights} does not load strictly into {config['library']} "
                              f"{config['model']}: {' '.join(line.strip() for line in lines[1:3])}") from None
    x = torch.randn(batch, *config["input_size"], generator=torch.Generator().manual_seed(seed))
    ours, theirs = reference.eval()(x).float(), target(x).float()
    if ours.shape != theirs.shape:
        raise CheckpointError(f"export refused: {config['library']} {config['model']} gives features of shape "
                              f"{tuple(theirs.shape)}, ours {tuple(ours.shape)}")
    difference = float((ours - theirs).abs().max())
    if not difference <= tolerance:
        raise CheckpointError(f"export refused: {config['library']} {config['model']} outputs differ from ours by "
                              f"up to {difference:.3g} (> tolerance {tolerance:g})")
    return difference


def _reference(record: dict) -> nn.Module:
    """Our backbone of the record with its weights (eval mode): what the export must reproduce."""
    info = record["data"]
    backbone = build_backbone(record["arch"], info["channels"], info["image_size"], record["kwargs"])
    backbone.load_state_dict(record["state_dict"])
    return backbone.eval()


def _write_files(record: dict, target: str, staging: Path, tolerance: float, context: dict | None) -> dict:
    """model.safetensors + config.json + README.md of a library target into `staging`, verified first.
    -> the result of write_export (without "out")."""
    config, state = export_layout(record, target)
    save_file({k: v.contiguous() for k, v in state.items()}, str(staging / "model.safetensors"))
    reference = _reference(record)
    difference = verify_export(config, staging / "model.safetensors", reference, tolerance)
    if target == "timm":
        config.update(timm_hub_fields(config, getattr(reference, "num_features", None)))
    config["sha256"] = sha256_file(staging / "model.safetensors")
    config["verified_max_abs_diff"] = difference
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (staging / "README.md").write_text(model_card(config, context or {}))
    return {"library": config["library"], "model": config["model"], "max_abs_diff": difference,
            "tolerance": tolerance, "sha256": config["sha256"]}


def write_export(record: dict, target: str, out_dir: str | Path, tolerance: float | None = None,
                 context: dict | None = None, overwrite: bool = False,
                 extra: Callable[[Path], None] | None = None) -> dict:
    """Write model.safetensors + config.json + README.md (model card) into `out_dir`, verified before anything
    lands there (a refused export leaves no files). `out_dir` must be new or empty unless `overwrite`, which
    replaces the export's own files there as one set (export_dir.py: nothing else is touched, no symlink followed).
    `extra(staging)` may add more OWNED files to the set (the CLI's bundle.tar.gz). `context` (method, recipe,
    data, metrics of the run) goes into the card. `tolerance`: max abs difference (default TOLERANCE); for target
    'onnx' (model.onnx, see onnx_export.py) relative to the largest feature (default ONNX_TOLERANCE).
    -> {"out": dir, "max_abs_diff": float, "tolerance": float, "sha256": str, "library": str, "model": str}."""
    check_out_dir(out_dir, overwrite)
    info = record["data"]  # the bounds before any build (a crafted record cannot make us allocate a giant network)
    check_architecture(record["arch"], record["kwargs"], info["channels"], info["image_size"],
                       f"checkpoint of {record['arch']!r}", record["state_dict"])
    if target == "onnx":
        from .onnx_export import require_onnx  # deferred: optional dependency (ssl_kit[onnx])

        require_onnx()
    elif target not in TARGETS:
        raise CheckpointError(f"export target must be one of {', '.join(TARGETS)}, got {target!r}")
    with staging_dir(out_dir) as staging:
        if target == "onnx":
            from .onnx_export import write_onnx_files  # deferred: optional dependency (ssl_kit[onnx])

            result = write_onnx_files(record, staging, _reference(record), tolerance, context)
        else:
            result = _write_files(record, target, staging, TOLERANCE if tolerance is None else tolerance, context)
        if extra is not None:
            extra(staging)
        out = publish(staging, out_dir, overwrite)
    return {"out": str(out), **result}


def verified_summary(result: dict) -> str:
    """One line on what write_export verified (the CLI prints it on stderr)."""
    if result["library"] == "onnx":
        return (f"onnxruntime runs model.onnx (opset {result['opset']}, dynamic batch) with our outputs: max "
                f"|difference| {result['max_abs_diff']:.3g}, {result['max_rel_diff']:.3g} of the largest feature "
                f"(tolerance {result['tolerance']:g} relative)")
    return (f"loads strictly into {result['library']} {result['model']}, max |difference| "
            f"{result['max_abs_diff']:.3g} (tolerance {result['tolerance']:g})")


def load_exported(out_dir: str | Path) -> nn.Module:
    """An export folder -> the target library's model with the weights loaded strictly (eval mode). The file's
    sha256 must match config.json's: a corrupted or swapped model.safetensors is refused (check_export_weights)."""
    config, weights = read_export_folder(Path(out_dir))
    check_export_weights(config, weights)
    model = build_exported(config).eval()
    try:
        model.load_state_dict(read_safetensors(weights), strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise CheckpointError(f"{str(weights)!r} does not fit {config['library']} {config['model']}: {detail}") from None
    return model
