"""Per-method cost against the floor (issues 3, 4, 9): one engine step of a method (its on-device augmentation,
heads, loss, momentum updates, all included) divided by a bare forward/backward/step of the same backbone + linear
head on the same number of images (SimCLR/MoCo: 2 views × batch; FixMatch: (1 + 2μ) × batch), same process,
interleaved (AdaMatch: (2 + 2μ) × batch, its labeled-only pass for the logit interpolation included). Also times
the losses against a straightforward implementation.

    python benchmarks/method_overhead.py [--methods simclr mocov2 mocov3 fixmatch] [--model small_cnn] [--device cpu]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import engine_vs_bare, table, time_interleaved  # noqa: E402
from ssl_kit.config import validate_recipe  # noqa: E402
from ssl_kit.data.pipeline import prepare_data  # noqa: E402
from ssl_kit.engine.trainer import RunContext, Trainer  # noqa: E402
from ssl_kit.losses import nt_xent_loss  # noqa: E402
from ssl_kit.engine.checkpoint import resolve_checkpoint  # noqa: E402
from ssl_kit.methods import build_method  # noqa: E402
from ssl_kit.models.heads import Classifier  # noqa: E402
from ssl_kit.models.registry import build_backbone  # noqa: E402

HEADERS = ["method", "backbone", "px", "batch", "method img/s", "bare img/s", "step / bare",
           "step / own floor"]  # own floor: bare, plus the momentum encoder's no-grad forward for MoCo
KWARGS = {"small_cnn": {"width": 32}, "resnet18": {"small_stem": True}, "wide_resnet28_2": {},
          "vit_tiny": {"patch_size": 4, "dim": 96, "depth": 4, "heads": 3}}
VIT_METHODS = ("mae", "simmim")  # measured on the small ViT whatever --model says (MAE needs a ViT)
MULTI_CROP = {  # the heads and crops of ssl_kit/recipes/<method>_digits.yaml (LARS like SimCLR; iBOT: AdamW on the ViT)
    "swav": dict(n_prototypes=100, proj_hidden_dim=128, proj_dim=64, local_crops=2, local_crop_size=0.5,
                 queue_length=512, queue_start_epochs=0),
    "nnclr": dict(proj_hidden_dim=128, proj_dim=64, pred_hidden_dim=128, support_set_size=1024),
    "supcon": dict(proj_hidden_dim=128, proj_dim=64),
    "ibot": dict(backbone={"name": "vit_tiny", "kwargs": KWARGS["vit_tiny"]}, out_dim=1024, head_hidden_dim=256,
                 bottleneck_dim=64, local_crops=2, local_crop_size=0.5, masking="random"),
}
HEADS = {  # the heads of ssl_kit/recipes/<method>_digits.yaml
    "byol": dict(proj_hidden_dim=128, proj_dim=64, pred_hidden_dim=128),
    "simsiam": dict(proj_hidden_dim=128, proj_dim=64, pred_hidden_dim=32),
    "barlow_twins": dict(proj_hidden_dim=256, proj_dim=256, scale_loss=0.1),
    "vicreg": dict(proj_hidden_dim=256, proj_dim=256),
}
# Semi-supervised methods beside FixMatch: their own keys here, and how many images get forward/backward per labeled
# image (`grad`) and a no-grad forward only (`nograd`: Mean Teacher's teacher, MixMatch's K label guesses) given μ.
SEMI_METHODS = {"pseudo_label": ({}, lambda mu: (1 + mu, 0)),
                "mean_teacher": ({}, lambda mu: (1 + mu, mu)),
                "uda": ({}, lambda mu: (1 + 2 * mu, 0)),
                "mixmatch": ({"num_augmentations": 2}, lambda mu: (1 + 2 * mu, 2 * mu)),
                "dash": ({"warmup_steps": 1}, lambda mu: (1 + 2 * mu, 0))}


def stage_for(method: str, model: str, batch: int, size: int, device: str, mu: int) -> dict:
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
    if method in ("simclr", "mocov2", "mocov3", "byol", "barlow_twins", "vicreg"):
        stage["optimizer"]["name"] = "lars"
    stage.update(HEADS.get(method, {}))
    if method == "dino":  # the head and crops of ssl_kit/recipes/dino_digits.yaml
        stage.update(local_crops=4, local_crop_size=0.5, out_dim=1024, head_hidden_dim=256, bottleneck_dim=64)
    if method in MULTI_CROP:
        stage.update(MULTI_CROP[method])
        stage["optimizer"]["name"] = "adamw" if method == "ibot" else "lars"
    if method in VIT_METHODS:  # the ViT and decoder of ssl_kit/recipes/mae_digits.yaml
        stage["backbone"] = {"name": "vit_tiny", "kwargs": {**KWARGS["vit_tiny"], "global_pool": True}}
        if method == "mae":
            stage.update(decoder_dim=64, decoder_depth=2)
    return stage


def measure(method: str, model: str, batch: int, size: int, device: str, mu: int, steps: int, rounds: int) -> tuple:
    model = "vit_tiny" if method in VIT_METHODS + ("ibot",) else model
    cfg = validate_recipe({"seed": 0, "stages": [stage_for(method, model, batch, size, device, mu)]}).stages[0]
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
        if method in ("fixmatch", "simmatch"):
            (x, y), count = images(batch * (1 + 2 * mu)), batch * (1 + 2 * mu)
        elif method == "adamatch":  # + the labeled images again, alone (random logit interpolation)
            (x, y), count = images(batch * (2 + 2 * mu)), batch * (2 + 2 * mu)
        elif method in SEMI_METHODS:  # the floor: the same images through forward/backward (+ no-grad passes)
            grad, nograd = SEMI_METHODS[method][1](mu)
            (x, y), count = images(batch * grad), batch * grad
            if nograd:
                key_encoder, key_input = bare, images(batch * nograd)[0]
        elif method in ("dino", "swav", "ibot"):  # 2 global views + local crops at their own size
            local = max(4, round(size * cfg.local_crop_size))
            (xg, yg), (xl, yl) = images(2 * batch), images(cfg.local_crops * batch, local)
            x, y, count = [xg, xl], [yg, yl], (2 + cfg.local_crops) * batch
            if method != "swav":  # DINO/iBOT: the EMA teacher sees the globals
                key_encoder, key_input = build_backbone(model, channels, size, kwargs).to(dev).train(), xg
        elif method in VIT_METHODS or method == "supervised":  # one view (MIM: the full ViT on every patch)
            (x, y), count = images(batch), batch
        else:
            (x, y), count = images(2 * batch), 2 * batch
            if method in ("mocov2", "mocov3", "byol"):  # their floor also has the momentum encoder's no-grad forward
                key_encoder = build_backbone(model, channels, size, kwargs).to(dev).train()
        times = engine_vs_bare(trainer, bare, x, y, steps, rounds, key_encoder, key_input)
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


def loss_timing(device: torch.device) -> list:
    rows = []
    for n, d in ((256, 128), (1024, 128)):
        z1 = torch.randn(n, d, device=device, requires_grad=True)
        z2 = torch.randn(n, d, device=device, requires_grad=True)

        def ours():
            nt_xent_loss(z1, z2, 0.2).backward()

        def naive():
            naive_nt_xent(z1, z2, 0.2).backward()

        times = time_interleaved({"ours": ours, "naive": naive}, 10, 5, device)
        check = abs(nt_xent_loss(z1, z2, 0.2).item() - naive_nt_xent(z1, z2, 0.2).item())
        rows.append([f"nt_xent N={n} D={d}", times["ours"] * 1e3, times["naive"] * 1e3, times["naive"] / times["ours"],
                     f"{check:.1e}"])
    return rows


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
    args = parser.parse_args()
    rows = []
    for method in args.methods:
        batch = args.fixmatch_batch if method in ("fixmatch", "simmatch", "adamatch") or method in SEMI_METHODS \
            else args.batch
        ratio, ips, bare_ips, own, model = measure(method, args.model, batch, args.size, args.device, args.mu,
                                                   args.steps, args.rounds)
        rows.append([method, model, args.size, batch, ips, bare_ips, ratio, own])
        print(table(HEADERS, rows[-1:]), flush=True)
    print("\n" + table(HEADERS, rows))
    print("\n" + table(["loss", "ssl_kit ms", "naive ms", "naive / ssl_kit", "|difference|"],
                       loss_timing(torch.device(args.device))))


if __name__ == "__main__":
    main()
