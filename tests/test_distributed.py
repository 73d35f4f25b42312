"""Two CPU processes with gloo (the torchrun code path) against one process on the same global batch."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ssl_kit.config import validate_recipe
from ssl_kit.engine.checkpoint import safe_load
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_env(rank, world, port):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})


def spawn_ranks(worker, world: int, out_dir) -> list[dict]:
    """Run worker(rank, world, port, out_dir) in `world` gloo processes; each saves its results to
    out_dir/rank{r}.pt. -> those results, by rank."""
    mp.spawn(worker, args=(world, free_port(), out_dir), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


def deterministic_stage():
    return tiny_stage(train={"steps": 6, "batch_size": 32, "checkpoint_every_steps": 100},
                      backbone={"name": "small_cnn", "kwargs": {"width": 4, "norm": "none"}},
                      data={"dataset": "digits", "image_size": 16, "translate": 0.0})


def _train_worker(rank, world, port, run_dir):
    _set_env(rank, world, port)
    torch.set_num_threads(1)
    recipe = validate_recipe({"seed": 0, "name": "ddp", "stages": [deterministic_stage()]})
    try:
        run_recipe(recipe, run_dir)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_training_matches_single_process(tmp_path):
    recipe = validate_recipe({"seed": 0, "name": "single", "stages": [deterministic_stage()]})
    single_dir, _ = run_recipe(recipe, tmp_path / "single")
    mp.spawn(_train_worker, args=(2, free_port(), tmp_path / "ddp"), nprocs=2, join=True)
    single = safe_load(single_dir / "checkpoints" / "last.pt")
    ddp = safe_load(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert ddp["world_size"] == 2
    for key, value in single["method"].items():
        assert torch.allclose(value, ddp["method"][key], atol=1e-5), key


def _gather_loss_worker(rank, world, port, out_dir):
    _set_env(rank, world, port)
    import torch.distributed as dist

    from ssl_kit.losses import InfoNCELoss, NTXentLoss

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 5), torch.randn(8, 5)  # the global batch; each rank takes its half
    local1 = z1[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    local2 = z2[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    loss = NTXentLoss(0.3)(local1, local2)
    loss.backward()
    q = z1[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    moco = InfoNCELoss(0.2)(q, z2[rank * 4:(rank + 1) * 4])
    moco.backward()
    torch.save({"loss": loss.detach(), "g1": local1.grad, "g2": local2.grad, "moco": moco.detach(), "gq": q.grad},
               out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_contrastive_losses_equal_single_process(tmp_path):
    from ssl_kit.losses import info_nce_loss, nt_xent_loss

    mp.spawn(_gather_loss_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    torch.manual_seed(0)
    z1 = torch.randn(8, 5, requires_grad=True)
    z2 = torch.randn(8, 5, requires_grad=True)
    loss = nt_xent_loss(z1, z2, 0.3)
    loss.backward()
    # the engine averages gradients over ranks: mean of per-rank losses and of per-rank gradient contributions
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-5)
    assert torch.allclose(torch.cat([r["g1"] for r in ranks]) / 2, z1.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r["g2"] for r in ranks]) / 2, z2.grad, atol=1e-6)
    q = z1.detach().clone().requires_grad_(True)
    moco = info_nce_loss(q, z2.detach(), None, 0.2)
    moco.backward()
    assert torch.stack([r["moco"] for r in ranks]).mean().item() == pytest.approx(moco.item(), rel=1e-5)
    assert torch.allclose(torch.cat([r["gq"] for r in ranks]) / 2, q.grad, atol=1e-6)
