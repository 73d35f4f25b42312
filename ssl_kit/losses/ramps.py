"""Ramp-up weights for unsupervised loss terms: functions of the step, from 0 to 1 over `length` steps, then 1.

sigmoid (Laine & Aila 2017, Mean Teacher), linear (MixMatch / USB's `unsup_warmup`), cosine (AdaMatch). Each takes
plain numbers and returns a float, so a method multiplies its λ_u by it."""
from __future__ import annotations

import math


def _progress(step: float, length: float, name: str) -> float:
    """step / length clipped to [0, 1]; length 0 means 'no ramp' (1.0)."""
    for label, value in (("step", step), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name}: {label} must be a number >= 0, got {value!r}")
    if length == 0:
        return 1.0
    return min(1.0, step / length)


def sigmoid_rampup(step: float, length: float) -> float:
    """exp(−5 (1 − t)²) with t = min(step / length, 1): 0.0067 at step 0, 1 from step ≥ length (Laine & Aila's
    Temporal Ensembling and Mean Teacher's `sigmoid_rampup`). length 0 -> 1.0."""
    t = _progress(step, length, "sigmoid_rampup")
    return math.exp(-5.0 * (1.0 - t) ** 2)


def linear_rampup(step: float, length: float) -> float:
    """min(step / length, 1) (MixMatch; USB's `unsup_warmup` factor clip(it / (unsup_warmup · num_train_iter), 0, 1)).
    length 0 -> 1.0."""
    return _progress(step, length, "linear_rampup")


def cosine_rampup(step: float, length: float) -> float:
    """½ − ½ cos(π · min(step / length, 1)): AdaMatch's unlabeled-loss weight μ(t) = ½ − cos(min(π, 2πt/T))/2 with
    length = T/2 (it reaches 1 half-way through training). length 0 -> 1.0."""
    t = _progress(step, length, "cosine_rampup")
    return 0.5 - 0.5 * math.cos(math.pi * t)
