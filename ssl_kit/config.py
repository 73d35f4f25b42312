"""Recipe schema (typed, validated with pydantic): every stage's keys, defaults, bounds and descriptions, and
`validate_recipe`, whose errors name the full key path. Reading YAML and `key.sub=value` overrides: recipe_files.py.

A recipe is YAML::

    seed: 0
    stages:
      - name: supervised
        method: supervised
        data: {dataset: digits, image_size: 32}
        backbone: {name: small_cnn}
        train: {epochs: 10, batch_size: 64}

Overrides address a stage by its name (``supervised.train.epochs=3``) or a top-level key (``seed=7``).
Unknown keys, wrong types and impossible values raise :class:`ConfigError` naming the full key path.
"""
from __future__ import annotations

import functools
import importlib
import math
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from .errors import ConfigError
from .limits import how_to_raise, limit


class Strict(BaseModel):
    """Base for every schema: unknown keys are errors, assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LongTailConfig(Strict):
    """A long-tailed labeled split and unlabeled pool drawn from a labeled dataset (the protocol of DARP, DASO and
    ACR on CIFAR-10-LT): class k of K keeps ⌊N · γ^(−k/(K−1))⌋ labeled images, N = data.labels_per_class, and the
    unlabeled pool (drawn from the images not labeled) ⌊M · γ_u^(−k/(K−1))⌋ (`consistent`), M of every class
    (`uniform`), or the tail first (`reversed`: class K−1 is the unlabeled head). The test set stays as it is."""

    ratio: float = Field(100.0, ge=1, description="γ_l: largest / smallest labeled class (DASO/ACR: 100, 150)")
    unlabeled_ratio: Optional[float] = Field(None, ge=1, description="γ_u of the unlabeled pool; default γ_l")
    unlabeled_distribution: Literal["consistent", "uniform", "reversed"] = Field(
        "consistent", description="class order of the unlabeled pool's counts relative to the labeled split")
    unlabeled_per_class: Optional[int] = Field(None, ge=1, description="M: the unlabeled head class's count; "
                                                                       "default: the most the data allows")

    def unlabeled_gamma(self) -> float:
        """γ_u of the pool's counts (1 for the uniform distribution)."""
        if self.unlabeled_distribution == "uniform":
            return 1.0
        return self.ratio if self.unlabeled_ratio is None else self.unlabeled_ratio


class DataConfig(Strict):
    dataset: str = "digits"
    root: Optional[str] = Field(None, description="dataset root folder; fills the ROOT part of the spec")
    test: Optional[str] = Field(None, description="spec of the test set; default: the dataset's own test split")
    unlabeled_dataset: Optional[str] = Field(
        None, description="spec whose training images (labels hidden) are the unlabeled pool instead of this "
                          "dataset's own images: domain adaptation, e.g. labeled digits + unlabeled digits-rotated:45; "
                          "it has this dataset's classes or none (images:ROOT)")
    image_size: int = Field(32, ge=4, le=1024)
    channels: Optional[Literal[1, 3]] = Field(None, description="convert images to this many channels")
    labels_per_class: Optional[int] = Field(None, ge=1, description="None: every training image is labeled")
    split_seed: Optional[int] = Field(None, ge=0, lt=2**63, description="seed of the labeled split; default: the recipe seed")
    long_tail: Optional[LongTailConfig] = Field(None, description="long-tailed labeled split and unlabeled pool "
                                                                  "(needs labels_per_class: the head class's count)")
    include_labeled_in_unlabeled: bool = True
    hflip: bool = Field(False, description="random horizontal flips (off for digits, on for natural images)")
    translate: float = Field(0.125, ge=0.0, le=0.5, description="weak view: max shift as a fraction of the size")
    normalize: Literal["dataset", "none"] = "dataset"
    storage: Literal["auto", "memory", "stream"] = Field(
        "auto", description="streamed sources (imagefolder, images, filelist, webdataset): memory decodes the set "
                            "onto the device, stream reads files in workers, auto streams above memory_budget_gb")
    memory_budget_gb: float = Field(4.0, gt=0, description="auto: stream when the decoded set at image_size is larger")
    labels: Optional[str] = Field(None, description="CSV of path,label rows labelling a subset (others unlabeled)")
    bad_images: Literal["skip", "error"] = Field(
        "skip", description="streamed: skip substitutes a deterministic other image, error stops at the first")
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="stop when more of the images read are bad")
    workers: int = Field(2, ge=0, description="streamed: DataLoader worker processes (0: decode in the trainer)")
    prefetch: int = Field(2, ge=1, description="streamed: batches each worker prepares ahead")
    photometric: Literal["auto", "device", "workers"] = Field(
        "auto", description="streamed views (SimCLR, DINO, ...): where colour jitter, grayscale, blur and solarize run — "
                            "device: batched on the training device; workers: per micro-batch in the DataLoader "
                            "workers, handed over as uint8; auto: workers when training on the CPU, else device")
    decode: Literal["cpu", "gpu"] = Field(
        "cpu", description="streamed training: cpu decodes every file in the workers (PIL, JPEG DCT reduction); gpu "
                           "decodes JPEGs on the CUDA training device in batches (nvJPEG via torchvision), the "
                           "workers only read bytes and draw crop boxes; other formats fall back to the CPU per file")
    stream_crop_scale: tuple[float, float] = Field(
        (0.2, 1.0), description="streamed, methods without views (supervised, FixMatch family, KD): area range of the "
                                "random resized crop the workers cut at image_size before the device augmentation")
    eval_resize_ratio: float = Field(0.875, gt=0, le=1,
                                     description="evaluation: shorter side to image_size/ratio, then centre crop")

    @model_validator(mode="after")
    def _device_decode_leaves_the_photometric_to_the_device(self) -> "DataConfig":
        if self.decode == "gpu" and self.photometric == "workers":
            raise ValueError("data.decode: gpu hands the workers' files to the device undecoded, so the workers "
                             "cannot run the photometric augmentation: use data.photometric: device (or auto)")
        return self

    @model_validator(mode="after")
    def _long_tail_has_a_head(self) -> "DataConfig":
        if self.long_tail is not None and self.labels_per_class is None:
            raise ValueError("data.long_tail needs data.labels_per_class: the labeled head class's count")
        return self

    @field_validator("root")
    @classmethod
    def _root_is_a_path(cls, root: Optional[str]) -> Optional[str]:
        """root fills the ROOT part of a spec: a comma would start spec options, a control character no path has."""
        if root is not None and ("," in root or any(ord(c) < 32 for c in root) or not root.strip()):
            raise ValueError(f"data.root must be a folder path without commas or control characters (options go in "
                             f"data.dataset, e.g. 'imagefolder,test_fraction=0.1'), got {root[:200]!r}")
        return root

    def spec(self) -> str:
        """The dataset spec with `root` put in place: 'cifar10' + root '/data' -> 'cifar10:/data'."""
        if self.root is None:
            return self.dataset
        head, *options = self.dataset.split(",")
        name = head.split(":", 1)[0]
        return ",".join([f"{name}:{self.root}", *options])


class BackboneConfig(Strict):
    name: str = "small_cnn"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    sync_bn: bool = False
    grad_checkpointing: bool = Field(
        False, description="activation checkpointing: keep only each transformer block's input and recompute the "
                           "block in the backward pass (ViTs: ssl_kit's and timm's; timm models that support "
                           "set_grad_checkpointing); less memory for ~30% more compute")


class InitConfig(Strict):
    checkpoint: Optional[str] = Field(None, description="backbone.pt, run dir or training checkpoint")
    from_stage: Optional[str] = Field(None, description="take the backbone an earlier stage produced")

    @model_validator(mode="after")
    def _one_source(self) -> "InitConfig":
        if self.checkpoint and self.from_stage:
            raise ValueError("give init.checkpoint or init.from_stage, not both")
        return self


class OptimizerConfig(Strict):
    name: Literal["sgd", "adam", "adamw", "rmsprop", "lars"] = "sgd"
    lr: float = Field(0.05, gt=0)
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none", description="lr × (global batch / base_batch_size) or its square root; none: lr as given")
    base_batch_size: int = Field(256, ge=1, description="the global batch at which lr is meant (lr_scaling)")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    lars_eta: float = Field(0.02, gt=0, description="LARS trust coefficient")
    exclude_norm_and_bias: bool = Field(True, description="no weight decay (nor LARS adaptation) for 1-D params")
    backbone_lr_scale: float = Field(1.0, ge=0, description="backbone lr = lr × this; heads use lr")
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = Field(
        "auto", description="how the update runs: fused (one kernel; sgd/adam/adamw on CUDA), foreach (a few "
                            "multi-tensor kernels), for_loop (one parameter at a time); auto: fused for "
                            "sgd/adam/adamw and foreach for lars/rmsprop on CUDA, for_loop on the CPU")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "OptimizerConfig":
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=true needs momentum > 0")
        return self


class ScheduleConfig(Strict):
    name: Literal["cosine", "fixmatch_cosine", "step", "multistep", "exponential", "constant", "plateau"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    warmup_start: float = Field(0.0, ge=0, le=1, description="lr factor at step 0 of the warmup")
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    step_epochs: float = Field(30, gt=0)
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75], description="multistep: fractions of training")
    gamma: float = Field(0.1, gt=0, le=1)
    plateau_patience: int = Field(3, ge=0)
    plateau_metric: str = "train/loss"
    weight_decay_end: Optional[float] = Field(
        None, ge=0, description="the weight decay of the decaying parameter groups follows a cosine from "
                                "optimizer.weight_decay at step 0 to this at the last step (DINO, iBOT, DINOv2, "
                                "I-JEPA, MSN); None: optimizer.weight_decay throughout")


def _channels_last_field():
    """train.channels_last of training and evaluation stages (one definition for both)."""
    return Field(None, description="train convolutions in the channels-last (NHWC) memory layout; None: on when "
                                   "training on the CPU (1.06-1.5× faster steps for our CNNs there), off on CUDA")


class TrainConfig(Strict):
    epochs: Optional[float] = Field(10, gt=0)
    steps: Optional[int] = Field(None, ge=1, description="overrides epochs")
    batch_size: int = Field(64, ge=1, description="global batch (all ranks, all accumulation steps)")
    accumulate: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype of the forward pass; auto: bf16 on a CUDA device that supports it, fp16 "
                            "(with loss scaling) on older GPUs, fp32 on the CPU")
    clip_grad_norm: Optional[float] = Field(None, gt=0)
    clip_grad_value: Optional[float] = Field(None, gt=0)
    ema_decay: Optional[float] = Field(None, gt=0, lt=1)
    head_init: Literal["default", "trunc_normal", "kaiming", "xavier"] = "default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    channels_last: Optional[bool] = _channels_last_field()
    log_every: int = Field(10, ge=1)
    eval_every_epochs: int = Field(1, ge=0, description="0: only at the end")
    checkpoint_every_steps: int = Field(200, ge=1)
    keep_last: int = Field(1, ge=1, description="checkpoints kept: last.pt plus keep_last − 1 older step-N.pt files")
    progress: bool = True
    tf32: bool = Field(True, description="CUDA: TF32 tensor cores for fp32 matmuls and convolutions (Ampere and "
                                         "newer; ~10 significant bits in the products, as PyTorch Lightning and timm "
                                         "train)")
    cudnn_benchmark: bool = Field(True, description="CUDA: let cuDNN time its convolution algorithms on the first "
                                                    "batch of each shape and keep the fastest (not bit-reproducible "
                                                    "across runs; set false for that)")
    compile: Literal["none", "backbone", "step"] = Field(
        "none", description="torch.compile: the student backbone (where the FLOPs are), or the whole forward of a "
                            "training step (heads and loss too; graph breaks at collectives and .item())")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode")
    compile_backend: str = Field("inductor", pattern=r"^[a-z_]+$",
                                 description="torch.compile backend (inductor; aot_eager or eager to debug)")
    compile_fallback: bool = Field(False, description="when compiling fails, train uncompiled with a warning "
                                                      "instead of stopping with the compiler's error")
    ddp_find_unused_parameters: Optional[bool] = Field(
        None, description="DistributedDataParallel: look for parameters a step did not use (None: the method's default)")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp (DistributedDataParallel, weights replicated) or fsdp (FSDP2 "
                           "fully_shard: weights, gradients and optimizer state sharded over the ranks)")

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainConfig":
        if self.batch_size % self.accumulate:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by accumulate {self.accumulate}")
        return self


# The sections of a training stage whose keys a method may recommend (StageBase.recommended).
RECOMMENDABLE = ("optimizer", "schedule", "train")


class StageBase(Strict):
    """A training stage. Each method's config subclasses it and states, in `recommended`, the optimizer, schedule and
    training settings of its paper or reference implementation (`recommended_source` says which): they fill every
    key of those sections the recipe leaves out, so `method: vicreg` alone trains as VICReg does. Keys the recipe
    gives always win; the resolved values are in the run's config.yaml."""

    recommended: ClassVar[dict[str, dict[str, Any]]] = {}
    recommended_source: ClassVar[str] = ""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$")
    data: DataConfig = Field(default_factory=DataConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _fill_recommended(cls, raw: Any) -> Any:
        """Put the method's recommended optimizer / schedule / train keys wherever the recipe is silent.

        A section whose `name` the recipe sets to another optimizer or schedule than the recommended one takes
        nothing from the recommendation: an lr tuned for LARS says nothing about SGD. Nor does a weight decay of the
        recipe's own take the recommended weight_decay_end."""
        if not isinstance(raw, dict) or not cls.recommended:
            return raw
        filled = dict(raw)
        for section, keys in cls.recommended.items():
            given = filled.get(section)
            if given is None:
                given = {}
            if not isinstance(given, dict) or given.get("name", keys.get("name")) != keys.get("name"):
                continue
            filled[section] = {**keys, **given}
        return cls._decay_end_follows_decay(raw, filled)

    @classmethod
    def _decay_end_follows_decay(cls, raw: dict, filled: dict) -> dict:
        """A recommended schedule.weight_decay_end belongs to the recommended weight decay: a recipe that sets its
        own optimizer (another name) or its own optimizer.weight_decay takes no weight_decay_end from the
        recommendation (one it sets itself stays)."""
        given_optimizer, given_schedule = raw.get("optimizer"), raw.get("schedule")
        recommended = cls.recommended.get("optimizer", {})
        own_decay = isinstance(given_optimizer, dict) and (
            "weight_decay" in given_optimizer or given_optimizer.get("name", recommended.get("name"))
            != recommended.get("name"))
        schedule = filled.get("schedule")
        from_recipe = isinstance(given_schedule, dict) and "weight_decay_end" in given_schedule
        if own_decay and isinstance(schedule, dict) and "weight_decay_end" in schedule and not from_recipe:
            filled["schedule"] = {k: v for k, v in schedule.items() if k != "weight_decay_end"}
        return filled

    def stage_references(self) -> dict[str, Optional[str]]:
        """{what: earlier stage name} this stage reads: its backbone (from_stage); methods add theirs."""
        return {"backbone": self.init.from_stage}

    def unlabeled_ratio(self) -> int:
        """Unlabeled images per labeled image in a step (FixMatch's μ); 0 for labeled-only stages."""
        return 0


class ViewsConfig(Strict):
    """SimCLR-style view augmentation strengths (applied on the device)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    jitter_prob: float = Field(0.8, ge=0, le=1)
    jitter_strength: float = Field(0.5, ge=0, le=2, description="brightness/contrast/saturation = 0.8·s, hue = 0.2·s")
    grayscale_prob: float = Field(0.2, ge=0, le=1)
    blur_prob: float = Field(0.0, ge=0, le=1, description="Gaussian blur; worth it from ~64 px up")
    solarize_prob: float = Field(0.0, ge=0, le=1, description="applied to the second view only (BYOL/MoCo v3)")

    def refuse_per_view_keys(self, method: str, instead: str) -> None:
        """For the multi-crop methods that set crop scales, blur and solarization per view themselves: a
        views.crop_scale, blur_prob or solarize_prob in the recipe would be ignored, so it is refused, naming the
        method's own keys (`instead`)."""
        clashing = sorted({"blur_prob", "solarize_prob", "crop_scale"} & self.model_fields_set)
        if clashing:
            raise ValueError(f"{method} sets crop scales, blur and solarization per view: use {instead} instead of "
                             f"views.{clashing}")


class StrongAugConfig(Strict):
    num_ops: int = Field(2, ge=0, le=14)
    magnitude_max: float = Field(1.0, gt=0, le=1, description="magnitudes drawn per sample in [0.05, max]")
    cutout: float = Field(0.5, ge=0, le=1, description="max cutout side as a fraction of the size")


# The corruptions eval/corruptions.py implements (it checks at import that its table has exactly these keys).
CORRUPTION_NAMES = ("gaussian_noise", "shot_noise", "gaussian_blur", "motion_blur", "contrast", "brightness",
                    "pixelate", "jpeg")


class EvalStageBase(Strict):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$")
    from_stage: Optional[str] = Field(None, description="backbone of this earlier stage; default: the latest one")
    checkpoint: Optional[str] = None
    data: Optional[str] = Field(None, description="dataset spec; default: the source stage's dataset")
    image_size: Optional[int] = Field(None, ge=4, le=1024)
    memory_budget_gb: Optional[float] = Field(
        None, gt=0, description="storage auto: embed a streamed evaluation set from files in workers when decoding it "
                                "would take more; default: data.memory_budget_gb of the stage that trained the backbone")
    weights: Optional[str] = Field(None, description="local weights file for checkpoint torchvision:NAME / timm:NAME "
                                                     "('random': an untrained torchvision network)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    channels_last: Optional[bool] = _channels_last_field()
    n_last_blocks: int = Field(1, ge=1, le=64, description="ViT only: concatenate the normalised [cls] tokens of the "
                                                          "last N blocks (DINOv2's linear evaluation: 1 or 4)")
    avgpool: bool = Field(False, description="ViT only: append the mean of the last block's normalised patch tokens "
                                             "(DINOv2's linear evaluation)")

    def stage_references(self) -> dict[str, Optional[str]]:
        return {"backbone": self.from_stage}


class ProbeStageBase(EvalStageBase):
    """What the linear and the attentive probe share: the labeled images they fit, their epochs, their sweep."""

    labels_per_class: Optional[int] = Field(None, ge=1)
    epochs: int = Field(100, ge=1)
    sweep: Optional[bool] = Field(None, description="choose lr/wd on a validation split of the training features; "
                                                    "default: yes, unless labels_per_class is 1")

    def sweeps(self) -> bool:
        return self.sweep if self.sweep is not None else self.labels_per_class is None or self.labels_per_class >= 2


class LinearProbeStage(ProbeStageBase):
    """Linear probe on frozen features: BN without affine + linear layer, lr/wd chosen on a validation split."""

    method: Literal["linear_probe"]
    tsne: bool = Field(False, description="t-SNE picture of the test features coloured by class in plots/")
    augment: bool = Field(False, description="re-extract features of augmented training images every epoch")


class AttentiveProbeStage(ProbeStageBase):
    """Attentive probe on a frozen ViT's patch tokens (CAPI's): learned query + linear layer, lr/wd on a val split."""

    method: Literal["attentive_probe"]
    batch_size: int = Field(128, ge=1, le=65_536, description="minibatch of the probe's AdamW (CAPI's 128)")

    @model_validator(mode="after")
    def _reads_patch_tokens(self) -> "AttentiveProbeStage":
        if self.n_last_blocks != 1 or self.avgpool:
            raise ValueError("n_last_blocks / avgpool choose linear_probe / knn / transfer features; the attentive "
                             "probe reads the last block's patch tokens")
        return self


class KnnStage(EvalStageBase):
    """Weighted kNN on frozen features (faiss, cosine similarity, votes weighted by exp(sim/T))."""

    method: Literal["knn"]
    k: int = Field(20, ge=1, le=10_000)
    knn_temperature: float = Field(0.07, gt=0, le=100, allow_inf_nan=False)
    ivf: bool = Field(False, description="approximate faiss IVF index for large banks")


class TransferStage(EvalStageBase):
    """Domain transfer: fit on `data` (the source), score on each target; optionally corruptions of the source test split, adaptation
    numbers beside the plain ones, and a leave-one-domain-out table over `domains`."""

    method: Literal["transfer"]
    targets: list[str] = Field(default_factory=list, description="dataset specs with the source's classes")
    epochs: int = Field(100, ge=1)
    oracle: bool = Field(True, description="also fit on each labeled target itself (the upper bound)")
    adapt: list[Literal["adabn", "fixmatch"]] = Field(default_factory=list)
    adapt_steps: int = Field(300, ge=1, description="training steps of fixmatch adaptation")
    corruptions: list[str] = Field(default_factory=list, description="'all' or names from eval/corruptions.py")
    severities: list[Literal[1, 2, 3, 4, 5]] = Field(default_factory=lambda: [1, 2, 3, 4, 5])
    domains: list[str] = Field(default_factory=list, description="leave-one-domain-out over these (≥ 3)")
    tsne: bool = Field(True, description="t-SNE picture of source and target features in plots/")
    sweep: bool = Field(True, description="choose each probe's lr/wd on a validation split")

    @model_validator(mode="after")
    def _something_to_do(self) -> "TransferStage":
        if not (self.targets or self.corruptions or self.domains):
            raise ValueError("give targets, corruptions or domains (leave-one-domain-out)")
        if self.domains and len(self.domains) < 3:
            raise ValueError(f"leave-one-domain-out needs at least 3 domains, got {self.domains}")
        return self

    @field_validator("corruptions")
    @classmethod
    def _known_corruptions(cls, names: list[str]) -> list[str]:
        if names == ["all"]:
            return list(CORRUPTION_NAMES)
        unknown = [n for n in names if n not in CORRUPTION_NAMES]
        if unknown:
            raise ValueError(f"unknown corruption(s) {unknown!r}; known: all, {', '.join(CORRUPTION_NAMES)}")
        return names


EVAL_STAGES: dict[str, type] = {"linear_probe": LinearProbeStage, "attentive_probe": AttentiveProbeStage,
                                 "knn": KnnStage, "transfer": TransferStage}
EVAL_METHODS = tuple(EVAL_STAGES)
_TRAINING_STAGES: dict[str, type[StageBase]] = {}


def register_stage_schema(method: str, schema: type[StageBase]) -> None:
    """Make `method: <method>` a valid training stage validated by `schema` (a StageBase subclass whose `method`
    field is Literal[method]). Called by `ssl_kit.methods.registry.register`: each method declares its own keys."""
    annotation = schema.model_fields.get("method")
    if annotation is None or method not in getattr(annotation.annotation, "__args__", ()):
        raise TypeError(f"{schema.__name__} must declare `method: Literal[{method!r}]`")
    if method in EVAL_STAGES or (method in _TRAINING_STAGES and _TRAINING_STAGES[method] is not schema):
        raise TypeError(f"stage method {method!r} is registered twice")
    _TRAINING_STAGES[method] = schema
    _recipe_model.cache_clear()


def _training_stages() -> dict[str, type[StageBase]]:
    """The registered training stage schemas, after importing ssl_kit.methods (whose modules register them): the
    package facade no longer imports every method, so whatever reads the registry loads it here first."""
    importlib.import_module(f"{__package__}.methods")  # deferred: methods import this module; cached once done
    return _TRAINING_STAGES


def training_methods() -> tuple[str, ...]:
    """Names of the registered training methods (the `method:` values of training stages)."""
    return tuple(_training_stages())


def stage_schema(method: str) -> type:
    """The config class that validates a stage with this `method`."""
    return {**_training_stages(), **EVAL_STAGES}[method]


class WandbConfig(Strict):
    enabled: bool = False
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "ssl_kit"
    entity: Optional[str] = None


class TensorBoardConfig(Strict):
    enabled: bool = Field(False, description="event files in RUN/tensorboard/: scalars, the first step's augmented "
                                             "views, the report's figures (needs the ssl_kit[tensorboard] extra)")


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"  # a run's folder name under runs/: no '/', no leading '.'


class Recipe(Strict):
    """seed, name, description, wandb, and the stages; each stage is validated by the schema of its `method`
    (`_recipe_model` builds the discriminated union from the registered methods)."""

    seed: int = Field(0, ge=0, lt=2**63)
    name: Optional[str] = Field(None, pattern=NAME_PATTERN,
                                description="run folder name under runs/ (letters, digits, _ . -; no path)")
    description: str = ""
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = Field(default_factory=TensorBoardConfig)
    stages: list[Any] = Field(min_length=1)

    @model_validator(mode="after")
    def _stage_references(self) -> "Recipe":
        seen: list[str] = []
        for stage in self.stages:
            if stage.name in seen:
                raise ValueError(f"stage name {stage.name!r} is used twice")
            for what, ref in stage.stage_references().items():
                if ref is not None and ref not in seen:
                    raise ValueError(f"stage {stage.name!r} takes its {what} from {ref!r}, which is not an earlier "
                                     f"stage (earlier: {seen or 'none'})")
            seen.append(stage.name)
        self._sources_are_training_stages()
        self._bounded_sizes()
        return self

    def _sources_are_training_stages(self) -> None:
        kinds = {stage.name: stage.method for stage in self.stages}
        for stage in self.stages:
            for role, ref in stage.stage_references().items():
                key = "from_stage" if role == "backbone" else f"{role}.from_stage"
                if ref is not None and kinds[ref] in EVAL_METHODS:
                    raise ValueError(f"stage {stage.name!r}: {key} {ref!r} is an evaluation stage ({kinds[ref]}), "
                                     f"which produces no backbone; name a training stage")

    def _bounded_sizes(self) -> None:
        """Knobs that multiply memory or time: finite epochs, at most 10^9 steps, architecture integers and the
        pixels of one step ((1 + mu) × batch × channels × image_size²) within the caps of limits.py."""
        for stage in self.stages:
            if not isinstance(stage, StageBase):
                continue
            where = f"stages[{stage.name}]"
            train = stage.train
            if train.epochs is not None and not math.isfinite(train.epochs) or (train.epochs or 0) > 1e6:
                raise ValueError(f"{where}.train.epochs must be finite and at most 1e6, got {train.epochs}")
            if train.steps is not None and train.steps > 10**9:
                raise ValueError(f"{where}.train.steps must be at most 1e9, got {train.steps}")
            _check_free_form(stage.backbone.kwargs, f"{where}.backbone.kwargs", 0)
            images = train.batch_size * (1 + stage.unlabeled_ratio())
            pixels = images * (stage.data.channels or 3) * stage.data.image_size ** 2
            if pixels > limit("MAX_BATCH_PIXELS"):
                raise ValueError(f"{where}: one step would hold {images} images of {stage.data.image_size}² px "
                                 f"({pixels:,} values: train.batch_size × (1 + mu) × channels × image_size²); "
                                 f"{how_to_raise('MAX_BATCH_PIXELS')}")

    def stage(self, name: str):
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


def _check_free_form(value: Any, where: str, depth: int) -> None:
    """Free-form settings (backbone.kwargs): plain scalars and short lists, integers within MAX_ARCH_INT."""
    if depth > 4:
        raise ValueError(f"{where} is nested more than 4 levels deep")
    if isinstance(value, dict):
        if len(value) > 64:
            raise ValueError(f"{where} has {len(value)} keys (at most 64)")
        for key, item in value.items():
            _check_free_form(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, (list, tuple)):
        if len(value) > 64:
            raise ValueError(f"{where} is a list of {len(value)} items (at most 64)")
        for i, item in enumerate(value):
            _check_free_form(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int) and abs(value) > limit("MAX_ARCH_INT"):
        raise ValueError(f"{where} = {value} is beyond any real architecture; {how_to_raise('MAX_ARCH_INT')}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} = {value} is not finite")
    elif isinstance(value, str) and len(value) > 256:
        raise ValueError(f"{where} is a string of {len(value)} characters (at most 256)")


@functools.lru_cache(maxsize=None)
def _recipe_model() -> type[Recipe]:
    """Recipe whose `stages` is the discriminated union (on `method`) of every registered stage schema."""
    schemas = tuple(_training_stages().values()) + tuple(EVAL_STAGES.values())
    stage = Annotated[Union[schemas], Field(discriminator="method")]
    return create_model("Recipe", __base__=Recipe, __doc__=Recipe.__doc__,
                        stages=(list[stage], Field(min_length=1)))


# ----------------------------------------------------------------------------------------------
# validation and its error messages (YAML loading and overrides: recipe_files.py)


def _format_location(loc: tuple, raw: dict) -> str:
    """Turn pydantic's loc ('stages', 0, 'fixmatch', 'threshold') into 'stages[fixmatch].threshold'."""
    parts: list[str] = []
    items = list(loc)
    i = 0
    while i < len(items):
        item = items[i]
        if item == "stages" and i + 1 < len(items) and isinstance(items[i + 1], int):
            index = items[i + 1]
            stages = raw.get("stages") or []
            name = stages[index].get("name", index) if index < len(stages) and isinstance(stages[index], dict) else index
            parts.append(f"stages[{name}]")
            i += 2
            if i < len(items) and isinstance(items[i], str) and items[i] in training_methods() + EVAL_METHODS:
                i += 1  # the discriminator tag pydantic inserts
            continue
        parts.append(f"[{item}]" if isinstance(item, int) else f".{item}")
        i += 1
    return "".join(parts).lstrip(".") or "<recipe>"


def _allowed_values_hint(error: dict) -> str:
    ctx = error.get("ctx") or {}
    if "expected" in ctx:
        return f" (allowed: {ctx['expected']})"
    return ""


def validate_recipe(raw: dict, source: str = "recipe") -> Recipe:
    """Validate a raw recipe dict; raise ConfigError listing every problem with its key path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe is a mapping with 'seed' and 'stages', got {type(raw).__name__}")
    try:
        return _recipe_model().model_validate(raw)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            where = _format_location(error["loc"], raw)
            got = error.get("input")
            got_text = "" if isinstance(got, (dict, list)) or error["type"] == "missing" else f" (got {short_repr(got)})"
            lines.append(f"  {where}: {error['msg']}{_allowed_values_hint(error)}{got_text}")
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(lines)) from None


def short_repr(value: Any, width: int = 200) -> str:
    """repr(value) cut to `width` characters: error messages never echo a whole hostile value."""
    text = repr(value)
    return text if len(text) <= width else f"{text[:width]}... ({len(text):,} characters)"
