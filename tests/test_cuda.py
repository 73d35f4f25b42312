"""What needs a GPU, run by `pytest -m cuda` (and by benchmarks/gpu_suite.py): the bf16/fp16 steps, the fused
optimizer, torch.compile with inductor, activation checkpointing, SyncBatchNorm, and resume on CUDA reproducing an
uninterrupted run. Skipped where there is no CUDA device; the CPU-testable parts are in tests/test_gpu_loop.py."""
import json

import pytest
import torch

from ssl_kit.config import validate_recipe
from ssl_kit.models.checkpointing import enable_grad_checkpointing
from ssl_kit.models.registry import build_backbone
from ssl_kit.runner import run_recipe

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pytest -m cuda)")]


def recipe(method: str = "simclr", backbone: dict | None = None, **train) -> dict:
    train = {"steps": 6, "batch_size": 32, "progress": False, "eval_every_epochs": 0, "log_every": 1,
             "device": "cuda", **train}
    return {"seed": 0, "stages": [{"name": "train", "method": method, "train": train,
                                   "data": {"dataset": "digits", "image_size": 32, "workers": 0},
                                   "backbone": backbone or {"name": "resnet18", "kwargs": {"small_stem": True}}}]}


def losses(tmp_path, name: str, raw: dict, **kwargs) -> list[float]:
    run_dir, _ = run_recipe(validate_recipe(raw), tmp_path / name, **kwargs)
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [row["loss"] for row in rows if row.get("kind") == "step"]


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16"])
def test_mixed_precision_steps_train(tmp_path, precision):
    values = losses(tmp_path, precision, recipe(precision=precision))
    assert len(values) == 6 and all(v == v and abs(v) < 1e4 for v in values)


def test_auto_precision_is_bf16_and_the_optimizer_fused_on_this_gpu(tmp_path):
    from ssl_kit.common.device import resolve_precision
    from ssl_kit.engine.optim import optimizer_implementation

    assert resolve_precision("auto", torch.device("cuda")) == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert optimizer_implementation("adamw", "auto", torch.device("cuda")) == "fused"


def test_compiled_backbone_with_inductor_tracks_eager(tmp_path):
    eager = losses(tmp_path, "eager", recipe(precision="fp32", tf32=False))
    compiled = losses(tmp_path, "compiled", recipe(precision="fp32", tf32=False, compile="backbone"))
    assert compiled == pytest.approx(eager, rel=1e-3)


def test_grad_checkpointing_gives_the_same_gradients_on_cuda():
    backbone = build_backbone("vit_small", 3, 32, {"patch_size": 4, "depth": 4}).cuda()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    backbone(x).square().sum().backward()
    plain = [p.grad.clone() for p in backbone.parameters()]
    backbone.zero_grad()
    enable_grad_checkpointing(backbone, "here")
    backbone(x).square().sum().backward()
    for a, b in zip(plain, (p.grad for p in backbone.parameters())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sync_batchnorm_runs_under_a_one_rank_nccl_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_backbone("resnet18", 3, 32, {})).cuda()
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[0])
        model(torch.randn(8, 3, 32, 32, device="cuda")).sum().backward()
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules())
    finally:
        dist.destroy_process_group()


class Crash(Exception):
    pass


def test_resume_on_cuda_reproduces_the_uninterrupted_run(tmp_path):
    """With cuDNN's algorithm search off (train.cudnn_benchmark=false) a resumed run's losses equal the
    uninterrupted one's: RNG states (CPU and CUDA), optimizer and schedule come back from the checkpoint."""
    raw = recipe(steps=8, checkpoint_every_steps=4, cudnn_benchmark=False, precision="fp32")

    def crash_at_6(step):
        if step == 6:
            raise Crash()

    torch.backends.cudnn.deterministic = True
    try:
        reference = losses(tmp_path, "a", raw)
        with pytest.raises(Crash):
            losses(tmp_path, "b", raw, step_callback=crash_at_6)
        assert losses(tmp_path, "b", raw, resume=True) == reference
    finally:
        torch.backends.cudnn.deterministic = False


def test_gpu_decode_matches_the_workers_cpu_decode_and_trains(tmp_path):
    """`data.decode: gpu`: nvJPEG views within a few grey levels of the CPU path's, and a streamed SimCLR stage on
    them trains."""
    import numpy as np
    from PIL import Image

    from ssl_kit.data.crops import CropSpec
    from ssl_kit.data.sources import build_index
    from ssl_kit.data.stream import StreamLoader

    root = tmp_path / "jpegs" / "a"
    root.mkdir(parents=True)
    for i in range(32):
        y, x = np.mgrid[0:120 + i, 160:160 + 3 * i + 1].astype(np.float64)
        rgb = np.stack([128 + 100 * np.sin(x / 17 + k + i) * np.cos(y / 11 - k) for k in range(3)], -1)
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(root / f"{i}.jpg", quality=95)
    index = build_index("images", str(root))
    views = [CropSpec(32, scale=(0.3, 1.0), count=2, flip=True)]
    cpu = StreamLoader(index, np.arange(32), 16, 0, views, workers=0, device="cuda")
    gpu = StreamLoader(index, np.arange(32), 16, 0, views, workers=0, device="cuda", decode_on_device=True)
    a, b = cpu.batch(0), gpu.batch(0)
    assert b.x.is_cuda and torch.equal(a.x_index, b.x_index)
    assert all((u.float() - v.float()).abs().mean() < 4.0 for u, v in zip(a.views, b.views))
    raw = recipe("simclr", {"name": "small_cnn"}, batch_size=16)
    raw["stages"][0]["data"] = {"dataset": f"imagefolder:{tmp_path / 'jpegs'}", "storage": "stream", "workers": 2,
                                "image_size": 32, "decode": "gpu"}
    values = losses(tmp_path, "gpu_decode", raw)
    assert len(values) == 6 and all(v == v for v in values)


def test_the_attentive_probe_trains_on_the_gpu_as_on_the_cpu():
    """The probe's minibatches go to the device from float16 tokens on the CPU; the stacked grid and GridAdamW run
    there and follow the CPU run."""
    from ssl_kit.eval.attentive_probe import attentive_probe, fit_attentive_grid

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(64, 16 * 8, generator=generator).half()  # 64 images of 16 tokens of width 8
    labels = torch.randint(0, 4, (64,), generator=generator)
    configs = [(1e-2, 5e-4), (1e-1, 0.0)]
    cpu = fit_attentive_grid(tokens, labels, 8, 4, configs, epochs=3)
    gpu = fit_attentive_grid(tokens, labels, 8, 4, configs, epochs=3, device="cuda")
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-3, atol=1e-4)
    result = attentive_probe(tokens, labels, tokens, labels, 4, 8, epochs=3, device="cuda")
    assert 0 <= result["top1"] <= 1 and result["train_size"] == 64
