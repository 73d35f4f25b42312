"""Linear probe, kNN, feature cache, transfer and the CLI's JSON output."""
import json
import math
import subprocess
import sys

import pytest
import torch

from ssl_kit.eval.knn import knn_classify, knn_scores, knn_search
from ssl_kit.eval.linear_probe import linear_probe
from ssl_kit.errors import DataError


def clusters(n_per_class=30, classes=4, dim=16, spread=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def test_linear_probe_separable_clusters_is_perfect_and_random_labels_at_chance():
    x, y = clusters()
    xt, yt = clusters(seed=0)
    result = linear_probe(x, y, xt, yt, 4, epochs=30)
    assert result["top1"] == 1.0 and result["train_size"] == 120
    g = torch.Generator().manual_seed(1)
    noise, noise_test = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    random_labels = torch.randint(0, 4, (400,), generator=g)
    chance = linear_probe(noise, random_labels, noise_test, torch.randint(0, 4, (400,), generator=g), 4, epochs=30)
    assert 0.15 < chance["top1"] < 0.35


def test_few_shot_probe_needs_validation_images():
    x, y = clusters()
    with pytest.raises(DataError, match="at least 2 labeled images per class"):
        linear_probe(x, y, x, y, 4, epochs=5, labels_per_class=1)
    assert linear_probe(x, y, x, y, 4, epochs=5, labels_per_class=1, sweep=False)["train_size"] == 4


def test_knn_voting_hand_computed():
    sims = torch.tensor([[0.9, 0.8, 0.1]])
    labels = torch.tensor([[1, 0, 0]])
    scores = knn_scores(sims, labels, 2, temperature=0.5)
    assert scores[0].tolist() == pytest.approx([math.exp(1.6) + math.exp(0.2), math.exp(1.8)])
    assert scores.argmax().item() == 0  # two weaker votes beat one stronger


def test_faiss_search_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(500, 32, generator=g), torch.randn(50, 32, generator=g)
    sims, ids = knn_search(bank, queries, k=10, chunk=16)
    brute = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    top = brute.topk(10, dim=1)
    assert torch.equal(ids, top.indices)
    assert torch.allclose(sims, top.values, atol=1e-5)


def test_knn_on_clusters():
    x, y = clusters()
    assert knn_classify(x, y, x, y, 4, k=5)["top1"] == 1.0


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from ssl_kit.config import validate_recipe
    from ssl_kit.runner import run_recipe
    from tests.conftest import tiny_stage

    recipe = validate_recipe({"seed": 0, "name": "t", "stages": [tiny_stage(train={"steps": 30})]})
    run_dir, _ = run_recipe(recipe, tmp_path_factory.mktemp("runs") / "run")
    return run_dir


def test_features_are_cached_and_other_formats_converted(trained_run):
    from ssl_kit.data.imageset import ImageSet
    from ssl_kit.eval.features import FeatureExtractor

    extractor = FeatureExtractor.from_checkpoint(trained_run, "cpu")
    first = extractor.dataset_features("digits")
    passes = extractor.forward_passes
    second = extractor.dataset_features("digits")
    assert extractor.forward_passes == passes == 1797
    assert second["train"][0] is first["train"][0]
    rgb = ImageSet(torch.randint(0, 256, (5, 3, 20, 20), dtype=torch.uint8), torch.zeros(5, dtype=torch.long), ["a"], "rgb")
    assert extractor.features(rgb).shape == (5, extractor.backbone.num_features)


def run_cli(*args):
    result = subprocess.run([sys.executable, "-m", "ssl_kit.cli", *args], capture_output=True, text=True, timeout=300)
    return result


def test_cli_linear_probe_json(trained_run):
    result = run_cli("linear-probe", "--checkpoint", str(trained_run / "backbone.pt"), "--data", "digits",
                     "--epochs", "20", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert 0.5 < payload["top1"] <= 1 and 0 <= payload["top5"] <= 1


def test_cli_knn_json(trained_run):
    result = run_cli("knn", "--checkpoint", str(trained_run), "--data", "digits", "--k", "10", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert set(payload) >= {"top1", "top5", "k"} and payload["k"] == 10


def test_cli_transfer_json(trained_run):
    result = run_cli("transfer", "--checkpoint", str(trained_run), "--source", "digits", "--target", "digits-rotated:30",
                     "--target", "digits-printed,per_font=1", "--epochs", "20", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert 0 <= payload["source"]["top1"] <= 1
    assert set(payload["targets"]) == {"digits-rotated:30", "digits-printed,per_font=1"}
    for metrics in payload["targets"].values():
        assert 0 <= metrics["top1"] <= 1 and metrics["gap"] == pytest.approx(payload["source"]["top1"] - metrics["top1"])


def test_cli_bad_checkpoint_is_a_clear_error(tmp_path):
    bogus = tmp_path / "x.pt"
    torch.save({"hello": torch.zeros(1)}, bogus)
    result = run_cli("knn", "--checkpoint", str(bogus), "--data", "digits", "--json")
    assert result.returncode == 2
    assert "not an ssl_kit backbone or training checkpoint" in result.stderr
    assert json.loads(result.stdout)["error"]["type"] == "CheckpointError"  # --json: one object on stdout, even here


def test_cli_info(trained_run):
    result = run_cli("info", "--checkpoint", str(trained_run), "--json")
    payload = json.loads(result.stdout)
    assert payload["arch"] == "small_cnn" and payload["params"] > 0 and payload["flops_per_image"] > 0


def test_cli_run_end_to_end_and_overrides(tmp_path):
    out = tmp_path / "run"
    result = run_cli("run", "supervised_digits", "supervised.train.epochs=1", "supervised.data.image_size=16",
                     "supervised.backbone.kwargs.width=8", "supervised.train.progress=false", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert 0 <= payload["supervised/test/top1"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["supervised/test/top1"] == payload["supervised/test/top1"]
    again = run_cli("run", "supervised_digits", "--out", str(out))
    assert again.returncode == 2 and "exists and is not empty" in again.stderr


def test_cli_run_bad_override_is_clear():
    result = run_cli("run", "supervised_digits", "supervised.train.batch_size=-1")
    assert result.returncode == 2
    assert "stages[supervised].train.batch_size" in result.stderr and "greater than or equal to 1" in result.stderr


def test_cli_finetune_json(trained_run, tmp_path):
    result = run_cli("finetune", "--checkpoint", str(trained_run), "--data", "digits", "--epochs", "1",
                     "--labels-per-class", "5", "--batch-size", "25", "--out", str(tmp_path / "ft"), "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert 0 <= payload["top1"] <= 1 and payload["run_dir"] == str(tmp_path / "ft")
    assert (tmp_path / "ft" / "backbone.pt").is_file()


def test_cli_finetune_names_its_flag_when_the_batch_is_too_large(trained_run, tmp_path, capsys):
    """A few labeled images (what this field fine-tunes on) and the default batch: the error names --batch-size,
    the flag the user can change, not the recipe key the command built."""
    from ssl_kit.cli import main

    assert main(["finetune", "--checkpoint", str(trained_run), "--data", "digits", "--labels-per-class", "5",
                 "--epochs", "1", "--out", str(tmp_path / "ft")]) == 2
    assert "error: --batch-size 64 is larger than the 50 training images; lower it" in capsys.readouterr().err


def test_probe_grid_equals_separate_sgd_runs():
    """Training the lr/wd grid as one stacked model gives each model exactly torch.optim.SGD's trajectory."""
    import torch.nn.functional as F

    from ssl_kit.eval.linear_probe import fit_linear_grid

    x, y = clusters(n_per_class=50, classes=5, dim=20, spread=2.0)
    configs = [(0.3, 0.0), (0.03, 1e-3)]
    models = fit_linear_grid(x, y, 5, configs, epochs=7, batch_size=64)
    for model, (lr, wd) in zip(models, configs):
        xs = (x - x.mean(0)) / x.std(0, unbiased=False)
        w = torch.zeros(5, 20, requires_grad=True)
        b = torch.zeros(5, requires_grad=True)
        optimizer = torch.optim.SGD([w, b], lr=lr, momentum=0.9, nesterov=True)
        generator, total, step = torch.Generator().manual_seed(0), 7 * math.ceil(250 / 64), 0
        for _ in range(7):
            order = torch.randperm(250, generator=generator)
            for start in range(0, 250, 64):
                index = order[start:start + 64]
                optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(xs[index] @ w.T + b, y[index]) + 0.5 * wd * w.pow(2).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
        assert torch.allclose(model.weight, w.detach(), atol=1e-5) and torch.allclose(model.bias, b.detach(), atol=1e-6)


def test_augmented_probe_re_extracts_features_every_epoch(trained_run):
    from ssl_kit.data.specs import load_splits
    from ssl_kit.eval.features import FeatureExtractor
    from ssl_kit.eval.stages import probe_dataset

    extractor = FeatureExtractor.from_checkpoint(trained_run, "cpu")
    images = load_splits("digits")["train"].subset(torch.arange(20))
    first, again = extractor.augmented_features(images, seed=1), extractor.augmented_features(images, seed=1)
    other = extractor.augmented_features(images, seed=2)
    assert first.shape == (20, extractor.backbone.num_features)
    assert torch.equal(first, again) and not torch.allclose(first, other)  # seeded crops, never cached
    clean_passes = 1797  # train + test, extracted once for the lr/wd sweep
    result = probe_dataset(extractor, "digits", epochs=3, augment=True, sweep=False)
    assert result["augmented"] == 1 and 0.3 < result["top1"] <= 1
    assert extractor.forward_passes == 60 + clean_passes + 3 * 1347  # three augmented passes over the train split


def test_an_empty_labeled_split_names_its_cause():
    """Labels given but too few per class for the holdout: the error says so instead of asking for labels."""
    from ssl_kit.errors import DataError
    from ssl_kit.eval.features import require_labeled

    with pytest.raises(DataError, match=r"round\(test_fraction x n\) .* a class needs 3 or more labeled images"):
        require_labeled("images:/x,labels=/x/l.csv", "test", 0)
    with pytest.raises(DataError, match="give labels with ',labels=labels.csv'"):
        require_labeled("images:/x", "test", 0)
    with pytest.raises(DataError, match="give labels with"):
        require_labeled("images:/x,labels=/x/l.csv", "train", 0)
    require_labeled("images:/x,labels=/x/l.csv", "test", 3)


def _finetune_config(capsys, tmp_path, checkpoint, *flags) -> tuple[dict, str]:
    """`ssl-kit finetune` on `checkpoint` for one step -> (its stage's optimizer section and layer_decay, stderr)."""
    import yaml

    from ssl_kit.cli import main

    out = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(checkpoint), "--data", "digits", "--labels-per-class", "5",
                 "--epochs", "0.02", "--batch-size", "25", "--out", str(out), *flags]) == 0
    stage = yaml.safe_load((out / "config.yaml").read_text())["stages"][0]
    return {**stage["optimizer"], "layer_decay": stage["layer_decay"]}, capsys.readouterr().err


DIGITS_16 = {"channels": 1, "image_size": 16, "num_classes": 10, "mean": [0.5], "std": [0.5]}


def test_finetune_trains_a_vit_as_mae_and_a_cnn_as_simclr(trained_run, tmp_path, capsys):
    """A ViT gets AdamW at 1e-3 with layer decay 0.65 and weight decay 0.05, a CNN Nesterov SGD at 0.05 × batch/256
    without weight decay; the backbone at the head's rate in both; stderr says which."""
    from tests.conftest import saved_vit

    vit = saved_vit(tmp_path / "vit.pt", {"patch_size": 4, "dim": 16, "depth": 2, "heads": 2}, DIGITS_16)
    chosen, err = _finetune_config(capsys, tmp_path / "a", vit)
    assert (chosen["name"], chosen["lr"], chosen["lr_scaling"], chosen["backbone_lr_scale"], chosen["weight_decay"],
            chosen["layer_decay"]) == ("adamw", 1e-3, "none", 1.0, 0.05, 0.65)
    assert "finetune: ViT backbone: adamw lr 0.001, backbone lr × 1, layer decay 0.65, weight decay 0.05" in err
    chosen, err = _finetune_config(capsys, tmp_path / "b", trained_run)
    assert (chosen["name"], chosen["lr"], chosen["lr_scaling"], chosen["nesterov"], chosen["backbone_lr_scale"],
            chosen["weight_decay"], chosen["layer_decay"]) == ("sgd", 0.05, "linear", True, 1.0, 0.0, None)
    assert "finetune: CNN backbone: sgd lr 0.05 × batch/256, backbone lr × 1, weight decay 0" in err


def test_finetune_flags_override_the_protocol(tmp_path, capsys):
    """--optimizer sgd on a ViT takes the SGD protocol (no layer decay unless asked); each other flag replaces its
    entry alone."""
    from tests.conftest import saved_vit

    vit = saved_vit(tmp_path / "vit.pt", {"patch_size": 4, "dim": 16, "depth": 2, "heads": 2}, DIGITS_16)
    chosen, _ = _finetune_config(capsys, tmp_path / "a", vit, "--optimizer", "sgd")
    assert (chosen["name"], chosen["lr"], chosen["weight_decay"], chosen["layer_decay"]) == ("sgd", 0.05, 0.0, None)
    chosen, _ = _finetune_config(capsys, tmp_path / "b", vit, "--lr", "3e-4", "--layer-decay", "0.75",
                                 "--weight-decay", "0.1", "--backbone-lr-scale", "0.5")
    assert (chosen["name"], chosen["lr"], chosen["layer_decay"], chosen["weight_decay"],
            chosen["backbone_lr_scale"]) == ("adamw", 3e-4, 0.75, 0.1, 0.5)


def test_layer_decay_on_a_cnn_is_refused_by_name(trained_run, tmp_path, capsys):
    """Layer decay groups a ViT's blocks; on a CNN it used to be dropped without a word. The command names its flag,
    a recipe its stage."""
    from ssl_kit.cli import main
    from ssl_kit.config import validate_recipe
    from ssl_kit.errors import ConfigError
    from ssl_kit.runner import run_recipe
    from tests.conftest import tiny_stage

    assert main(["finetune", "--checkpoint", str(trained_run), "--data", "digits", "--layer-decay", "0.65",
                 "--out", str(tmp_path / "ft")]) == 2
    assert "--layer-decay decays a ViT's learning rates block by block" in capsys.readouterr().err
    recipe = validate_recipe({"seed": 0, "stages": [tiny_stage("tune", "supervised", layer_decay=0.65)]})
    with pytest.raises(ConfigError, match=r"stages\[tune\]: layer_decay needs a ViT backbone"):
        run_recipe(recipe, tmp_path / "run")
