"""The method contract: a method is one file that declares its typed config and registers itself; momentum targets
are declared as pairs and updated in one place; each states the optimizer/schedule it trains with (tests/test_layers.py
checks the import layers)."""
import json
import math
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field

import ssl_kit.config as config
from ssl_kit.config import StageBase, validate_recipe
from ssl_kit.errors import ConfigError
from ssl_kit.losses import consistency_loss, fixmatch_loss
from ssl_kit.methods import Progress, build_method, registered_methods
from ssl_kit.methods import registry
from ssl_kit.methods.base import ClassifierMethod
from ssl_kit.methods.momentum import cosine_ramp
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage

class ToyConfig(StageBase):
    """A method written in a test, exactly as a user would write a new file."""

    recommended = {"optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}}
    recommended_source = "a test: the lr that trains digits in 20 steps"
    method: Literal["toy_smoothing"]
    smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the toy loss")


@pytest.fixture
def toy_method():
    """Register a one-class method for the duration of a test (and take it out again)."""

    @registry.register("toy_smoothing", ToyConfig)
    class ToySmoothing(ClassifierMethod):
        """Cross-entropy with label smoothing on weak views (a test method)."""

        def training_step(self, batch, progress):
            logits = self.net(self.weak_view(batch.x))
            return {"loss": F.cross_entropy(logits, batch.y, label_smoothing=self.cfg.smoothing)}

    yield ToySmoothing
    registry._METHODS.pop("toy_smoothing")
    config._TRAINING_STAGES.pop("toy_smoothing")
    config._recipe_model.cache_clear()


def test_registering_one_class_makes_the_method_usable_end_to_end(toy_method, tmp_path):
    assert build_method("toy_smoothing") is toy_method and "toy_smoothing" in registered_methods()
    recipe = validate_recipe({"seed": 0, "name": "toy", "stages": [tiny_stage("toy", "toy_smoothing", smoothing=0.2)]})
    assert recipe.stages[0].smoothing == 0.2 and isinstance(recipe.stages[0], ToyConfig)
    run_dir, summary = run_recipe(recipe, tmp_path / "run")
    assert 0 <= summary["toy/test/top1"] <= 1
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("kind") == "step"]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)


def test_a_methods_own_keys_are_validated_with_their_path(toy_method):
    with pytest.raises(ConfigError, match=r"stages\[toy\]\.smoothing: .*less than 1"):
        validate_recipe({"stages": [tiny_stage("toy", "toy_smoothing", smoothing=1.5)]})
    with pytest.raises(ConfigError, match=r"stages\[toy\]\.threshold: Extra inputs are not permitted"):
        validate_recipe({"stages": [tiny_stage("toy", "toy_smoothing", threshold=0.9)]})


def test_a_method_without_its_papers_settings_is_refused_at_registration():
    """Defaults are a promise: a method states the optimizer/schedule it trains with, and where they come from."""

    class Silent(StageBase):
        method: Literal["toy_silent"]

    class Unsourced(StageBase):
        recommended = {"optimizer": {"name": "sgd", "lr": 0.1}}
        method: Literal["toy_silent"]

    for config_class in (Silent, Unsourced):
        with pytest.raises(TypeError, match=r"toy_silent.*must state its own `recommended`.*recommended_source"):
            registry.register("toy_silent", config_class)(type("ToySilent", (ClassifierMethod,), {}))
    assert "toy_silent" not in registered_methods()


def test_recommended_settings_fill_only_what_the_recipe_leaves_out():
    def stage(**keys):
        return validate_recipe({"seed": 0, "stages": [{"name": "p", "method": "vicreg", **keys}]}).stages[0]

    silent = stage()  # VICReg's paper: LARS, 0.2 x batch/256, wd 1e-6, 10 warm-up epochs
    assert (silent.optimizer.name, silent.optimizer.lr, silent.optimizer.lr_scaling) == ("lars", 0.2, "linear")
    assert silent.optimizer.weight_decay == 1e-6 and silent.schedule.warmup_epochs == 10
    given_lr = stage(optimizer={"lr": 0.1}, schedule={"warmup_epochs": 1})
    assert (given_lr.optimizer.name, given_lr.optimizer.lr, given_lr.optimizer.weight_decay) == ("lars", 0.1, 1e-6)
    assert given_lr.schedule.warmup_epochs == 1 and given_lr.schedule.name == "cosine"
    other = stage(optimizer={"name": "sgd"}, schedule={"name": "constant"})  # another optimizer: nothing carried over
    assert (other.optimizer.lr, other.optimizer.lr_scaling, other.optimizer.weight_decay) == (0.05, "none", 5e-4)
    assert other.schedule.warmup_epochs == 0
    for name, cls in registered_methods().items():  # every method states its own settings and their source
        assert cls.config_class.__dict__.get("recommended") and cls.config_class.__dict__.get("recommended_source"), name


def test_unknown_methods_and_unregistered_names_are_refused_clearly():
    with pytest.raises(ConfigError, match="toy_smoothing"):
        validate_recipe({"stages": [tiny_stage("toy", "toy_smoothing")]})
    with pytest.raises(ConfigError, match=r"unknown method 'nope' \(known: .*simclr"):
        build_method("nope")


def test_a_config_must_declare_its_method_literal():
    class Untagged(StageBase):
        pass

    with pytest.raises(TypeError, match="must declare `method: Literal\\['untagged'\\]`"):
        config.register_stage_schema("untagged", Untagged)
    class AnotherSimCLR(StageBase):
        method: Literal["simclr"]

    with pytest.raises(TypeError, match="stage method 'simclr' is registered twice"):
        config.register_stage_schema("simclr", AnotherSimCLR)


def test_every_registered_method_has_a_typed_config_and_a_docstring():
    methods = registered_methods()
    assert {"supervised", "simclr", "mocov2", "mocov3", "fixmatch", "kd", "dino", "mae", "simmim"} <= set(methods)
    for name, cls in methods.items():
        assert cls.name == name and issubclass(cls.config_class, StageBase)
        assert name in cls.config_class.model_fields["method"].annotation.__args__
        assert (cls.__doc__ or cls.config_class.__doc__), name


def test_momentum_pairs_are_updated_by_the_base_class_along_the_cosine_ramp():
    recipe = validate_recipe({"stages": [tiny_stage("p", "mocov2", queue_size=64, proj_hidden_dim=16, proj_dim=8,
                                                    momentum=0.9)]})
    cfg = recipe.stages[0]
    from ssl_kit.data.pipeline import prepare_data
    from ssl_kit.models.registry import build_backbone

    data = prepare_data(cfg.data, 0)
    method = build_method("mocov2")(cfg, build_backbone("small_cnn", 1, 16, {"width": 4}), data.info)
    pairs = method.momentum_pairs()
    assert [type(o).__name__ for o, _ in pairs] and all(not p.requires_grad for _, t in pairs for p in t.parameters())
    with torch.no_grad():
        for online, _ in pairs:
            for p in online.parameters():
                p.add_(torch.randn_like(p))
    before = [[p.clone() for p in t.parameters()] for _, t in pairs]
    progress = Progress(step=5, total_steps=10, epoch=0, steps_per_epoch=10)
    method.after_optimizer_step(progress)
    m = cosine_ramp(0.9, 1.0, 5, 10)
    assert method.current_momentum == pytest.approx(m) and 0.9 < m < 1.0
    for (online, target), old in zip(pairs, before):
        for o, t, t0 in zip(online.parameters(), target.parameters(), old):
            assert torch.allclose(t, m * t0 + (1 - m) * o, atol=1e-6)


def test_consistency_loss_hard_soft_and_weights():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    weights = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 1.0])
    expected = (F.cross_entropy(logits, labels, reduction="none") * weights).sum() / 6
    assert consistency_loss(logits, labels, weights).item() == pytest.approx(expected.item(), rel=1e-6)
    one_hot = F.one_hot(labels, 4).float()
    assert consistency_loss(logits, one_hot, weights).item() == pytest.approx(expected.item(), rel=1e-6)
    soft = torch.softmax(torch.randn(6, 4), dim=1)
    by_hand = -(soft * torch.log_softmax(logits, 1)).sum(1).mean()
    assert consistency_loss(logits, soft).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # FixMatch's loss is the consistency loss with its confidence mask as weights
    weak = torch.randn(6, 4) * 3
    loss, mask = fixmatch_loss(weak, logits, threshold=0.7)
    assert consistency_loss(logits, weak.argmax(1), mask).item() == pytest.approx(loss.item(), rel=1e-6)
    grad, = torch.autograd.grad(consistency_loss(logits, soft), logits)
    assert torch.allclose(grad, (torch.softmax(logits, 1) - soft).detach() / 6, atol=1e-6)


@pytest.mark.parametrize("targets, weights, message", [
    (torch.zeros(5, dtype=torch.long), None, r"hard targets must be int64 of shape \(6,\)"),
    (torch.zeros(6), None, r"hard targets must be int64"),
    (torch.zeros(6, 3), None, r"targets must be labels \(6,\) or distributions \(6, 4\)"),
    (torch.zeros(6, dtype=torch.long), torch.ones(5), r"weights must have shape \(6,\)"),
])
def test_consistency_loss_refuses_bad_shapes(targets, weights, message):
    with pytest.raises(ValueError, match=message):
        consistency_loss(torch.zeros(6, 4), targets, weights)



def test_each_method_declares_what_it_draws_from_its_data_in_one_place():
    """Method.data_needs: pretext methods learn without labels, the semi-supervised family draws μ× unlabeled images
    (μ its own `mu`), KD only with use_unlabeled; prepare_data and the loaders read nothing else."""
    from ssl_kit.config import validate_recipe
    from ssl_kit.data.needs import DataNeeds
    from tests.conftest import tiny_stage

    def needs(method: str, **keys) -> DataNeeds:
        stage = validate_recipe({"stages": [tiny_stage(method=method, **keys)]}).stages[0]
        return registry.registered_methods()[method].data_needs(stage)

    assert needs("supervised") == DataNeeds()
    assert needs("simclr") == needs("dino") == needs("mae", backbone={"name": "vit_tiny"}) == DataNeeds(labels=False)
    assert needs("fixmatch") == DataNeeds(unlabeled=True, unlabeled_ratio=7)
    assert needs("fixmatch", mu=3) == DataNeeds(unlabeled=True, unlabeled_ratio=3)
    assert needs("kd", teacher={"checkpoint": "t.pt"}) == DataNeeds()
    assert needs("kd", teacher={"checkpoint": "t.pt"}, use_unlabeled=True, mu=2) == \
        DataNeeds(unlabeled=True, unlabeled_ratio=2)
    with pytest.raises(ValueError, match="unlabeled pool goes with a ratio"):
        DataNeeds(unlabeled=True)
