"""Domain transfer: source -> targets with oracle bounds, leave-one-domain-out bookkeeping, corruptions, AdaBN,
AdaMatch-style thresholds, torchvision backbones with local weights, and the transfer pictures."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ssl_kit.data.views import Normalize
from ssl_kit.data.needs import DataNeeds
from ssl_kit.errors import CheckpointError, DataError
from ssl_kit.eval.corruptions import CORRUPTIONS, SEVERITIES, corrupt, parse_corruptions
from ssl_kit.eval.features import FeatureExtractor
from ssl_kit.eval.transfer import leave_one_domain_out, transfer_eval
from ssl_kit.models.registry import build_backbone
from tests.test_eval import clusters, run_cli

POOL = DataNeeds(unlabeled=True, unlabeled_ratio=7)  # what a FixMatch stage draws: labeled + 7× unlabeled

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeExtractor:
    """dataset_features over synthetic per-domain features: {spec: {"train": (x, y, classes), "test": ...}}."""

    def __init__(self, domains: dict) -> None:
        self.domains = domains
        self.requests: list[str] = []

    def dataset_features(self, spec):
        self.requests.append(spec)
        return self.domains[spec]


def _domain(shift: float, seed: int, classes=("a", "b", "c", "d"), n=30, mirror=False):
    x, y = clusters(n_per_class=n, classes=len(classes), seed=0, spread=0.3)
    x = -x if mirror else x
    g = torch.Generator().manual_seed(seed)
    noise = lambda t: t + 0.3 * torch.randn(t.shape, generator=g)  # noqa: E731
    return {"train": (noise(x) + shift, y, list(classes)), "test": (noise(x) + shift, y, list(classes))}


def test_transfer_reports_gap_and_oracle_and_checks_classes():
    extractor = FakeExtractor({"src": _domain(0.0, 1), "near": _domain(0.0, 2), "far": _domain(0.0, 3, mirror=True),
                               "other": _domain(0.0, 4, classes=("w", "x", "y", "z"))})
    result = transfer_eval(extractor, "src", ["near", "far"], epochs=20)
    near, far = result["targets"]["near"], result["targets"]["far"]
    assert result["source"]["top1"] == 1.0 and near["top1"] == 1.0 and near["gap"] == 0.0
    assert far["gap"] == pytest.approx(1.0 - far["top1"]) and far["top1"] < 0.9
    assert far["oracle_top1"] == 1.0  # the target-oracle bound: a probe fitted on the shifted domain itself
    with pytest.raises(DataError, match="same classes"):
        transfer_eval(extractor, "src", ["other"], epochs=5)
    with pytest.raises(DataError, match="unknown adaptation"):
        transfer_eval(extractor, "src", ["near"], epochs=5, adapt=["tent"])


def test_leave_one_domain_out_bookkeeping():
    domains = {"d0": _domain(0.0, 1, n=10), "d1": _domain(0.5, 2, n=20), "d2": _domain(1.0, 3, n=30)}
    result = leave_one_domain_out(FakeExtractor(domains), ["d0", "d1", "d2"], epochs=10)
    table = result["domains"]
    # the held-out domain never enters its own training pool: 40 images per domain-class in d0 → sizes add up
    assert table["d0"]["train_size"] == 4 * (20 + 30)
    assert table["d1"]["train_size"] == 4 * (10 + 30)
    assert table["d2"]["train_size"] == 4 * (10 + 20)
    assert result["average"]["top1"] == pytest.approx(sum(r["top1"] for r in table.values()) / 3)
    assert result["average"]["oracle_top1"] == pytest.approx(sum(r["oracle_top1"] for r in table.values()) / 3)
    assert "training-domain validation" in result["protocol"]
    with pytest.raises(DataError, match="at least 3"):
        leave_one_domain_out(FakeExtractor(domains), ["d0", "d1"])


def test_leave_one_domain_out_on_mapped_domains_equals_in_memory(tmp_path, monkeypatch):
    """Streamed domains arrive as memory-mapped float16 caches: the pooled training set is written to the cache
    folder and read mapped (nothing left behind), with the same table as the same features in memory."""
    import numpy as np

    from ssl_kit.eval.mapped import open_mapped

    monkeypatch.setenv("SSL_KIT_CACHE", str(tmp_path / "cache"))
    memory, mapped = {}, {}
    for name, (shift, seed, n) in {"d0": (0.0, 1, 10), "d1": (0.5, 2, 20), "d2": (1.0, 3, 30)}.items():
        domain = _domain(shift, seed, n=n)
        memory[name], mapped[name] = {}, {}
        for split, (x, y, classes) in domain.items():
            np.save(tmp_path / f"{name}-{split}.npy", x.numpy().astype(np.float16))
            memory[name][split] = (x.half().float(), y, classes)
            mapped[name][split] = (open_mapped(tmp_path / f"{name}-{split}.npy"), y, classes)
    expected = leave_one_domain_out(FakeExtractor(memory), ["d0", "d1", "d2"], epochs=10)
    assert leave_one_domain_out(FakeExtractor(mapped), ["d0", "d1", "d2"], epochs=10) == expected
    assert [p.name for p in (tmp_path / "cache").rglob("*.npy")] == []


def test_corruptions_are_deterministic_shaped_and_graded():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(40, 216, (6, 1, 16, 16), generator=g, dtype=torch.uint8)
    for name in CORRUPTIONS:
        out = corrupt(images, name, 3, seed=5)
        assert out.dtype == torch.uint8 and out.shape == images.shape, name
        assert torch.equal(out, corrupt(images, name, 3, seed=5)), name
    distances = [(corrupt(images, "gaussian_noise", s).float() - images.float()).abs().mean() for s in SEVERITIES]
    assert all(a < b for a, b in zip(distances, distances[1:]))
    # contrast at severity s keeps each image's mean and scales deviations by the documented factor
    flat = torch.full((1, 1, 8, 8), 100, dtype=torch.uint8)
    flat[..., :4] = 200
    squeezed = corrupt(flat, "contrast", 5).float()
    assert squeezed.max() - squeezed.min() == pytest.approx(100 * 0.05, abs=1)
    assert parse_corruptions("all") == list(CORRUPTIONS)
    with pytest.raises(DataError, match="unknown corruption"):
        parse_corruptions("gaussian_noise,fog")
    with pytest.raises(DataError, match="severity"):
        corrupt(images, "contrast", 6)


def test_adabn_uses_exact_target_statistics_and_leaves_original_alone():
    from ssl_kit.eval.adaptation import adapt_batchnorm

    backbone = nn.Sequential(nn.BatchNorm2d(1), nn.Flatten())
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (37, 1, 4, 4), generator=g, dtype=torch.uint8)
    normalize = Normalize([0.5], [0.25])
    adapted = adapt_batchnorm(backbone, images, normalize, torch.device("cpu"), batch_size=8)
    x = normalize(images)
    # the plain average over batches of each batch's mean and unbiased variance (cumulative BN update)
    batch_means = [x[i:i + 8].mean() for i in range(0, 37, 8)]
    assert adapted[0].running_mean.item() == pytest.approx(torch.stack(batch_means).mean().item(), abs=1e-6)
    batch_vars = [x[i:i + 8].var(dim=(0, 2, 3), unbiased=True) for i in range(0, 37, 8)]
    assert adapted[0].running_var.item() == pytest.approx(torch.stack(batch_vars).mean().item(), rel=1e-4)
    assert backbone[0].running_mean.item() == 0.0 and not adapted.training
    with pytest.raises(DataError, match="no BatchNorm"):
        adapt_batchnorm(nn.Sequential(nn.Flatten()), images, normalize, torch.device("cpu"))


def test_relative_threshold_and_alignment_to_labeled_predictions():
    from ssl_kit.methods.thresholds import DistributionAlignment, RelativeThreshold

    policy = RelativeThreshold(0.9, 3)
    policy.observe_labeled(torch.tensor([[0.8, 0.1, 0.1], [0.6, 0.2, 0.2]]))  # mean confidence 0.7 -> cut 0.63
    weights = policy.weights(torch.tensor([[0.64, 0.3, 0.06], [0.62, 0.3, 0.08]]), torch.arange(2))
    assert weights.tolist() == [1.0, 0.0]
    assert policy.thresholds()[0].item() == pytest.approx(0.63)
    align = DistributionAlignment(2, momentum=0.5, follow_labeled=True)
    align.observe_labeled(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert align.p_target.tolist() == pytest.approx([0.75, 0.25])
    aligned = align(torch.tensor([[0.5, 0.5]]))  # p_model becomes [0.5, 0.5]: p ∝ p · p_target / p_model
    assert aligned[0].tolist() == pytest.approx([0.75, 0.25])


def test_unlabeled_dataset_is_the_other_domains_training_images(tmp_path):
    from PIL import Image

    from ssl_kit.config import DataConfig
    from ssl_kit.data.pipeline import prepare_data
    from ssl_kit.data.specs import load_splits

    cfg = DataConfig(dataset="digits", image_size=8, labels_per_class=2, unlabeled_dataset="digits-rotated:90")
    data = prepare_data(cfg, 0, POOL)
    source_train = len(load_splits("digits")["train"])
    assert len(data.labeled) == 20 and int(data.labeled.max()) < source_train
    assert data.unlabeled.tolist() == list(range(source_train, 2 * source_train))
    rotated = load_splits("digits-rotated:90")["train"].converted(8, 1).images
    assert torch.equal(data.train.images[data.unlabeled], rotated)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("L", (10, 10), color=40 * i).save(tmp_path / name / f"{i}.png")
    with pytest.raises(DataError, match="same classes"):
        prepare_data(DataConfig(dataset="digits", image_size=8, unlabeled_dataset=f"imagefolder:{tmp_path}"), 0, POOL)
    pool = prepare_data(DataConfig(dataset="digits", image_size=8, labels_per_class=2,
                                   unlabeled_dataset=f"images:{tmp_path}"), 0, POOL)  # no classes: a plain pool
    pool_train = len(load_splits(f"images:{tmp_path}")["train"])  # its training split, as for any other domain
    assert pool.unlabeled.tolist() == list(range(source_train, source_train + pool_train)) and pool_train >= 5
    assert bool((pool.train.labels[pool.unlabeled] == -1).all()) and pool.train.classes == data.train.classes


def test_torchvision_backbone_with_local_weights(tmp_path):
    import torchvision

    from ssl_kit.eval.features import load_eval_backbone

    reference = torchvision.models.resnet18(weights=None, num_classes=1000).eval()
    weights = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), weights)
    backbone = load_eval_backbone("torchvision:resnet18", str(weights), image_size=32)
    x = torch.randn(2, 3, 32, 32)
    reference.fc = nn.Identity()
    assert backbone.num_features == 512 and torch.allclose(backbone(x), reference(x), atol=1e-5)
    assert backbone.data_info["image_size"] == 32 and backbone.data_info["channels"] == 3
    with pytest.raises(CheckpointError, match="needs --weights"):
        load_eval_backbone("torchvision:resnet18")
    with pytest.raises(CheckpointError, match="unknown torchvision model"):
        load_eval_backbone("torchvision:resnet19", "random")
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_eval_backbone("torchvision:resnet18", str(tmp_path / "r34.pth"))


def test_cli_linear_probe_on_torchvision_weights(tmp_path):
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    result = run_cli("linear-probe", "--checkpoint", "torchvision:resnet18", "--weights", str(weights),
                     "--image-size", "32", "--data", "digits", "--epochs", "10", "--no-sweep", "--json")
    assert result.returncode == 0, result.stderr
    assert 0.3 < json.loads(result.stdout)["top1"] <= 1  # random conv features of 8x8 digits are far above chance


def test_transfer_stage_writes_tables_and_pictures(tmp_path):
    from ssl_kit.config import validate_recipe
    from ssl_kit.runner import run_recipe
    from tests.conftest import tiny_stage

    recipe = validate_recipe({"seed": 0, "name": "t", "stages": [
        tiny_stage(train={"steps": 20}),
        {"name": "transfer", "method": "transfer", "epochs": 5, "targets": ["digits-rotated:30"], "adapt": ["adabn"],
         "corruptions": ["contrast"], "severities": [1, 5], "domains": ["digits", "digits-rotated:30",
                                                                         "digits-rotated:60"]},
        {"name": "linear_probe", "method": "linear_probe", "epochs": 5, "tsne": True}]})
    run_dir, summary = run_recipe(recipe, tmp_path / "run")
    for key in ("transfer/digits-rotated:30/top1", "transfer/digits-rotated:30/oracle_top1",
                "transfer/digits-rotated:30/adabn_top1", "transfer/digits+contrast@5/top1",
                "transfer/corruption_mean/contrast/top1", "transfer/lodo/digits-rotated:60/top1",
                "transfer/lodo/average/top1"):
        assert 0 <= summary[key] <= 1, key
    for picture in ("domains_transfer.png", "tsne_transfer.png", "tsne_linear_probe.png"):
        assert (run_dir / "plots" / picture).read_bytes()[:8] == PNG_MAGIC, picture
    report = (run_dir / "report.md").read_text()
    assert "leave-one-domain-out" in report and "plots/tsne_transfer.png" in report and "| AdaBN |" in report


def test_transfer_stage_needs_something_to_do():
    from ssl_kit.config import validate_recipe
    from ssl_kit.errors import ConfigError

    with pytest.raises(ConfigError, match="give targets, corruptions or domains"):
        validate_recipe({"stages": [{"name": "t", "method": "transfer", "checkpoint": "x"}]})
    with pytest.raises(ConfigError, match="unknown corruption"):
        validate_recipe({"stages": [{"name": "t", "method": "transfer", "checkpoint": "x", "corruptions": ["fog"]}]})


def test_fixmatch_adaptation_is_training_stages_the_runner_runs_before_the_scoring(tmp_path, capsys):
    """`adapt: fixmatch` in a recipe and `ssl-kit transfer --adapt fixmatch` take one path (runner.evaluate): the
    two adaptation stages train as a recipe of their own, then the transfer stage scores; the evaluation code is
    handed their scores and never trains."""
    from ssl_kit.cli import main as cli_main
    from ssl_kit.config import validate_recipe
    from ssl_kit.runner import run_recipe
    from tests.conftest import tiny_stage

    target = "digits-rotated:30"
    recipe = validate_recipe({"seed": 0, "name": "t", "stages": [
        tiny_stage(train={"steps": 10}),
        {"name": "transfer", "method": "transfer", "epochs": 5, "targets": [target], "adapt": ["fixmatch"],
         "adapt_steps": 3, "tsne": False, "device": "cpu"}]})
    run_dir, summary = run_recipe(recipe, tmp_path / "run")
    for key in ("top1", "fixmatch_source_only_top1", "fixmatch_adapted_top1"):
        assert 0 <= summary[f"transfer/{target}/{key}"] <= 1, key
    adapt_dir = run_dir / "stages" / "transfer" / "adapt-digits-rotated_30"
    adapt_summary = json.loads((adapt_dir / "summary.json").read_text())
    assert adapt_summary["adapted/test/top1"] == summary[f"transfer/{target}/fixmatch_adapted_top1"]
    assert adapt_summary["source_only/test/top1"] == summary[f"transfer/{target}/fixmatch_source_only_top1"]

    capsys.readouterr()
    assert cli_main(["transfer", "--checkpoint", str(run_dir / "stages" / "supervised" / "backbone.pt"), "--source",
                     "digits", "--target", target, "--adapt", "fixmatch", "--adapt-steps", "3", "--epochs", "5",
                     "--device", "cpu", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["targets"][target]) >= {"top1", "gap", "fixmatch_source_only_top1", "fixmatch_adapted_top1"}
    # the same stage on the same backbone and seed: the command and the recipe stage agree
    assert printed["targets"][target]["top1"] == summary[f"transfer/{target}/top1"]


def test_the_transfer_evaluation_itself_refuses_to_train(tmp_path):
    backbone = build_backbone("small_cnn", 1, 16, {"width": 8}).eval()
    backbone.data_info = {"image_size": 16, "channels": 1, "mean": [0.5], "std": [0.25]}
    extractor = FeatureExtractor(backbone, "cpu")
    with pytest.raises(DataError, match=r"fixmatch adaptation to \['digits-rotated:30'\] is training"):
        transfer_eval(extractor, "digits", ["digits-rotated:30"], epochs=2, adapt=["fixmatch"])
