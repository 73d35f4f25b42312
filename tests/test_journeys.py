"""The journey matrix: what a user does, across methods × data sources × commands, with the defaults.

Part 1, generated from the method registry: every registered method trains a few steps on its own defaults (no
optimizer, schedule or method key set) on each source: the builtin digits in memory; a streamed `images:` tree of
JPEG/PNG files of mixed sizes, aspects and modes, bare (label-free methods; the others must refuse it clearly) and
with a labels CSV naming a subset, or labeled tar shards (one of these two per method, alternating: they share the
streamed loader). Each backbone.pt then goes through every command a user runs next, through the CLI with --json
parsed: `ssl-kit info`, `knn`, `linear-probe`, `finetune`, `transfer` and `export --to safetensors` (`--to timm` for
the ViT; a ResNet-18 from digits and from the streamed tree `--to torchvision`).

Part 2: the two journeys of the issue that built this matrix, with longer runs whose probe must beat chance: a
label-free backbone from the unlabeled tree and a labeled one from tar shards, through every evaluation command.

A new method or data source joins the matrix by registering itself; nothing here lists methods by hand except the
few that need a particular backbone or an earlier stage."""
from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_kit import cli
from ssl_kit.config import EVAL_STAGES, validate_recipe
from ssl_kit.engine.checkpoint import resolve_checkpoint
from ssl_kit.errors import ConfigError, DataError
from ssl_kit.methods import registered_methods
from ssl_kit.runner import run_recipe
from tests.test_streaming_training import class_folder, write_image

TINY_CNN = {"name": "small_cnn", "kwargs": {"width": 8}}
TINY_VIT = {"name": "vit_tiny", "kwargs": {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2}}
# visible-patch encoders (MAE, I-JEPA, CAPI) or mask tokens
NEEDS_VIT = ("capi", "dinov2", "ibot", "ijepa", "mae", "msn", "simmim")
NEEDS_TEACHER = ("kd", "dkd")
METHODS = sorted(registered_methods())
CLASSES = ("red", "green", "blue")


# ------------------------------------------------------------------------------------------------- data sources
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("journeys")


@pytest.fixture(autouse=True)
def cache(data_root, monkeypatch):
    monkeypatch.setenv("SSL_KIT_CACHE", str(data_root / "cache"))


@pytest.fixture(scope="module")
def unlabeled_tree(data_root) -> tuple[Path, Path]:
    """An `images:` tree of 48 photos (nested folders, sizes 20-60 px, JPEG RGB, JPEG grayscale, PNG RGBA), and a
    labels CSV naming 30 of them: (root, csv)."""
    root, rows = data_root / "pool", ["path,label"]
    for i in range(48):
        cls, rel = i % 3, f"day{i % 4}/cam{i % 2}/img{i:03d}"
        size = (20 + (7 * i) % 41, 22 + (5 * i) % 37)
        if i % 8 == 5:  # grayscale JPEG
            rel += ".jpg"
            write_image(root / rel, i, cls, size)
            Image.open(root / rel).convert("L").save(root / rel)
        elif i % 8 == 6:  # RGBA PNG
            rel += ".png"
            write_image(root / (rel + ".jpg"), i, cls, size)
            Image.open(root / (rel + ".jpg")).convert("RGBA").save(root / rel)
            (root / (rel + ".jpg")).unlink()
        else:
            rel += ".jpg"
            write_image(root / rel, i, cls, size)
        if i < 30:
            rows.append(f"{rel},{CLASSES[cls]}")
    csv = data_root / "labels.csv"
    csv.write_text("\n".join(rows) + "\n")
    return root, csv


@pytest.fixture(scope="module")
def labeled_folders(data_root) -> tuple[Path, Path]:
    """Two class folders with the same classes, the second a shifted domain (smaller, darker images)."""
    source = class_folder(data_root / "source", per_class=12, classes=CLASSES)
    target = data_root / "target"
    for c, name in enumerate(CLASSES):
        for i in range(8):
            write_image(target / name / f"{i:03d}.jpg", 5000 + 100 * c + i, c, (24 + i, 20 + i))
            dark = np.asarray(Image.open(target / name / f"{i:03d}.jpg")) // 2
            Image.fromarray(dark).save(target / name / f"{i:03d}.jpg")
    return source, target


@pytest.fixture(scope="module")
def shards(labeled_folders, data_root) -> str:
    """The source folder as two tar shards (webdataset layout: key.jpg + key.cls); the spec pattern."""
    source, _ = labeled_folders
    files = sorted(source.rglob("*.jpg"))
    for shard, part in enumerate((files[::2], files[1::2])):
        with tarfile.open(data_root / f"shard-{shard:03d}.tar", "w") as tar:
            for path in part:
                key = f"{path.parent.name}_{path.stem}"
                for name, payload in ((f"{key}.jpg", path.read_bytes()),
                                      (f"{key}.cls", str(CLASSES.index(path.parent.name)).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return f"webdataset:{data_root}/shard-{{000..001}}.tar"


def streamed(spec: str, labels: Path | None = None) -> dict:
    """data section of a streamed source (storage forced to stream: these sets are small enough for memory)."""
    data = {"dataset": spec, "image_size": 16, "workers": 0, "storage": "stream"}
    return {**data, "labels": str(labels)} if labels else data


IN_MEMORY = {"dataset": "digits", "image_size": 16, "workers": 0}


# --------------------------------------------------------------------------------------- part 1: train on defaults
def ssl_kit_json(capsys, *argv: str) -> dict:
    """Run `ssl-kit ARGV --json` in-process; its exit status must be 0 and stdout one JSON object."""
    capsys.readouterr()
    status = cli.main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert status == 0, f"ssl-kit {' '.join(argv)} exited {status}: {out[-800:]} {err[-800:]}"
    return json.loads(out.strip().splitlines()[-1])


def defaults_recipe(method: str, data: dict, steps: int = 3, batch: int = 16) -> dict:
    """`method` with nothing but data, a tiny backbone and a short run set; kd/dkd get a supervised teacher first."""
    train = {"steps": steps, "batch_size": batch, "progress": False, "eval_every_epochs": 0, "log_every": 1}
    stage = {"name": "train", "method": method, "data": data, "train": train,
             "backbone": TINY_VIT if method in NEEDS_VIT else TINY_CNN}
    stages = [stage]
    if method in NEEDS_TEACHER:
        stages.insert(0, {"name": "teacher", "method": "supervised", "data": data, "backbone": TINY_CNN,
                          "train": train})
        stage["teacher"] = {"from_stage": "teacher"}
    return {"seed": 0, "stages": stages}


def step_rows(run_dir: Path, stage: str = "train") -> list[dict]:
    return [row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if row.get("stage") == stage and row.get("kind") == "step"]


def assert_trained(run_dir: Path, steps: int) -> dict:
    """Finite losses on every step, and a backbone.pt the evaluation commands resolve. -> the backbone record."""
    rows = step_rows(run_dir)
    assert len(rows) == steps and all(math.isfinite(row["loss"]) for row in rows), rows
    return resolve_checkpoint(run_dir / "backbone.pt")


def learns_from_labels(method: str) -> bool:
    """What the method declares (Method.data_needs) for a stage on its defaults."""
    stage = validate_recipe(defaults_recipe(method, IN_MEMORY)).stages[-1]
    return registered_methods()[method].data_needs(stage).labels


SOURCES = ("digits", "images", "images+labels", "shards")
STREAMED_LABELED = ("images+labels", "shards")  # both go through the same streamed loader: one per method suffices


def method_sources(index: int, method: str) -> list[str]:
    """The sources method number `index` trains on: digits in memory; the bare tree unless it learns from labels
    (then it must refuse it: test_a_method_that_learns_from_labels_refuses_a_source_without_any); and one streamed
    labeled source, alternating between the labeled tree and the shards along the sorted method list, so that both
    are exercised by half of the methods each."""
    sources = ["digits"] + ([] if learns_from_labels(method) else ["images"])
    return sources + [STREAMED_LABELED[index % 2]]


CELLS = [(method, source) for index, method in enumerate(METHODS) for source in method_sources(index, method)]


def source_data(source: str, request) -> dict:
    """The data section of a matrix cell (fixtures are built once per module, on first use)."""
    if source == "digits":
        return IN_MEMORY
    if source == "shards":
        return streamed(request.getfixturevalue("shards"))
    root, csv = request.getfixturevalue("unlabeled_tree")
    return streamed(f"images:{root}", csv if source == "images+labels" else None)


def evaluate_everywhere(checkpoint: str, knn_data: str, folders: tuple[Path, Path], capsys, out: Path) -> None:
    """Every evaluation command through the CLI on one backbone: `knn` on `knn_data`; `linear-probe`, `finetune`
    and `transfer` (source folder -> shifted target folder) on the labeled folders; each result a real accuracy."""
    source, target = (f"imagefolder:{folder}" for folder in folders)
    assert 0 <= ssl_kit_json(capsys, "knn", "--checkpoint", checkpoint, "--data", knn_data, "--k", "5")["top1"] <= 1
    probe = ssl_kit_json(capsys, "linear-probe", "--checkpoint", checkpoint, "--data", source, "--epochs", "3",
                         "--no-sweep")
    assert 0 <= probe["top1"] <= 1 and probe["train_size"] > 0
    tuned = ssl_kit_json(capsys, "finetune", "--checkpoint", checkpoint, "--data", source, "--epochs", "1",
                         "--batch-size", "16", "--out", str(out / "finetune"))
    assert 0 <= tuned["top1"] <= 1 and (out / "finetune" / "backbone.pt").is_file()
    moved = ssl_kit_json(capsys, "transfer", "--checkpoint", checkpoint, "--source", source, "--target", target,
                         "--epochs", "3", "--no-sweep")
    assert moved["targets"][target]["gap"] == pytest.approx(moved["source"]["top1"] - moved["targets"][target]["top1"])


@pytest.mark.parametrize("method,source", CELLS)
def test_every_method_trains_on_its_defaults_and_its_backbone_is_accepted(method, source, request, capsys, tmp_path):
    """Train 3 steps on the method's defaults, then through the CLI on backbone.pt: `info`, `knn`, `linear-probe`,
    `finetune`, `transfer`, `export --to safetensors` (and `attentive-probe` and `--to timm` for the ViT, which has
    patch tokens and a timm counterpart)."""
    data = source_data(source, request)
    run_dir, _ = run_recipe(validate_recipe(defaults_recipe(method, data)), tmp_path / "run")
    record = assert_trained(run_dir, 3)
    classes = {"digits": 10, "images": None}.get(source, len(CLASSES))
    assert record.get("head", {}).get("num_classes") == classes  # the classifier or online probe; none: no classes
    checkpoint = str(run_dir / "backbone.pt")
    assert ssl_kit_json(capsys, "info", "--checkpoint", checkpoint)["arch"] == record["arch"]
    folders = request.getfixturevalue("labeled_folders")
    knn_data = "digits" if source == "digits" else f"imagefolder:{folders[0]}"
    evaluate_everywhere(checkpoint, knn_data, folders, capsys, tmp_path)
    ssl_kit_json(capsys, "export", "--checkpoint", checkpoint, "--to", "safetensors", "--out", str(tmp_path / "x"))
    assert (tmp_path / "x" / "model.safetensors").stat().st_size > 0
    if method in NEEDS_VIT:
        attentive = ssl_kit_json(capsys, "attentive-probe", "--checkpoint", checkpoint, "--data",
                                 f"imagefolder:{folders[0]}", "--epochs", "3", "--no-sweep")
        assert 0 <= attentive["top1"] <= 1 and attentive["train_size"] > 0
        ssl_kit_json(capsys, "export", "--checkpoint", checkpoint, "--to", "timm", "--out", str(tmp_path / "timm"))
        assert json.loads((tmp_path / "timm" / "config.json").read_text())["library"] == "timm"


@pytest.mark.parametrize("source", ["digits", "images"])
def test_a_resnet_backbone_exports_to_torchvision(source, request, capsys, tmp_path):
    """The architecture with a torchvision counterpart (ResNet-18, 11M parameters: in memory and streamed only,
    the labeled streamed sources share the bare tree's loader): SimCLR on its defaults, then `export --to
    torchvision` (verified by the command against ours before anything is written) and `info`."""
    recipe = defaults_recipe("simclr", source_data(source, request), steps=2, batch=8)
    recipe["stages"][0]["backbone"] = {"name": "resnet18"}
    run_dir, _ = run_recipe(validate_recipe(recipe), tmp_path / "run")
    assert_trained(run_dir, 2)
    checkpoint = str(run_dir / "backbone.pt")
    exported = ssl_kit_json(capsys, "export", "--checkpoint", checkpoint, "--to", "torchvision",
                            "--out", str(tmp_path / "tv"))
    config = json.loads((tmp_path / "tv" / "config.json").read_text())
    assert config["library"] == "torchvision" and config["model"] == "resnet18", (config, exported)
    assert ssl_kit_json(capsys, "info", "--checkpoint", checkpoint)["arch"] == "resnet18"


@pytest.mark.parametrize("method", [m for m in METHODS if learns_from_labels(m)])
def test_a_method_that_learns_from_labels_refuses_a_source_without_any(method, unlabeled_tree, tmp_path):
    """Before: 'float division by zero', 'cannot draw batches from an empty set', 'larger than the 0 images'."""
    root, _ = unlabeled_tree
    recipe = validate_recipe(defaults_recipe(method, streamed(f"images:{root}")))
    with pytest.raises(DataError, match=r"has no labeled training images.*give data\.labels"):
        run_recipe(recipe, tmp_path / "run")


def test_an_evaluation_stage_on_an_unlabeled_tree_is_refused_before_training(unlabeled_tree, tmp_path):
    """Pretraining on a bare images: tree, then a probe with no data of its own: it would score the unlabeled tree
    after all the training; refused first, naming the stage. Given labels (data or data.labels), it runs."""
    root, csv = unlabeled_tree
    recipe = defaults_recipe("simclr", streamed(f"images:{root}"))
    recipe["stages"].append({"name": "probe", "method": "linear_probe", "epochs": 2})
    with pytest.raises(ConfigError, match=r"^stages\[probe\]: scores labeled images of the dataset stage 'train' "
                                          r"trains on, 'images:.*', an unlabeled image tree; give the stage data"):
        run_recipe(validate_recipe(recipe), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    recipe["stages"][0]["data"] = {**streamed("images"), "root": str(root)}  # the spec's root given apart
    with pytest.raises(ConfigError, match=r"^stages\[probe\]: .* an unlabeled image tree"):
        run_recipe(validate_recipe(recipe), tmp_path / "run")
    recipe["stages"][0]["data"] = {**streamed("images"), "root": None}  # no root: the training stage says so
    with pytest.raises(DataError, match=r"stages\[train\]\.data: .*images needs a root folder"):
        run_recipe(validate_recipe(recipe), tmp_path / "run")
    recipe["stages"][0]["data"] = streamed(f"images:{root}", csv)
    _, summary = run_recipe(validate_recipe(recipe), tmp_path / "labeled")
    assert 0 <= summary["probe/top1"] <= 1


@pytest.mark.parametrize("method", NEEDS_VIT)
def test_a_masked_method_on_a_cnn_is_refused_before_training(method, tmp_path):
    recipe = defaults_recipe(method, IN_MEMORY)
    recipe["stages"][0]["backbone"] = TINY_CNN
    with pytest.raises(ConfigError, match=r"stages\[train\]: .*(ViT|mask token).*got SmallCNN"):
        run_recipe(validate_recipe(recipe), tmp_path / "run")
    assert not (tmp_path / "run" / "backbone.pt").exists()


# --------------------------------------------------------------------------------------- part 2: the commands after
@pytest.fixture(scope="module")
def label_free_backbone(unlabeled_tree, data_root) -> Path:
    """SimCLR on its defaults on the bare unlabeled tree: the journey the field exists for."""
    root, _ = unlabeled_tree
    run_dir, _ = run_recipe(validate_recipe(defaults_recipe("simclr", streamed(f"images:{root}"), steps=6)),
                            data_root / "simclr-run")
    return run_dir / "backbone.pt"


@pytest.fixture(scope="module")
def shard_backbone(shards, data_root) -> Path:
    """FixMatch on its defaults on labeled tar shards (a third of the labels hidden, the rest the unlabeled pool)."""
    data = {**streamed(shards), "labels_per_class": 4}
    run_dir, _ = run_recipe(validate_recipe(defaults_recipe("fixmatch", data, steps=4)), data_root / "fixmatch-run")
    return run_dir / "backbone.pt"


@pytest.mark.parametrize("backbone", ["label_free_backbone", "shard_backbone"])
def test_evaluation_commands_accept_what_training_wrote(backbone, request, labeled_folders, capsys, tmp_path):
    checkpoint = str(request.getfixturevalue(backbone))
    source, target = (f"imagefolder:{folder}" for folder in labeled_folders)
    info = ssl_kit_json(capsys, "info", "--checkpoint", checkpoint)
    assert info["arch"] == "small_cnn" and info["params"] > 0
    knn = ssl_kit_json(capsys, "knn", "--checkpoint", checkpoint, "--data", source, "--k", "5")
    assert 0 <= knn["top1"] <= 1
    probe = ssl_kit_json(capsys, "linear-probe", "--checkpoint", checkpoint, "--data", source, "--epochs", "5",
                         "--no-sweep")
    assert 1 / len(CLASSES) - 0.2 < probe["top1"] <= 1
    tuned = ssl_kit_json(capsys, "finetune", "--checkpoint", checkpoint, "--data", source, "--epochs", "1",
                         "--batch-size", "16", "--out", str(tmp_path / "finetune"))
    assert 0 <= tuned["top1"] <= 1
    moved = ssl_kit_json(capsys, "transfer", "--checkpoint", checkpoint, "--source", source, "--target", target,
                         "--epochs", "5", "--no-sweep")
    assert moved["source"]["spec"] == source and set(moved["targets"]) == {target}
    shifted = moved["targets"][target]
    assert shifted["gap"] == pytest.approx(moved["source"]["top1"] - shifted["top1"])
    exported = ssl_kit_json(capsys, "export", "--checkpoint", checkpoint, "--to", "safetensors",
                            "--out", str(tmp_path / "export"))
    assert (tmp_path / "export" / "model.safetensors").is_file(), exported


def test_methods_command_shows_the_defaults_a_stage_trains_with(capsys):
    """`ssl-kit methods NAME` prints what `method: NAME` alone resolves to, and where the values come from."""
    shown = ssl_kit_json(capsys, "methods", "vicreg")
    resolved = validate_recipe({"seed": 0, "stages": [{"name": "p", "method": "vicreg"}]}).stages[0]
    assert shown["recommended"]["optimizer"]["name"] == resolved.optimizer.name == "lars"
    assert shown["recommended"]["optimizer"]["lr"] == resolved.optimizer.lr == 0.2
    assert "VICReg" in shown["recommended_source"]
    options = {row["key"]: row["default"] for row in shown["options"]}
    assert options["sim_weight"] == resolved.sim_weight == 25.0 and "views.jitter_prob" in options
    assert "optimizer.lr" not in options and "name" not in options  # stage keys every method shares are not listed
    assert cli.main(["methods", "no_such_method"]) == 2
    assert "unknown method 'no_such_method'" in capsys.readouterr().err
    listed = list(ssl_kit_json(capsys, "methods")["methods"])
    training, evaluation = listed[:-len(EVAL_STAGES)], listed[-len(EVAL_STAGES):]
    assert training == sorted(training) and "fixmatch" in training and "dinov2" in training
    assert evaluation == ["linear_probe", "attentive_probe", "knn", "transfer"]  # the evaluation stages come last


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`ssl-kit methods | head -1`: the reader closes the pipe early; the command stops with 141 (128 + SIGPIPE) and
    no traceback, as shell tools do."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        command = "import sys; from ssl_kit.cli import main; sys.exit(main(['methods']))"
        done = subprocess.run([sys.executable, "-c", command], stdout=write_end, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 141 and b"Traceback" not in done.stderr and b"Exception ignored" not in done.stderr, \
        done.stderr.decode()
