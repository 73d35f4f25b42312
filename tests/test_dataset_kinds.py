"""The registry of dataset kinds (data/kinds.py, data/catalog.py): a new source is one registration, and what a
kind declares (its argument, its options, whether it streams) is what parsing, loading, training and evaluation
use."""
from __future__ import annotations

import re

import pytest
import torch

from ssl_kit.cli import main as cli_main
from ssl_kit.config import validate_recipe
from ssl_kit.data import kinds
from ssl_kit.data.builtin import DIGIT_CLASSES, load_digits_dataset
from ssl_kit.data.imageset import ImageSet
from ssl_kit.data.kinds import DatasetKind, register_kind, streamed_kinds
from ssl_kit.data.opened import is_streamed_source
from ssl_kit.data.sources import index_images
from ssl_kit.data.specs import load_splits, parse_spec
from ssl_kit.errors import DataError
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage


def inverted_digits(spec, size: int) -> dict[str, ImageSet]:
    """The digits with their grey levels inverted: a 'new source' of the test's own."""
    digits = load_digits_dataset()
    return {name: ImageSet(255 - split.images, split.labels, DIGIT_CLASSES, f"inverted/{name}")
            for name, split in digits.items()}


@pytest.fixture
def inverted_kind():
    kind = register_kind(DatasetKind("digits-inverted", "digits with inverted grey levels", "none",
                                     load=inverted_digits))
    yield kind
    del kinds.KINDS[kind.name]


def test_a_new_source_is_one_registration_and_trains_and_evaluates(inverted_kind, tmp_path, capsys):
    assert parse_spec("digits-inverted").name == "digits-inverted" and not is_streamed_source("digits-inverted")
    splits = load_splits("digits-inverted")
    assert torch.equal(splits["test"].images, 255 - load_splits("digits")["test"].images)
    recipe = validate_recipe({"name": "t", "seed": 0, "stages": [
        tiny_stage(data={"dataset": "digits-inverted", "image_size": 16}, train={"steps": 4})]})
    run_dir, summary = run_recipe(recipe, tmp_path / "run")
    assert summary["supervised/test/top1"] >= 0.0
    assert cli_main(["knn", "--checkpoint", str(run_dir), "--data", "digits-inverted", "--device", "cpu",
                     "--json"]) == 0
    assert '"top1"' in capsys.readouterr().out


def test_the_file_indexed_kinds_are_the_ones_that_stream():
    assert streamed_kinds() == ("imagefolder", "images", "filelist", "webdataset")
    assert kinds.dataset_kind("images").index is index_images


@pytest.mark.parametrize("spec, message", [
    ("digits,per_font=3", r"per_font= is not an option of digits \(its options: test_fraction, seed\)"),
    ("cifar10:/x,labels=a.csv", r"labels= is not an option of cifar10 \(its options: test_fraction, seed, download\)"),
    ("images:/x,download=true", r"download= is not an option of images \(its options: test_fraction, seed, labels, "
                                r"storage\)"),
    ("mnist", r"mnist needs a root folder, e.g. 'mnist:/path/to/mnist'"),
    ("digits-printed:/x", r"digits-printed is builtin and takes no root"),
    ("nope:/x", r"unknown dataset 'nope' in spec 'nope:/x' \(known: digits, digits-printed, .*webdataset\)"),
])
def test_a_spec_is_checked_against_what_its_kind_declares(spec, message):
    with pytest.raises(DataError, match=message):
        parse_spec(spec)


def test_a_bare_path_is_answered_with_the_spec_that_names_it(tmp_path):
    """What a new user types first: the path itself. The error names the spec to write for a folder, a tar file or a
    file list, and adds nothing for a name that is not a path."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "shard.tar").write_bytes(b"")
    (tmp_path / "list.txt").write_text("a.jpg\n")
    folder, shard, listing = (re.escape(str(tmp_path / name)) for name in ("photos", "shard.tar", "list.txt"))
    with pytest.raises(DataError, match=rf"is a folder: write imagefolder:{folder} \(one sub-folder per class\) or "
                                        rf"images:{folder} \(unlabeled"):
        parse_spec(str(tmp_path / "photos"))
    with pytest.raises(DataError, match=rf"is a tar file: write webdataset:{shard}$"):
        parse_spec(str(tmp_path / "shard.tar"))
    with pytest.raises(DataError, match=rf"is a file: write filelist:{listing} "):
        parse_spec(str(tmp_path / "list.txt") + ",seed=1")
    with pytest.raises(DataError) as refused:
        parse_spec("nope")
    assert str(refused.value).endswith("webdataset)")


def test_a_kind_is_registered_once_with_one_way_to_load():
    with pytest.raises(ValueError, match="'digits' is already registered"):
        register_kind(DatasetKind("digits", "again", "none", load=inverted_digits))
    with pytest.raises(ValueError, match="needs a loader or a file-index builder, not both"):
        register_kind(DatasetKind("both", "x", load=inverted_digits, index=index_images))
    with pytest.raises(ValueError, match="needs a loader or a file-index builder"):
        register_kind(DatasetKind("neither", "x"))
    assert "both" not in kinds.KINDS and "neither" not in kinds.KINDS
