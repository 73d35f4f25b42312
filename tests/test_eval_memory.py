"""Bounded-memory evaluation of streamed sets: the float16 feature cache memory-mapped, the linear probe and kNN
reading it a chunk at a time, with the numbers of the in-memory path."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_kit.errors import ConfigError, DataError
from ssl_kit.eval.knn import chunked_knn_search, knn_classify, knn_search, torch_knn_search
from ssl_kit.eval.linear_probe import fit_linear_grid, linear_probe
from ssl_kit.eval.mapped import CHUNK_ROWS_ENV, chunk_rows, column_stats, gather, is_mapped, open_mapped


def cached(path: Path, features: torch.Tensor) -> torch.Tensor:
    """features (N, F) written as the float16 cache and opened memory-mapped."""
    np.save(path, features.numpy().astype(np.float16))
    return open_mapped(path)


def class_sorted_set(n_per_class: int = 120, classes: int = 5, dim: int = 24, seed: int = 0):
    """Overlapping Gaussian classes, rows sorted by class as a file index is; float16-rounded as the cache is."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[labels] * 2 + 3 + torch.randn(len(labels), dim, generator=g) * 5
    return x.half().float(), labels


def test_open_mapped_reads_the_file_without_copying_or_writing_it(tmp_path):
    x, _ = class_sorted_set()
    path = tmp_path / "f.f16.npy"
    mapped = cached(path, x)
    before = path.read_bytes()
    assert is_mapped(mapped) and mapped.dtype == torch.float16 and tuple(mapped.shape) == tuple(x.shape)
    assert not is_mapped(x) and not is_mapped(mapped[:3].clone())
    rows = torch.tensor([7, 2, 599, 2])
    assert torch.equal(gather(mapped, rows), x[rows]) and gather(mapped, rows).dtype == torch.float32
    assert path.read_bytes() == before
    np.save(tmp_path / "wide.npy", np.zeros((3, 4), np.float32))
    with pytest.raises(DataError, match="float16 .N, F. feature cache"):
        open_mapped(tmp_path / "wide.npy")


def test_chunk_rows_knob(monkeypatch):
    monkeypatch.delenv(CHUNK_ROWS_ENV, raising=False)
    assert chunk_rows(256) == 8192 and chunk_rows(512) == 4096
    monkeypatch.setenv(CHUNK_ROWS_ENV, "100")
    assert chunk_rows(512) == 100
    monkeypatch.setenv(CHUNK_ROWS_ENV, "-3")
    with pytest.raises(ConfigError, match="SSL_KIT_EVAL_CHUNK_ROWS='-3'"):
        chunk_rows(512)


def test_chunked_statistics_equal_float64_reference(tmp_path, monkeypatch):
    monkeypatch.setenv(CHUNK_ROWS_ENV, "37")  # 17 uneven chunks
    x, _ = class_sorted_set()
    mapped = cached(tmp_path / "f.npy", x)
    rows = torch.randperm(600, generator=torch.Generator().manual_seed(3))[:450]
    mean, std = column_stats(mapped, rows)
    reference = x[rows].double()
    assert torch.allclose(mean.double(), reference.mean(0), rtol=0, atol=1e-6)
    assert torch.allclose(std.double(), reference.std(0, unbiased=False), rtol=1e-6, atol=0)


@pytest.mark.parametrize("chunk", ["64", "1000000"])
def test_mapped_probe_equals_the_in_memory_probe(tmp_path, monkeypatch, chunk):
    """Same permutation and minibatches, read in windows of 64 rows (many) or all at once: the grid's weights agree
    to float32 rounding of the statistics, and the sweep, the chosen lr/wd and the test metrics are the same."""
    monkeypatch.setenv(CHUNK_ROWS_ENV, chunk)
    x, y = class_sorted_set()
    xt, yt = class_sorted_set(n_per_class=40, seed=1)
    mapped, mapped_test = cached(tmp_path / "train.npy", x), cached(tmp_path / "test.npy", xt)
    configs = [(0.3, 0.0), (0.03, 1e-3)]
    rows = torch.arange(0, 600, 3)
    for ours, reference in zip(fit_linear_grid(mapped, y, 5, configs, epochs=6, batch_size=32, rows=rows),
                               fit_linear_grid(x[rows], y[rows], 5, configs, epochs=6, batch_size=32)):
        assert torch.allclose(ours.mean, reference.mean, atol=1e-5)
        assert torch.allclose(ours.std, reference.std, rtol=1e-5)
        assert torch.allclose(ours.weight, reference.weight, atol=1e-4)
        assert torch.allclose(ours.bias, reference.bias, atol=1e-4)
    ours = linear_probe(mapped, y, mapped_test, yt, 5, epochs=8)
    reference = linear_probe(x, y, xt, yt, 5, epochs=8)
    assert 0.5 < reference["top1"] < 0.99  # not saturated: a wrong batch order or statistics would show
    for key in ("top1", "top5", "val_top1", "chosen_lr", "chosen_weight_decay", "train_size"):
        assert ours[key] == reference[key], key
    assert torch.allclose(ours["_model"].logits(mapped_test), reference["_model"].logits(xt), atol=1e-3)
    few = linear_probe(mapped, y, mapped_test, yt, 5, epochs=8, labels_per_class=4)
    assert few["top1"] == linear_probe(x, y, xt, yt, 5, epochs=8, labels_per_class=4)["top1"]


def test_mapped_probe_refuses_augmented_re_extraction(tmp_path):
    x, y = class_sorted_set()
    with pytest.raises(DataError, match="augmented re-extraction needs the training images in memory"):
        fit_linear_grid(cached(tmp_path / "f.npy", x), y, 5, [(0.1, 0.0)], epochs=2,
                        reextract=lambda epoch: x)


def test_chunked_knn_equals_the_full_search(tmp_path):
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(1000, 32, generator=g).half().float(), torch.randn(90, 32, generator=g)
    full_sims, full_ids = knn_search(bank, queries, k=10)
    torch_sims, torch_ids = torch_knn_search(bank, queries, k=10)
    mapped_bank = cached(tmp_path / "bank.npy", bank)
    for rows in (64, 333, 5000):  # many chunks, uneven chunks, one chunk
        sims, ids = chunked_knn_search(mapped_bank, queries, k=10, rows=rows)
        assert torch.equal(ids, full_ids) and torch.equal(ids, torch_ids)
        assert torch.allclose(sims, full_sims, atol=1e-5) and torch.allclose(sims, torch_sims, atol=1e-5)
    assert chunked_knn_search(mapped_bank, queries[:2], k=2000, rows=64)[1].shape == (2, 1000)


def test_knn_classify_on_mapped_splits_equals_in_memory(tmp_path, monkeypatch):
    monkeypatch.setenv(CHUNK_ROWS_ENV, "50")
    x, y = class_sorted_set()
    xt, yt = class_sorted_set(n_per_class=40, seed=1)
    ours = knn_classify(cached(tmp_path / "train.npy", x), y, cached(tmp_path / "test.npy", xt), yt, 5, k=7)
    reference = knn_classify(x, y, xt, yt, 5, k=7)
    assert 0.5 < reference["top1"] < 1.0
    assert ours == reference


def test_tally_over_chunks_equals_the_whole_and_hand_computed_values():
    from ssl_kit.common.metrics import ClassificationTally, classification_metrics

    logits = torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 1, 2], [2, 0, 1], [0, 0.5, 1]])
    labels = torch.tensor([0, 2, 2, 1, 1])  # predictions 0, 1, 2, 0, 2: right on rows 0 and 2
    whole = classification_metrics(logits, labels, 3)
    assert whole["top1"] == pytest.approx(2 / 5) and whole["top5"] == 1.0
    assert whole["per_class"] == [1.0, 0.0, 0.5] and whole["balanced_accuracy"] == pytest.approx(0.5)
    assert whole["confusion"] == [[1, 0, 0], [1, 0, 1], [0, 1, 1]]
    tally = ClassificationTally(3)
    for rows in (slice(0, 2), slice(2, 3), slice(3, 5)):
        tally.add(logits[rows], labels[rows])
    assert tally.result() == whole


def test_knn_scores_tallied_in_chunks_equal_one_block(monkeypatch):
    import ssl_kit.eval.knn as knn

    x, y = class_sorted_set()
    xt, yt = class_sorted_set(n_per_class=40, seed=1)
    reference = knn_classify(x, y, xt, yt, 5, k=7)
    monkeypatch.setattr(knn, "SCORE_CHUNK", 17)  # 200 test rows: 12 chunks, the last one short
    assert knn_classify(x, y, xt, yt, 5, k=7) == reference


def test_pooling_mapped_domains_writes_a_mapped_cache_and_leaves_no_file(tmp_path, monkeypatch):
    """Leave-one-domain-out pools the other domains' features: mapped parts -> a mapped float16 cache whose rows
    are the parts' rows in order (the file already unlinked); in-memory parts -> torch.cat, as before."""
    from ssl_kit.eval.mapped import concat_features

    monkeypatch.setenv(CHUNK_ROWS_ENV, "7")
    a, b = class_sorted_set(n_per_class=11, dim=6)[0], class_sorted_set(n_per_class=5, dim=6, seed=3)[0]
    pooled = concat_features([cached(tmp_path / "a.npy", a), b], tmp_path / "pool")
    assert is_mapped(pooled) and pooled.dtype == torch.float16 and pooled.shape == (80, 6)
    assert torch.equal(pooled.float(), torch.cat([a, b.half().float()]))
    assert list((tmp_path / "pool").iterdir()) == []
    assert torch.equal(concat_features([a, b], tmp_path / "pool"), torch.cat([a, b]))
    with pytest.raises(DataError, match=r"different widths \[3, 6\]"):
        concat_features([cached(tmp_path / "c.npy", a[:, :3]), b], tmp_path / "pool")


# ------------------------------------------------------------------------------------------ measured memory
ROWS, DIM, TEST_ROWS = 200_000, 256, 10_000
FLOAT32_MB = ROWS * DIM * 4 / 2 ** 20  # 195 MiB: what the in-memory path holds at least once, before any copy
EVALUATE = """
import json, sys, time
import faiss, numpy as np, torch  # faiss loaded before measuring: its library is not feature memory
from ssl_kit.eval.knn import knn_classify
from ssl_kit.eval.linear_probe import linear_probe
from ssl_kit.eval.mapped import open_mapped
folder, mode = sys.argv[1], sys.argv[2]
def load(split):  # mode 'memory' is the in-memory path streamed sets took before: float16 file -> float32 tensor
    path = f"{folder}/{split}.f16.npy"
    return open_mapped(path) if mode == "mapped" else torch.from_numpy(np.load(path).astype(np.float32))
def status_mb(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key + ":")).split()[1]) / 1024
def growth(run):  # peak resident memory during run() above the resident memory before it (Linux: VmHWM reset)
    open("/proc/self/clear_refs", "w").write("5")
    base = status_mb("VmRSS")
    result = run()
    return status_mb("VmHWM") - base, result
labels = {split: torch.load(f"{folder}/{split}_y.pt") for split in ("train", "test")}
# warm-up on every 100th row: the code pages of the kernels used, not feature memory, are counted before measuring
np.save(f"{folder}/warm.f16.npy", np.load(f"{folder}/train.f16.npy", mmap_mode="r")[::100])
warm, warm_y = load("warm"), labels["train"][::100]
linear_probe(warm, warm_y, warm, warm_y, 10, epochs=1)
knn_classify(warm, warm_y, warm, warm_y, 10, k=20)
del warm
start = time.time()
load_mb, (train, test) = growth(lambda: (load("train"), load("test")))
probe_mb, probe = growth(lambda: linear_probe(train, labels["train"], test, labels["test"], 10, epochs=2))
knn_mb, knn = growth(lambda: knn_classify(train, labels["train"], test, labels["test"], 10, k=20))
print(json.dumps({"load_mb": load_mb, "probe_mb": probe_mb, "knn_mb": knn_mb, "probe_top1": probe["top1"],
                  "knn_top1": knn["top1"], "seconds": time.time() - start}))
"""


def evaluate(folder: Path, mode: str, chunk_rows: str | None = None) -> dict:
    """Peak resident-memory growth (MiB) of loading, probing and kNN on the cache in `folder` in a fresh process."""
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "1", **({CHUNK_ROWS_ENV: chunk_rows} if chunk_rows else {})}
    result = subprocess.run([sys.executable, "-c", EVALUATE, str(folder), mode], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_synthetic_cache(folder: Path) -> None:
    """ROWS × DIM float16 features of 10 classes (TEST_ROWS of them for test), sorted by class, written in
    slices."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((10, DIM)).astype(np.float32)
    for split, rows in (("train", ROWS - TEST_ROWS), ("test", TEST_ROWS)):
        labels = np.repeat(np.arange(10), rows // 10)
        store = np.lib.format.open_memmap(folder / f"{split}.f16.npy", "w+", np.float16, (rows, DIM))
        for start in range(0, rows, 20_000):
            part = labels[start:start + 20_000]
            store[start:start + len(part)] = centres[part] * 0.3 + rng.standard_normal((len(part), DIM))
        store.flush()
        del store
        torch.save(torch.from_numpy(labels), folder / f"{split}_y.pt")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak-RSS reset is Linux-only")
def test_probe_and_knn_on_a_streamed_cache_stay_far_below_its_float32_size(tmp_path):
    write_synthetic_cache(tmp_path)
    measured = evaluate(tmp_path, "mapped")
    small = evaluate(tmp_path, "mapped", chunk_rows="2048")
    print(f"float32 features {FLOAT32_MB:.0f} MiB; peak RSS growth (MiB), default chunks: {measured}; "
          f"2048-row chunks: {small}")
    assert measured["probe_top1"] > 0.9 and measured["knn_top1"] > 0.9  # it did learn from all the rows
    assert (small["probe_top1"], small["knn_top1"]) == (measured["probe_top1"], measured["knn_top1"])
    # the in-memory path (mode "memory") grew by 278 MiB to load (float16 -> float32), then by 450 MiB for the
    # probe and 379 MiB for kNN; the chunked one holds a few 8 MiB chunks, faiss's 16 MiB block, allocator slack.
    # kNN's peak with 8,192-row chunks was 52 MiB on the development machine and 102 MiB on a CI machine of the same
    # kind (BLAS work buffers differ by CPU): the bound is the float32 size the in-memory path holds at least once
    assert measured["load_mb"] < 5 and measured["probe_mb"] < FLOAT32_MB / 2 and measured["knn_mb"] < FLOAT32_MB * 0.75
    assert small["knn_mb"] < FLOAT32_MB / 4  # the knob bounds it: 2 MiB chunks
