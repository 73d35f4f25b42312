"""SimMatchV2 (Zheng et al. 2023; reference github.com/mingkai-zheng/SimMatchV2): the label propagation, the
edge-edge and node-edge losses equal the reference's formulas computed naively here (values and gradients); bad
arguments are named; a step is the weighted sum of its terms, its pseudo-labels come from the teacher's weak view
propagated over the labeled bank, the banks take the teacher's embeddings; the teacher follows the student by the
reference's momentum rule; a resumed method continues exactly; the method trains on digits with a falling loss."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_semi_method, semi_batch, tiny_stage
from oracle import TOL, assert_same, randn, value_and_grads
from ssl_kit.config import validate_recipe
from ssl_kit.errors import ConfigError
from ssl_kit.losses.pseudo_label import consistency_loss
from ssl_kit.losses.simmatchv2 import (simmatchv2_edge_edge_loss, simmatchv2_label_propagation,
                                       simmatchv2_node_edge_loss)
from ssl_kit.methods.base import Progress
from ssl_kit.methods.simmatchv2 import MomentumAlignment

N, M, D, K = 5, 9, 4, 3
SEMI = dict(data={"dataset": "digits", "image_size": 16, "labels_per_class": 4},
            train={"steps": 3, "batch_size": 8, "ema_decay": 0.9, "log_every": 1})


def _unit(*shape, seed):
    return F.normalize(randn(*shape, seed=seed), dim=1)


def _probs(*shape, seed, scale=3.0):
    return torch.softmax(randn(*shape, seed=seed) * scale, dim=1)


# ------------------------------------------------------------------------------------------------ naive formulas
def _naive_propagation(z, p, bank, labels, topn, t, alpha):
    """Per node, by hand: the topn most similar labeled rows, the (topn+1)-node graph without self-loops,
    F = (1 − α)(I − α A)⁻¹ Y in float64, row 0."""
    out = torch.zeros(z.shape[0], p.shape[1])
    for i in range(z.shape[0]):
        sims = [float(z[i] @ bank[j]) for j in range(bank.shape[0])]
        nearest = sorted(range(bank.shape[0]), key=lambda j: -sims[j])[:min(topn, bank.shape[0])]
        nodes = [z[i].double()] + [bank[j].double() for j in nearest]
        ys = [p[i].double()] + [F.one_hot(labels[j], p.shape[1]).double() for j in nearest]
        size = len(nodes)
        a = torch.zeros(size, size, dtype=torch.float64)
        for r in range(size):
            row = [math.exp(float(nodes[r] @ nodes[c]) / t) if c != r else 0.0 for c in range(size)]
            for c in range(size):
                a[r, c] = row[c] / sum(row)
        prop = (1 - alpha) * torch.linalg.inv(torch.eye(size, dtype=torch.float64) - alpha * a)
        out[i] = sum(prop[0, c] * ys[c] for c in range(size)).float()
    return out


def _naive_edge_edge(student, teacher, bank, t):
    total = 0.0
    for i in range(student.shape[0]):
        q = [math.exp(float(teacher[i] @ bank[j]) / t) for j in range(bank.shape[0])]
        s = [torch.exp(student[i] @ bank[j] / t) for j in range(bank.shape[0])]
        total = total - sum(q[j] / sum(q) * torch.log(s[j] / sum(s)) for j in range(bank.shape[0]))
    return total / student.shape[0]


def _naive_node_edge(student, bank, bank_probs, targets, t):
    total = 0.0
    for i in range(student.shape[0]):
        s = [torch.exp(student[i] @ bank[j] / t) for j in range(bank.shape[0])]
        for k in range(bank_probs.shape[1]):
            aggregated = sum(s[j] / sum(s) * bank_probs[j, k] for j in range(bank.shape[0]))
            total = total - targets[i, k] * torch.log(aggregated)
    return total / student.shape[0]


# ------------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("topn, t, alpha", [(3, 0.1, 0.1), (4, 0.5, 0.6), (128, 0.2, 0.1)])
def test_label_propagation_is_the_closed_form_over_the_nearest_labeled_nodes(topn, t, alpha):
    z, p, bank = _unit(N, D, seed=1), _probs(N, K, seed=2), _unit(M, D, seed=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    got = simmatchv2_label_propagation(z, p, bank, labels, topn, t, alpha)
    torch.testing.assert_close(got, _naive_propagation(z, p, bank, labels, topn, t, alpha), **TOL)
    torch.testing.assert_close(got.sum(1), torch.ones(N), **TOL)  # A row-stochastic: F's rows sum to 1
    assert not got.requires_grad


def test_label_propagation_moves_the_prediction_towards_its_labeled_neighbours():
    z, bank = _unit(N, D, seed=4), _unit(M, D, seed=5)
    labels = torch.zeros(M, dtype=torch.long)  # every labeled neighbour is class 0
    p = torch.full((N, K), 1.0 / K)
    assert torch.equal(simmatchv2_label_propagation(z, p, bank, labels, 4, 0.1, 0.0), p)  # α = 0: unchanged
    got = simmatchv2_label_propagation(z, p, bank, labels, 4, 0.1, 0.5)
    assert (got[:, 0] > 1.0 / K + 0.05).all() and torch.allclose(got[:, 1], got[:, 2])
    # order of the neighbours does not matter: a permuted bank gives the same pseudo-labels
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(simmatchv2_label_propagation(z, p, bank[perm], labels[perm], 4),
                               simmatchv2_label_propagation(z, p, bank, labels, 4), **TOL)


def test_edge_edge_loss_is_the_cross_entropy_of_bank_edges_values_and_grads():
    student, teacher, bank = _unit(N, D, seed=6), _unit(N, D, seed=7), _unit(M, D, seed=8)
    ours = value_and_grads(lambda s: simmatchv2_edge_edge_loss(s, teacher, bank, 0.2), student)
    theirs = value_and_grads(lambda s: _naive_edge_edge(s, teacher, bank, 0.2), student)
    assert_same(ours, theirs)
    teacher_leaf, bank_leaf = teacher.clone().requires_grad_(), bank.clone().requires_grad_()
    simmatchv2_edge_edge_loss(student.clone().requires_grad_(), teacher_leaf, bank_leaf).backward()
    assert teacher_leaf.grad is None and bank_leaf.grad is None  # targets and bank take no gradient


def test_node_edge_loss_aggregates_bank_predictions_values_and_grads():
    student, bank = _unit(N, D, seed=9), _unit(M, D, seed=10)
    bank_probs, targets = _probs(M, K, seed=11), _probs(N, K, seed=12)
    ours = value_and_grads(lambda s: simmatchv2_node_edge_loss(s, bank, bank_probs, targets, 0.3), student)
    theirs = value_and_grads(lambda s: _naive_node_edge(s, bank, bank_probs, targets, 0.3), student)
    assert_same(ours, theirs)
    # one-hot bank predictions: the aggregation is SimMatch's per-class sum of similarities
    one_hot = F.one_hot(torch.arange(M) % K, K).float()
    edges = torch.softmax(student @ bank.T / 0.1, dim=1)
    per_class = torch.stack([edges[:, torch.arange(M) % K == c].sum(1) for c in range(K)], dim=1)
    torch.testing.assert_close(simmatchv2_node_edge_loss(student, bank, one_hot, targets),
                               -(targets * per_class.log()).sum(1).mean(), **TOL)


def test_similarities_stay_float32_under_autocast():
    z, p, bank, labels = _unit(N, D, seed=1), _probs(N, K, seed=2), _unit(M, D, seed=3), torch.arange(M) % K
    teacher, bank_probs = _unit(N, D, seed=4), _probs(M, K, seed=5)
    want = (simmatchv2_label_propagation(z, p, bank, labels, 4), simmatchv2_edge_edge_loss(z, teacher, bank),
            simmatchv2_node_edge_loss(z, bank, bank_probs, p))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (simmatchv2_label_propagation(z, p, bank, labels, 4), simmatchv2_edge_edge_loss(z, teacher, bank),
               simmatchv2_node_edge_loss(z, bank, bank_probs, p))
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, **TOL)


def test_bad_arguments_are_named():
    z, p, bank, labels = _unit(N, D, seed=1), _probs(N, K, seed=2), _unit(M, D, seed=3), torch.arange(M) % K
    cases = [
        (lambda: simmatchv2_label_propagation(z, p, bank, labels, 0), "topn"),
        (lambda: simmatchv2_label_propagation(z, p, bank, labels, 4, 0.0), "temperature"),
        (lambda: simmatchv2_label_propagation(z, p, bank, labels, 4, 0.1, 1.0), "alpha"),
        (lambda: simmatchv2_label_propagation(z, p[:2], bank, labels), "probs"),
        (lambda: simmatchv2_label_propagation(z, p, bank[:, :2], labels), "bank"),
        (lambda: simmatchv2_label_propagation(z, p, bank, labels[:3]), "bank_labels"),
        (lambda: simmatchv2_label_propagation(z, p, bank[:0], labels[:0]), "empty"),
        (lambda: simmatchv2_edge_edge_loss(z, z[:2], bank), "teacher_embeddings"),
        (lambda: simmatchv2_edge_edge_loss(z, z, bank, -1.0), "temperature"),
        (lambda: simmatchv2_node_edge_loss(z, bank, p, p), "bank_probs"),
        (lambda: simmatchv2_node_edge_loss(z, bank, _probs(M, K, seed=1), p[:, :2]), "targets"),
        (lambda: simmatchv2_node_edge_loss(z[0], bank, _probs(M, K, seed=1), p), "student_embeddings"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


# ------------------------------------------------------------------------------------------------ method
def _method(**overrides):
    return build_semi_method(tiny_stage("s2", "simmatchv2", **{**SEMI, "mu": 2, **overrides}))


def _step(method, data, step=0, seed=0):
    torch.manual_seed(seed)
    return method.training_step(semi_batch(data, 8, 2), Progress(step=step, total_steps=10, epoch=0,
                                                                 steps_per_epoch=10))


def test_defaults_follow_the_reference():
    cfg = validate_recipe({"stages": [tiny_stage("s2", "simmatchv2")]}).stages[0]
    assert (cfg.threshold, cfg.lambda_u, cfg.lambda_ee, cfg.lambda_ne, cfg.mu, cfg.temperature, cfg.alpha, cfg.topn,
            cfg.bank_batches, cfg.proj_size, cfg.distribution_alignment, cfg.da_momentum, cfg.ema_m, cfg.eman) == (
        0.7, 10.0, 5.0, 5.0, 5, 0.1, 0.1, 128, 256, 128, True, 0.9, 0.999, False)
    silent = validate_recipe({"stages": [{"name": "s2", "method": "simmatchv2"}]}).stages[0]
    assert (silent.optimizer.name, silent.optimizer.lr, silent.optimizer.weight_decay, silent.optimizer.nesterov,
            silent.schedule.name, silent.schedule.warmup_epochs) == ("sgd", 0.03, 1e-4, True, "cosine", 5)


@pytest.mark.parametrize("key, value", [("alpha", 1.0), ("alpha", -0.1), ("topn", 0), ("threshold", 1.5),
                                        ("da_momentum", 1.0), ("ema_m", 1.5), ("bank_batches", 0),
                                        ("temperature", 0.0), ("lambda_ee", -1.0)])
def test_config_errors_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"stages\[s2\]\.{key}"):
        validate_recipe({"stages": [tiny_stage("s2", "simmatchv2", **{key: value})]})


def test_step_is_the_weighted_sum_of_its_terms_and_fills_both_banks():
    method, data = _method(bank_batches=2, lambda_ee=2.0, lambda_ne=3.0, lambda_u=4.0)
    assert method.unlabeled_bank.shape == (2 * 2 * 8, 128) and method.labeled_bank.shape == (40, 128)
    first = _step(method, data)
    assert first["node_edge_loss"] == 0  # nothing written yet: the reference's guard drops the term
    assert int(method.unlabeled_pointer) == 16 and bool(method.unlabeled_written)
    torch.testing.assert_close(method.unlabeled_bank_probs[:16].sum(1), torch.ones(16), **TOL)
    out = _step(method, data, step=1)
    assert out["node_edge_loss"] > 0 and int(method.unlabeled_pointer) == 0  # 32 rows: wrapped to the start
    want = out["supervised_loss"] + 4.0 * out["unsupervised_loss"] + 2.0 * out["edge_edge_loss"] + \
        3.0 * out["node_edge_loss"]
    torch.testing.assert_close(out["loss"].detach(), want, **TOL)
    assert all(math.isfinite(float(v.detach())) for v in out.values())


def test_pseudo_labels_and_banks_come_from_the_teacher(monkeypatch):
    """The teacher (moved away from the student) makes the propagated pseudo-labels from its weak view, gates them
    with its aligned confidence, and its labeled / weak embeddings and aligned probabilities fill the banks."""
    import ssl_kit.methods.simmatchv2 as module

    method, data = _method(threshold=0.0, distribution_alignment=False, bank_batches=1)
    method.teacher_synced.fill_(True)
    with torch.no_grad():
        for p in method.teacher_backbone.parameters():
            p.add_(0.3 * torch.randn_like(p))
    calls = {}
    original = module.simmatchv2_label_propagation

    def record(*args):
        calls["args"] = [a.clone() if torch.is_tensor(a) else a for a in args]
        calls["result"] = original(*args)
        return calls["result"]

    monkeypatch.setattr(module, "simmatchv2_label_propagation", record)
    labeled_before = method.labeled_bank.clone()
    batch = semi_batch(data, 8, 2)
    torch.manual_seed(0)
    x, u_weak, _ = method.views(batch)
    method.teacher_backbone.train()  # the default teacher normalises with its batch's statistics, as in the step
    with torch.no_grad():
        features = method.teacher_backbone(torch.cat([x, u_weak]))
        teacher_z = F.normalize(method.teacher_projector(features), dim=1)
        teacher_p = torch.softmax(method.teacher_head(features), dim=1)
        student_z = F.normalize(method.projector(method.net.backbone(torch.cat([x, u_weak]))), dim=1)
    torch.manual_seed(0)
    method.training_step(batch, Progress(0, 10, 0, 10))
    z, p, bank, labels, topn, t, alpha = calls["args"]
    torch.testing.assert_close(z, teacher_z[8:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p, teacher_p[8:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(z, student_z[8:], atol=1e-3)
    assert torch.equal(bank, labeled_before) and (topn, t, alpha) == (128, 0.1, 0.1)
    assert torch.equal(labels, data.train.labels[data.labeled])
    slots = torch.arange(8)  # semi_batch's labeled images are data.labeled[:8]: slots 0..7
    torch.testing.assert_close(method.labeled_bank[slots], teacher_z[:8], atol=1e-5, rtol=1e-5)
    assert torch.equal(method.labeled_bank[8:], labeled_before[8:])
    torch.testing.assert_close(method.unlabeled_bank[:16], teacher_z[8:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(method.unlabeled_bank_probs[:16], teacher_p[8:], atol=1e-5, rtol=1e-5)


def test_node_node_loss_is_gated_by_the_teachers_aligned_confidence(monkeypatch):
    """weights = [max_k p ≥ threshold] of the teacher's aligned prediction p (not of the propagated label that the
    strong view is trained towards)."""
    import ssl_kit.methods.simmatchv2 as module

    seen = {}

    def record(logits, targets, weights):
        seen.update(targets=targets.clone(), weights=weights.clone())
        return consistency_loss(logits, targets, weights)

    def gated(threshold):
        method, data = _method(threshold=threshold)
        weigh = method.gate.weigh
        method.gate.weigh = lambda probs, index: seen.update(probs=probs.clone()) or weigh(probs, index)
        return _step(method, data)

    monkeypatch.setattr(module, "consistency_loss", record)
    gated(0.0)
    threshold = float(seen["probs"].max(1).values.median())
    out = gated(threshold)
    expected = (seen["probs"].max(1).values >= threshold).float()
    assert torch.equal(seen["weights"], expected) and 0 < float(expected.sum()) < 16
    assert not torch.allclose(seen["targets"], seen["probs"], atol=1e-4)  # trained towards the propagated label
    assert out["mask_rate"] == expected.mean()


def test_momentum_alignment_divides_by_the_running_mean_before_updating_it():
    align = MomentumAlignment(2, 0.9)
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3]])
    torch.testing.assert_close(align(probs), probs)  # p̄ uniform at first
    torch.testing.assert_close(align.p_model, 0.9 * torch.tensor([0.5, 0.5]) + 0.1 * torch.tensor([0.8, 0.2]))
    second = align(probs)
    expected = probs / align.p_model.new_tensor([0.53, 0.47])
    torch.testing.assert_close(second, expected / expected.sum(1, keepdim=True))


@pytest.mark.parametrize("ema_m, eman", [(0.9, False), (0.999, True)])
def test_teacher_follows_the_student_by_the_references_momentum_rule(ema_m, eman):
    method, data = _method(ema_m=ema_m, eman=eman)
    method.train()
    assert method.teacher_backbone.training is (not eman)  # EMAN: eval mode; else batch statistics
    _step(method, data)  # the first step copies the student into the teacher
    assert torch.equal(method.teacher_head.weight, method.net.head.weight)
    teacher = [p.clone() for p in method.teacher_backbone.parameters()]
    with torch.no_grad():
        for p in [*method.net.backbone.parameters(), *method.net.head.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    progress = Progress(step=4, total_steps=10, epoch=0, steps_per_epoch=10)
    m = ema_m if ema_m > 0.996 else 1 - (1 - ema_m) * (math.cos(math.pi * 5 / 10) + 1) / 2
    assert method.teacher_momentum(progress) == pytest.approx(m)
    method.after_optimizer_step(progress)
    for t, t0, s in zip(method.teacher_backbone.parameters(), teacher, method.net.backbone.parameters()):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s, atol=1e-6, rtol=1e-6)


def test_a_restored_method_continues_exactly():
    method, data = _method(bank_batches=1)
    method.train()
    for step in range(2):
        _step(method, data, step, seed=step)
        method.after_optimizer_step(Progress(step, 10, 0, 10))
    state = {k: v.clone() for k, v in method.state_dict().items()}
    assert {"labeled_bank", "unlabeled_bank", "unlabeled_bank_probs", "unlabeled_pointer", "teacher_synced",
            "gate.alignment.p_model", "teacher_backbone.features.0.weight"} <= set(state)
    fresh, _ = _method(bank_batches=1)
    fresh.load_state_dict(state)
    fresh.train()
    a, b = _step(method, data, 2, seed=2), _step(fresh, data, 2, seed=2)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    for key, value in method.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


def test_trains_on_digits_through_the_runner_with_falling_losses(tmp_path):
    """60 steps on digits (4 labels per class): every term finite, the supervised and the node-edge losses fall
    (the total need not: the node-node term grows with the mask rate, and the edge-edge cross-entropy holds the
    teacher's edge entropy), and the classifier beats chance by far."""
    from ssl_kit.runner import run_recipe

    stage = tiny_stage("s2", "simmatchv2", data={"dataset": "digits", "image_size": 16, "labels_per_class": 4},
                       train={"steps": 60, "batch_size": 16, "ema_decay": 0.9, "log_every": 1},
                       mu=2, bank_batches=4, ema_m=0.9, threshold=0.5)
    run_dir, summary = run_recipe(validate_recipe({"seed": 0, "name": "s2", "stages": [stage]}), tmp_path / "r")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("kind") == "step"]
    assert len(steps) == 60
    for key in ("loss", "supervised_loss", "unsupervised_loss", "edge_edge_loss", "node_edge_loss"):
        assert all(math.isfinite(r[key]) for r in steps), key

    def mean(key, part):
        return sum(r[key] for r in part) / len(part)

    assert mean("supervised_loss", steps[-10:]) < 0.5 * mean("supervised_loss", steps[:5])
    assert mean("node_edge_loss", steps[-10:]) < mean("node_edge_loss", steps[1:6]) - 0.05  # step 0: bank empty
    assert max(r["mask_rate"] for r in steps[-10:]) > 0  # the node-node term takes part
    assert summary["s2/test/top1"] > 0.5


# ------------------------------------------------------------------------------------------------ two ranks
def _bank_worker(rank, world, port, out_dir):
    """Each rank writes its own rows into the banks and aligns its own predictions; rank r's rows are rows
    r·n .. (r+1)·n of one global batch."""
    from tests.test_distributed import _set_env

    _set_env(rank, world, port)
    import torch.distributed as torch_dist

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo")
    try:
        method, data = _method(bank_batches=1)  # 1 · mu 2 · batch 8 = 16 unlabeled rows
        z, p = _unit(8, 128, seed=1), _probs(8, 10, seed=2)
        method.update_unlabeled_bank(z[rank * 4:(rank + 1) * 4], p[rank * 4:(rank + 1) * 4])
        index = data.labeled[:4]  # training-set indices of labeled images
        labeled = _unit(4, 128, seed=3)
        method.update_labeled_bank(labeled[rank * 2:(rank + 1) * 2], index[rank * 2:(rank + 1) * 2])
        align = MomentumAlignment(10, 0.5)
        aligned = align(p[rank * 4:(rank + 1) * 4])
        torch.save({"bank": method.unlabeled_bank[:8].clone(), "probs": method.unlabeled_bank_probs[:8].clone(),
                    "pointer": int(method.unlabeled_pointer), "slot_of": method.slot_of.clone(),
                    "labeled_bank": method.labeled_bank.clone(), "p_model": align.p_model.clone(),
                    "aligned": aligned, "index": index}, out_dir / f"rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.slow
def test_banks_and_alignment_gather_every_ranks_rows(tmp_path):
    from tests.test_distributed import spawn_ranks

    results = spawn_ranks(_bank_worker, 2, tmp_path)
    z, p, labeled = _unit(8, 128, seed=1), _probs(8, 10, seed=2), _unit(4, 128, seed=3)
    for result in results:  # both ranks hold the global batch's rows, in rank order
        torch.testing.assert_close(result["bank"], z, **TOL)
        torch.testing.assert_close(result["probs"], p, **TOL)
        assert result["pointer"] == 8
        slots = result["slot_of"][result["index"]]
        assert slots.tolist() == [0, 1, 2, 3]
        torch.testing.assert_close(result["labeled_bank"][slots], labeled, **TOL)
        torch.testing.assert_close(result["p_model"], 0.5 * torch.full((10,), 0.1) + 0.5 * p.mean(0), **TOL)
    torch.testing.assert_close(torch.cat([r["aligned"] for r in results]), p, **TOL)  # p̄ uniform at first
