"""Any timm model as a trained backbone: `backbone: {name: timm:convnext_atto, kwargs: {drop_path_rate: 0.1}}`.

Nothing is downloaded (pretrained=False always). The model is created with num_classes=0, so it maps images
(N, C, H, W) to its pooled pre-logits features (N, num_features); `in_chans` is the data's channel count and
models with a fixed input size (ViT, Swin, ...) get `img_size` = the data's image size unless the kwargs give one.

A timm ViT with a class token and a learned absolute position embedding (register tokens and DINOv2's / DeiT III's
position table without a class entry, `no_embed_class`, included) becomes a `TimmViT`: its
modules are registered under timm's own names (so its state dict is exactly timm's) and it offers the interface
MAE/SimMIM and layer-wise lr decay use from our VisionTransformer (`embed`, `encode`, `pos_embed`, `patch_size`,
`grid`, `depth`), so the masked-image methods encode only the visible patches of a timm ViT too.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .checkpointing import run_blocks
from .vit import VisionTransformer

PREFIX = "timm:"


def create_timm_model(name: str, in_channels: int, image_size: int, kwargs: dict[str, Any]) -> nn.Module:
    """timm.create_model(name, pretrained=False, num_classes=0, in_chans, [img_size], **kwargs) with clear errors."""
    import timm  # deferred: heavy optional import (timm, ~2 s), only for timm:NAME backbones

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ConfigError(f"unknown timm model {name!r} (e.g. {', '.join(close) or 'see timm.list_models()'})")
    check_timm_kwargs(name, kwargs)
    args = dict(kwargs)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and getattr(cfg, "fixed_input_size", False) and "img_size" not in args:
        args["img_size"] = image_size
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels, **args)
    except (TypeError, ValueError, AssertionError, KeyError, IndexError, ZeroDivisionError) as exc:
        raise ConfigError(f"timm:{name}: bad kwargs {kwargs}: {type(exc).__name__}: {str(exc)[:300]}") from None


SET_BY_SSL_KIT = ("pretrained", "num_classes", "in_chans")
# create_model arguments that load weights or configs from files or the hub, or change what the model returns:
# timm would open them behind ssl_kit's checks (safe loading, bounds), so they are refused
REFUSED_KWARGS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "cache_dir",
                  "features_only", "feature_cfg", "feature_cls", "out_indices", "output_stride_cfg")
REFUSED_WORDS = ("checkpoint", "file", "url", "hub", "cache", "pretrained")  # not "path": drop_path_rate


def check_timm_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Refuse kwargs ssl_kit sets itself, and any that would make timm read files/the hub or change the output
    (REFUSED_KWARGS, or a name containing one of REFUSED_WORDS), naming the key."""
    for key in kwargs:
        if key in SET_BY_SSL_KIT:
            raise ConfigError(f"timm:{name}: kwarg {key!r} is set by ssl_kit (pretrained=False, num_classes=0, "
                              f"in_chans = the data's channels); remove it from backbone.kwargs")
        if not isinstance(key, str) or key in REFUSED_KWARGS or any(word in key.lower() for word in REFUSED_WORDS):
            raise ConfigError(f"timm:{name}: kwarg {key!r} is refused: it would make timm load files, configs or "
                              f"weights behind ssl_kit's checks, or change the model's output (refused: "
                              f"{', '.join(REFUSED_KWARGS)} and any name with {'/'.join(REFUSED_WORDS)})")


def classifier_name(model: nn.Module) -> str:
    """The module path of the classifier timm removed (num_classes=0), e.g. 'fc', 'head', 'head.fc'."""
    name = model.pretrained_cfg.get("classifier", "head") if hasattr(model, "pretrained_cfg") else "head"
    return name[0] if isinstance(name, (tuple, list)) else name


class TimmBackbone(nn.Module):
    """A timm model without classifier: images (N, C, H, W) -> pooled pre-logits (N, num_features).
    Its state dict is timm's, each key prefixed with 'model.'."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_features = model.num_features
        self.classifier_name = classifier_name(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class TimmViT(VisionTransformer):
    """A timm VisionTransformer with our ViT interface. images (N, C, H, W) -> features (N, D): the normalised cls
    token (global_pool 'token') or the mean of the normalised patch tokens ('avg', then fc_norm), exactly as timm's
    forward. The modules are timm's own, registered under timm's names: the state dict equals timm's.

    Subclasses our VisionTransformer only so the methods' `isinstance` checks accept it; every member they use is
    defined here (VisionTransformer.__init__ is deliberately not run: the modules come from timm)."""

    def __init__(self, model: nn.Module) -> None:
        nn.Module.__init__(self)
        _check_plain_vit(model)
        for name, child in model.named_children():
            if name not in ("head", "attn_pool"):
                self.add_module(name, child)
        self.cls_token, self.reg_token, self.pos_embed = model.cls_token, model.reg_token, model.pos_embed
        self.num_registers = int(getattr(model, "num_reg_tokens", 0))
        # rows of the position table before the patches': cls + registers (timm's classic layout), or none
        self.prefix_positions = 0 if model.no_embed_class else 1 + self.num_registers
        self.patch_embed.strict_img_size = False  # other grids (DINO's local crops) resample the position table
        patch = model.patch_embed.patch_size
        self.patch_size, self.grid = int(patch[0]), int(model.patch_embed.grid_size[0])
        self.global_pool = model.global_pool == "avg"
        self.num_features = model.num_features
        self.depth = len(model.blocks)
        self.classifier_name = "head"

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """images (N, C, H, W) -> patch tokens + position embedding (N, L, D); other grids than the trained one get
        the position table resampled (timm's resample_abs_pos_embed)."""
        from timm.layers import resample_abs_pos_embed  # deferred: heavy optional import (timm)

        tokens = self.patch_embed(x)
        if tokens.ndim == 4:  # dynamic_img_size: NHWC
            grid = tuple(tokens.shape[1:3])
            tokens = tokens.flatten(1, 2)
        else:
            grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        pos = self.pos_embed[:, self.prefix_positions:]
        if grid != (self.grid, self.grid):
            pos = resample_abs_pos_embed(pos, new_size=list(grid), old_size=[self.grid, self.grid], num_prefix_tokens=0)
        return tokens + pos

    def prefix_tokens(self) -> torch.Tensor:
        """(1, 1 + R, D): the cls token and the R register tokens, with their rows of the position table when it
        has them (timm's classic layout; none with no_embed_class, as timm)."""
        prefix = self.cls_token if self.reg_token is None else torch.cat([self.cls_token, self.reg_token], dim=1)
        return prefix + self.pos_embed[:, :self.prefix_positions] if self.prefix_positions else prefix

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """patch tokens (N, L', D) (all or a visible subset) -> normalised (N, 1 + L', D) with the cls token first;
        register tokens ride through the blocks and are dropped here, as in our ViT."""
        prefix = self.prefix_tokens().expand(tokens.shape[0], -1, -1)
        x = self.norm_pre(self.patch_drop(self.pos_drop(torch.cat([prefix, tokens], dim=1))))
        x = self.norm(run_blocks(self.blocks, x, self.grad_checkpointing))
        return x if not self.num_registers else torch.cat([x[:, :1], x[:, 1 + self.num_registers:]], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encode(self.embed(x))
        pooled = tokens[:, 1:].mean(dim=1) if self.global_pool else tokens[:, 0]
        return self.head_drop(self.fc_norm(pooled))


def _check_plain_vit(model: nn.Module) -> None:
    """TimmViT reproduces timm's forward for the plain layout only; anything else is refused by name."""
    problems = []
    if getattr(model, "cls_token", None) is None:
        problems.append("no class token")
    if getattr(model, "num_prefix_tokens", 1) != 1 + int(getattr(model, "num_reg_tokens", 0)):
        problems.append("distillation tokens")
    if getattr(model, "pos_embed", None) is None:
        problems.append("no learned position embedding")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg"):
        problems.append(f"global_pool {model.global_pool!r}")
    patch = model.patch_embed.patch_size
    if patch[0] != patch[1]:
        problems.append(f"non-square patches {tuple(patch)}")
    if problems:
        raise ConfigError(f"timm ViT with {', '.join(problems)} is not supported as a backbone here (supported: class "
                          f"token, learned position embedding, global_pool 'token' or 'avg')")


def timm_backbone(name: str, in_channels: int, image_size: int, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """'NAME' (without the 'timm:' prefix) -> TimmViT for plain timm ViTs, else TimmBackbone."""
    # deferred: heavy optional import (timm, ~2 s), only for timm:NAME backbones
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

    model = create_timm_model(name, in_channels, image_size, dict(kwargs or {}))
    if type(model) is TimmVisionTransformer:
        return TimmViT(model)
    return TimmBackbone(model)
