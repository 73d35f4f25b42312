"""Parameter count and FLOPs per image of a backbone (torch's FLOP counter)."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..engine.checkpoint import build_from_record


def model_info(record: dict) -> dict:
    backbone = build_from_record(record).eval()
    info = record["data"]
    x = torch.zeros(1, info["channels"], info["image_size"], info["image_size"])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone(x)
    return {"arch": record["arch"], "params": sum(p.numel() for p in backbone.parameters()),
            "flops_per_image": int(counter.get_total_flops()), "num_features": int(backbone.num_features),
            "image_size": info["image_size"], "channels": info["channels"], "trained_on": info.get("dataset")}
