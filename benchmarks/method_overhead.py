"""Per-method cost against the floor (issues 3, 4, 9): one engine step of a method (its on-device augmentation,
heads, loss, momentum updates, all included) divided by a bare forward/backward/step of the same backbone + linear
head on the same number of images (SimCLR/MoCo: 2 views × batch; FixMatch: (1 + 2μ) × batch), same process,
interleaved (AdaMatch: (2 + 2μ) × batch, its labeled-only pass for the logit interpolation included). Also times
the losses against a straightforward implementation. The own floor adds the no-grad forwards a method's algorithm
needs (momentum encoders, EMA teachers); for I-JEPA, MSN and CAPI its gradient pass sees only the patches their
encoder sees (`SomePatches`), while the bare step runs the ViT on every patch of the same crops.

    python benchmarks/method_overhead.py [--methods simclr mocov2 mocov3 fixmatch] [--model small_cnn] [--device cpu]
    python benchmarks/method_overhead.py --methods ijepa capi --gpu-recipes --size 224 --batch 8

`--gpu-recipes`: the self-supervised ViT methods with the backbone and keys of their GPU recipes
(`ssl_kit/recipes/<method>_vit_small_imagefolder.yaml`: ViT-S/16 or /14, the method's own heads and predictor)
instead of the digits-scale ViT; use it with --size 224.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import engine_vs_bare, table, time_interleaved  # noqa: E402
from ssl_kit.config import validate_recipe  # noqa: E402
from ssl_kit.data.pipeline import prepare_data  # noqa: E402
from ssl_kit.engine.trainer import RunContext, Trainer  # noqa: E402
from ssl_kit.losses import capi_cross_entropy, nt_xent_loss  # noqa: E402
from ssl_kit.engine.checkpoint import resolve_checkpoint  # noqa: E402
from ssl_kit.methods import build_method  # noqa: E402
from ssl_kit.models.heads import Classifier  # noqa: E402
from ssl_kit.models.registry import build_backbone  # noqa: E402

HEADERS = ["method", "backbone", "px", "batch", "method img/s", "bare img/s", "step / bare",
           "step / own floor"]  # own floor: bare, plus the momentum encoder's no-grad forward for MoCo (etc.)
KWARGS = {"small_cnn": {"width": 32}, "resnet18": {"small_stem": True}, "wide_resnet28_2": {},
          "vit_tiny": {"patch_size": 4, "dim": 96, "depth": 4, "heads": 3}}
VIT_METHODS = ("mae", "simmim")  # measured on the small ViT whatever --model says (MAE needs a ViT)
# Self-supervised ViT methods, on KWARGS["vit_tiny"] at --size (32 px, patch 4: the 8 x 8 grid of the I-JEPA / MSN
# recipes' 16 px with patch 2) whatever --model says; their recipes' optimizer, AdamW (LeJEPA's too)
VIT_SSL = ("ibot", "dinov2", "ijepa", "msn", "capi")
ADAMW = VIT_SSL + ("lejepa",)
MULTI_CROP = {  # the heads and crops of ssl_kit/recipes/<method>_digits.yaml (LARS like SimCLR; iBOT: AdamW on the ViT)
    "swav": dict(n_prototypes=100, proj_hidden_dim=128, proj_dim=64, local_crops=2, local_crop_size=0.5,
                 queue_length=512, queue_start_epochs=0),
    "nnclr": dict(proj_hidden_dim=128, proj_dim=64, pred_hidden_dim=128, support_set_size=1024),
    "supcon": dict(proj_hidden_dim=128, proj_dim=64),
    "ibot": dict(backbone={"name": "vit_tiny", "kwargs": KWARGS["vit_tiny"]}, out_dim=1024, head_hidden_dim=256,
                 bottleneck_dim=64, local_crops=2, local_crop_size=0.5, masking="random"),
    "dinov2": dict(backbone={"name": "vit_tiny", "kwargs": KWARGS["vit_tiny"]}, out_dim=1024, patch_out_dim=1024,
                   shared_head=False, head_hidden_dim=256, bottleneck_dim=64, centering="sinkhorn_knopp",
                   koleo_weight=0.1, momentum=0.9, local_crops=2, local_crop_size=0.5, mask_ratio=(0.1, 0.5),
                   mask_prob=0.5, masking="random", layer_decay=0.9),
    "lejepa": dict(sigreg_weight=0.05, num_slices=256, proj_hidden_dim=512, proj_dim=64, global_views=2,
                   local_crops=4, local_crop_size=0.5, blur_prob=0.0, solarize_prob=0.0),
    "msn": dict(backbone={"name": "vit_tiny", "kwargs": KWARGS["vit_tiny"]}, num_prototypes=256, hidden_dim=512,
                output_dim=128, mask_ratio=0.15, rand_views=1, focal_views=6),
    "ijepa": dict(backbone={"name": "vit_tiny", "kwargs": {**KWARGS["vit_tiny"], "global_pool": True}},
                  predictor_dim=48, predictor_depth=2, num_targets=4),
    "capi": dict(backbone={"name": "vit_tiny", "kwargs": KWARGS["vit_tiny"]}),  # no digits recipe: its defaults
}
HEADS = {  # the heads of ssl_kit/recipes/<method>_digits.yaml
    "byol": dict(proj_hidden_dim=128, proj_dim=64, pred_hidden_dim=128),
    "simsiam": dict(proj_hidden_dim=128, proj_dim=64, pred_hidden_dim=32),
    "barlow_twins": dict(proj_hidden_dim=256, proj_dim=256, scale_loss=0.1),
    "vicreg": dict(proj_hidden_dim=256, proj_dim=256),
    "emp_ssl": dict(n_patches=20, patch_scale=0.5, proj_hidden_dim=512, proj_dim=128, blur_prob=0.0,
                    solarize_prob=0.0),
    "mmcr": dict(n_views=4, lambda_local=0.0, momentum_encoder=True, momentum=0.99, proj_hidden_dim=128, proj_dim=64),
    "tico": dict(proj_hidden_dim=256, proj_dim=64, beta=0.9, rho=8.0, momentum=0.99),
    "dcl": dict(temperature=0.2, proj_hidden_dim=128, proj_dim=64),
}
# Semi-supervised methods beside FixMatch: their own keys here, and how many images get forward/backward per labeled
# image (`grad`) and a no-grad forward only (`nograd`: Mean Teacher's teacher, MixMatch's K label guesses) given μ.
SEMI_METHODS = {"pseudo_label": ({}, lambda mu: (1 + mu, 0)),
                "mean_teacher": ({}, lambda mu: (1 + mu, mu)),
                "uda": ({}, lambda mu: (1 + 2 * mu, 0)),
                "mixmatch": ({"num_augmentations": 2}, lambda mu: (1 + 2 * mu, 2 * mu)),
                "dash": ({"warmup_steps": 1}, lambda mu: (1 + 2 * mu, 0))}


RECIPES = Path(__file__).resolve().parents[1] / "ssl_kit" / "recipes"
SKIPPED_RECIPE_KEYS = ("name", "data", "train", "schedule")  # the benchmark's own data, steps and batch
GPU_RECIPE_METHODS = tuple(m for m in VIT_SSL if (RECIPES / f"{m}_vit_small_imagefolder.yaml").is_file())


def gpu_recipe_keys(method: str) -> dict:
    """The pretraining stage of ssl_kit/recipes/<method>_vit_small_imagefolder.yaml less its data and run keys:
    backbone, method keys (heads, crops, predictor) and optimizer as a user's GPU run has them."""
    path = RECIPES / f"{method}_vit_small_imagefolder.yaml"
    if not path.is_file():
        raise SystemExit(f"--gpu-recipes: {method} has no GPU image-folder recipe ({path.name}); "
                         f"the ViT methods that have one: {', '.join(GPU_RECIPE_METHODS)}")
    stage = yaml.safe_load(path.read_text())["stages"][0]
    return {key: value for key, value in stage.items() if key not in SKIPPED_RECIPE_KEYS}


def stage_for(method: str, model: str, batch: int, size: int, device: str, mu: int,
              gpu_recipes: bool = False) -> dict:
    stage = {"name": method, "method": method, "data": {"dataset": "digits", "image_size": size},
             "backbone": {"name": model, "kwargs": KWARGS[model]},
             "optimizer": {"name": "sgd", "lr": 0.03, "momentum": 0.9},
             "train": {"steps": 1000, "batch_size": batch, "progress": False, "device": device}}
    if method in ("fixmatch", "simmatch", "adamatch"):
        stage.update(mu=mu)
        stage["data"]["labels_per_class"] = 10
        stage["train"]["ema_decay"] = 0.999
    if method in SEMI_METHODS:
        stage.update(mu=mu, **SEMI_METHODS[method][0])
        stage["data"]["labels_per_class"] = 10
        stage["train"]["ema_decay"] = 0.999
    if method in ("simclr", "mocov2", "mocov3", "byol", "barlow_twins", "vicreg", "emp_ssl", "mmcr", "tico", "dcl"):
        stage["optimizer"]["name"] = "lars"
    stage.update(HEADS.get(method, {}))
    if method == "dino":  # the head and crops of ssl_kit/recipes/dino_digits.yaml
        stage.update(local_crops=4, local_crop_size=0.5, out_dim=1024, head_hidden_dim=256, bottleneck_dim=64)
    if method in MULTI_CROP:
        stage.update(MULTI_CROP[method])
        stage["optimizer"]["name"] = "adamw" if method in ADAMW else "lars"
    if gpu_recipes and method in VIT_SSL:
        for key in MULTI_CROP[method]:  # the method's defaults where the recipe sets nothing
            stage.pop(key, None)
        stage.update(gpu_recipe_keys(method))
    if method in VIT_METHODS:  # the ViT and decoder of ssl_kit/recipes/mae_digits.yaml
        stage["backbone"] = {"name": "vit_tiny", "kwargs": {**KWARGS["vit_tiny"], "global_pool": True}}
        if method == "mae":
            stage.update(decoder_dim=64, decoder_depth=2)
    return stage


class SomePatches(torch.nn.Module):
    """A ViT that encodes only keep(L) of an image's L patch tokens (+ [cls]): the encoder of a method that drops
    patches (I-JEPA's context, MSN's anchors, CAPI's student). Which patches does not change the cost: the first."""

    def __init__(self, vit: torch.nn.Module, keep) -> None:
        super().__init__()
        self.vit, self.keep, self.num_features = vit, keep, vit.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.embed(x)
        return self.vit.encode(tokens[:, :self.keep(tokens.shape[1])])[:, 0]


def measure(method: str, model: str, batch: int, size: int, device: str, mu: int, steps: int, rounds: int,
            gpu_recipes: bool = False) -> tuple:
    model = "vit_tiny" if method in VIT_METHODS + VIT_SSL else model
    stage = stage_for(method, model, batch, size, device, mu, gpu_recipes)
    model = stage["backbone"]["name"]
    cfg = validate_recipe({"seed": 0, "stages": [stage]}).stages[0]
    cls = build_method(method)
    data = prepare_data(cfg.data, 0, cls.data_needs(cfg))
    torch.manual_seed(0)
    kwargs = dict(cfg.backbone.kwargs)
    backbone = build_backbone(model, data.info.channels, size, kwargs)
    instance = cls(cfg, backbone, data.info, **cls.context_from(cfg, data, resolve_checkpoint))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(instance, data, cfg, RunContext(Path(tmp), 0), {})
        dev, channels, classes = trainer.device, data.info.channels, data.info.num_classes
        bare = Classifier(build_backbone(model, channels, size, kwargs), classes).to(dev).train()

        def images(n: int, side: int = size):
            return torch.randn(n, channels, side, side, device=dev), torch.randint(0, classes, (n,), device=dev)

        key_encoder, key_input = None, None
        keep = None  # patch tokens the gradient encoder sees, L -> count, when it drops some (own floor below)
        if method in ("fixmatch", "simmatch"):
            (x, y), count = images(batch * (1 + 2 * mu)), batch * (1 + 2 * mu)
        elif method == "adamatch":  # + the labeled images again, alone (random logit interpolation)
            (x, y), count = images(batch * (2 + 2 * mu)), batch * (2 + 2 * mu)
        elif method in SEMI_METHODS:  # the floor: the same images through forward/backward (+ no-grad passes)
            grad, nograd = SEMI_METHODS[method][1](mu)
            (x, y), count = images(batch * grad), batch * grad
            if nograd:
                key_encoder, key_input = bare, images(batch * nograd)[0]
        elif method in ("dino", "swav", "ibot", "dinov2", "lejepa"):  # 2 global views + local crops at their size
            local = max(4, round(size * cfg.local_crop_size))
            (xg, yg), (xl, yl) = images(2 * batch), images(cfg.local_crops * batch, local)
            x, y, count = [xg, xl], [yg, yl], (2 + cfg.local_crops) * batch
            if method not in ("swav", "lejepa"):  # DINO/iBOT/DINOv2: the EMA teacher sees the (unmasked) globals
                key_encoder, key_input = build_backbone(model, channels, size, kwargs).to(dev).train(), xg
        elif method == "emp_ssl":  # n_patches crops of each image, each resized to the full image size
            (x, y), count = images(cfg.n_patches * batch), cfg.n_patches * batch
        elif method == "mmcr":  # n_views views; the momentum encoder embeds the same views again, no grad
            (x, y), count = images(cfg.n_views * batch), cfg.n_views * batch
            key_encoder, key_input = build_backbone(model, channels, size, kwargs).to(dev).train(), x
        elif method == "tico":  # online network on view 1 only, the momentum target on view 2, no grad
            (x, y), count = images(batch), batch
            key_encoder, key_input = build_backbone(model, channels, size, kwargs).to(dev).train(), images(batch)[0]
        elif method == "msn":  # anchors: rand_views global + focal_views focal crops, mask_ratio of patches dropped;
            # the target encoder sees one global view, whole. bare: the ViT on every patch of the anchors
            patch = cfg.backbone.kwargs["patch_size"]
            focal = max(patch, int(round(size * cfg.focal_crop_size / patch)) * patch)
            (xg, yg), (xf, yf) = images(cfg.rand_views * batch), images(cfg.focal_views * batch, focal)
            x, y, count = [xg, xf], [yg, yf], (cfg.rand_views + cfg.focal_views) * batch
            key_encoder, key_input = build_backbone(model, channels, size, kwargs).to(dev).eval(), images(batch)[0]
            keep = lambda length: max(1, length - int(cfg.mask_ratio * length))  # noqa: E731
        elif method in ("ijepa", "capi"):  # one crop; bare: the ViT on every patch. Own floor: the gradient encoder
            # on the patches it sees (I-JEPA's context block less the targets, cut to the batch's smallest, its mean
            # count over 20 draws of the method's masks; CAPI's visible block) + the no-grad EMA target/teacher
            # encoder on the whole crop. The predictor and heads are the method's own work, not floor
            (x, y), count = images(batch), batch
            key_encoder, key_input = build_backbone(model, channels, size, kwargs).to(dev).eval(), x
            draws = [instance.masks(batch, "cpu") for _ in range(20)]
            seen = sum((m.context if method == "ijepa" else m.visible).shape[1] for m in draws) / len(draws)
            keep = lambda length: round(seen)  # noqa: E731
        elif method in VIT_METHODS or method == "supervised":  # one view (MIM: the full ViT on every patch)
            (x, y), count = images(batch), batch
        else:
            (x, y), count = images(2 * batch), 2 * batch
            if method in ("mocov2", "mocov3", "byol"):  # their floor also has the momentum encoder's no-grad forward
                key_encoder = build_backbone(model, channels, size, kwargs).to(dev).train()
        floor_model = None if keep is None else Classifier(
            SomePatches(build_backbone(model, channels, size, kwargs), keep), classes).to(dev).train()
        times = engine_vs_bare(trainer, bare, x, y, steps, rounds, key_encoder, key_input, floor_model)
    floor = times.get("bare+key", times["bare"])
    return (times["engine"] / times["bare"], count / times["engine"], count / times["bare"], times["engine"] / floor,
            model)


def naive_nt_xent(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = torch.exp(z @ z.T / t)
    positives = torch.cat([torch.diag(sim, n), torch.diag(sim, -n)])
    denominator = sim.sum(1) - torch.diag(sim)
    return -(torch.log(positives / denominator)).mean()


def loss_row(name: str, ours: Callable[[], torch.Tensor], naive: Callable[[], torch.Tensor], device: torch.device,
             steps: int, rounds: int) -> list:
    """One row of the loss table: forward + backward of `ours` against `naive` (each a closure returning the
    scalar loss), timed in alternating blocks, and the difference of their values."""
    times = time_interleaved({"ours": lambda: ours().backward(), "naive": lambda: naive().backward()}, steps, rounds,
                             device)
    check = abs(ours().item() - naive().item())
    return [name, times["ours"] * 1e3, times["naive"] * 1e3, times["naive"] / times["ours"], f"{check:.1e}"]


def loss_timing(device: torch.device) -> list:
    rows = []
    for n, d in ((256, 128), (1024, 128)):
        z1 = torch.randn(n, d, device=device, requires_grad=True)
        z2 = torch.randn(n, d, device=device, requires_grad=True)
        rows.append(loss_row(f"nt_xent N={n} D={d}", lambda: nt_xent_loss(z1, z2, 0.2),
                             lambda: naive_nt_xent(z1, z2, 0.2), device, 10, 5))
    rows.append(capi_cross_entropy_timing(device))
    return rows


def naive_capi_cross_entropy(logits, targets, t):
    """The autograd chain log_softmax -> multiply -> sum -> mean that capi_cross_entropy replaces."""
    return -(targets * F.log_softmax(logits.float() / t, dim=-1)).sum(dim=-1).mean()


def capi_cross_entropy_timing(device: torch.device, shape=(8, 256, 16384)) -> list:
    """CAPI's clustering loss at ViT-S/14 224 px, batch 8: (B, L = 256 patches, K = 16,384 clusters), forward and
    backward, against the autograd chain."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=generator).to(device).requires_grad_(True)
    targets = torch.softmax(torch.randn(shape, generator=generator) / 0.06, dim=-1).to(device)
    return loss_row(f"capi_cross_entropy {tuple(shape)}", lambda: capi_cross_entropy(logits, targets, 0.12),
                    lambda: naive_capi_cross_entropy(logits, targets, 0.12), device, 2, 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+",
                        default=["supervised", "simclr", "mocov2", "mocov3", "fixmatch", "dino", "mae", "simmim"])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--fixmatch-batch", type=int, default=32)
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gpu-recipes", action="store_true",
                        help="ViT methods with their GPU recipes' backbone and keys (ViT-S); use --size 224")
    args = parser.parse_args()
    rows = []
    for method in args.methods:
        batch = args.fixmatch_batch if method in ("fixmatch", "simmatch", "adamatch") or method in SEMI_METHODS \
            else args.batch
        ratio, ips, bare_ips, own, model = measure(method, args.model, batch, args.size, args.device, args.mu,
                                                   args.steps, args.rounds, args.gpu_recipes)
        rows.append([method, model, args.size, batch, ips, bare_ips, ratio, own])
        print(table(HEADERS, rows[-1:]), flush=True)
    print("\n" + table(HEADERS, rows))
    print("\n" + table(["loss", "ssl_kit ms", "naive ms", "naive / ssl_kit", "|difference|"],
                       loss_timing(torch.device(args.device))))


if __name__ == "__main__":
    main()
