"""Foreign checkpoints and `FILE@ARCH` references are checked against the architecture bounds before anything is
built: tiny crafted safetensors files that ask for tens of gigabytes are refused under an address-space cap a
real build would break; crafted shape metadata and timm kwargs that would read files are clear errors."""
from __future__ import annotations

import contextlib
import importlib
import resource

import pytest
import torch
from safetensors.torch import save_file

from ssl_kit.engine.checkpoint import resolve_checkpoint
from ssl_kit.errors import CheckpointError, ConfigError, SslKitError
from ssl_kit.models.export import write_export

HEADROOM = 1 << 30  # 1 GiB of address space beyond what the process maps already: far below any crafted request


def vm_size() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


@contextlib.contextmanager
def address_space_cap(headroom: int = HEADROOM):
    """RLIMIT_AS lowered to the current mapping + headroom while the block runs (restored after): a build of the
    crafted size fails with an allocation error instead of taking the machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + headroom, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def crafted(tmp_path, name, tensors):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    assert path.stat().st_size < 1 << 20  # tiny files
    return path


VIT = "timm:vit_tiny_patch16_224"


def vit_tensors(pos_tokens, patch_shape=(192, 3, 16, 16), pos_dim=0):
    return {"patch_embed.proj.weight": torch.zeros(patch_shape), "cls_token": torch.zeros(1, 1, 192),
            "pos_embed": torch.zeros(1, pos_tokens, pos_dim)}


@pytest.fixture(scope="module", autouse=True)
def timm_imported():
    importlib.import_module("timm")  # imported outside the cap: its modules map address space


HOSTILE = [  # (id, tensors, arch, error class, message part)
    ("pos_embed-zero-dim-asks-77GB", vit_tensors(1 + 4000 ** 2), VIT, CheckpointError,
     "'pos_embed' has shape (1, 16000001, 0)"),
    ("img_size-asks-12GB", vit_tensors(197, pos_dim=192), f"{VIT},img_size=64000", CheckpointError,
     "parameters; the limit is"),
    ("img_size-beyond-MAX_ARCH_INT", vit_tensors(197, pos_dim=192), f"{VIT},img_size=100000", CheckpointError,
     "kwargs.img_size = 100000 is beyond any real architecture"),
    ("width-60000", {"conv.weight": torch.zeros(1, 1, 1, 1)}, "small_cnn,width=60000", CheckpointError,
     "parameters; the limit is"),
    ("zero-size-patch-weight", vit_tensors(197, (192, 3, 0, 0), 192), VIT, CheckpointError,
     "'patch_embed.proj.weight' has shape (192, 3, 0, 0)"),
    ("1-D-pos_embed", {**vit_tensors(197), "pos_embed": torch.zeros(197)}, VIT, CheckpointError,
     "'pos_embed' has shape (197,)"),
    ("empty-pos_embed", vit_tensors(0), VIT, CheckpointError, "'pos_embed' has shape (1, 0, 0)"),
    ("zero-channel-conv", {"conv1.weight": torch.zeros(8, 0, 3, 3)}, "resnet18", CheckpointError,
     "'conv1.weight' has shape (8, 0, 3, 3)"),
    ("timm-checkpoint_path", vit_tensors(197, pos_dim=192), f"{VIT},checkpoint_path=/etc/passwd", ConfigError,
     "kwarg 'checkpoint_path' is refused"),
    ("timm-cache_dir", vit_tensors(197, pos_dim=192), f"{VIT},cache_dir=/tmp",
     ConfigError, "kwarg 'cache_dir' is refused"),
    ("timm-bad-value", vit_tensors(197, pos_dim=192), f"{VIT},num_heads=0", SslKitError, "bad kwargs"),
]


@pytest.mark.parametrize("tensors,arch,kind,part", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_crafted_foreign_checkpoints_are_refused_before_any_build(tmp_path, tensors, arch, kind, part):
    path = crafted(tmp_path, "crafted", tensors)
    with address_space_cap(), pytest.raises(kind) as caught:
        resolve_checkpoint(f"{path}@{arch}")
    assert part in str(caught.value) and not isinstance(caught.value, MemoryError)


def test_a_crafted_record_is_bounded_before_export(tmp_path):
    record = {"arch": "small_cnn", "kwargs": {"width": 60000}, "state_dict": {},
              "data": {"channels": 3, "image_size": 32, "mean": [0.5] * 3, "std": [0.2] * 3}}
    with address_space_cap(), pytest.raises(CheckpointError, match="parameters; the limit is"):
        write_export(record, "safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_drop_path_rate_and_plain_kwargs_still_pass(tmp_path):
    from ssl_kit.models.timm_backbone import check_timm_kwargs

    check_timm_kwargs("vit_tiny_patch16_224", {"drop_path_rate": 0.1, "depth": 2, "global_pool": "avg"})
    with pytest.raises(ConfigError, match="kwarg 'cache_dir' is refused"):
        check_timm_kwargs("vit_tiny_patch16_224", {"cache_dir": "/tmp"})
