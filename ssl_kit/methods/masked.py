"""Masked image modeling.

MAE (He et al. 2022): the ViT encoder sees only the visible patches (per-sample random or blockwise masks), a light
decoder with mask tokens and fixed 2-D sin-cos positions predicts the pixels of the masked patches; loss `mae_loss`
(norm-pix targets). SimMIM (Xie et al. 2022): masked units are replaced by a learned mask token in the input (ViT:
token space; ResNet: pixel space), a linear head predicts raw pixels, L1 on the masked pixels.

BEiT would additionally need a discrete visual tokenizer (a pretrained dVAE) to produce its targets; we ship its
blockwise masking (`masking: block`) but not the tokenizer, which cannot be trained or downloaded here."""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..common.modes import eval_mode
from ..common.plots import plot_reconstructions
from ..data.fileset import image_batches
from ..data.loader import Batch
from ..errors import ConfigError
from ..losses import mae_loss
from ..models.masking import make_mask, patchify, unpatchify
from ..models.resnet import ResNetBackbone
from ..models.vit import Block, VisionTransformer, sincos_pos_embed
from .base import Progress, require_vit
from .pretext import OneCropMethod, PretextConfig
from .registry import register


class MaskedConfig(PretextConfig):
    """Keys MAE and SimMIM share: how much is masked, in which pattern, and the input view."""

    mask_ratio: float = Field(0.75, gt=0, lt=1)
    masking: Literal["random", "block"] = Field("random", description="block: BEiT-style blockwise masks")
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="random resized crop of the input view")


class MAEConfig(MaskedConfig):
    """MAE: ViT encoder on the visible patches, light decoder with mask tokens, (norm-)pixel targets."""

    method: Literal["mae"]

    recommended = {"optimizer": {"name": "adamw", "lr": 0.00015, "lr_scaling": "linear", "base_batch_size": 256, "weight_decay": 0.05, "betas": [0.9, 0.95]}, "schedule": {"name": "cosine", "warmup_epochs": 40}}
    recommended_source = ("MAE (He et al. 2022, appendix A.1): AdamW β=(0.9, 0.95), base lr 1.5e-4 × batch/256, weight decay 0.05, 40 warm-up epochs, cosine")
    norm_pix: bool = Field(True, description="per-patch normalised pixel targets")
    decoder_dim: int = Field(128, ge=4)
    decoder_depth: int = Field(2, ge=1)
    decoder_heads: int = Field(4, ge=1)


class SimMIMConfig(MaskedConfig):
    """SimMIM: mask token in the input (ViT tokens or ResNet pixels), linear head, L1 on masked pixels."""

    method: Literal["simmim"]

    recommended = {"optimizer": {"name": "adamw", "lr": 0.0008, "lr_scaling": "linear", "base_batch_size": 512, "weight_decay": 0.05, "betas": [0.9, 0.999]}, "schedule": {"name": "cosine", "warmup_epochs": 10}, "train": {"clip_grad_norm": 5.0}}
    recommended_source = ("SimMIM (Xie et al. 2022, appendix): AdamW, lr 8e-4 × batch/512, weight decay 0.05, 10 warm-up epochs, cosine, gradient clipping at norm 5.0")
    mask_patch_size: Optional[int] = Field(None, ge=1, description="mask unit in pixels (default: the ViT patch "
                                                                     "size / the ResNet's output stride)")


@register("mae", MAEConfig)
class MAE(OneCropMethod):
    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        require_vit(cfg.name, backbone, "MAE", "its encoder sees the visible patches only (SimMIM, method: "
                    "simmim, also works with ResNets)")
        super().__init__(cfg, backbone, info)
        dim, dec = backbone.num_features, cfg.decoder_dim
        self.patch, self.grid = backbone.patch_size, backbone.grid
        self.decoder_embed = nn.Linear(dim, dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("decoder_pos", sincos_pos_embed(dec, self.grid, cls_token=True).unsqueeze(0),
                             persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(dec, cfg.decoder_heads) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dec, eps=1e-6)
        self.decoder_pred = nn.Linear(dec, self.patch ** 2 * info.channels)

    def encode_visible(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """normalised images (N, C, H, W) -> encoded visible tokens (N, 1 + K, D) (cls first), mask (N, L), restore."""
        tokens = self.backbone.embed(x)
        keep, mask, restore = make_mask(self.cfg.masking, x.shape[0], self.grid, self.cfg.mask_ratio, x.device)
        visible = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.backbone.encode(visible), mask, restore

    def decode(self, encoded: Tensor, restore: Tensor) -> Tensor:
        """(N, 1 + K, D) + restore (N, L) -> predicted patches (N, L, patch²·C)."""
        y = self.decoder_embed(encoded)
        n, length = restore.shape
        fill = self.mask_token.expand(n, length - (y.shape[1] - 1), -1).to(y.dtype)
        shuffled = torch.cat([y[:, 1:], fill], dim=1)
        ordered = torch.gather(shuffled, 1, restore.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
        y = torch.cat([y[:, :1], ordered], dim=1) + self.decoder_pos.to(y.dtype)
        for block in self.decoder_blocks:
            y = block(y)
        return self.decoder_pred(self.decoder_norm(y))[:, 1:]

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        x = self.view(batch.x, precropped=batch.views is not None)
        encoded, mask, restore = self.encode_visible(x)
        pred = self.decode(encoded, restore)
        loss = mae_loss(pred.float(), patchify(x, self.patch).float(), mask, self.cfg.norm_pix)
        return self.with_probe("reconstruction_loss", loss, encoded[:, 1:].mean(dim=1), batch.y)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """normalised images (N, C, H, W) -> (masked input, reconstruction with visible patches pasted back,
        mask (N, L)), in normalised units; norm-pix predictions are mapped back with each patch's own statistics."""
        encoded, mask, restore = self.encode_visible(x)
        pred = self.decode(encoded, restore).float()
        target = patchify(x, self.patch).float()
        if self.cfg.norm_pix:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        m = mask.unsqueeze(-1)
        channels = x.shape[1]
        masked_input = unpatchify(target * (1 - m), self.patch, channels)
        pasted = unpatchify(pred * m + target * (1 - m), self.patch, channels)
        return masked_input, pasted, mask

    def final_report(self, model: nn.Module, data, out_dir) -> dict[str, float]:
        device = next(self.parameters()).device
        source = data.test if len(data.test) else data.train  # an unlabeled folder has no test images
        info = self.info
        first, _ = next(image_batches(source, info.image_size, info.channels, batch_size=8, workers=0,
                                      resize_ratio=self.cfg.data.eval_resize_ratio))
        x = self.normalize(first.to(device))
        with eval_mode(self):
            masked, pasted, _ = self.reconstruct(x)
        mean, std = self.normalize.mean.to(device), self.normalize.std.to(device)
        rows = [(t * std + mean).clamp(0, 1).cpu() for t in (x, masked, pasted)]
        plot_reconstructions(rows, ["original", "masked input", "reconstruction"],
                             out_dir / "plots" / f"reconstruction_{self.cfg.name}.png")
        return {}


@register("simmim", SimMIMConfig)
class SimMIM(OneCropMethod):
    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        channels = info.channels
        if isinstance(backbone, VisionTransformer):
            self.kind, self.patch = "vit", backbone.patch_size
            self.unit = cfg.mask_patch_size or backbone.patch_size
            if self.unit % backbone.patch_size:
                raise ConfigError(f"stages[{cfg.name}].mask_patch_size {self.unit} must be a multiple of the ViT "
                                  f"patch size {backbone.patch_size}")
            self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.num_features))
            self.decoder = nn.Linear(backbone.num_features, self.patch ** 2 * channels)
        elif isinstance(backbone, ResNetBackbone):
            self.kind, stride = "conv", backbone.stride
            self.unit = cfg.mask_patch_size or stride
            self.mask_token = nn.Parameter(torch.zeros(1, channels, 1, 1))
            self.decoder = nn.Sequential(nn.Conv2d(backbone.num_features, stride ** 2 * channels, 1),
                                         nn.PixelShuffle(stride))
        else:
            raise ConfigError(f"stages[{cfg.name}]: SimMIM works with ViT and ResNet backbones, got "
                              f"{type(backbone).__name__}")
        nn.init.normal_(self.mask_token, std=0.02)
        if info.image_size % self.unit:
            raise ConfigError(f"stages[{cfg.name}]: image_size {info.image_size} is not divisible by the mask unit "
                              f"{self.unit} px")

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        x = self.view(batch.x, precropped=batch.views is not None)
        n, channels, size, _ = x.shape
        grid = size // self.unit
        _, mask, _ = make_mask(self.cfg.masking, n, grid, self.cfg.mask_ratio, x.device)
        pixel_mask = mask.view(n, 1, grid, grid).repeat_interleave(self.unit, 2).repeat_interleave(self.unit, 3)
        if self.kind == "vit":
            tokens = self.backbone.embed(x)
            token_mask = F.interpolate(pixel_mask, size=(size // self.patch,) * 2, mode="nearest").flatten(1)
            pos = self.backbone.pos_embed[:, 1:].to(tokens.dtype)
            tokens = torch.where(token_mask.unsqueeze(-1) > 0, self.mask_token.to(tokens.dtype) + pos, tokens)
            encoded = self.backbone.encode(tokens)[:, 1:]
            pred = unpatchify(self.decoder(encoded), self.patch, channels)
            features = encoded.mean(dim=1)
        else:
            masked_input = x * (1 - pixel_mask) + self.mask_token * pixel_mask
            feature_map = self.backbone.feature_map(masked_input)
            pred = self.decoder(feature_map)
            features = feature_map.mean(dim=(2, 3))
        loss = ((pred.float() - x.float()).abs() * pixel_mask).sum() / (pixel_mask.sum() * channels + 1e-5)
        return self.with_probe("reconstruction_loss", loss, features, batch.y)
