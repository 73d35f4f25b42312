"""Other repos' checkpoints as backbone records: MAE, DINO, DINOv2, MoCo v3, solo-learn, lightly, torchvision and timm
files.

A reference is `[LAYOUT:]FILE[@ARCH]`:
  LAYOUT  forces the layout (else it is detected): mae | dino | dino-student | dinov2 | mocov3 | solo-learn |
          lightly | state-dict (a bare torchvision/timm state dict, .pth or .safetensors)
  ARCH    the architecture when the file does not record it: timm:NAME | torchvision:NAME | one of our backbone
          names, optionally with constructor kwargs: `timm:vit_small_patch16_224,global_pool=avg`
          (the command line's --arch appends it).

Layouts (what is kept; everything else is dropped and listed):
  mae          {'model': timm-ViT keys}                        drops decoder_*, mask_token, head.*
  dino         {'teacher'/'student': 'backbone.' or 'module.backbone.' keys}   the teacher; drops head.*
  dinov2       facebookresearch/dinov2's keys: a hub file (dinov2_vits14[_reg4]_pretrain.pth) or a training run's
               {'teacher': 'backbone.' keys} (teacher_checkpoint.pth)   drops mask_token, dino_head.*, ibot_head.*
  mocov3       {'state_dict': 'module.base_encoder.' keys}     drops head.* / fc.* (projector), momentum, predictor
  solo-learn   Lightning {'state_dict': 'backbone.' keys}      drops projector, classifier, momentum copies
  lightly      a lightly model's state dict: 'backbone.' keys  drops projection/prediction heads, momentum copies
  state-dict   torchvision/timm keys ('module.' stripped)      the classifier the backbone removes is dropped

The kept keys are fitted to the architecture's own names (our adapters' 'model.' / ResNet's 'net.' prefix, and
lightly's nn.Sequential(*children) indices mapped back to child names). DINOv2's keys become timm's as timm converts
them: block chunks 'blocks.C.I.' -> 'blocks.I.', SwiGLU 'mlp.w12'/'mlp.w3' -> 'mlp.fc1'/'mlp.fc2', and with registers
'register_tokens' -> 'reg_token' with the cls row of 'pos_embed' added to 'cls_token' (timm's *_reg4_dinov2 models
have no cls/register rows, no_embed_class); without registers the table keeps its cls row (timm's *_dinov2). Its
standard sizes (ViT-S/B/L/g) infer the timm architecture when none is given. Missing or unexpected keys are an error
naming them; a shape mismatch is an error naming the key and both shapes.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Optional

import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..errors import CheckpointError
from .bounds import check_architecture
from .registry import BACKBONES
from .torchvision_backbone import list_torchvision_models

LAYOUTS = ("mae", "dino", "dino-student", "dinov2", "mocov3", "solo-learn", "lightly", "state-dict")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
ARCH_HELP = "--arch timm:NAME | torchvision:NAME | <ssl_kit backbone name> (in a recipe: 'FILE@ARCH')"


# ----------------------------------------------------------------------------------------------- references
def is_arch(text: str) -> bool:
    """'timm:NAME', 'torchvision:NAME' or one of our registered names (kwargs after a comma allowed)."""
    base = text.split(",", 1)[0]
    return base.startswith(("timm:", "torchvision:")) or base in BACKBONES


def split_reference(text: str, arch: Optional[str] = None) -> tuple[Optional[str], str, Optional[str]]:
    """'[LAYOUT:]FILE[@ARCH]' -> (layout or None, file, arch or None). An explicit `arch` wins over '@ARCH'."""
    layout = None
    head, sep, rest = text.partition(":")
    if sep and head in LAYOUTS:
        layout, text = head, rest
    if "@" in text:
        path, _, tail = text.rpartition("@")
        if is_arch(tail):
            text, arch = path, arch or tail
    return layout, text, arch


def parse_arch(arch: str) -> tuple[str, dict[str, Any]]:
    """'timm:NAME,key=value,...' -> ('timm:NAME', {key: YAML-parsed value})."""
    name, *options = re.split(r",(?=\s*[A-Za-z_]\w*=)", arch)  # commas inside [8,16] stay with their value
    kwargs = {}
    for option in options:
        key, _, value = option.partition("=")
        try:
            kwargs[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise CheckpointError(f"architecture {arch!r}: {key.strip()}={value!r} is not a YAML value") from None
    if "," in name:
        raise CheckpointError(f"architecture {arch!r}: options after the name are key=value, e.g. "
                              f"timm:vit_small_patch16_224,global_pool=avg")
    return name, kwargs


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """A .safetensors file -> state dict (the format holds tensors only: nothing can run on load)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None


# ----------------------------------------------------------------------------------------------- layouts
def _is_state(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) and \
        any(isinstance(v, Tensor) for v in obj.values())


def _has_prefix(state: dict, *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in state)


CHUNKED_BLOCK = re.compile(r"blocks\.(\d+)\.(\d+)\.")  # DINOv2's BlockChunk: 'blocks.C.I.' (I = the global index)


def _backbone_keys(state: dict) -> dict:
    """`state` without the 'module.' and 'backbone.' prefixes (a teacher's backbone, or the state itself)."""
    state = _strip(state, "module.")
    return _keep(state, "backbone.")[0] if _has_prefix(state, "backbone.") else state


def is_dinov2_state(state: dict) -> bool:
    """DINOv2's own ViT keys: 'register_tokens', chunked blocks, or its (1, D) 'mask_token' (MAE's and timm's are
    (1, 1, D)) / a 'mask_token' beside layer scale 'ls1.gamma'; never with timm's 'reg_token' or a MAE decoder."""
    state = _backbone_keys(state)
    if "reg_token" in state or _has_prefix(state, "decoder_") or "cls_token" not in state:
        return False
    mask = state.get("mask_token")
    masked = isinstance(mask, Tensor) and (mask.ndim == 2 or any(k.endswith(".ls1.gamma") for k in state))
    return "register_tokens" in state or masked or any(CHUNKED_BLOCK.match(k) for k in state)


def detect_layout(data: dict) -> str:
    """The layout of a loaded checkpoint dict (see the module doc); CheckpointError when none fits."""
    if _is_state(data.get("teacher")) or _is_state(data.get("student")):
        return "dinov2" if _is_state(data.get("teacher")) and is_dinov2_state(data["teacher"]) else "dino"
    if any(_is_state(state) and is_dinov2_state(state) for state in (data.get("model"), data.get("state_dict"), data)):
        return "dinov2"
    if _is_state(data.get("model")) and not _is_state(data.get("state_dict")):
        return "mae"
    inner = data.get("state_dict") if _is_state(data.get("state_dict")) else data
    if not _is_state(inner):
        raise CheckpointError(f"no state dict found (top-level keys: {sorted(map(str, data))[:10]})")
    if _has_prefix(inner, "module.base_encoder.", "base_encoder."):
        return "mocov3"
    if _has_prefix(inner, "backbone.", "module.backbone."):
        if _has_prefix(inner, "projection_head.", "prediction_head.", "backbone_momentum.") or inner is data:
            return "lightly"
        return "solo-learn"
    return "state-dict"


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _keep(state: dict, prefix: str) -> tuple[dict, list[str]]:
    """Keys under `prefix` (prefix removed), and the names of the others (dropped)."""
    kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return kept, [k for k in state if not k.startswith(prefix)]


def _dinov2_source(data: dict) -> dict:
    """The state dict a DINOv2 file holds: a training run's 'teacher', else the file itself (a hub file)."""
    for key in ("teacher", "model", "state_dict"):
        if _is_state(data.get(key)):
            return data[key]
    if not _is_state(data):
        raise CheckpointError(f"dinov2 layout: no state dict found (top-level keys: {sorted(map(str, data))[:10]})")
    return data


def _unchunk(key: str) -> str:
    """'blocks.C.I.rest' (block_chunks > 0; I is the block's global index) -> 'blocks.I.rest'."""
    return CHUNKED_BLOCK.sub(r"blocks.\2.", key, count=1) if CHUNKED_BLOCK.match(key) else key


def _timm_mlp_name(key: str) -> str:
    """DINOv2's SwiGLU 'mlp.w12' (packed [gate, value], silu on the first half) / 'mlp.w3' -> timm's SwiGLUPacked
    'mlp.fc1' / 'mlp.fc2' (GluMlp with gate_last=False: the same split and order)."""
    return re.sub(r"^(blocks\.\d+\.mlp\.)w(12|3)\.", lambda m: m[1] + ("fc1." if m[2] == "12" else "fc2."), key)


def _fold_cls_position(state: dict) -> dict:
    """With registers: DINOv2 adds pos_embed's row 0 to the cls token and none to the registers, which it inserts
    after it; timm's no_embed_class table holds the patch rows only, so row 0 moves into cls_token."""
    state = dict(state)
    state["reg_token"] = state.pop("register_tokens")
    cls, pos = state.get("cls_token"), state.get("pos_embed")
    if not isinstance(cls, Tensor) or not isinstance(pos, Tensor):
        return state  # a missing or non-tensor one is named by the later checks
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[1] < 2 or tuple(cls.shape) != (1, 1, pos.shape[2]):
        raise CheckpointError(f"dinov2 layout: 'cls_token' {tuple(cls.shape)} and 'pos_embed' {tuple(pos.shape)} are "
                              f"not (1, 1, D) and (1, 1 + grid², D): the file is not a DINOv2 ViT's")
    state["cls_token"], state["pos_embed"] = cls + pos[:, :1], pos[:, 1:]
    return state


def dinov2_state(data: dict) -> tuple[dict[str, Tensor], list[str]]:
    """DINOv2's backbone keys -> timm's ViT keys (see the module doc), and the dropped key names."""
    state = _strip(_dinov2_source(data), "module.")
    state, dropped = _keep(state, "backbone.") if _has_prefix(state, "backbone.") else (state, [])
    dropped += [k for k in state if k == "mask_token"]
    state = {_timm_mlp_name(_unchunk(k)): v for k, v in state.items() if k != "mask_token"}
    return (_fold_cls_position(state) if "register_tokens" in state else state), dropped


def layout_state(data: dict, layout: str) -> tuple[dict[str, Tensor], list[str]]:
    """(backbone state dict in the backbone's own key names, dropped key names) for a checkpoint of `layout`."""
    if layout == "dinov2":
        return dinov2_state(data)
    if layout in ("dino", "dino-student"):
        which = "student" if layout == "dino-student" else "teacher"
        if not _is_state(data.get(which)):
            raise CheckpointError(f"DINO layout: no {which!r} state dict (top-level keys: {sorted(map(str, data))})")
        state = _strip(data[which], "module.")
        if _has_prefix(state, "backbone."):
            return _keep(state, "backbone.")
        dropped = [k for k in state if k.startswith("head.")]  # a bare backbone (DINO's published files)
        return {k: v for k, v in state.items() if k not in dropped}, dropped
    if layout == "mae":
        state = data.get("model") if _is_state(data.get("model")) else data
        dropped = [k for k in state if k.startswith(("decoder_", "mask_token", "head."))]
        return {k: v for k, v in state.items() if k not in dropped}, dropped
    inner = data["state_dict"] if _is_state(data.get("state_dict")) else data
    if not _is_state(inner):
        raise CheckpointError(f"{layout} layout: no state dict found (top-level keys: {sorted(map(str, data))[:10]})")
    if layout == "mocov3":
        state, dropped = _keep(_strip(inner, "module."), "base_encoder.")
        head = [k for k in state if k.startswith(("head.", "fc."))]
        return {k: v for k, v in state.items() if k not in head}, dropped + [f"base_encoder.{k}" for k in head]
    if layout in ("solo-learn", "lightly"):
        return _keep(_strip(inner, "module."), "backbone.")
    return _strip(inner, "module."), []


# ----------------------------------------------------------------------------------------------- architecture
def _first_conv_weight(state: dict) -> Optional[Tensor]:
    return next((v for v in state.values() if isinstance(v, Tensor) and v.ndim == 4), None)


def _refuse_shape(where: str, key: str, value: Tensor, expected: str) -> CheckpointError:
    return CheckpointError(f"{where}: {key!r} has shape {tuple(value.shape)}, expected {expected}: the metadata of "
                           f"this file is not a real network's")


def check_tensors(state: dict, where: str) -> None:
    """Every kept value is a tensor under a string key (a crafted file may hold numbers, strings or None among its
    weights; found by fuzzing): CheckpointError naming the first other one."""
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(f"{where}: {str(key)[:80]!r} holds a {type(value).__name__}, not a tensor: the "
                                  f"backbone weights must all be tensors")


def check_shape_metadata(state: dict, where: str) -> None:
    """The tensors the architecture is inferred from (a ViT's patch weight and position table, the first
    convolution) have the ranks and non-zero sizes a real network has: crafted ones are refused by name, before
    any size is derived from them."""
    patch, pos = state.get("patch_embed.proj.weight"), state.get("pos_embed")
    if isinstance(patch, Tensor) and (patch.ndim != 4 or min(patch.shape) < 1):
        raise _refuse_shape(where, "patch_embed.proj.weight", patch, "(dim, channels, patch, patch), no size 0")
    if isinstance(pos, Tensor) and (pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[1] < 2 or pos.shape[2] < 1):
        raise _refuse_shape(where, "pos_embed", pos, "(1, 1 + grid², dim), no size 0")
    first = _first_conv_weight(state)
    if first is not None and min(first.shape) < 1:
        key = next(k for k, v in state.items() if v is first)
        raise _refuse_shape(where, key, first, "(out, channels, k, k), no size 0")


def infer_kwargs(arch: str, state: dict) -> dict[str, Any]:
    """Constructor kwargs the weights imply: a timm ViT's patch size; our ResNet's stem (3×3 conv = small_stem)."""
    if arch.startswith("timm:") and "patch_embed.proj.weight" in state:
        return {"patch_size": int(state["patch_embed.proj.weight"].shape[-1])}
    if arch in ("resnet18", "resnet34", "resnet50") and "conv1.weight" in state:
        return {"small_stem": int(state["conv1.weight"].shape[-1]) == 3}
    return {}


def position_grid(state: dict) -> int:
    """The patch grid's side from a ViT position table (1, rows, D): rows = grid² plus a row per prefix token (cls
    and the registers of `reg_token` (1, R, D)) in timm's classic layout, or grid² alone (`no_embed_class`, as
    DINOv2's); the classic reading wins when both fit."""
    rows = int(state["pos_embed"].shape[1])
    reg = state.get("reg_token")
    registers = int(reg.shape[1]) if isinstance(reg, Tensor) and reg.ndim == 3 else 0
    for prefix in (1 + registers, 0):
        side = math.isqrt(max(rows - prefix, 0))
        if side > 0 and side * side == rows - prefix:
            return side
    return max(1, math.isqrt(max(rows - 1, 1)))


def infer_data_info(arch: str, state: dict, image_size: Optional[int]) -> dict:
    """Input format of foreign weights: channels from the first convolution, the size from a ViT's position table
    (else `image_size`, else the library default), normalisation from timm's config or ImageNet's."""
    first = _first_conv_weight(state)
    channels = int(first.shape[1]) if first is not None else 3
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, 224 if ":" in arch else 32
    if arch.startswith("timm:"):
        import timm  # deferred: heavy optional import (timm, ~2 s), only for timm:NAME architectures

        cfg = timm.models.get_pretrained_cfg(arch[len("timm:"):])
        if cfg is not None:
            mean, std, size = list(cfg.mean), list(cfg.std), int(cfg.input_size[-1])
    if "pos_embed" in state and "patch_embed.proj.weight" in state:
        size = position_grid(state) * int(state["patch_embed.proj.weight"].shape[-1])
    if channels != len(mean):
        mean, std = [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels
    return {"num_classes": 0, "classes": [], "channels": channels, "image_size": image_size or size,
            "mean": mean, "std": std, "dataset": None}


def _inner(backbone: nn.Module) -> tuple[str, nn.Module]:
    """(key prefix, module) that holds the library model inside our backbone: adapters 'model.', ResNet 'net.'."""
    for attr in ("model", "net"):
        module = getattr(backbone, attr, None)
        if isinstance(module, nn.Module):
            return f"{attr}.", module
    return "", backbone


def _sequential_to_children(state: dict, module: nn.Module) -> dict:
    """lightly's nn.Sequential(*list(resnet.children())[:-1]) keys '4.0.conv1.weight' -> 'layer1.0.conv1.weight'."""
    names = [name for name, _ in module.named_children()]
    out = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        child = index.isdecimal() and len(index) < 10 and int(index) < len(names)  # not '²' (isdigit, no int)
        out[f"{names[int(index)]}.{rest}" if child else key] = value
    return out


def _names(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def fit_state(backbone: nn.Module, state: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], list[str]]:
    """Rename `state` to `backbone`'s keys; -> (state ready for a strict load, dropped classifier keys).
    Missing/unexpected keys and shape mismatches raise CheckpointError naming the keys."""
    prefix, inner = _inner(backbone)
    if state and all(k.split(".", 1)[0].isdecimal() for k in state):
        state = _sequential_to_children(state, inner)
    own = backbone.state_dict()
    if prefix and not any(k in own for k in state):
        state = {prefix + k: v for k, v in state.items()}
    classifier = getattr(backbone, "classifier_name", "fc" if prefix == "net." else None)
    dropped = [k for k in state if k not in own and classifier and k[len(prefix):].startswith(f"{classifier}.")]
    state = {k: v for k, v in state.items() if k not in dropped}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    arch = getattr(backbone, "arch_name", type(backbone).__name__)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the weights do not fit {arch}: " +
            (f"missing keys: {_names(missing)}" if missing else "") + ("; " if missing and unexpected else "") +
            (f"unexpected keys: {_names(unexpected)}" if unexpected else "") +
            f". Is the architecture right? ({ARCH_HELP})")
    for key in own:  # in the model's order: the first mismatching layer is named
        value = state.get(key)
        if value is not None and tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{source}: shape mismatch at {key!r}: the file has {tuple(value.shape)}, {arch} "
                                  f"expects {tuple(own[key].shape)}; is the architecture right? ({ARCH_HELP})")
    full = {k: state.get(k, own[k]) for k in own}  # absent BatchNorm counters keep the model's own
    return full, dropped


DINOV2_SIZES = {(384, 12): "small", (768, 12): "base", (1024, 24): "large", (1536, 40): "giant"}  # (dim, depth)


def _block_count(state: dict) -> int:
    return len({m[1] for m in map(re.compile(r"blocks\.(\d{1,6})\.").match, state) if m})


def dinov2_arch(state: dict) -> Optional[str]:
    """The timm architecture of DINOv2's published sizes (ViT-S/B/L/g, dinov2/models/vision_transformer.py) from
    converted weights: 'timm:vit_small_patch14_dinov2', '..._reg4_dinov2' with registers (reg_tokens=R when R != 4);
    None for other sizes, or a ViT-g without SwiGLU / another size with it (pass the architecture then)."""
    patch, fc1, fc2 = (state.get(k) for k in ("patch_embed.proj.weight", "blocks.0.mlp.fc1.weight",
                                              "blocks.0.mlp.fc2.weight"))
    if not all(isinstance(t, Tensor) and t.ndim == n for t, n in ((patch, 4), (fc1, 2), (fc2, 2))):
        return None
    size = DINOV2_SIZES.get((int(patch.shape[0]), _block_count(state)))
    if size is None or (size == "giant") != (fc1.shape[0] == 2 * fc2.shape[1]):
        return None
    reg = state.get("reg_token")
    registers = int(reg.shape[1]) if isinstance(reg, Tensor) and reg.ndim == 3 else 0
    extra = f",reg_tokens={registers}" if registers not in (0, 4) else ""
    return f"timm:vit_{size}_patch14{'_reg4' if registers else ''}_dinov2{extra}"


def _file_arch(data: dict) -> Optional[str]:
    """An architecture the file records: MoCo v3 / DINO 'arch' naming a torchvision model."""
    arch = data.get("arch")
    return f"torchvision:{arch}" if isinstance(arch, str) and arch in list_torchvision_models() else None


def foreign_record(data: dict, path: str, layout: Optional[str] = None, arch: Optional[str] = None,
                   image_size: Optional[int] = None, arch_kwargs: Optional[dict] = None,
                   data_info: Optional[dict] = None) -> dict:
    """A loaded foreign checkpoint -> the fields of an ssl_kit backbone record (arch, kwargs, data, state_dict; see
    engine/checkpoint.py) whose state dict fits the architecture exactly, and 'source': file, layout, dropped keys.
    `arch_kwargs` are added to those `arch` names ('NAME,key=value'); `data_info` (channels, image_size, mean, std)
    replaces what would be inferred from the weights."""
    detected = layout is None
    try:
        layout = layout or detect_layout(data)
        state, dropped = layout_state(data, layout)
    except CheckpointError as exc:  # found by fuzzing: the message did not name the file
        raise CheckpointError(f"{path!r}: {exc}") from None
    if not state:
        raise CheckpointError(f"{path!r} ({layout} layout): no backbone weights found")
    check_tensors(state, f"{path!r} ({layout} layout)")
    arch = arch or _file_arch(data)
    inferred = dinov2_arch(state) if arch is None and layout == "dinov2" else None
    arch = arch or inferred
    if arch is None:
        plain = " is not an ssl_kit backbone or training checkpoint (no 'format' field); read as" \
            if detected and layout == "state-dict" else ""
        raise CheckpointError(f"{path!r}{plain} ({layout} layout) does not record its architecture: pass {ARCH_HELP}")
    name, kwargs = parse_arch(arch)
    where = f"{path!r} ({layout} layout)"
    check_shape_metadata(state, where)
    kwargs = {**infer_kwargs(name, state), **kwargs, **(arch_kwargs or {})}
    info = dict(infer_data_info(name, state, image_size), **(data_info or {}))
    # the bounds first, on the meta device (no memory); the weights are fitted to that skeleton's names and shapes:
    # nothing of the size the metadata asks for is allocated here (build_from_record builds it after its own check)
    skeleton = check_architecture(name, kwargs, info["channels"], info["image_size"], where)
    skeleton.arch_name = arch
    fitted, classifier = fit_state(skeleton, state, where)
    dropped += classifier
    if inferred:
        print(f"[ssl-kit] {path} ({layout} layout): architecture {arch} (from its sizes)", file=sys.stderr)
    if dropped:
        print(f"[ssl-kit] {path} ({layout} layout): dropped {len(dropped)} non-backbone keys: {_names(dropped, 6)}",
              file=sys.stderr)
    return {"arch": name, "kwargs": kwargs, "data": info,
            "state_dict": fitted, "source": {"file": str(path), "layout": layout, "dropped": dropped}}


EXPORT_CONFIG_MAX_BYTES = 1 << 20  # an export's config.json is a few kB
TIMM_KWARGS_SET_HERE = ("pretrained", "num_classes", "in_chans", "img_size")  # from the record's data instead


def read_export_folder(folder: Path) -> tuple[dict, Path]:
    """An `ssl-kit export` folder -> (config.json's content, the path of model.safetensors). An ONNX export, a
    missing file or a config.json that is not JSON is refused by name; check_export_weights then checks the file."""
    config_path, weights = folder / "config.json", folder / "model.safetensors"
    where = f"export folder {str(folder)!r}"
    if (folder / "model.onnx").is_file() and not weights.is_file():
        raise CheckpointError(f"{where} is an ONNX export: run model.onnx with onnxruntime.InferenceSession (see its "
                              f"README.md), not as a torch model")
    for path in (config_path, weights):
        if not path.is_file():
            raise CheckpointError(f"{where} is not an ssl_kit export: {path.name} is missing")
    try:
        config = json.loads(config_path.read_bytes()[:EXPORT_CONFIG_MAX_BYTES])
    except ValueError as exc:
        raise CheckpointError(f"{where}: config.json is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: config.json is a {type(config).__name__}, expected an object")
    return config, weights


def check_export_weights(config: dict, weights: Path) -> None:
    """model.safetensors must be the file exported: the sha256 config.json records."""
    from ..common.files import sha256_file  # deferred: only export folders need it

    if config.get("sha256") != sha256_file(weights):
        raise CheckpointError(f"export folder {str(weights.parent)!r}: model.safetensors does not match the sha256 "
                              f"recorded in config.json: the file was corrupted or replaced; export it again")


def export_folder_record(folder: Path) -> dict:
    """An `ssl-kit export` folder (config.json + model.safetensors, the timm / torchvision / safetensors targets;
    read_export_folder, check_export_weights) -> the fields of a backbone record, as foreign_record gives them,
    with the input size, channels and normalisation config.json records. A timm export is rebuilt as timm's model (timm:NAME with its
    kwargs: the weights are under timm's names); the others as the ssl_kit backbone they were exported from
    (config.json's "ssl_kit" arch and kwargs; torchvision's names fit it)."""
    config, weights = read_export_folder(folder)
    where = f"export folder {str(folder)!r}"
    try:
        library, model, kwargs = config["library"], config["model"], dict(config["kwargs"])
        channels, size, _ = (int(v) for v in config["input_size"])
        mean, std, source = list(config["mean"]), list(config["std"]), config.get("ssl_kit") or {}
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: config.json is not an ssl-kit export's ({type(exc).__name__}: "
                              f"{str(exc)[:200]})") from None
    check_export_weights(config, weights)
    if library == "timm":
        arch = f"timm:{model}"
        kwargs = {k: v for k, v in kwargs.items() if k not in TIMM_KWARGS_SET_HERE}
    elif library in ("torchvision", "ssl_kit") and isinstance(source.get("arch"), str):
        arch, kwargs = source["arch"], dict(source.get("kwargs") or {})
    else:
        raise CheckpointError(f"{where}: config.json names library {library!r} without the ssl_kit architecture it "
                              f"was exported from; expected an export of ssl-kit export --to timm | torchvision | "
                              f"safetensors")
    info = {"channels": channels, "image_size": size, "mean": mean, "std": std}
    return foreign_record(read_safetensors(weights), str(weights), None, arch, size, kwargs, info)
