"""Bit fingerprints of the ops the semi-supervised tables depend on, to tell why a table moved between machines.

Run it on each machine and compare:

    python benchmarks/numerics_fingerprint.py --out here.json
    python benchmarks/numerics_fingerprint.py --compare here.json     # on the other machine

Each entry is a digest of the exact bytes an op produces on fixed, seeded inputs: the small CNN of the tables
(width 16, 28 px) forward and gradient at the batch sizes the rows use (40 labeled; 160 labeled + weak; 280 labeled
+ weak + strong), RandAugment and the whole strong view on a seeded batch, and torch's trigonometric functions (the
rotation matrices). Two machines that print the same digests compute those ops to the same bits; an entry that
differs says where a run's numbers start to part. Not a timing benchmark.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssl_kit.common.versions import library_versions  # noqa: E402
from ssl_kit.config import StrongAugConfig  # noqa: E402
from ssl_kit.data.randaugment import rand_augment  # noqa: E402
from ssl_kit.data.views import Normalize, StrongView  # noqa: E402
from ssl_kit.models.registry import build_backbone  # noqa: E402
from ssl_kit.run_dir import cpu_numerics  # noqa: E402

BATCH_SIZES = (40, 160, 280)


def digest(*tensors: torch.Tensor) -> str:
    """The first 16 hex digits of the SHA-256 of the tensors' bytes (contiguous, in order)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def conv_fingerprints(size: int = 28, width: int = 16) -> dict[str, str]:
    """The small CNN's output (N, D) and parameter gradients of sum(output²), per batch size N."""
    out = {}
    for n in BATCH_SIZES:
        torch.manual_seed(0)
        model = build_backbone("small_cnn", 1, size, {"width": width})
        x = torch.randn(n, 1, size, size)
        y = model(x)
        y.square().sum().backward()
        out[f"small_cnn/forward/{n}"] = digest(y)
        out[f"small_cnn/grad/{n}"] = digest(*(p.grad for p in model.parameters()))
    return out


def augmentation_fingerprints(n: int = 120, size: int = 28) -> dict[str, str]:
    """RandAugment (2 ops, magnitude up to 1) and the whole strong view (RandAugment + cutout + crop/flip) on a
    seeded uint8 batch (n, 1, size, size)."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8)
    torch.manual_seed(1)
    randaugment = rand_augment(images.float() / 255, num_ops=2, magnitude_max=1.0)
    torch.manual_seed(2)
    strong = StrongView(Normalize((0.5,), (0.5,)), StrongAugConfig(), translate=0.125, hflip=True)(images)
    return {"rand_augment": digest(randaugment), "strong_view": digest(strong)}


def trig_fingerprints() -> dict[str, str]:
    """torch.cos / torch.sin on 37 angles in [-30°, 30°] (vector body and scalar tail of the kernels)."""
    angles = torch.linspace(-0.5236, 0.5236, 37)
    return {"cos": digest(torch.cos(angles)), "sin": digest(torch.sin(angles))}


def fingerprint() -> dict:
    """{"environment": {...}, "digests": {entry: hex}} for this process's settings."""
    return {"environment": {**cpu_numerics(), **library_versions()},
            "digests": {**conv_fingerprints(), **augmentation_fingerprints(), **trig_fingerprints()}}


def differences(mine: dict, theirs: dict) -> dict[str, list]:
    """{section/key: [theirs, mine]} for every environment entry or digest that differs."""
    found = {}
    for section in ("environment", "digests"):
        a, b = theirs.get(section, {}), mine.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                found[f"{section}/{key}"] = [a.get(key), b.get(key)]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the fingerprint here (JSON)")
    parser.add_argument("--compare", help="a fingerprint from another machine: print what differs, exit 1 if any")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                        help="torch intra-op threads (default: OMP_NUM_THREADS, else 1, as the tables ran)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    mine = fingerprint()
    if args.out:
        Path(args.out).write_text(json.dumps(mine, indent=2))
    if not args.compare:
        print(json.dumps(mine, indent=2))
        return 0
    found = differences(mine, json.loads(Path(args.compare).read_text()))
    for key, (theirs, ours) in found.items():
        print(f"{key}: {theirs} -> {ours}")
    print("identical" if not found else f"{len(found)} entries differ")
    return 1 if any(key.startswith("digests/") for key in found) else 0


if __name__ == "__main__":
    sys.exit(main())
