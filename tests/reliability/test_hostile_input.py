"""Hostile and careless input (issue 18): small files that would take gigabytes, crafted checkpoints, broken dataset
files, out-of-range settings and bad CLI arguments each stop with a clear ssl_kit error naming the file/key/value
and the limit: never a traceback, never a silent remap, nothing allocated first."""
from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch
import yaml

from ssl_kit.cli import main
from ssl_kit.config import validate_recipe
from ssl_kit.recipe_files import apply_overrides, bounded_yaml, load_recipe, load_yaml
from ssl_kit.data import formats
from ssl_kit.data.specs import parse_spec
from ssl_kit.engine.checkpoint import build_from_record, resolve_checkpoint, safe_load
from ssl_kit.errors import CheckpointError, ConfigError, DataError
from ssl_kit.models.cnn import SmallCNN
from tests.conftest import tiny_stage

BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


# ----------------------------------------------------------------------------------------- recipes
def test_billion_laughs_is_refused_before_expansion():
    with pytest.raises(ConfigError, match=r"expands to 1,234,567,909 values .*MAX_YAML_NODES"):
        bounded_yaml(BILLION_LAUGHS, "recipe")


def test_cyclic_alias_and_deep_nesting_are_refused():
    with pytest.raises(ConfigError, match="cyclic alias"):
        bounded_yaml("a: &x [1, *x]\n", "recipe")
    with pytest.raises(ConfigError, match="levels of nesting.*MAX_YAML_DEPTH"):
        bounded_yaml("[" * 60 + "]" * 60, "recipe")
    with pytest.raises(ConfigError, match="nested too deeply"):
        bounded_yaml("[" * 5000 + "]" * 5000, "recipe")
    assert bounded_yaml("a: &x [1, 2]\nb: *x\n", "recipe") == {"a": [1, 2], "b": [1, 2]}


def test_alias_bomb_in_an_override_is_refused():
    bomb = "{a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], " + ", ".join(
        f"a{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 10)}]" for i in range(1, 9)) + "}"
    with pytest.raises(ConfigError, match=r"override 'pretrain.backbone.kwargs=.*\.\.\. \([\d,]+ characters\): the YAML "
                                          r"expands to 1,234,567,909 values"):
        apply_overrides({"stages": [{"name": "pretrain"}]}, ["pretrain.backbone.kwargs=" + bomb])


def test_recipe_file_limits(tmp_path, monkeypatch):
    big = tmp_path / "big.yaml"
    big.write_text("description: " + "x" * 5000 + "\n")
    monkeypatch.setenv("SSL_KIT_MAX_RECIPE_BYTES", "4096")
    with pytest.raises(ConfigError, match=r"big\.yaml' is 5,014 bytes; the limit is 4,096 .*SSL_KIT_MAX_RECIPE_BYTES"):
        load_yaml(big)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="a recipe is a mapping with 'seed' and 'stages', got a list"):
        load_yaml(tmp_path / "list.yaml")
    os.mkfifo(tmp_path / "fifo.yaml")  # reading it would block forever
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_yaml(tmp_path / "fifo.yaml")


@pytest.mark.parametrize("change, message", [
    ({"name": "../../etc"}, r"name: String should match pattern"),
    ({"name": "/abs/run"}, r"name: String should match pattern"),
    ({"seed": -1}, r"seed: Input should be greater than or equal to 0"),
    ({"seed": 2**70}, r"seed: Input should be less than 9223372036854775808"),
])
def test_top_level_values_are_bounded(change, message):
    with pytest.raises(ConfigError, match=message):
        validate_recipe({"stages": [tiny_stage()], **change})


@pytest.mark.parametrize("stage_change, message", [
    ({"data": {"dataset": "digits", "root": "/data,download=true"}}, "data.root must be a folder path without commas"),
    ({"backbone": {"name": "small_cnn", "kwargs": {"width": 10**9}}},
     r"backbone.kwargs.width = 1000000000 is beyond any real architecture; the limit is 65,536"),
    ({"backbone": {"name": "small_cnn", "kwargs": {"width": float("nan")}}}, r"kwargs.width = nan is not finite"),
    ({"train": {"steps": 20, "batch_size": 65536}, "data": {"dataset": "digits", "image_size": 1024}},
     r"one step would hold 65536 images of 1024² px .*MAX_BATCH_PIXELS"),
    ({"train": {"epochs": float("inf"), "steps": None}}, r"train.epochs must be finite"),
])
def test_stage_values_are_bounded(stage_change, message):
    with pytest.raises(ConfigError, match=message):
        validate_recipe({"stages": [tiny_stage(**stage_change)]})


def test_from_stage_must_name_a_training_stage():
    stages = [tiny_stage(), {"name": "knn", "method": "knn"},
              {"name": "probe", "method": "linear_probe", "from_stage": "knn"}]
    with pytest.raises(ConfigError, match="from_stage 'knn' is an evaluation stage"):
        validate_recipe({"stages": stages})


def test_eval_stage_knobs_are_bounded():
    for stage, message in (({"k": 10**7}, "k: Input should be less than or equal to 10000"),
                           ({"knn_temperature": float("nan")}, "knn_temperature: Input should be a finite number"),
                           ({"image_size": 10**5}, "image_size: Input should be less than or equal to 1024")):
        with pytest.raises(ConfigError, match=message):
            validate_recipe({"stages": [tiny_stage(), {"name": "knn", "method": "knn", **stage}]})


def test_long_hostile_values_are_not_echoed_whole(tmp_path):
    with pytest.raises(ConfigError) as info:
        validate_recipe({"stages": [tiny_stage()], "seed": "x" * 100_000})
    assert len(str(info.value)) < 600 and "100,002 characters" in str(info.value)


# ---------------------------------------------------------------------------------------- spec options
@pytest.mark.parametrize("spec, message", [
    ("digits-printed,per_font=0", r"per_font=0 is outside \[1, 1000\]"),
    ("digits-printed,per_font=100000000", r"per_font=100000000 is outside"),
    ("digits-printed,seed=-3", r"seed=-3 is outside"),
    ("imagefolder:/x,test_fraction=nan", r"test_fraction=nan is outside"),
    ("imagefolder:/x,test_fraction=1.0", r"test_fraction=1.0 is outside"),
    ("digits-rotated:nan", r"angle nan must be finite"),
    ("digits-rotated:1e300", r"angle 1e300 must be finite and within \[-360, 360\]"),
    ("digits-rotated:inf", r"angle inf must be finite"),
])
def test_spec_options_are_bounded(spec, message):
    with pytest.raises(DataError, match=message):
        parse_spec(spec)


# ------------------------------------------------------------------------------------------ dataset files
def idx_bytes(dtype_code: int, shape: tuple, payload: bytes) -> bytes:
    return bytes([0, 0, dtype_code, len(shape)]) + b"".join(struct.pack(">I", n) for n in shape) + payload


def test_idx_declared_size_is_checked_before_reading(tmp_path):
    path = tmp_path / "bomb-idx3-ubyte.gz"
    with gzip.open(path, "wb") as handle:  # 60000 × 60000 × 60000 bytes declared, a few bytes present
        handle.write(idx_bytes(0x08, (60000, 60000, 60000), b"\0" * 100))
    with pytest.raises(DataError, match=r"declares 216,000,000,000,000 bytes .*SSL_KIT_MAX_DATA_BYTES"):
        formats.read_idx(path)
    gz_bomb = tmp_path / "gz-idx3-ubyte.gz"  # header says 4 bytes, the gzip member expands to 50 MB
    with gzip.open(gz_bomb, "wb") as handle:
        handle.write(idx_bytes(0x08, (1, 2, 2), b"\0" * 50_000_000))
    with pytest.raises(DataError, match=r"header says \(1, 2, 2\) \(4 bytes\), file holds 5\+"):
        formats.read_idx(gz_bomb)


def test_idx_float_pixels_and_bad_labels(tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    images = idx_bytes(0x0D, (2, 2, 2), np.ones(8, ">f4").tobytes())
    labels = idx_bytes(0x08, (2,), bytes([1, 12]))
    for prefix in ("train", "t10k"):
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(images)
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)
    with pytest.raises(DataError, match=r"images are >f4, expected uint8 pixels"):
        formats.load_idx_dataset(root, "mnist", [str(i) for i in range(10)])
    for prefix in ("train", "t10k"):
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(0x08, (2, 2, 2), bytes(8)))
    with pytest.raises(DataError, match="mnist train: label 12 is out of range for 10 classes"):
        formats.load_idx_dataset(root, "mnist", [str(i) for i in range(10)])


def test_cifar_list_bomb_and_bad_labels(tmp_path):
    row = [0] * 3072  # pickled once, then referenced 200 000 times through the memo
    buffer = io.BytesIO()
    pickle.dump({"data": [row] * 200_000, "labels": [0] * 200_000}, buffer)
    assert len(buffer.getvalue()) < 2_000_000  # 200 000 × 3072 values once expanded
    (tmp_path / "test").write_bytes(buffer.getvalue())
    (tmp_path / "train").write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match=r"'data' is a list, expected a uint8 array \(N, 3072\)"):
        formats.load_cifar100(tmp_path)
    batch = {"data": np.zeros((2, 3072), np.uint8), "fine_labels": [3, -1]}
    for name in ("train", "test"):
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match="label -1 is out of range for 100 classes"):
        formats.load_cifar100(tmp_path)
    batch["fine_labels"] = [3]
    (tmp_path / "train").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match=r"'fine_labels' must list 2 labels \(one per image\), got 1 entries"):
        formats.load_cifar100(tmp_path)


def test_stl_labels_are_checked_not_wrapped(tmp_path):
    for split in ("train", "test"):
        (tmp_path / f"{split}_X.bin").write_bytes(bytes(2 * 3 * 96 * 96))
        (tmp_path / f"{split}_y.bin").write_bytes(bytes([1, 11]))
    with pytest.raises(DataError, match=r"label 10 is out of range for 10 classes"):
        formats.load_stl10(tmp_path)
    (tmp_path / "train_y.bin").write_bytes(bytes([1]))
    with pytest.raises(DataError, match=r"holds 1 labels for 2 images"):
        formats.load_stl10(tmp_path)


def test_svhn_labels_and_declared_shapes(tmp_path):
    from scipy.io import savemat

    def write(x, y):
        for split in ("train", "test"):
            savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})

    write(np.zeros((32, 32, 3, 3), np.uint8), np.array([[1], [10], [11]], np.uint8))
    with pytest.raises(DataError, match=r"label 11 is outside 1..10"):
        formats.load_svhn(tmp_path)
    write(np.zeros((32, 32, 3, 2), np.float64), np.array([[1], [10]], np.uint8))
    with pytest.raises(DataError, match=r"X is double \(32, 32, 3, 2\), expected uint8"):
        formats.load_svhn(tmp_path)
    write(np.zeros((32, 32, 3, 2), np.uint8), np.array([[1], [10]], np.uint8))
    assert formats.load_svhn(tmp_path)["train"].labels.tolist() == [1, 0]


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_image_pixel_cap_is_checked_from_the_header(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(60_000, 60_000))
    with pytest.raises(DataError, match=r"huge.png' is too large to decode \(Image size \(3600000000 pixels\) "
                                        r"exceeds .*the limit is 89,478,485 .*SSL_KIT_MAX_IMAGE_PIXELS"):
        formats.read_image(path, 32)
    monkeypatch.setenv("SSL_KIT_MAX_IMAGE_PIXELS", "100")
    path.write_bytes(png_header_only(12, 12))
    with pytest.raises(DataError, match=r"huge.png' is 12×12 pixels; the limit is 100 "):
        formats.read_image(path, 32)


# -------------------------------------------------------------------------------------------- checkpoints
def backbone_file(path, **changes):
    net = SmallCNN(1, width=4)
    record = {"format": "ssl_kit.backbone", "version": 1, "arch": "small_cnn", "kwargs": {"width": 4},
              "data": {"channels": 1, "image_size": 16, "mean": [0.5], "std": [0.2], "dataset": "digits",
                       "classes": [], "num_classes": 10},
              "state_dict": net.state_dict()}
    record.update(changes)
    torch.save(record, path)
    return path


@pytest.mark.parametrize("changes, message", [
    ({"kwargs": {"width": 60000}}, r"would have [\d,]+ parameters; the limit is 2,000,000,000"),
    ({"kwargs": {"width": 8}}, r"weights do not fit backbone 'small_cnn' \{'width': 8\}: wrong shapes"),
    ({"arch": 5}, r"'arch' is a int, expected str"),
    ({"data": {"channels": 7, "image_size": 16}}, r"data.channels is 7, expected 1 or 3"),
    ({"data": {"channels": 1, "image_size": 10**9}}, r"data.image_size is 1000000000, expected 4..4096"),
    ({"data": {"channels": 1, "image_size": 16, "std": [0.0]}}, r"data.std is \[0.0\], expected 1 finite number"),
    ({"state_dict": {"features.0.weight": "not a tensor"}}, r"entry 'features.0.weight' is a str, expected a tensor"),
    ({"head": {"state_dict": {"weight": torch.zeros(3, 16)}, "num_classes": 5}},
     r"head.num_classes is 5 but head weight has shape \(3, 16\)"),
])
def test_crafted_backbone_records_are_refused_before_building(tmp_path, changes, message):
    path = backbone_file(tmp_path / "backbone.pt", **changes)
    with pytest.raises(CheckpointError, match=message):
        build_from_record(resolve_checkpoint(path, "--checkpoint"))


def test_missing_metadata_in_a_training_checkpoint_names_the_key(tmp_path):
    torch.save({"format": "ssl_kit.checkpoint", "backbone": {"arch": "small_cnn"}, "method": {}}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"init checkpoint '.*c.pt': backbone metadata has no 'kwargs'"):
        resolve_checkpoint(tmp_path / "c.pt", "init checkpoint")


def test_corrupt_bytes_name_the_slot_and_never_advise_weights_only_false(tmp_path):
    good = backbone_file(tmp_path / "good.pt").read_bytes()
    rng = np.random.default_rng(0)
    cases = {"random": rng.bytes(3000), "truncated": good[: len(good) // 2], "empty": b"",
             "pickle": pickle.dumps({"a": 1}), "flipped": good[:200] + bytes(200) + good[400:]}
    for name, data in cases.items():
        (tmp_path / f"{name}.pt").write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"stages\[ft\].init.checkpoint '.*{name}.pt'") as info:
            build_from_record(resolve_checkpoint(tmp_path / f"{name}.pt", "stages[ft].init.checkpoint"))
        assert "weights_only" not in str(info.value), str(info.value)
    with pytest.raises(CheckpointError, match="is not a regular file"):
        safe_load("/dev/zero", "teacher checkpoint")
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        safe_load(tmp_path, "resume checkpoint")


def test_zip_bomb_checkpoint_is_refused_unexpanded(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        archive.writestr("archive/data/0", b"\0" * 200_000_000)
    assert path.stat().st_size < 1_000_000
    with pytest.raises(CheckpointError, match=r"declares 200,000,0\d\d bytes of content in a [\d,]+-byte file"):
        safe_load(path, "--checkpoint")


# ----------------------------------------------------------------------------------------------- the CLI
def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, kind, message", [
    (["knn", "--checkpoint", "x", "--data", "digits", "--k", "0"], "UsageError", r"--k: 0 is outside \[1, 10000\]"),
    (["knn", "--checkpoint", "x", "--data", "digits", "--temperature", "nan"], "UsageError", "--temperature: nan"),
    (["knn", "--checkpoint", "x", "--data", "digits", "--temperature", "0"], "UsageError", r"0 is outside \(0, 100\]"),
    (["linear-probe", "--checkpoint", "x", "--data", "digits", "--epochs", "0"], "UsageError", "--epochs: 0"),
    (["linear-probe", "--checkpoint", "x", "--data", "d", "--labels-per-class", "-2"], "UsageError", "-2 is outside"),
    (["linear-probe", "--checkpoint", "x", "--data", "digits", "--image-size", "99999"], "UsageError", "99999"),
    (["finetune", "--checkpoint", "x", "--data", "digits", "--epochs", "inf"], "UsageError", "--epochs: inf"),
    (["knn", "--checkpoint", "/dev/zero", "--data", "digits"], "CheckpointError", "not a regular file"),
    (["knn", "--data", "digits"], "UsageError", "the following arguments are required: --checkpoint"),
    (["nonsense"], "UsageError", "invalid choice: 'nonsense'"),
])
def test_json_errors_are_one_object_and_exit_2(capsys, argv, kind, message):
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 2 and "Traceback" not in err
    error = json.loads(out)["error"]  # exactly one JSON document on stdout
    assert error["type"] == kind
    assert re.search(message, error["message"]), error["message"]
    assert err.startswith("ssl-kit: error: ")


def test_finetune_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, out, err = run_cli(capsys, "finetune", "--checkpoint", "x", "--data", "digits", "--out",
                             str(tmp_path / "file"), "--json")
    assert code == 2 and "is a file, not a directory" in json.loads(out)["error"]["message"]


def test_recipe_path_kinds(tmp_path, capsys):
    code, out, err = run_cli(capsys, "run", str(tmp_path), "--json")
    assert code == 2 and "is a directory" in json.loads(out)["error"]["message"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"seed": 0, "stages": [tiny_stage()], "name": "../escape"}))
    code, out, err = run_cli(capsys, "run", str(tmp_path / "r.yaml"), "--json")
    assert code == 2 and "name: String should match pattern" in json.loads(out)["error"]["message"]
    recipe = load_recipe(_named(tmp_path / "my recipe (v2).yaml"))
    assert recipe.name == "my_recipe__v2_"


def _named(path):
    path.write_text(yaml.safe_dump({"seed": 0, "stages": [tiny_stage()]}))
    return path


def test_nan_features_are_an_error_not_a_number():
    from ssl_kit.data.imageset import ImageSet
    from ssl_kit.errors import TrainingError
    from ssl_kit.eval.features import FeatureExtractor

    net = SmallCNN(1, width=2)
    torch.nn.init.constant_(net.features[0].weight, float("nan"))
    net.data_info = {"channels": 1, "image_size": 8, "mean": [0.5], "std": [0.2]}
    images = ImageSet(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0]), ["a", "b"], "probe/train")
    with pytest.raises(TrainingError, match="probe/train: the backbone produced non-finite features for 3 of 3 images"):
        FeatureExtractor(net.eval(), "cpu").features(images)
