"""Streamed file sources wired into training and evaluation: prepare_data's storage choice and splits, the loader
each method gets, bad files through a real run, streamed evaluation with the on-disk feature cache, and the
CPU-sized folder recipe end to end (SimCLR -> FixMatch with a labels CSV -> linear probe), on generated folders."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_kit.config import DataConfig, validate_recipe

from ssl_kit.recipe_files import load_recipe
from ssl_kit.data.crops import CropSpec
from ssl_kit.data.decode import decode_eval
from ssl_kit.data.fileset import FileSet
from ssl_kit.data.imageset import ImageSet
from ssl_kit.data.pipeline import channel_stats, prepare_data
from ssl_kit.data.stream import StreamLoader
from ssl_kit.engine.loading import build_loader, stream_views
from ssl_kit.cli import bundled_recipe_dir
from ssl_kit.data.needs import DataNeeds
from ssl_kit.errors import DataError
from ssl_kit.eval.features import FeatureExtractor
from ssl_kit.eval.mapped import is_mapped
from ssl_kit.methods import build_method
from ssl_kit.models.registry import build_backbone
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage

POOL = DataNeeds(unlabeled=True, unlabeled_ratio=7)  # what a FixMatch stage draws: labeled + 7× unlabeled

RECIPES = bundled_recipe_dir()  # ssl_kit/recipes, read as package data


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_KIT_CACHE", str(tmp_path / "cache"))


def write_image(path: Path, seed: int, cls: int, size=(40, 30)) -> None:
    """A noisy image whose dominant colour channel is its class: easy to learn from a few steps."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 120, (size[1], size[0], 3), dtype=np.uint8)
    array[:, :, cls] = 200 + rng.integers(0, 55, (size[1], size[0]), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=90)


def class_folder(root: Path, per_class: int = 30, classes=("red", "green")) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{i:03d}.jpg", 1000 * c + i, c, (36 + i % 9, 28 + i % 5))
    return root


def unlabeled_tree_with_csv(root: Path, count: int = 60, labeled: int = 16) -> Path:
    """images:ROOT tree (no class folders) + labels.csv naming `labeled` of them (class names 'red'/'green')."""
    rows = ["path,label"]
    for i in range(count):
        cls = i % 2
        rel = f"batch{i % 3}/img{i:03d}.jpg"
        write_image(root / rel, i, cls)
        if i < labeled:
            rows.append(f"{rel},{('red', 'green')[cls]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def data_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(**{"dataset": "imagefolder", "root": str(root), "image_size": 16, "workers": 0, **kw})


# ---------------------------------------------------------------------------------------- prepare_data
def test_storage_auto_memory_stream(tmp_path):
    root = class_folder(tmp_path / "f", per_class=10)
    streamed = prepare_data(data_cfg(root, storage="auto", memory_budget_gb=1e-6), 0)
    assert streamed.streamed and isinstance(streamed.train, FileSet) and not hasattr(streamed.train, "images")
    assert len(streamed.train) == 16 and len(streamed.test) == 4  # 20% stratified holdout: 2 per class
    assert streamed.info.dataset.endswith(",storage=stream")
    in_memory = prepare_data(data_cfg(root, storage="auto"), 0)
    assert isinstance(in_memory.train, ImageSet) and tuple(in_memory.train.images.shape) == (16, 3, 16, 16)
    forced = prepare_data(data_cfg(root, storage="memory", memory_budget_gb=1e-6), 0)
    assert isinstance(forced.train, ImageSet)
    assert prepare_data(data_cfg(root, storage="stream"), 0).streamed
    # the same images and labels on both paths
    assert torch.equal(streamed.train.labels, in_memory.train.labels)
    assert streamed.train.classes == in_memory.train.classes == ["green", "red"]


def test_streamed_normalisation_stats_come_from_the_eval_crops(tmp_path):
    root = class_folder(tmp_path / "f", per_class=6)
    data = prepare_data(data_cfg(root, storage="stream"), 0)
    index = data.train.index
    crops = np.stack([decode_eval(index.read(p), index.path(p), 16, 3, 0.875) for p in data.train.positions])
    mean, std = channel_stats(torch.from_numpy(crops))
    assert data.info.mean == mean and data.info.std == std


def test_labels_csv_labeled_subset_plus_unlabeled_rest(tmp_path):
    csv = unlabeled_tree_with_csv(tmp_path / "pool", count=60, labeled=20)
    cfg = DataConfig(dataset="images", root=str(tmp_path / "pool"), labels=str(csv), image_size=16, storage="stream",
                     workers=0)
    data = prepare_data(cfg, 0, POOL)
    assert data.info.classes == ["green", "red"]
    assert len(data.test) == 4 and bool((data.test.labels >= 0).all())  # 20% of the labeled, unlabeled stay in train
    assert len(data.train) == 56 and len(data.labeled) == 16
    assert len(data.unlabeled) == 56  # include_labeled_in_unlabeled: the labeled images + the unlabeled rest
    assert int((data.train.labels < 0).sum()) == 40
    assert f",labels={csv}" in data.info.dataset


def test_streamed_set_with_a_streamed_unlabeled_domain(tmp_path):
    """data.unlabeled_dataset on a streamed labeled set: the other domain's images are appended to the file index
    as the unlabeled pool (its labels kept only for pseudo-label accuracy); nothing is decoded up front."""
    root = class_folder(tmp_path / "src", per_class=10)
    class_folder(tmp_path / "tgt", per_class=7)
    cfg = data_cfg(root, storage="stream", unlabeled_dataset=f"imagefolder:{tmp_path / 'tgt'}")
    data = prepare_data(cfg, 0, POOL)
    assert isinstance(data.train, FileSet) and len(data.train) == 16 + 14
    assert data.unlabeled.tolist() == list(range(16, 30)) and len(data.labeled) == 16
    index = data.train.index
    assert all(index.path(p).startswith(str(tmp_path / "tgt")) for p in data.train.positions[16:])
    assert data.train.labels[16:].tolist() == [0] * 7 + [1] * 7  # green, red: the target's own labels
    assert len(data.test) == 4  # the source's holdout, untouched
    unlabeled_tree_with_csv(tmp_path / "pool", count=9)
    pool = prepare_data(data_cfg(root, storage="stream", unlabeled_dataset=f"images:{tmp_path / 'pool'}"), 0, POOL)
    assert len(pool.unlabeled) == 9 and bool((pool.train.labels[16:] == -1).all())
    with pytest.raises(DataError, match="a streamed labeled set takes a streamed unlabeled set"):
        prepare_data(data_cfg(root, storage="stream", unlabeled_dataset="digits"), 0, POOL)
    class_folder(tmp_path / "other", per_class=2, classes=("cyan", "pink"))
    with pytest.raises(DataError, match="unlabeled_dataset.*same classes"):
        prepare_data(data_cfg(root, storage="stream", unlabeled_dataset=f"imagefolder:{tmp_path / 'other'}"), 0, POOL)


def test_labels_csv_on_a_builtin_set_is_refused():
    with pytest.raises(DataError, match="data.labels 'x.csv'.*'digits' has its own labels"):
        prepare_data(DataConfig(dataset="digits", labels="x.csv"), 0)


# --------------------------------------------------------------------------------------- the loaders
def _method(method: str, tmp_path: Path, **extra):
    root = class_folder(tmp_path / "f", per_class=10)
    data = {"dataset": "imagefolder", "root": str(root), "image_size": 16, "storage": "stream", "workers": 0,
            "stream_crop_scale": [0.5, 1.0], "hflip": True, **extra.pop("data", {})}
    stage = tiny_stage("s", method, data=data, **extra)
    cfg = validate_recipe({"seed": 0, "stages": [stage]}).stages[0]
    cls = build_method(method)
    data = prepare_data(cfg.data, 0, cls.data_needs(cfg))
    backbone = build_backbone(cfg.backbone.name, 3, 16, cfg.backbone.kwargs)
    return cls(cfg, backbone, data.info, **cls.context_from(cfg, data, None)), data, cfg


def test_view_methods_get_one_crop_per_view(tmp_path):
    method, data, cfg = _method("dino", tmp_path, local_crops=3, local_crop_size=0.5, out_dim=32,
                                head_hidden_dim=16, bottleneck_dim=8)
    views, u_views = stream_views(method, 16)
    assert [v.size for v in views] == [16, 16, 8, 8, 8] and u_views is None
    assert views[0].scale == tuple(cfg.global_crop_scale) and views[2].scale == tuple(cfg.local_crop_scale)
    assert all(v.flip for v in views)
    loader = build_loader(method, data, cfg, 0, 0, 1, torch.device("cpu"))
    assert isinstance(loader, StreamLoader)
    batch = loader.batch(0)
    assert [tuple(v.shape) for v in batch.views] == [(32, 3, 16, 16)] * 2 + [(32, 3, 8, 8)] * 3
    out = method.training_step(batch, method_progress())
    assert torch.isfinite(out["loss"])


def method_progress():
    from ssl_kit.methods.base import Progress

    return Progress(0, 10, 0, 10)


def test_methods_without_views_get_one_base_crop(tmp_path):
    method, data, cfg = _method("fixmatch", tmp_path, mu=2, train={"batch_size": 4})
    views, u_views = stream_views(method, 16)
    assert views == u_views == [CropSpec(16, (0.5, 1.0))]  # data.stream_crop_scale, no flip: the device flips
    batch = build_loader(method, data, cfg, 0, 0, 1, torch.device("cpu")).batch(0)
    assert tuple(batch.x.shape) == (4, 3, 16, 16) and tuple(batch.u.shape) == (8, 3, 16, 16)
    assert len(batch.u_views) == 1  # weak and strong are derived on the device from one decode


def test_mae_crops_in_the_workers_with_its_own_scale(tmp_path):
    method, _, cfg = _method("mae", tmp_path, backbone={"name": "vit_tiny", "kwargs": {"patch_size": 4, "depth": 2}},
                             crop_scale=[0.3, 0.9], decoder_dim=16, decoder_depth=1, decoder_heads=2)
    assert stream_views(method, 16) == ([CropSpec(16, (0.3, 0.9), flip=True)], [CropSpec(16, (0.3, 0.9), flip=True)])


# ------------------------------------------------------------------------------------- runs and bad files
def _folder_run(tmp_path, root: Path, method: str = "simclr", **overrides):
    extra = dict(temperature=0.5, proj_hidden_dim=32, proj_dim=16) if method == "simclr" else {}
    data = {"dataset": "imagefolder", "root": str(root), "image_size": 16, "storage": "stream", "workers": 1,
            **overrides.pop("data", {})}
    train = {"steps": 6, "batch_size": 8, "log_every": 2, **overrides.pop("train", {})}
    stage = tiny_stage("s", method, data=data, train=train, **extra, **overrides)
    return run_recipe(validate_recipe({"seed": 0, "name": "b", "stages": [stage]}), tmp_path / "run")


def test_bad_file_is_substituted_counted_and_listed(tmp_path):
    root = class_folder(tmp_path / "f", per_class=30)
    broken = root / "red" / "000.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated JPEG
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_dir, summary = _folder_run(tmp_path, root, data={"max_bad_fraction": 0.1}, train={"steps": 8})
    assert "s/test/top1" in summary
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    counts = [r["data/bad_images"] for r in records if r["kind"] == "step"]
    assert counts == sorted(counts) and counts[-1] == 1
    assert (run_dir / "bad_images.txt").read_text().startswith(f"{broken}\t")
    assert sum(str(broken) in str(w.message) for w in caught) == 1  # one warning per file


def test_fixmatch_adapts_to_a_streamed_unlabeled_domain(tmp_path):
    """A FixMatch stage on a streamed source with another folder as data.unlabeled_dataset trains from both and
    measures pseudo-label accuracy on the other domain's (hidden) labels."""
    root = class_folder(tmp_path / "src", per_class=12)
    class_folder(tmp_path / "tgt", per_class=12)
    run_dir, summary = _folder_run(tmp_path, root, "fixmatch", mu=2,
                                   data={"unlabeled_dataset": f"imagefolder:{tmp_path / 'tgt'}"})
    assert "s/test/top1" in summary
    split = json.loads((run_dir / "splits" / "s.json").read_text())
    assert len(split["unlabeled"]) == 24 and min(split["unlabeled"]) == 20  # after the 20 source training images
    quality = summary["s/sweep/quality@0.5"]  # pseudo-label accuracy, scored on the target's hidden labels
    assert 0.0 <= quality <= 1.0


def test_too_many_bad_files_stop_the_run_naming_them(tmp_path):
    root = class_folder(tmp_path / "f", per_class=30)
    for i in range(4):
        (root / "green" / f"{i:03d}.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"bad image files .* exceed data.max_bad_fraction=0.05 of 60 images; "
                                        r"first: .*green/00\d.jpg: empty file"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _folder_run(tmp_path, root, data={"max_bad_fraction": 0.05}, train={"steps": 30})
    listed = (tmp_path / "run" / "bad_images.txt").read_text().splitlines()
    assert len(listed) >= 3 and all("green/00" in line and "empty file" in line for line in listed)


def test_streamed_mae_run_writes_its_reconstruction(tmp_path):
    root = class_folder(tmp_path / "f", per_class=8)
    run_dir, summary = _folder_run(tmp_path, root, "mae", train={"steps": 2},
                                   backbone={"name": "vit_tiny", "kwargs": {"patch_size": 4, "depth": 2, "dim": 48}},
                                   decoder_dim=16, decoder_depth=1, decoder_heads=2,
                                   optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05})
    assert (run_dir / "plots" / "reconstruction_s.png").is_file() and "s/test/top1" in summary


# --------------------------------------------------------------------------------------------- evaluation
def test_streamed_features_match_the_eval_transform_and_are_cached_on_disk(tmp_path):
    root = class_folder(tmp_path / "f", per_class=6)
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", 3, 16, {"width": 8})
    backbone.data_info = {"image_size": 16, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    spec = f"imagefolder:{root},storage=stream"
    extractor = FeatureExtractor(backbone, "cpu", workers=0)
    assert extractor.streams(spec) and not extractor.streams(f"imagefolder:{root}")  # small: memory by default
    features = extractor.dataset_features(spec)
    train_x, train_y, classes = features["train"]
    # the float16 cache itself, memory-mapped (mapped.py), not an in-memory float32 copy
    assert train_x.dtype == torch.float16 and is_mapped(train_x) and tuple(train_x.shape) == (10, backbone.num_features)
    cached = sorted((tmp_path / "cache" / "features").glob("*.f16.npy"))
    assert len(cached) == 2 and np.load(cached[0]).dtype == np.float16
    # the same numbers as decoding with the eval transform by hand (up to float16 rounding)
    data = prepare_data(data_cfg(root, storage="stream", normalize="none"), 0)
    index = data.train.index
    crops = torch.from_numpy(np.stack([decode_eval(index.read(p), index.path(p), 16) for p in data.train.positions]))
    expected = extractor.features(ImageSet(crops, data.train.labels, classes))
    assert torch.allclose(train_x.float(), expected, rtol=2e-3, atol=2e-3)
    assert torch.equal(train_y, data.train.labels)
    again = FeatureExtractor(backbone, "cpu", workers=0)
    assert torch.equal(again.dataset_features(spec)["train"][0], train_x) and again.forward_passes == 0
    with pytest.raises(DataError, match="streams .*augmented probes"):
        again.dataset_splits(spec)


# ------------------------------------------------------------------------------------------ the recipe
@pytest.mark.slow
def test_simclr_then_fixmatch_folder_recipe_end_to_end(tmp_path):
    csv = unlabeled_tree_with_csv(tmp_path / "pool", count=80, labeled=24)
    root = tmp_path / "pool"
    overrides = [f"{s}.data.{k}={v}" for s in ("pretrain", "fixmatch") for k, v in
                 (("root", root), ("labels", csv), ("image_size", 16), ("workers", 1))]
    overrides += ["pretrain.train.epochs=1", "pretrain.train.batch_size=16", "pretrain.train.progress=false",
                  "fixmatch.train.steps=4", "fixmatch.train.batch_size=8", "fixmatch.mu=2",
                  "fixmatch.train.progress=false", "linear_probe.epochs=3"]
    recipe = load_recipe(RECIPES / "simclr_then_fixmatch_folder.yaml", overrides)
    run_dir, summary = run_recipe(recipe, tmp_path / "run")
    for key in ("pretrain/test/top1", "fixmatch/test/top1", "fixmatch/sweep/quantity@0.5", "linear_probe/top1"):
        assert key in summary, key
    assert summary["pretrain/steps"] == 76 // 16  # SimCLR draws every training image, labeled or not
    split = json.loads((run_dir / "splits" / "fixmatch.json").read_text())
    assert len(split["labeled"]) == 20 and len(split["unlabeled"]) == 76
    assert summary["linear_probe/train_size"] == 20  # the labeled images of the training split, from the CSV


@pytest.mark.parametrize("mode, in_workers", [("auto", True), ("workers", True), ("device", False)])
def test_cpu_training_runs_the_photometric_part_in_the_workers(tmp_path, mode, in_workers):
    """data.photometric: auto on the CPU (and workers) hands over augmented uint8 views, so training only normalises
    them; device leaves the photometric part to the training process. Both train."""
    method, data, cfg = _method("simclr", tmp_path, data={"photometric": mode})
    loader = build_loader(method, data, cfg, 0, 0, 1, torch.device("cpu"))
    batch = loader.batch(0)
    assert batch.views_augmented is in_workers
    views = method.augment_views(batch)
    if in_workers:
        normalize = method.view1.normalize
        assert all(torch.allclose(v, normalize(x)) for v, x in zip(views, batch.views))
    assert torch.isfinite(method.training_step(batch, method_progress())["loss"])


def test_photometric_auto_leaves_the_device_path_on_an_accelerator(tmp_path):
    from ssl_kit.engine.loading import worker_photometric

    method, _, _ = _method("simclr", tmp_path)
    assert worker_photometric(method, "auto", torch.device("cuda")) is None
    assert len(worker_photometric(method, "auto", torch.device("cpu"))) == 2
    fixmatch, _, _ = _method("fixmatch", tmp_path / "f", mu=2, train={"batch_size": 4})
    assert worker_photometric(fixmatch, "workers", torch.device("cpu")) is None  # no views: weak/strong on device


def _bad_files_worker(rank: int, world: int, port: int, root: str, run_dir: str) -> None:
    import os

    import torch.distributed as torch_dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "SSL_KIT_CACHE": f"{run_dir}-cache{rank}"})
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    stage = tiny_stage("s", "simclr", temperature=0.5, proj_hidden_dim=32, proj_dim=16,
                       data={"dataset": "imagefolder", "root": root, "image_size": 16, "storage": "stream",
                             "workers": 0, "max_bad_fraction": 0.3},
                       train={"steps": 10, "batch_size": 8, "log_every": 5})
    try:
        run_recipe(validate_recipe({"seed": 0, "name": "b", "stages": [stage]}), Path(run_dir))
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


@pytest.mark.slow
def test_bad_files_of_every_rank_are_counted_and_listed_under_ddp(tmp_path):
    """2 gloo ranks read disjoint shares: data/bad_images counts the distinct bad files of both ranks, and
    bad_images.txt (written by rank 0) lists them all, not rank 0's share alone."""
    import torch.multiprocessing as mp

    from tests.test_distributed import free_port

    root = class_folder(tmp_path / "f", per_class=24)
    broken = [root / "red" / f"{i:03d}.jpg" for i in range(0, 24, 4)] + [root / "green" / f"{i:03d}.jpg"
                                                                         for i in range(0, 24, 4)]
    for path in broken:
        path.write_bytes(b"not an image")
    mp.spawn(_bad_files_worker, args=(2, free_port(), str(root), str(tmp_path / "run")), nprocs=2, join=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lines = (tmp_path / "run" / "bad_images.txt").read_text().splitlines()
    listed = {line.split("\t")[0] for line in lines if not line.endswith("(held-out test split)")}
    held_out = {line.split("\t")[0] for line in lines if line.endswith("(held-out test split)")}
    final = [r["data/bad_images"] for r in records if r["kind"] == "step"][-1]
    assert listed <= {str(p) for p in broken} and final == len(listed)  # data/bad_images counts training reads
    assert listed | held_out == {str(p) for p in broken} and not listed & held_out  # the test split's are listed too
    assert len(listed) > 8  # more than one rank's share of the 12 broken files (train split: ~80% of them)
