"""The GPU loop's knobs, tested where they can be on the CPU: train.precision auto, the CUDA backend flags,
optimizer.implementation (fused / foreach / for_loop, LARS's foreach path equal to its loop), backbone.grad_checkpointing
(same gradients, blocks recomputed in the backward pass, unsupported backbones refused by key), and train.compile
(same losses as eager, a compiler failure named by key or, with compile_fallback, training on uncompiled).
What needs a GPU runs under `pytest -m cuda` (tests/test_cuda.py) and in benchmarks/gpu_suite.py."""
import json

import pytest
import torch
from torch import nn

from ssl_kit.common.device import configure_cuda_backends, resolve_precision
from ssl_kit.config import OptimizerConfig, validate_recipe
from ssl_kit.engine.optim import LARS, build_optimizer, optimizer_implementation
from ssl_kit.errors import ConfigError, TrainingError
from ssl_kit.methods.param_groups import ParamGroup
from ssl_kit.models.checkpointing import enable_grad_checkpointing
from ssl_kit.models.registry import build_backbone
from ssl_kit.runner import run_recipe

CUDA = torch.device("cuda", 0)  # a device object only: nothing here runs on it
TINY_VIT = {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2}


# --------------------------------------------------------------------------------------------- precision, flags
def test_precision_auto_is_fp32_on_the_cpu_and_bf16_or_fp16_on_cuda(monkeypatch):
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", CUDA) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", CUDA) == "fp16"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16" and resolve_precision("fp32", CUDA) == "fp32"
    assert validate_recipe({"seed": 0, "stages": [{"name": "s", "method": "supervised"}]}).stages[0] \
        .train.precision == "auto"


def test_cuda_backend_flags_follow_the_stage_settings():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        configure_cuda_backends(tf32=True, cudnn_benchmark=False)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.backends.cudnn.benchmark
        configure_cuda_backends(tf32=False, cudnn_benchmark=True)
        assert not torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = before


# --------------------------------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("name,device,expected", [
    ("adamw", None, "for_loop"), ("lars", torch.device("cpu"), "for_loop"), ("sgd", CUDA, "fused"),
    ("adamw", CUDA, "fused"), ("lars", CUDA, "foreach"), ("rmsprop", CUDA, "foreach")])
def test_auto_implementation_is_fused_where_torch_has_it_on_cuda(name, device, expected):
    assert optimizer_implementation(name, "auto", device) == expected


@pytest.mark.parametrize("name,device", [("lars", CUDA), ("rmsprop", CUDA), ("sgd", torch.device("cpu"))])
def test_a_fused_optimizer_torch_does_not_have_is_refused_by_key(name, device):
    with pytest.raises(ConfigError, match=rf"optimizer.implementation=fused: torch has a fused {name} only"):
        optimizer_implementation(name, "fused", device)


def test_build_optimizer_passes_the_implementation_to_torch():
    params = [nn.Parameter(torch.randn(3, 3))]
    fused = build_optimizer([ParamGroup("all", params)], OptimizerConfig(name="adamw", implementation="fused"), 256)
    assert fused.defaults["fused"] is True
    loop = build_optimizer([ParamGroup("all", params)], OptimizerConfig(name="sgd"), 256, torch.device("cpu"))
    assert loop.defaults["foreach"] is False
    lars = build_optimizer([ParamGroup("all", params)], OptimizerConfig(name="lars", implementation="foreach"), 256)
    assert isinstance(lars, LARS) and lars.foreach


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_foreach_lars_equals_its_loop(nesterov, weight_decay):
    """Several steps over a LARS group and a plain (1-D) group, with a parameter whose gradient is missing in one
    step and one that starts at zero (trust ratio 1): identical parameters and momentum buffers."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen), torch.zeros(3, 3)]
    runs = []
    for foreach in (False, True):
        params = [nn.Parameter(p.clone()) for p in start]
        groups = [{"params": [params[0], params[2]]}, {"params": [params[1]], "lars": False}]
        optimizer = LARS(groups, lr=0.1, weight_decay=weight_decay, nesterov=nesterov, foreach=foreach)
        gen = torch.Generator().manual_seed(1)
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if step == 1:
                params[2].grad = None
            optimizer.step()
        runs.append((params, optimizer))
    (loop, loop_opt), (multi, multi_opt) = runs
    for a, b in zip(loop, multi):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(loop_opt.state[a]["momentum_buffer"], multi_opt.state[b]["momentum_buffer"])
    assert not torch.equal(loop[0], start[0])


# ------------------------------------------------------------------------------------------ grad checkpointing
def grads_of(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    backbone.zero_grad()
    backbone(x).square().sum().backward()
    return [p.grad.clone() for p in backbone.parameters()]


def count_block_calls(backbone: nn.Module) -> list[int]:
    calls = [0]
    for block in backbone.blocks:
        # a pre-hook: the recomputation stops as soon as it has what the backward needs, before a forward hook
        block.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name,kwargs", [
    ("vit_tiny", TINY_VIT),
    ("timm:vit_tiny_patch16_224", {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2})])
def test_grad_checkpointing_gives_the_same_gradients_and_recomputes_the_blocks(name, kwargs):
    backbone = build_backbone(name, 3, 16, kwargs)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    calls = count_block_calls(backbone)
    plain = grads_of(backbone, x)
    assert calls[0] == 2
    enable_grad_checkpointing(backbone, "here")
    checkpointed = grads_of(backbone, x)
    assert calls[0] == 2 + 4  # forward, then each block again in the backward pass
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        backbone(x)
    assert calls[0] == 6 + 2  # no-grad forwards (teachers, evaluation) are not checkpointed


def test_grad_checkpointing_on_a_backbone_without_it_is_refused_by_key(tmp_path):
    recipe = {"seed": 0, "stages": [{"name": "pre", "method": "supervised", "backbone": {
        "name": "small_cnn", "kwargs": {"width": 8}, "grad_checkpointing": True},
        "data": {"dataset": "digits", "image_size": 16}, "train": {"steps": 1, "progress": False}}]}
    with pytest.raises(ConfigError, match=r"stages\[pre\]\.backbone\.grad_checkpointing: SmallCNN does not support"):
        run_recipe(validate_recipe(recipe), tmp_path / "run")


# ---------------------------------------------------------------------------------------------------- compile
def compiled_run(tmp_path, name: str, method: str = "simclr", **train) -> list[float]:
    """3 steps of `method` on digits with these train keys. -> the step losses."""
    train = {"steps": 3, "batch_size": 16, "progress": False, "eval_every_epochs": 0, "log_every": 1, **train}
    recipe = {"seed": 0, "stages": [{"name": "train", "method": method, "train": train,
                                     "data": {"dataset": "digits", "image_size": 16, "workers": 0},
                                     "backbone": {"name": "small_cnn", "kwargs": {"width": 8}}}]}
    run_dir, _ = run_recipe(validate_recipe(recipe), tmp_path / name)
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [row["loss"] for row in rows if row.get("kind") == "step"]


@pytest.fixture(scope="module")
def failing_backend():
    """A torch.compile backend that always fails, as a missing compiler toolchain would."""
    from torch._dynamo import register_backend

    def ssl_kit_test_failing(graph, example_inputs):
        raise RuntimeError("no C++ compiler in this test")

    register_backend(ssl_kit_test_failing, "ssl_kit_test_failing")
    return "ssl_kit_test_failing"


def test_compiled_training_matches_eager(tmp_path):
    """aot_eager traces and runs forward and backward through dynamo and AOTAutograd (inductor's front end)
    without generating code: the losses of the backbone- and step-compiled runs equal eager ones."""
    eager = compiled_run(tmp_path, "eager")
    assert compiled_run(tmp_path, "backbone", compile="backbone", compile_backend="aot_eager") == \
        pytest.approx(eager, rel=1e-5)
    assert compiled_run(tmp_path, "step", method="supervised", compile="step", compile_backend="aot_eager") == \
        pytest.approx(compiled_run(tmp_path, "supervised", method="supervised"), rel=1e-5)


def test_a_compiler_failure_is_named_or_falls_back_when_allowed(tmp_path, failing_backend, capsys):
    with pytest.raises(TrainingError, match=r"stages\[train\]\.train\.compile='backbone': torch.compile .*"
                                            r"ssl_kit_test_failing.*compile_fallback=true"):
        compiled_run(tmp_path, "stop", compile="backbone", compile_backend=failing_backend)
    fallback = compiled_run(tmp_path, "fallback", compile="backbone", compile_backend=failing_backend,
                            compile_fallback=True)
    assert "training continues uncompiled" in capsys.readouterr().err
    assert fallback == pytest.approx(compiled_run(tmp_path, "eager"), rel=1e-6)


# -------------------------------------------------------------------------------------------------- GPU suite
def test_gpu_suite_smoke_runs_every_path(tmp_path):
    """benchmarks/gpu_suite.py --smoke: the JPEG folder, timm's floor eager and compiled, every method row (memory
    and streamed feeds, channels-last, compile, grad checkpointing) on the CPU at toy sizes, without an error."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import gpu_suite

    results = gpu_suite.main(["--smoke", "--skip-tests", "--out", str(tmp_path / "suite.json"),
                              "--workdir", str(tmp_path)])
    assert json.loads((tmp_path / "suite.json").read_text())["smoke"] is True
    assert len(list((tmp_path / "jpegs").rglob("*.jpg"))) == gpu_suite.SMOKE.images
    assert [row["model"] for row in results["floor"]] == ["timm:test_resnet", "timm:test_vit"]
    assert all(row["compiled img/s"] > 0 for row in results["floor"])
    errors = [row for row in results["methods"] if "error" in row]
    assert not errors, errors
    variants = {(row["method"], row["feed"], row["variant"]) for row in results["methods"]}
    assert {("simclr", "stream", ""), ("dino", "memory", "compile=backbone"),
            ("dino", "memory", "vit_large+grad_checkpointing"), ("mae", "memory", ""),
            ("fixmatch", "memory", "")} <= variants
    assert all(row["img/s"] > 0 and row["step / floor"] > 0 for row in results["methods"])
