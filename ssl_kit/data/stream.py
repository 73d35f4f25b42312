"""Streamed batches: DataLoader workers decode files of a `FileIndex` and cut every view; uint8 views go to the
device, where the photometric augmentation runs batched — or, training on a CPU, the workers run it too, per
micro-batch (`photometric`), seeded by (seed, the micro-batch's first position, view) so it stays a pure function
of the key.

`StreamLoader` has `DeviceLoader`'s interface (`steps_per_epoch`, `mu`, `unlabeled_stream`,
`batch(step, micro, micro_count) -> Batch`), so the trainer can use either. Which images a batch holds is the
same pure function of (seed, stream, position) as in `DeviceLoader` (`IndexStream`, the same rank slicing), and
every crop box and flip is a pure function of (seed, stream, position, view) (`crops.crop_box`). Each DataLoader
item is one whole micro-batch, computed from its key (step, micro, micro_count) alone, so the result does not
depend on the number of workers, and `batch()` at any other step than the next one restarts the worker iterator
there in O(1): no replay.

Nothing decoded is cached: memory is the index plus the batches in flight (workers × prefetch).
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DataError
from .crops import CropSpec, expand_views, view_rng
from .decode import SUBSTITUTE_GREY, BadImage, decode_eval, decode_views
from .device_decode import JpegJob, decode_jobs, plan_jpeg
from .loader import Batch, IndexStream
from .sources import FileIndex

SUBSTITUTE_TRIES = 8
MIN_READS_FOR_FRACTION = 1000
PHOTOMETRIC_VIEW = 2_000_000  # view_rng's view numbers of the workers' photometric draws (crops: < 1M)
PHOTOMETRIC_CHUNK = 4  # images augmented together in a worker: 4 × 3 × 224² floats stay in the CPU's caches


def read_views(index: FileIndex, image: int, views: list[CropSpec], seed: int, position: int, channels: int,
               jpeg_jobs: bool = False) -> Union[list[np.ndarray], JpegJob]:
    """Views of image `image` (a position in the index) at stream position `position`. With `jpeg_jobs`
    (`data.decode: gpu`) a JPEG the device decoder takes comes back as its JpegJob instead (bytes, crop boxes,
    flips; nothing decoded); any other file is decoded here. Raises BadImage."""
    name = index.path(image)
    try:
        data = index.read(image)
    except OSError as exc:
        raise BadImage(name, f"cannot read the file ({exc.strerror or exc})") from None
    try:
        job = plan_jpeg(data, name, views, seed, position) if jpeg_jobs else None
        return job if job is not None else decode_views(data, name, views, seed, position, channels)
    except BadImage as exc:
        raise BadImage(name, exc.reason) from None


def views_with_substitute(index: FileIndex, pool: np.ndarray, slot: int, views: list[CropSpec], seed: int,
                          position: int, channels: int, bad: list, read: Callable = read_views) -> tuple[int, list]:
    """Views of pool[slot] (`read`: `read_views`, or its JpegJob variant for device decoding); when that file is
    bad, of a substitute pool[k] with k a pure function of (seed, position, try), up to SUBSTITUTE_TRIES, else
    mid-grey views. Appends (path, reason) of each bad file to `bad`. -> (index position of the image used, -1
    for grey; views, or a JpegJob)."""
    image = int(pool[slot])
    for attempt in range(SUBSTITUTE_TRIES + 1):
        try:
            return image, read(index, image, views, seed, position, channels)
        except BadImage as exc:
            bad.append((exc.name, exc.reason))
        image = int(pool[view_rng(seed, position, 1_000_000 + attempt).randrange(len(pool))])
    return -1, [np.full((channels, v.size, v.size), SUBSTITUTE_GREY, dtype=np.uint8) for v in views]


class _Plan:
    """Everything a worker needs to build micro-batch (step, micro, micro_count) for this rank."""

    def __init__(self, index: FileIndex, labeled: np.ndarray, unlabeled: Optional[np.ndarray], batch_size: int,
                 mu: int, seed: int, views: list[CropSpec], u_views: list[CropSpec], channels: int, rank: int,
                 world_size: int, photometric: Optional[list[Callable[[Tensor], Tensor]]] = None,
                 device_decode: bool = False) -> None:
        self.index, self.labeled, self.unlabeled = index, labeled, unlabeled
        self.photometric = photometric
        self.read = functools.partial(read_views, jpeg_jobs=True) if device_decode else read_views
        self.batch_size, self.mu, self.seed, self.channels = batch_size, mu, seed, channels
        self.views, self.u_views, self.rank, self.world_size = views, u_views, rank, world_size
        self.labeled_stream = IndexStream(len(labeled), seed, 0)
        self.unlabeled_stream = IndexStream(len(unlabeled), seed, 1) if unlabeled is not None and mu > 0 else None

    def _rank_slice(self, start: int, count: int) -> range:
        per_rank = count // self.world_size
        return range(start + self.rank * per_rank, start + (self.rank + 1) * per_rank)

    def _stream(self, stream: IndexStream, pool: np.ndarray, positions: range, views: list[CropSpec],
                crop_seed: int, bad: list) -> tuple[list[Tensor], Tensor, Tensor, list[JpegJob]]:
        """-> (views: list of uint8 (B, C, S_v, S_v), index positions int64 (B,), slots in the pool int64 (B,),
        the rows left to the device decoder: their views' rows are filled by `decode_jobs`)."""
        slots = stream.take(positions.start, len(positions)) if len(positions) else torch.empty(0, dtype=torch.long)
        out = [torch.empty((len(positions), self.channels, v.size, v.size), dtype=torch.uint8) for v in views]
        used = torch.empty(len(positions), dtype=torch.long)
        jobs: list[JpegJob] = []
        for row, (slot, position) in enumerate(zip(slots.tolist(), positions)):
            used[row], result = views_with_substitute(self.index, pool, slot, views, crop_seed, position,
                                                      self.channels, bad, self.read)
            if isinstance(result, JpegJob):
                result.row = row
                jobs.append(result)
                continue
            for v, array in enumerate(result):
                out[v].numpy()[row] = array
        return out, used, slots, jobs

    def _augment(self, views: list[Tensor], first_position: int) -> list[Tensor]:
        """Each view's photometric augmentation (uint8 (B, C, S_v, S_v) -> same), PHOTOMETRIC_CHUNK images at a
        time (1.7× less CPU than the whole batch at 224 px), under torch's RNG seeded by (seed, first stream position
        of this rank's micro-batch, view); the caller's RNG state is left untouched."""
        out = []
        for v, (augment, x) in enumerate(zip(self.photometric, views)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_rng(self.seed * 2, first_position, PHOTOMETRIC_VIEW + v).getrandbits(63))
                out.append(torch.cat([augment(chunk) for chunk in x.split(PHOTOMETRIC_CHUNK)]))
        return out

    def build(self, step: int, micro: int, micro_count: int) -> dict:
        size = self.batch_size // micro_count
        start = step * self.batch_size + micro * size
        bad: list[tuple[str, str]] = []
        positions = self._rank_slice(start, size)
        views, used, _, jobs = self._stream(self.labeled_stream, self.labeled, positions, self.views, self.seed * 2,
                                            bad)
        if self.photometric is not None:
            views = self._augment(views, positions.start)
        labels = torch.from_numpy(self.index.labels)
        item = {"views": views, "x_index": used, "y": labels[used.clamp_min(0)], "bad": bad, "jobs": jobs,
                "count": len(views[0]), "key": (step, micro, micro_count), "augmented": self.photometric is not None}
        if self.unlabeled_stream is not None:
            u_views, u_used, slots, u_jobs = self._stream(self.unlabeled_stream, self.unlabeled,
                                                  self._rank_slice(self.mu * start, self.mu * size), self.u_views,
                                                  self.seed * 2 + 1, bad)
            item.update(u_views=u_views, u_image_index=u_used, u_index=slots, u_y=labels[u_used.clamp_min(0)],
                        count=item["count"] + len(slots), u_jobs=u_jobs)
        return item


class _StepDataset(Dataset):
    def __init__(self, plan: _Plan) -> None:
        self.plan = plan

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        return self.plan.build(*key)

    def __len__(self) -> int:  # endless; the sampler decides
        return 2 ** 62


class _KeySampler(Sampler):
    """Endless (step, micro, micro_count) keys from `start` on; `start` is set before each new iterator."""

    def __init__(self) -> None:
        self.start = (0, 0, 1)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        step, micro, count = self.start
        while True:
            yield step, micro, count
            step, micro = (step, micro + 1) if micro + 1 < count else (step + 1, 0)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _private_generator() -> torch.Generator:
    """A DataLoader draws its workers' base seed when an iterator starts; from the global torch RNG that draw
    would shift the device augmentation's random stream by one number at every (re)start, so a resumed run (which
    starts its iterator at another step) would diverge. Workers here use no torch randomness: a fixed private
    generator keeps the global stream untouched."""
    return torch.Generator().manual_seed(0)


class BadImageLog:
    """The bad-file policy: 'skip' substitutes (one warning per file) until more than max_bad_fraction of the
    images read are bad; 'error' stops at the first bad file. `files` maps each bad file to its reason.

    The fraction is bad reads / reads once at least min(dataset size, 1000) images were read; also, more distinct
    bad files than max_bad_fraction × dataset size stop at once."""

    def __init__(self, policy: str, max_fraction: float, dataset_size: int) -> None:
        if policy not in ("skip", "error"):
            raise DataError(f"data.bad_images must be skip or error, got {policy!r}")
        if not 0 <= max_fraction <= 1:
            raise DataError(f"data.max_bad_fraction must be in [0, 1], got {max_fraction}")
        self.policy, self.max_fraction, self.dataset_size = policy, max_fraction, dataset_size
        self.files: dict[str, str] = {}
        self.reads = self.bad_reads = 0
        self.all_files: dict[str, str] = {}  # under DDP: every rank's bad files as of the last `merge`
        self._sent = 0  # how many of self.files the other ranks have been sent

    @property
    def count(self) -> int:
        """Distinct bad files met so far (the trainer logs it as data/bad_images)."""
        return len(self.files)

    def record(self, bad: list[tuple[str, str]], reads: int) -> None:
        self.reads += reads
        for name, reason in bad:
            self.bad_reads += 1
            if self.policy == "error":
                raise DataError(f"{name}: {reason} (data.bad_images=error stops at the first bad file; "
                                f"data.bad_images=skip substitutes another image)")
            if name not in self.files:
                self.files[name] = reason
                warnings.warn(f"skipping bad image {name}: {reason} (a deterministic substitute is used)")
        self._check()

    def _check(self) -> None:
        too_many_files = self.count > self.max_fraction * self.dataset_size
        enough = self.reads >= min(self.dataset_size, MIN_READS_FOR_FRACTION)
        if too_many_files or (enough and self.bad_reads > self.max_fraction * self.reads):
            listed = "; ".join(f"{n}: {r}" for n, r in list(self.files.items())[:5])
            raise DataError(f"{self.count} bad image files ({self.bad_reads} of {self.reads} reads) exceed "
                            f"data.max_bad_fraction={self.max_fraction} of {self.dataset_size} images; first: {listed}")

    def unsent(self) -> list[tuple[str, str]]:
        """The bad files met since the last call (what this rank has not yet told the others)."""
        new = list(self.files.items())[self._sent:]
        self._sent = len(self.files)
        return new

    def merge(self, per_rank: list[list[tuple[str, str]]]) -> None:
        """Add what every rank met since the last merge (`unsent()` of each rank) to `all_files`."""
        for files in per_rank:
            self.all_files.update(files)

    def _known(self) -> dict[str, str]:
        """Bad files met by any rank as of the last merge, and by this rank since (this rank's alone in a single
        process): path -> reason."""
        return {**self.all_files, **self.files}

    @property
    def total_count(self) -> int:
        """How many distinct bad files `_known` holds."""
        return len(self._known())

    def lines(self) -> list[str]:
        """'path<TAB>reason' per `_known` bad file, for bad_images.txt."""
        return [f"{name}\t{reason}" for name, reason in self._known().items()]


class StreamLoader:
    """Global batches of `batch_size` labeled (+ mu·batch_size unlabeled) images streamed from `index`; each rank
    gets its slice, exactly as `DeviceLoader` slices.

    labeled / unlabeled: positions in the index (int64 arrays). views: the labeled stream's CropSpecs (expanded in
    order: Batch.views[v] is uint8 (B, C, S_v, S_v), Batch.x = views[0]); u_views: the unlabeled stream's
    (Batch.u_views, Batch.u = u_views[0]), e.g. FixMatch [weak, strong] from one decode. Labels come from
    index.labels. workers=0 decodes in the calling process. photometric: one uint8 -> uint8 function per expanded
    labeled view (e.g. `ContrastiveView.photometric_uint8`) that the workers apply; Batch.views_augmented says so.
    decode_on_device: the workers hand JPEGs over undecoded and `batch()` decodes them on `device`
    (`device_decode`; `data.decode: gpu`).
    """

    def __init__(self, index: FileIndex, labeled, batch_size: int, seed: int, views: list[CropSpec],
                 channels: int = 3, unlabeled=None, mu: int = 0, u_views: Optional[list[CropSpec]] = None,
                 rank: int = 0, world_size: int = 1, workers: int = 2, prefetch: int = 2, device="cpu",
                 bad_images: str = "skip", max_bad_fraction: float = 0.01,
                 photometric: Optional[list[Callable[[Tensor], Tensor]]] = None,
                 decode_on_device: bool = False) -> None:
        if batch_size % world_size:
            raise DataError(f"batch_size {batch_size} is not divisible by the world size {world_size}")
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {channels}")
        labeled = np.asarray(labeled, dtype=np.int64)
        unlabeled = None if unlabeled is None else np.asarray(unlabeled, dtype=np.int64)
        u_specs = expand_views(u_views or views)
        views = expand_views(views)
        if photometric is not None and len(photometric) != len(views):
            raise DataError(f"photometric: {len(photometric)} functions for {len(views)} views")
        if photometric is not None and decode_on_device:
            raise DataError("decoding on the device leaves the workers undecoded files: they cannot run the "
                            "photometric augmentation (data.photometric: device with data.decode: gpu)")
        self.plan = _Plan(index, labeled, unlabeled, batch_size, mu, seed, views, u_specs, channels, rank,
                          world_size, photometric, decode_on_device)
        self.batch_size, self.mu, self.device = batch_size, mu, torch.device(device)
        self.labeled_stream, self.unlabeled_stream = self.plan.labeled_stream, self.plan.unlabeled_stream
        main = len(unlabeled) // (mu * batch_size) if self.unlabeled_stream else len(labeled) // batch_size
        self.steps_per_epoch = max(1, main)
        self.bad = BadImageLog(bad_images, max_bad_fraction, len(index))
        self.sampler = _KeySampler()
        self.workers, self.prefetch = workers, prefetch
        self.loader = self._make_loader()
        self._iterator = None
        self._next_key: Optional[tuple[int, int, int]] = None

    def _make_loader(self) -> DataLoader:
        extra = dict(persistent_workers=True, prefetch_factor=self.prefetch,
                     worker_init_fn=_worker_init) if self.workers else {}
        return DataLoader(_StepDataset(self.plan), batch_size=None, sampler=self.sampler, num_workers=self.workers,
                          pin_memory=self.device.type == "cuda", generator=_private_generator(), **extra)

    def _restart(self, key: tuple[int, int, int]) -> None:
        self.sampler.start = key
        self._iterator = iter(self.loader)

    def batch(self, step: int, micro: int = 0, micro_count: int = 1) -> Batch:
        """Micro-batch `micro` of `micro_count` of global step `step`, this rank's share, on the device."""
        key = (step, micro, micro_count)
        if key != self._next_key:
            self._restart(key)
        item = next(self._iterator)
        if tuple(item["key"]) != key:
            raise DataError(f"stream out of order: asked for {key}, the workers delivered {tuple(item['key'])}")
        self._next_key = (step, micro + 1, micro_count) if micro + 1 < micro_count else (step + 1, 0, micro_count)
        self.bad.record(item["bad"], item["count"])
        move = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        views = [move(v) for v in item["views"]]
        x_index = move(item["x_index"])
        self._decode_here(item["jobs"], views, self.plan.views, x_index)
        batch = Batch(views[0], move(item["y"]), x_index=x_index, views=views, views_augmented=item["augmented"])
        if "u_views" in item:
            batch.u_views = [move(v) for v in item["u_views"]]
            batch.u, batch.u_y = batch.u_views[0], move(item["u_y"])
            batch.u_index, batch.u_image_index = move(item["u_index"]), move(item["u_image_index"])
            self._decode_here(item["u_jobs"], batch.u_views, self.plan.u_views, batch.u_image_index)
        return batch

    def _decode_here(self, jobs: list[JpegJob], views: list[Tensor], specs: list[CropSpec], used: Tensor) -> None:
        """Decode the workers' JPEG jobs on the device into their rows of `views`; a file neither the device nor
        the CPU can decode is logged as bad and its row marked grey (`used` -1, as a worker marks it)."""
        if not jobs:
            return
        for row, name, reason in decode_jobs(jobs, views, specs, self.plan.channels, self.device):
            used[row] = -1
            self.bad.record([(name, reason)], 0)

    def close(self) -> None:
        """Stop the workers now (dropping the DataLoader that owns them); a later batch() starts new ones."""
        self._iterator = None
        self._next_key = None
        self.loader = self._make_loader()


# ------------------------------------------------------------------------------------------- evaluation
class _EvalChunks(Dataset):
    def __init__(self, index: FileIndex, positions: np.ndarray, size: int, channels: int, ratio: float,
                 chunk: int) -> None:
        self.index, self.positions, self.size, self.channels = index, positions, size, channels
        self.ratio, self.chunk = ratio, chunk

    def __len__(self) -> int:
        return (len(self.positions) + self.chunk - 1) // self.chunk

    def __getitem__(self, number: int) -> dict:
        rows, images, bad = [], [], []
        for position in self.positions[number * self.chunk:(number + 1) * self.chunk].tolist():
            try:
                images.append(decode_eval(self.index.read(position), self.index.path(position), self.size,
                                          self.channels, self.ratio))
                rows.append(position)
            except BadImage as exc:
                bad.append((self.index.path(position), exc.reason))
            except OSError as exc:
                bad.append((self.index.path(position), f"cannot read the file ({exc.strerror or exc})"))
        stacked = torch.from_numpy(np.stack(images)) if images else torch.empty(
            (0, self.channels, self.size, self.size), dtype=torch.uint8)
        return {"images": stacked, "positions": torch.tensor(rows, dtype=torch.long), "bad": bad}


def eval_batches(index: FileIndex, positions, size: int, channels: int = 3, resize_ratio: float = 0.875,
                 batch_size: int = 256, workers: int = 2, bad: Optional[BadImageLog] = None):
    """Evaluation images in order: shorter side -> size/resize_ratio, centre crop. Yields (uint8 (B, C, S, S),
    labels int64 (B,), positions int64 (B,)); bad files are left out and recorded in `bad` (a BadImageLog)."""
    positions = np.asarray(positions, dtype=np.int64)
    dataset = _EvalChunks(index, positions, size, channels, resize_ratio, batch_size)
    extra = dict(worker_init_fn=_worker_init, prefetch_factor=2) if workers else {}
    labels = torch.from_numpy(index.labels)
    for item in DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                           generator=_private_generator(), **extra):
        if bad is not None:
            bad.record(item["bad"], len(item["positions"]) + len(item["bad"]))
        yield item["images"], labels[item["positions"]], item["positions"]


def check_index(index: FileIndex, workers: int = 2, size: int = 32) -> tuple[int, list[tuple[str, str]]]:
    """Decode every image (reduced resolution, full entropy stream) -> (images read, [(path, reason)] of the
    unreadable ones)."""
    log = BadImageLog("skip", 1.0, max(1, len(index)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in eval_batches(index, np.arange(len(index)), size, 3, 1.0, 64, workers, log):
            pass
    return log.reads, list(log.files.items())
