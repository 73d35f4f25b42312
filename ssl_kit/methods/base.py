"""The method contract. A method owns its networks and its views of a batch; the engine does the rest
(device, AMP, backward, clipping, optimizer, schedule, EMA, DDP, logging, checkpoints)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

from ..data.views import Normalize, WeakView
from ..data.crops import CropSpec
from ..data.loader import Batch
from ..data.needs import DataNeeds
from ..data.pipeline import DataInfo
from ..errors import ConfigError
from ..models.heads import Classifier
from ..models.vit import VisionTransformer
from .momentum import cosine_ramp, update_momentum_pairs
from .param_groups import ParamGroup, layer_decay_groups


def require_vit(stage: str, backbone: nn.Module, method: str, why: str) -> None:
    """ConfigError naming the stage and the backbone unless `backbone` is ssl_kit's VisionTransformer; `why` says
    what the method needs the ViT for."""
    if not isinstance(backbone, VisionTransformer):
        raise ConfigError(f"stages[{stage}]: {method} needs a ViT backbone (vit_tiny, vit_small, vit_base): {why}, "
                          f"got {type(backbone).__name__}")


@dataclass
class Progress:
    """Where training is: global optimizer step (0-based), totals, epoch."""

    step: int
    total_steps: int
    epoch: int
    steps_per_epoch: int

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.total_steps)


class Method(nn.Module):
    """Subclasses set `backbone`, build heads in __init__ and implement training_step; `@register(name, Config)`
    (registry.py) gives the method its name and typed stage config.

    backbone_prefix / head_prefix: where in state_dict() the backbone and the classification head (if any) live,
    so a training checkpoint can be turned into a backbone.pt.
    """

    name: str = ""
    backbone_prefix = "backbone."
    head_prefix: Optional[str] = None

    def __init__(self, cfg, info: DataInfo) -> None:
        super().__init__()
        self.cfg, self.info = cfg, info
        self.normalize = Normalize(info.mean, info.std)
        self.weak_view = WeakView(self.normalize, cfg.data.translate, cfg.data.hflip)

    @classmethod
    def data_needs(cls, cfg) -> DataNeeds:
        """What a stage with this config draws from its data (labels or not, an unlabeled pool and its ratio μ):
        the one declaration prepare_data, the trainer and the loaders read. Default: labeled batches only."""
        return DataNeeds()

    @classmethod
    def context_from(cls, cfg, data, load_record) -> dict:
        """Extra constructor arguments from the prepared data (the unlabeled set's size) or from a checkpoint the
        stage names (a teacher): `load_record(stage name or checkpoint path)` -> backbone record dict."""
        return {}

    def view_list(self) -> list[nn.Module]:
        """The augmented views training_step takes of each labeled image, in order (ContrastiveViews: crop +
        photometric). On streamed data the DataLoader workers cut each view's crop from the original image
        (`batch.views`, in this order) and only the photometric part runs on the device. [] : the method
        augments `batch.x` itself (weak/strong views at the stage's image size)."""
        return []

    def augment_views(self, batch: Batch) -> list[Tensor]:
        """Every view of `view_list()` applied to the batch: to `batch.x` (in memory) or to the pre-cut crops
        `batch.views` (streamed). -> normalised float views, each (N, C, S_v, S_v)."""
        views = self.view_list()
        if batch.views is not None:
            if len(batch.views) != len(views):
                raise ValueError(f"{type(self).__name__}: the loader cut {len(batch.views)} views, the method "
                                 f"declares {len(views)}")
            augmented = batch.views_augmented
            return [view(x, precropped=True, augmented=augmented) for view, x in zip(views, batch.views)]
        return [view(batch.x) for view in views]

    @classmethod
    def ddp_find_unused_parameters(cls, cfg) -> bool:
        """Whether a step may leave a trainable parameter without a gradient (DDP must then look for unused ones).
        False by default: every trainable parameter takes part in every step."""
        return False

    def stream_crop(self, image_size: int) -> CropSpec:
        """Streamed data, methods without views: the one crop the workers cut per image (its weak/strong views are
        then made on the device from it). RandomResizedCrop over data.stream_crop_scale, no flip (the device's weak
        view flips)."""
        return CropSpec(image_size, tuple(self.cfg.data.stream_crop_scale))

    # -- what the engine asks of every method -------------------------------------------------------
    def get_backbone(self) -> nn.Module:
        """The backbone being trained (saved as backbone.pt)."""
        return self.backbone

    def student_backbone(self) -> nn.Module:
        """The backbone the loss's gradients train (what train.compile=backbone compiles): `self.backbone` where a
        method keeps a separate saved copy (DINO's teacher), else the saved one."""
        student = getattr(self, "backbone", None)
        return student if isinstance(student, nn.Module) else self.get_backbone()

    def parameter_groups(self) -> list[ParamGroup]:
        """Backbone at lr × backbone_lr_scale; every other trainable parameter (heads) at lr."""
        backbone = self.get_backbone()
        backbone_ids = {id(p) for p in backbone.parameters()}
        heads = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids]
        groups = [ParamGroup("backbone", [p for p in backbone.parameters() if p.requires_grad],
                             self.cfg.optimizer.backbone_lr_scale)]
        if heads:
            groups.append(ParamGroup("head", heads))
        return groups

    def head_modules(self) -> list[nn.Module]:
        """Modules re-initialised by train.head_init."""
        return []

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        """-> {'loss': scalar tensor, other scalars to log}."""
        raise NotImplementedError

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum target) module pairs; each target follows its online module by EMA after every step."""
        return []

    def base_momentum(self) -> float:
        """Momentum at step 0; it rises to 1 along a half cosine (BYOL/MoCo/DINO). Methods with pairs define it."""
        return self.cfg.momentum

    def forward(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        """The training step as the module's forward, so DistributedDataParallel can wrap the method and overlap
        gradient averaging with backward."""
        return self.training_step(batch, progress)

    def after_optimizer_step(self, progress: Progress) -> None:
        """Update the momentum targets (subclasses extending this call super() for queues, centres, ...)."""
        pairs = self.momentum_pairs()
        if pairs:
            self.current_momentum = cosine_ramp(self.base_momentum(), 1.0, progress.step, progress.total_steps)
            update_momentum_pairs(pairs, self.current_momentum)

    def ema_target(self) -> Optional[nn.Module]:
        """The sub-network whose weights train.ema_decay averages (evaluated instead of the raw one)."""
        return None

    def classifier(self, ema: Optional[nn.Module] = None) -> Optional[nn.Module]:
        """normalised images (N, C, H, W) -> logits (N, classes) for the test evaluation; None when the method has
        no classification head."""
        return None

    def head(self) -> Optional[nn.Linear]:
        """The classification head saved beside the backbone in backbone.pt (None: features only)."""
        return None

    def final_report(self, model: nn.Module, data, out_dir) -> dict[str, float]:
        """After training: method-specific pictures and numbers (written under out_dir). model: the evaluated
        classifier (EMA when enabled). -> metrics for summary.json."""
        return {}

    def epoch_metrics(self) -> dict[str, float]:
        """Metrics gathered over the epoch (pseudo-label rates, probe accuracy), logged and reset per epoch."""
        return {}

    def preview_views(self, batch: Batch) -> dict[str, Tensor]:
        """The augmented images this method trains on, for a logger to show: {name: normalised float (N, C, S, S)}:
        each view of `view_list()`, else the weak view of the labeled images and, for weak/strong methods, the
        strong view of the unlabeled ones. Draws random numbers: the caller forks the RNG."""
        views = self.view_list()
        if views:
            return {f"view{i + 1}": view for i, view in enumerate(self.augment_views(batch))}
        shown = {"weak": self.weak_view(batch.x)}
        strong = getattr(self, "strong_view", None)
        if strong is not None and batch.u is not None:
            shown["strong"] = strong(batch.u)
        return shown


class ClassifierMethod(Method):
    """A method whose network is backbone + linear head (`self.net`): supervised, FixMatch, KD students.
    The EMA (when enabled) averages `net`, and the test evaluation runs the EMA copy."""

    backbone_prefix = "net.backbone."
    head_prefix = "net.head."
    evaluate_ema = True

    def __init__(self, cfg, backbone: nn.Module, info: DataInfo) -> None:
        super().__init__(cfg, info)
        self.net = Classifier(backbone, info.num_classes)

    def get_backbone(self) -> nn.Module:
        return self.net.backbone

    def layer_decay(self) -> Optional[float]:
        """ViT layer-wise lr decay factor for fine-tuning (None: off); the supervised stage exposes it."""
        return None

    def parameter_groups(self) -> list[ParamGroup]:
        """With `layer_decay` (fine-tuning a ViT): one group per layer, decayed towards the input; else backbone/head."""
        decay = self.layer_decay()
        if decay is None or not isinstance(self.net.backbone, VisionTransformer):
            return super().parameter_groups()
        return layer_decay_groups(self.net.backbone, decay, self.cfg.optimizer.backbone_lr_scale) + \
            [ParamGroup("head", list(self.net.head.parameters()))]

    def head_modules(self) -> list[nn.Module]:
        return [self.net.head]

    def ema_target(self) -> nn.Module:
        return self.net

    def classifier(self, ema: Optional[nn.Module] = None) -> nn.Module:
        return ema if (ema is not None and self.evaluate_ema) else self.net

    def head(self) -> nn.Linear:
        return self.net.head
