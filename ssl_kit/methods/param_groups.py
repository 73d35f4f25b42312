"""How a method declares its trainable parameters to the engine: named groups with an lr scale, whether weight
decay applies and whether the lr schedule applies; the ViT layer-wise lr decay used for fine-tuning (MAE, BEiT
protocol)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn


@dataclass
class ParamGroup:
    """A named set of parameters trained at lr × lr_scale, times the schedule's factor unless `fixed_lr`: then at
    lr × lr_scale on every step, warmup included (SimSiam's predictor; solo-learn's `static_lr`)."""

    name: str
    params: list[nn.Parameter]
    lr_scale: float = 1.0
    weight_decay: bool = True
    extra: dict = field(default_factory=dict)
    fixed_lr: bool = False


def split_off(groups: list[ParamGroup], new: ParamGroup) -> list[ParamGroup]:
    """Move new.params out of the groups holding them into `new` (appended last); groups left empty are dropped."""
    moved = {id(p) for p in new.params}
    kept = [replace(g, params=[p for p in g.params if id(p) not in moved]) for g in groups]
    return [g for g in kept if g.params] + [new]


def vit_layer_id(name: str, depth: int) -> int:
    """Layer index of a ViT parameter for layer-wise lr decay: embeddings (patch_embed, cls_token, reg_token,
    pos_embed) 0, blocks.i -> i + 1, everything after the blocks (final norm) depth + 1."""
    if name.startswith(("patch_embed", "cls_token", "reg_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(backbone: nn.Module, decay: float, base_scale: float = 1.0) -> list[ParamGroup]:
    """One group per ViT layer with lr_scale = base_scale · decay^(depth + 1 − layer id); the head (not in the
    backbone) keeps scale 1 in its own group."""
    depth = backbone.depth
    by_layer: dict[int, list[nn.Parameter]] = {}
    for name, param in backbone.named_parameters():
        if param.requires_grad:
            by_layer.setdefault(vit_layer_id(name, depth), []).append(param)
    return [ParamGroup(f"layer{layer}", params, base_scale * decay ** (depth + 1 - layer))
            for layer, params in sorted(by_layer.items())]
