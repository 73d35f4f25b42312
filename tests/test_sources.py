"""File indexes of streamed sources, the index cache, labels CSVs and `ssl-kit data`, on files the tests write."""
import io
import json
import os
import tarfile
import warnings

import numpy as np
import pytest
from PIL import Image

from ssl_kit.cli import main
from ssl_kit.data.sources import apply_labels_csv, build_index, choose_storage, join_indexes
from ssl_kit.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_KIT_CACHE", str(tmp_path / "cache"))


def jpeg(path, width=24, height=16, seed=0, fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, fmt)
    return path


def jpeg_bytes(width=24, height=16, seed=0):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def folder(root, classes=("cat", "dog"), per_class=3, split=None):
    for c in classes:
        for i in range(per_class):
            jpeg(root / (split or "") / c / "nested" / f"{i}.jpg", seed=i)
    return root


def test_imagefolder_nested_files_and_classes(tmp_path):
    root = folder(tmp_path / "f")
    (tmp_path / "f" / "cat" / "notes.txt").write_text("not an image")
    index = build_index("imagefolder", str(root))
    assert len(index) == 6 and index.classes == ["cat", "dog"]
    assert [index.name(i) for i in range(3)] == [f"cat/nested/{i}.jpg" for i in range(3)]
    assert index.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert list(index.splits) == ["train"] and index.read(0) == (root / "cat/nested/0.jpg").read_bytes()


def test_imagefolder_train_val_split(tmp_path):
    root = tmp_path / "f"
    folder(root, per_class=2, split="train")
    folder(root, classes=("cat",), per_class=1, split="val")
    index = build_index("imagefolder", str(root))
    assert index.classes == ["cat", "dog"]
    assert index.split("train").tolist() == [0, 1, 2, 3] and index.split("val").tolist() == [4]
    assert index.name(4) == "val/cat/nested/0.jpg" and index.labels[4] == 0
    folder(root, classes=("bird",), per_class=1, split="test")
    with pytest.raises(DataError, match=r"split 'test' has classes \['bird'\] that the train split lacks"):
        build_index("imagefolder", str(root))


def test_images_unlabeled_tree(tmp_path):
    for i, rel in enumerate(["a.jpg", "x/b.png", "x/y/c.jpeg"]):
        jpeg(tmp_path / "t" / rel, seed=i, fmt="PNG" if rel.endswith("png") else "JPEG")
    index = build_index("images", str(tmp_path / "t"))
    assert [index.name(i) for i in range(3)] == ["a.jpg", "x/b.png", "x/y/c.jpeg"]
    assert index.labels.tolist() == [-1, -1, -1] and index.classes == []


def test_filelist_relative_paths_and_empty_labels(tmp_path):
    jpeg(tmp_path / "imgs" / "a.jpg")
    jpeg(tmp_path / "imgs" / "b.jpg", seed=1)
    jpeg(tmp_path / "imgs" / "c.jpg", seed=2)
    lst = tmp_path / "list.csv"
    lst.write_text("path,label\nimgs/a.jpg,cat\nimgs/b.jpg,\nimgs/c.jpg,dog\n")
    index = build_index("filelist", str(lst))
    assert index.classes == ["cat", "dog"] and index.labels.tolist() == [0, -1, 1]
    assert index.read(2) == (tmp_path / "imgs" / "c.jpg").read_bytes()
    (tmp_path / "plain.txt").write_text("imgs/a.jpg\nimgs/b.jpg\n")
    plain = build_index("filelist", str(tmp_path / "plain.txt"))
    assert plain.labels.tolist() == [-1, -1] and plain.classes == []
    (tmp_path / "nums.tsv").write_text("imgs/a.jpg\t2\nimgs/b.jpg\t0\n")
    nums = build_index("filelist", str(tmp_path / "nums.tsv"))
    assert nums.labels.tolist() == [2, 0] and nums.classes == ["0", "1", "2"]
    (tmp_path / "bad.csv").write_text("imgs/a.jpg,1,extra\n")
    with pytest.raises(DataError, match=r"bad.csv:1: expected 'path\[,label\]', got 3 columns"):
        build_index("filelist", str(tmp_path / "bad.csv"))


def write_shard(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_with_and_without_cls(tmp_path):
    write_shard(tmp_path / "s-000.tar", [("k0.jpg", jpeg_bytes(seed=0)), ("k0.cls", b"1"),
                                         ("k1.jpg", jpeg_bytes(seed=1)), ("k1.cls", b"0")])
    write_shard(tmp_path / "s-001.tar", [("k2.png", jpeg_bytes(seed=2)), ("k3.jpg", jpeg_bytes(seed=3))])
    index = build_index("webdataset", str(tmp_path / "s-{000..001}.tar"))
    assert len(index) == 4 and index.labels.tolist() == [1, 0, -1, -1] and index.classes == ["0", "1"]
    assert index.read(1) == jpeg_bytes(seed=1) and index.read(3) == jpeg_bytes(seed=3)
    assert index.name(2) == "s-001.tar/k2.png"
    assert len(build_index("webdataset", str(tmp_path / "s-*.tar"))) == 4
    with pytest.raises(DataError, match="shard files missing"):
        build_index("webdataset", str(tmp_path / "s-{000..002}.tar"))


def test_join_indexes_of_folders_shards_and_unlabeled_trees(tmp_path):
    """Another domain appended to a source: positions continue, files under another root read by absolute path,
    shards listed one after the other, labels kept, 'train' extended; mixed kinds and other classes refused."""
    first = build_index("imagefolder", str(folder(tmp_path / "a", per_class=2, split="train")))
    folder(tmp_path / "a", classes=("cat",), per_class=1, split="test")
    first = build_index("imagefolder", str(tmp_path / "a"))
    second = build_index("imagefolder", str(folder(tmp_path / "b", per_class=3)))
    joined = join_indexes(first, second)
    assert len(joined) == 5 + 6 and joined.classes == ["cat", "dog"]
    assert joined.labels.tolist() == first.labels.tolist() + second.labels.tolist()
    assert joined.split("train").tolist() == [0, 1, 2, 3] + list(range(5, 11))
    assert joined.split("test").tolist() == first.split("test").tolist()
    assert all(joined.read(i) == first.read(i) and joined.path(i) == first.path(i) for i in range(5))
    assert all(joined.read(5 + i) == second.read(i) and joined.path(5 + i) == second.path(i) for i in range(6))
    for i in range(6):
        jpeg(tmp_path / "u" / f"{i}.jpg", seed=10 + i)
    unlabeled = join_indexes(first, build_index("images", str(tmp_path / "u")))
    assert unlabeled.labels[5:].tolist() == [-1] * 6 and unlabeled.read(5) == (tmp_path / "u/0.jpg").read_bytes()
    with pytest.raises(DataError, match=r"classes \['bird'\].*same classes"):
        join_indexes(first, build_index("imagefolder", str(folder(tmp_path / "c", classes=("bird",)))))
    write_shard(tmp_path / "s-000.tar", [("k0.jpg", jpeg_bytes(seed=0)), ("k0.cls", b"1")])
    write_shard(tmp_path / "t-000.tar", [("m0.jpg", jpeg_bytes(seed=5)), ("m1.jpg", jpeg_bytes(seed=6))])
    shards = join_indexes(build_index("webdataset", str(tmp_path / "s-000.tar")),
                          build_index("webdataset", str(tmp_path / "t-000.tar")))
    assert len(shards) == 3 and shards.read(2) == jpeg_bytes(seed=6) and shards.name(1) == "t-000.tar/m0.jpg"
    assert shards.labels.tolist() == [1, -1, -1]  # labels of the first, the other unlabeled
    with pytest.raises(DataError, match="one is tar shards, the other files"):
        join_indexes(first, build_index("webdataset", str(tmp_path / "t-000.tar")))


def test_index_cache_hit_and_miss(tmp_path, monkeypatch):
    root = folder(tmp_path / "f")
    first = build_index("imagefolder", str(root))
    import ssl_kit.data.sources as sources

    calls = []
    original = sources._folder_index
    monkeypatch.setattr(sources, "_folder_index", lambda *a: calls.append(1) or original(*a))
    again = build_index("imagefolder", str(root))
    assert calls == [] and again.labels.tolist() == first.labels.tolist() and again.name(5) == first.name(5)
    jpeg(root / "dog" / "nested" / "new.jpg")  # changes that directory's mtime
    changed = build_index("imagefolder", str(root))
    assert calls == [1] and len(changed) == 7


def test_read_only_root_and_unwritable_cache(tmp_path, monkeypatch):
    root = folder(tmp_path / "f")
    for dirpath, _, _ in os.walk(root):
        os.chmod(dirpath, 0o555)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("SSL_KIT_CACHE", str(blocker))
    try:  # an unusable cache folder is one clear error on every path (limits.cache_root), never a silent skip
        with pytest.raises(ConfigError, match="SSL_KIT_CACHE=.* is a file, not a folder"):
            build_index("imagefolder", str(root))
        monkeypatch.setenv("SSL_KIT_CACHE", str(tmp_path / "cache"))
        assert len(build_index("imagefolder", str(root))) == 6  # a read-only dataset root is never written to
    finally:
        for dirpath, _, _ in os.walk(root):
            os.chmod(dirpath, 0o755)


def test_symlinks_out_of_root_and_loops_are_skipped(tmp_path):
    root = folder(tmp_path / "f")
    outside = jpeg(tmp_path / "outside.jpg")
    os.symlink(outside, root / "cat" / "escape.jpg")
    os.symlink(root / "cat", root / "cat" / "nested" / "loop")
    os.symlink(tmp_path / "missing.jpg", root / "dog" / "dangling.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = build_index("imagefolder", str(root))
    assert len(index) == 6
    reasons = dict((os.path.basename(p), r) for p, r in index.skipped)
    assert reasons["escape.jpg"].startswith("symlink points out of the root")
    assert reasons["loop"].startswith("directory already indexed")
    assert reasons["dangling.jpg"] == "dangling or looping symlink"
    assert sum("skipped" in str(w.message) for w in caught) == 3


def test_labels_csv_subset_missing_extra_unlabeled_rows(tmp_path):
    for i in range(5):
        jpeg(tmp_path / "pool" / f"{i}.jpg", seed=i)
    index = build_index("images", str(tmp_path / "pool"))
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\npool/0.jpg,cat\n1.jpg,dog\npool/2.jpg,\npool/gone.jpg,cat\n")
    with pytest.warns(UserWarning, match=r"1 rows name files not in .*'pool/gone.jpg'"):
        labeled = apply_labels_csv(index, str(csv))
    assert labeled.classes == ["cat", "dog"] and labeled.labels.tolist() == [0, 1, -1, -1, -1]
    csv.write_text("pool/0.jpg,cat\npool/0.jpg,dog\n")
    with pytest.raises(DataError, match=r"labels.csv:2: 'pool/0.jpg' appears again with label 'dog'"):
        apply_labels_csv(index, str(csv))
    csv.write_text("elsewhere/0.jpg,cat\n")
    with pytest.raises(DataError, match="none of its 1 rows names an image"):
        apply_labels_csv(index, str(csv))
    classes = build_index("imagefolder", str(folder(tmp_path / "f")))
    csv.write_text("f/cat/nested/0.jpg,bird\n")
    with pytest.raises(DataError, match=r"labels \['bird'\] are not classes of"):
        apply_labels_csv(classes, str(csv))
    csv.write_text("f/cat/nested/0.jpg,dog\n")
    assert apply_labels_csv(classes, str(csv)).labels.tolist() == [1, -1, -1, -1, -1, -1]


def test_choose_storage():
    assert choose_storage("auto", 1000, 32, 3, 1.0) == "memory"
    assert choose_storage("auto", 1_000_000, 224, 3, 4.0) == "stream"  # 150 GB
    assert choose_storage("memory", 1_000_000, 224, 3, 4.0) == "memory"


def test_cli_data_on_each_source(tmp_path, capsys):
    root = folder(tmp_path / "f")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["data", f"imagefolder:{root}", "--check", "--json", "--image-size", "32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 7 and out["classes"] == 2 and out["storage"] == "memory"
    assert out["decoded_bytes"] == 7 * 3 * 32 * 32 and out["width"]["median"] == 24
    assert out["checked"] == 7 and out["unreadable"] == 1 and "broken.jpg" in out["unreadable_files"][0]
    assert main(["data", f"images:{root}", "--storage", "auto", "--budget-gb", "1e-6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["labeled"] == 0 and out["storage"] == "stream"
    lst = tmp_path / "l.csv"
    lst.write_text("f/cat/nested/0.jpg,a\nf/dog/nested/1.jpg,\n")
    assert main(["data", f"filelist:{lst}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labeled"] == 1
    write_shard(tmp_path / "s-0.tar", [("k.jpg", jpeg_bytes()), ("k.cls", b"3")])
    assert main(["data", f"webdataset:{tmp_path}/s-0.tar", "--check"]) == 0
    text = capsys.readouterr().out
    assert "images: 1" in text and "classes: 4" in text and "unreadable: 0" in text
    assert main(["data", f"images:{tmp_path}/nowhere"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_small_streamed_sources_load_in_memory(tmp_path):
    from ssl_kit.data.specs import load_splits

    lines = []
    for i in range(10):
        jpeg(tmp_path / "imgs" / f"{i}.jpg", width=30, height=20, seed=i)
        lines.append(f"imgs/{i}.jpg,{'ab'[i % 2]}")
    (tmp_path / "imgs" / "9.jpg").write_bytes(b"")  # a bad file is left out with a warning
    (tmp_path / "l.csv").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"left out bad image .*9.jpg: empty file"):
        splits = load_splits(f"filelist:{tmp_path / 'l.csv'},test_fraction=0.2", folder_size=8)
    train, test = splits["train"], splits["test"]
    assert train.images.shape[1:] == (3, 8, 8) and train.classes == ["a", "b"]
    assert len(train) + len(test) == 9 and len(test) in (1, 2)  # 20% of each class held out, minus the bad file
