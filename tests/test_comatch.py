"""CoMatch (Li, Xiong & Hoi 2021; USB `comatch`): memory smoothing, the pseudo-label graph and the graph-contrastive
loss equal the paper's formulas computed naively here (values and gradients); the memory bank is a ring buffer of
weak embeddings and probabilities (unlabeled: aligned predictions, labeled: one-hot labels); bad arguments are
named; a step's total loss is the sum of its terms; the method trains on its defaults with finite loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_semi_method, semi_batch, tiny_stage
from oracle import TOL, assert_same, randn, value_and_grads
from ssl_kit.config import validate_recipe
from ssl_kit.losses import comatch_contrastive_loss, comatch_memory_smoothing, comatch_pseudo_label_graph
from ssl_kit.methods.base import Progress

N, M, D, K = 6, 9, 4, 3
SEMI = dict(data={"dataset": "digits", "image_size": 16, "labels_per_class": 4},
            train={"steps": 3, "batch_size": 8, "ema_decay": 0.9, "log_every": 1})


def _unit(*shape, seed):
    return F.normalize(randn(*shape, seed=seed), dim=1)


def _probs(*shape, seed, scale=3.0):
    return torch.softmax(randn(*shape, seed=seed) * scale, dim=1)


# ------------------------------------------------------------------------------------------------ naive formulas
def _naive_smoothing(p, z, bank_z, bank_p, t, alpha):
    out = torch.zeros_like(p)
    for i in range(p.shape[0]):
        a = [math.exp(float(z[i] @ bank_z[j]) / t) for j in range(bank_z.shape[0])]
        total = sum(a)
        for k in range(p.shape[1]):
            neighbours = sum(a[j] / total * float(bank_p[j, k]) for j in range(bank_z.shape[0]))
            out[i, k] = alpha * float(p[i, k]) + (1 - alpha) * neighbours
    return out


def _naive_graph(p, cutoff):
    n = p.shape[0]
    w = [[1.0 if i == j else float(p[i] @ p[j]) for j in range(n)] for i in range(n)]
    w = [[v if v >= cutoff else 0.0 for v in row] for row in w]
    return torch.tensor([[v / sum(row) for v in row] for row in w])


def _naive_contrastive(a, b, graph, t):
    total = 0.0
    for i in range(a.shape[0]):
        sims = [torch.exp(a[i] @ b[j] / t) for j in range(b.shape[0])]
        norm = sum(sims)
        total = total - sum(graph[i, j] * torch.log(sims[j] / norm) for j in range(b.shape[0]))
    return total / a.shape[0]


# ------------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("alpha", [0.9, 0.0, 1.0])
def test_memory_smoothing_is_alpha_mix_with_similarity_weighted_bank_probabilities(alpha):
    p, z, bank_z, bank_p = _probs(N, K, seed=1), _unit(N, D, seed=2), _unit(M, D, seed=3), _probs(M, K, seed=4)
    got = comatch_memory_smoothing(p, z, bank_z, bank_p, 0.5, alpha)
    torch.testing.assert_close(got, _naive_smoothing(p, z, bank_z, bank_p, 0.5, alpha), **TOL)
    torch.testing.assert_close(got.sum(1), torch.ones(N), **TOL)
    assert not got.requires_grad


def test_pseudo_label_graph_has_self_loops_cutoff_and_unit_rows():
    p = _probs(N, K, seed=5, scale=6.0)
    for cutoff in (0.0, 0.5, 0.8, 1.0):
        got = comatch_pseudo_label_graph(p, cutoff)
        torch.testing.assert_close(got, _naive_graph(p, cutoff), **TOL)
        torch.testing.assert_close(got.sum(1), torch.ones(N), **TOL)
    assert torch.equal(comatch_pseudo_label_graph(p, 1.0), torch.eye(N))  # only the self-loops survive
    one_hot = F.one_hot(torch.tensor([0, 0, 1, 2, 2, 2]), K).float()
    same = one_hot @ one_hot.T
    torch.testing.assert_close(comatch_pseudo_label_graph(one_hot, 0.8), same / same.sum(1, keepdim=True))


def test_contrastive_loss_is_graph_cross_entropy_of_the_embedding_graph_values_and_grads():
    a, b = _unit(N, D, seed=6), _unit(N, D, seed=7)
    graph = _naive_graph(_probs(N, K, seed=8), 0.3)
    ours = value_and_grads(lambda x, y: comatch_contrastive_loss(x, y, graph, 0.5), a, b)
    theirs = value_and_grads(lambda x, y: _naive_contrastive(x, y, graph, 0.5), a, b)
    assert_same(ours, theirs)
    # identity graph: InfoNCE between the two views
    ours = comatch_contrastive_loss(a, b, torch.eye(N), 0.2)
    torch.testing.assert_close(ours, F.cross_entropy(a @ b.T / 0.2, torch.arange(N)), **TOL)
    graph.requires_grad_(True)
    comatch_contrastive_loss(a.requires_grad_(), b, graph).backward()
    assert graph.grad is None  # the pseudo-label graph is a target


def test_bad_arguments_are_named():
    p, z, bank_z, bank_p = _probs(N, K, seed=1), _unit(N, D, seed=2), _unit(M, D, seed=3), _probs(M, K, seed=4)
    cases = [
        (lambda: comatch_memory_smoothing(p, z, bank_z, bank_p, 0.0), "temperature"),
        (lambda: comatch_memory_smoothing(p, z, bank_z, bank_p, 0.5, 1.5), "smoothing_alpha"),
        (lambda: comatch_memory_smoothing(p, z[:2], bank_z, bank_p), "embeddings"),
        (lambda: comatch_memory_smoothing(p, z, bank_z[:, :2], bank_p), "bank_embeddings"),
        (lambda: comatch_memory_smoothing(p, z, bank_z, bank_p[:2]), "bank_probs"),
        (lambda: comatch_memory_smoothing(p, z, bank_z[:0], bank_p[:0]), "empty"),
        (lambda: comatch_memory_smoothing(p[0], z, bank_z, bank_p), "probs"),
        (lambda: comatch_pseudo_label_graph(p, 1.2), "cutoff"),
        (lambda: comatch_contrastive_loss(z, z[:3], torch.eye(N)), "embeddings_b"),
        (lambda: comatch_contrastive_loss(z, z, torch.eye(N - 1)), "graph"),
        (lambda: comatch_contrastive_loss(z, z, torch.eye(N), -1.0), "temperature"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


# ------------------------------------------------------------------------------------------------ method
def _method(**overrides):
    return build_semi_method(tiny_stage("comatch", "comatch", **{**SEMI, "mu": 2, **overrides}))


def test_defaults_follow_usb():
    cfg = validate_recipe({"stages": [tiny_stage("c", "comatch")]}).stages[0]
    assert (cfg.threshold, cfg.contrast_p_cutoff, cfg.contrast_loss_ratio, cfg.temperature, cfg.proj_size,
            cfg.queue_batch, cfg.smoothing_alpha, cfg.da_len, cfg.mu, cfg.lambda_u) == (
        0.95, 0.8, 1.0, 0.2, 64, 5, 0.9, 32, 7, 1.0)
    assert cfg.recommended["optimizer"]["lr"] == 0.03


def test_bank_is_a_ring_buffer_of_gathered_rows():
    method, _ = _method(queue_batch=1)  # 1 · (mu 2 + 1) · batch 8 = 24 rows
    assert method.bank_embeddings.shape == (24, 64) and method.bank_probs.shape == (24, 10)
    z, p = _unit(30, 64, seed=1), _probs(30, 10, seed=2)
    method.update_bank(z[:10], p[:10])
    assert int(method.bank_pointer) == 10 and not bool(method.bank_full)
    torch.testing.assert_close(method.bank_embeddings[:10], z[:10])
    method.update_bank(z[10:], p[10:])  # 10 + 20 > 24: the last 6 rows wrap to the start
    assert int(method.bank_pointer) == 6 and bool(method.bank_full)
    torch.testing.assert_close(method.bank_embeddings[10:24], z[10:24])
    torch.testing.assert_close(method.bank_probs[10:24], p[10:24])
    torch.testing.assert_close(method.bank_embeddings[:6], z[24:30])
    torch.testing.assert_close(method.bank_probs[:6], p[24:30])
    torch.testing.assert_close(method.bank_embeddings[6:10], z[6:10])  # not yet overwritten


def test_step_is_the_sum_of_its_terms_and_fills_the_bank_with_weak_rows():
    method, data = _method(joint_forward=True)
    batch = semi_batch(data, 8, 2)
    torch.manual_seed(0)
    out = method.training_step(batch, Progress(step=0, total_steps=10, epoch=0, steps_per_epoch=10))
    want = out["supervised_loss"] + out["unsupervised_loss"] + out["contrast_loss"]
    torch.testing.assert_close(out["loss"].detach(), want, **TOL)
    assert int(method.bank_pointer) == 16 + 8
    labeled_rows = method.bank_probs[16:24]
    assert torch.equal(labeled_rows, F.one_hot(batch.y, 10).float())  # labeled images: one-hot labels
    torch.testing.assert_close(method.bank_probs[:16].sum(1), torch.ones(16), **TOL)
    torch.testing.assert_close(method.bank_embeddings[:24].norm(dim=1), torch.ones(24), **TOL)


def test_trains_on_its_defaults_with_finite_loss_and_fills_the_bank():
    method, data = _method(queue_batch=1)  # bank of 24 rows fills after one step of 8 + 16 rows
    method.train()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.03, momentum=0.9)
    for step in range(3):
        torch.manual_seed(step)
        out = method.training_step(semi_batch(data, 8, 2), Progress(step=step, total_steps=3, epoch=0,
                                                                   steps_per_epoch=3))
        assert math.isfinite(out["loss"].item()) and math.isfinite(out["contrast_loss"].item())
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert bool(method.bank_full) and method.bank_embeddings.norm(dim=1).min() > 0.99


def test_method_comatch_alone_trains_through_the_runner(tmp_path):
    """`method: comatch` and nothing else of its own (USB defaults, mu 7): finite losses, a pseudo-label report."""
    import json

    from ssl_kit.runner import run_recipe

    stage = tiny_stage("comatch", "comatch", **SEMI)
    run_dir, summary = run_recipe(validate_recipe({"seed": 0, "name": "c", "stages": [stage]}), tmp_path / "r")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "step"]
    assert len(steps) == 3
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["contrast_loss"]) for r in steps)
    assert 0 <= summary["comatch/test/top1"] <= 1
