"""Per-iteration learning-rate factors: linear warmup, then cosine / FixMatch cosine / step / multistep /
exponential / constant; and a plateau scheduler driven by a monitored metric. Param groups marked 'fixed_lr' keep
their base lr (`LrSchedule.apply`). With `weight_decay_end`, the decaying groups' weight decay follows a cosine over
the run as well."""
from __future__ import annotations

import math

from ..config import ScheduleConfig


class LrSchedule:
    """factor(step) in [0, 1] multiplies each param group's base lr. steps_per_epoch converts epoch settings."""

    def __init__(self, cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> None:
        self.cfg, self.total, self.per_epoch = cfg, max(1, total_steps), max(1, steps_per_epoch)
        self.warmup = min(int(round(cfg.warmup_epochs * self.per_epoch)), self.total)
        self.plateau_scale = 1.0
        self._best: float | None = None
        self._bad = 0

    def factor(self, step: int) -> float:
        cfg = self.cfg
        if step < self.warmup:
            return cfg.warmup_start + (1 - cfg.warmup_start) * step / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        progress = min(max(progress, 0.0), 1.0)
        floor = cfg.min_lr_ratio
        if cfg.name == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.name == "fixmatch_cosine":  # lr · cos(7π k / 16 K)
            return max(floor, math.cos(7 * math.pi * progress / 16))
        if cfg.name == "step":
            return max(floor, cfg.gamma ** int((step - self.warmup) / (cfg.step_epochs * self.per_epoch)))
        if cfg.name == "multistep":
            passed = sum(progress >= m for m in cfg.milestones)
            return max(floor, cfg.gamma ** passed)
        if cfg.name == "exponential":  # gamma per epoch
            return max(floor, cfg.gamma ** ((step - self.warmup) / self.per_epoch))
        if cfg.name == "plateau":
            return self.plateau_scale
        return 1.0

    def weight_decay(self, start: float, step: int) -> float:
        """The weight decay at `step` of a group that decays from `start`: with weight_decay_end, the cosine
        end + (start − end) · ½(1 + cos(π · step / total)) over the whole run, warm-up included (DINO's and iBOT's
        cosine_scheduler(weight_decay, weight_decay_end), DINOv2's, I-JEPA's and MSN's CosineWDSchedule); without,
        `start`."""
        end = self.cfg.weight_decay_end
        if end is None:
            return start
        progress = min(max(step / self.total, 0.0), 1.0)
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))

    def apply(self, param_groups: list[dict], step: int) -> None:
        """Set each torch param group's lr to base_lr × factor(step), or to base_lr when its 'fixed_lr' is set
        (no warmup either: the group trains at its base lr from step 0, as SimSiam's predictor); and the weight
        decay of every group with a 'base_weight_decay' (groups without decay have None and keep 0)."""
        factor = self.factor(step)
        for group in param_groups:
            group["lr"] = group["base_lr"] * (1.0 if group.get("fixed_lr", False) else factor)
            if group.get("base_weight_decay") is not None:
                group["weight_decay"] = self.weight_decay(group["base_weight_decay"], step)

    # plateau: reduce by gamma after `patience` epochs without improvement of the monitored metric (lower = better
    # for names ending in 'loss', else higher = better)
    def state_dict(self) -> dict:
        return {"plateau_scale": self.plateau_scale, "best": self._best, "bad": self._bad}

    def load_state_dict(self, state: dict) -> None:
        self.plateau_scale, self._best, self._bad = state["plateau_scale"], state["best"], state["bad"]

    def observe(self, metrics: dict) -> None:
        if self.cfg.name != "plateau" or self.cfg.plateau_metric not in metrics:
            return
        value = float(metrics[self.cfg.plateau_metric])
        lower_is_better = self.cfg.plateau_metric.endswith("loss")
        best = self._best
        improved = best is None or (value < best if lower_is_better else value > best)
        if improved:
            self._best, self._bad = value, 0
            return
        self._bad += 1
        if self._bad > self.cfg.plateau_patience:
            self.plateau_scale = max(self.cfg.min_lr_ratio, self.plateau_scale * self.cfg.gamma)
            self._bad = 0
