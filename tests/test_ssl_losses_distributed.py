"""The gathering Module wrappers of the self-supervised losses under two gloo processes, each holding half of the
global batch, against the pure functions on the whole batch in one process. The engine averages gradients over
ranks, so: mean of the per-rank losses == the global loss, and each rank's input gradients / 2 == the global
gradients of its rows."""
import pytest
import torch

from ssl_kit.losses import (BarlowTwinsLoss, NNCLRLoss, SupConLoss, SupportSet, SwAVLoss, VICRegLoss,
                            barlow_twins_loss, nnclr_loss, supcon_loss, swav_loss, vicreg_loss)
from tests.test_distributed import _set_env, spawn_ranks

pytestmark = pytest.mark.slow  # spawns 2 processes (about 10 s of CPU, once for the module)

WORLD, N = 2, 4  # each rank holds N samples; the global batch has WORLD·N
QUEUE = 3  # rows of each rank's own SwAV queue


def global_inputs():
    """The global batch of every case, identical in every process."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g)

    return {
        "barlow": [randn(8, 5), randn(8, 5)],
        "vicreg": [randn(8, 5, scale=0.5), randn(8, 5)],
        "swav_high": [torch.tanh(randn(8, 4)) for _ in range(2)],
        "swav_low": [torch.tanh(randn(8, 4)) for _ in range(2)],
        "swav_queue": [torch.tanh(randn(WORLD * QUEUE, 4)) for _ in range(2)],  # rank r owns rows r·QUEUE..
        "supcon": [randn(8, 2, 4)],
        "supcon_labels": torch.tensor([0, 1, -1, 2, 1, 0, -1, 2]),
        "supcon1": [randn(8, 1, 4)],
        "supcon1_labels": torch.tensor([0, 1, 2, 3, 0, 1, 5, 6]),  # rank 0's positives all live on rank 1
        "nnclr_prev": randn(8, 4),
        "nnclr": [randn(8, 4) for _ in range(4)],  # z1, z2, p1, p2
    }


def rows(x, rank, per_rank=N):
    return x[rank * per_rank:(rank + 1) * per_rank]


def leaves(tensors, rank=None, per_rank=N):
    return [(t if rank is None else rows(t, rank, per_rank)).clone().requires_grad_(True) for t in tensors]


def _worker(rank, world, port, out_dir):
    _set_env(rank, world, port)
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        data, results = global_inputs(), {}

        def record(name, loss, tensors):
            results[name] = {"loss": loss.detach(), "grads": torch.autograd.grad(loss, tensors)}

        z = leaves(data["barlow"], rank)
        record("barlow", BarlowTwinsLoss(0.02)(*z), z)
        z = leaves(data["vicreg"], rank)
        record("vicreg", VICRegLoss()(*z), z)
        high, low = leaves(data["swav_high"], rank), leaves(data["swav_low"], rank)
        queue = [rows(q, rank, QUEUE) for q in data["swav_queue"]]
        record("swav", SwAVLoss(0.1, 3, 0.05)(high, low, queue), high + low)
        f = leaves(data["supcon"], rank)
        record("supcon", SupConLoss(0.2)(f[0], rows(data["supcon_labels"], rank)), f)
        f = leaves(data["supcon1"], rank)
        record("supcon1", SupConLoss(0.2)(f[0], rows(data["supcon1_labels"], rank)), f)
        support = SupportSet(6, 4, seed=3)
        support.update(rows(data["nnclr_prev"], rank))  # gathered: 8 rows into 6 slots (wraps)
        z = leaves(data["nnclr"], rank)
        record("nnclr", NNCLRLoss(0.2)(z[0], z[1], support, z[2], z[3]), z[2:])  # only the keys get gradients
        results["support"] = support.state_dict()
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("ssl_losses_ddp"))


def single_process(name):
    """The pure function on the global batch: (loss, gradients of the inputs the worker differentiates)."""
    data = global_inputs()
    if name == "barlow":
        z = leaves(data["barlow"])
        loss = barlow_twins_loss(*z, 0.02)
    elif name == "vicreg":
        z = leaves(data["vicreg"])
        loss = vicreg_loss(*z)
    elif name == "swav":
        high, low = leaves(data["swav_high"]), leaves(data["swav_low"])
        z = high + low
        loss = swav_loss(high, low, data["swav_queue"], 0.1, 3, 0.05)
    elif name in ("supcon", "supcon1"):
        z = leaves(data[name])
        loss = supcon_loss(z[0], data[f"{name}_labels"], 0.2)
    else:
        support = SupportSet(6, 4, seed=3)
        support.update(data["nnclr_prev"])
        z1, z2, *z = leaves(data["nnclr"])
        loss = nnclr_loss(z1, z2, support, 0.2, *z)
    return loss.detach(), torch.autograd.grad(loss, z)


@pytest.mark.parametrize("name", ["barlow", "vicreg", "swav", "supcon", "supcon1", "nnclr"])
def test_gathered_loss_and_gradients_equal_single_process(ranks, name):
    loss, grads = single_process(name)
    per_rank = [r[name] for r in ranks]
    assert torch.stack([r["loss"] for r in per_rank]).mean().item() == pytest.approx(loss.item(), rel=1e-5)
    for i, expected in enumerate(grads):
        gathered = torch.cat([r["grads"][i] for r in per_rank]) / WORLD
        assert torch.allclose(gathered, expected, atol=1e-6, rtol=1e-4), (name, i, (gathered - expected).abs().max())


def test_statistics_losses_are_the_global_loss_on_every_rank(ranks):
    # Barlow Twins sums statistics over ranks, so each rank returns the whole global batch's loss
    loss, _ = single_process("barlow")
    assert all(r["barlow"]["loss"].item() == pytest.approx(loss.item(), rel=1e-5) for r in ranks)


def test_support_set_update_gathers_every_rank(ranks):
    single = SupportSet(6, 4, seed=3)
    single.update(global_inputs()["nnclr_prev"])
    for r in ranks:
        assert torch.allclose(r["support"]["embeddings"], single.embeddings, atol=1e-7)
        assert int(r["support"]["pointer"]) == int(single.pointer) == 2
