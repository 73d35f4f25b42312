"""The weak/strong base (methods/weak_strong.py): every method that trains a strong view stands on it, its joint
forward equals three separate passes when batch norm is frozen, its gate is the one every method uses, and a
checkpoint written before the base (gate state at `policy.*` / `alignment.*`) resumes exactly."""
from __future__ import annotations

import pytest
import torch

from conftest import build_semi_method, semi_batch, tiny_stage
from ssl_kit.config import validate_recipe
from ssl_kit.data.loader import Batch
from ssl_kit.errors import ConfigError
from ssl_kit.methods.base import Progress
from ssl_kit.methods.registry import registered_methods
from ssl_kit.methods.weak_strong import GatedConfig, WeakStrongConfig, WeakStrongMethod, split_joint

SEMI = dict(data={"dataset": "digits", "image_size": 16, "labels_per_class": 4},
            train={"steps": 6, "batch_size": 16, "ema_decay": 0.9, "log_every": 1})


def _method(method: str, **overrides):
    return build_semi_method(tiny_stage(method, method, **{**SEMI, "mu": 2, **overrides}))


def _batch(data, b: int = 8, mu: int = 2) -> Batch:
    return semi_batch(data, b, mu)


def test_every_method_with_a_strong_view_stands_on_the_base():
    strong = {name: cls for name, cls in registered_methods().items()
              if "strong" in cls.config_class.model_fields}
    assert {"fixmatch", "uda", "dash", "adamatch", "simmatch"} <= set(strong)
    for name, cls in strong.items():
        assert issubclass(cls.config_class, WeakStrongConfig), name
        assert issubclass(cls, WeakStrongMethod), name
        if "threshold_policy" in cls.config_class.model_fields:
            assert issubclass(cls.config_class, GatedConfig), name


def test_split_joint_returns_the_three_parts_in_order():
    rows = torch.arange(3 + 2 * 4).float().unsqueeze(1)  # 3 labeled, 4 weak, 4 strong
    labeled, weak, strong = split_joint(rows, 3)
    assert labeled.flatten().tolist() == [0, 1, 2]
    assert weak.flatten().tolist() == [3, 4, 5, 6] and strong.flatten().tolist() == [7, 8, 9, 10]


@pytest.mark.parametrize("method", ["fixmatch", "simmatch"])
def test_joint_forward_equals_three_passes_with_frozen_batch_norm(method):
    model, data = _method(method)
    model.eval()  # BN uses running statistics: the only difference between the two is BN's batch statistics
    batch = _batch(data)
    torch.manual_seed(1)
    views = model.views(batch)
    network = model.features_and_embeddings if method == "simmatch" else None
    joint = model.forward_views(*views, network)
    model.cfg.joint_forward = False
    separate = model.forward_views(*views, network)
    flat = lambda parts: [t for part in parts for t in (part if isinstance(part, tuple) else (part,))]  # noqa: E731
    assert len(flat(joint)) == len(flat(separate)) == (6 if method == "simmatch" else 3)
    for a, b in zip(flat(joint), flat(separate)):
        assert torch.allclose(a, b, atol=1e-5)


def test_adamatch_refuses_separate_passes():
    stage = tiny_stage("a", "adamatch", **SEMI, joint_forward=False)
    with pytest.raises(ConfigError, match="joint_forward"):
        validate_recipe({"seed": 0, "name": "t", "stages": [stage]})


@pytest.mark.parametrize("method,options", [
    ("fixmatch", {"threshold": 0.3, "threshold_policy": {"policy": "flexmatch", "distribution_alignment": True}}),
    ("adamatch", {}),
    ("dash", {"warmup_steps": 1, "rho_window": 1, "rho_update_every": 1}),
])
def test_a_checkpoint_from_before_the_base_loads_its_gate_state(method, options):
    model, data = _method(method, **options)
    for step in range(3):
        model.training_step(_batch(data), Progress(step=step, total_steps=10, epoch=0, steps_per_epoch=10))
    state = model.state_dict()
    gate_keys = [k for k in state if k.startswith("gate.")]
    assert gate_keys, "the gate's state is checkpointed"
    old = {(k[len("gate."):] if k.startswith("gate.") else k): v.clone() for k, v in state.items()}
    fresh, _ = _method(method, **options)
    assert any(not torch.equal(fresh.state_dict()[k], state[k]) for k in gate_keys)  # the state moved in training
    fresh.load_state_dict(old)
    for key in gate_keys:
        assert torch.equal(fresh.state_dict()[key], state[key]), key
