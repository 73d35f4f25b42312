"""The installed versions of the libraries a run's numbers depend on, in one place: env.json records them
(run_dir.py) and the on-disk feature cache stamps them into its key (eval/features.py), so features computed by
other releases are never served.

Why each is recorded: torch and torchvision compute, kornia runs the batched RandAugment and CTAugment ops, timm
builds the timm backbones, Pillow decodes and resizes files, OpenCV runs the streamed workers' photometric kernels,
NumPy and safetensors read and write arrays; a release of any of them can change an op's numerics or semantics.
"""
from __future__ import annotations

import functools
import importlib.metadata
from typing import Optional

RECORDED_PACKAGES = ("torch", "torchvision", "kornia", "timm", "safetensors", "numpy", "pillow")
OPENCV_DISTRIBUTIONS = ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
                        "opencv-contrib-python")  # any of them provides cv2


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of `distribution` (a PyPI name), None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, Optional[str]]:
    """{package: version or None} for RECORDED_PACKAGES, plus "opencv": the first installed OpenCV distribution's
    version. Read once per process (installing a release under a running process does not change what it runs)."""
    versions = {package: installed_version(package) for package in RECORDED_PACKAGES}
    versions["opencv"] = next(filter(None, map(installed_version, OPENCV_DISTRIBUTIONS)), None)
    return versions
