"""DARP (Kim et al. NeurIPS 2020) on FixMatch: the refinery against the paper's problem (column totals, rows,
KL-closest solution against a closed form on 2 classes and the optimality conditions on 3), the bank and its
schedule in a hand-made step, one real training step, resume state and config errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import build_semi_method, interrupted_then_resumed, semi_batch, tiny_stage
from ssl_kit.config import validate_recipe
from ssl_kit.errors import ConfigError
from ssl_kit.losses.darp import darp_refine, darp_target, remove_noisy_entries
from ssl_kit.methods.base import Progress

LONG_TAIL = {"dataset": "digits", "image_size": 16, "labels_per_class": 20, "long_tail": {"ratio": 10}}


def _probs(n: int, k: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * scale, dim=1)


def _weights(a: torch.Tensor) -> torch.Tensor:
    """The paper's code's row weights w_i = 1 / H(a_i), H with log(a + 1e-6)."""
    return 1 / -(a * torch.log(a + 1e-6)).sum(1)


# ------------------------------------------------------------------------------------------------------- refinery
def test_refinery_meets_the_target_totals_and_keeps_rows_distributions():
    probs = _probs(300, 4, 0)
    target = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    for alpha in (None, 2.0):
        refined = darp_refine(probs, target * 7, num_iter=60, alpha=alpha)  # any scale: normalised, × N
        assert refined.dtype == probs.dtype and refined.shape == probs.shape and (refined >= 0).all()
        assert torch.allclose(refined.sum(1), torch.ones(300, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(refined.sum(0), target * 300, atol=1e-6)
    assert not torch.allclose(probs.sum(0), target * 300, atol=1.0)  # the case is not aligned to start with
    # the default T = 10 gets most of the way (the method's setting)
    short = darp_refine(probs, target, num_iter=10, alpha=None)
    assert (short.sum(0) - target * 300).abs().max() < 0.1 * (probs.sum(0) - target * 300).abs().max()


def test_refinery_is_the_kl_closest_solution_two_classes_closed_form():
    """K = 2: minimising Σ_i w_i KL(m_i ‖ a_i) with Σ_i m_i1 = c gives logit(m_i1) = logit(a_i1) + μ / w_i, μ set by
    the column constraint: found here by bisection, independently of the refinery's dual ascent."""
    a = _probs(40, 2, 1, scale=1.5)
    w = _weights(a)
    c = 0.3 * 40
    logit = torch.log(a[:, 0] / a[:, 1])

    def column(mu):
        return torch.sigmoid(logit + mu / w).sum()

    lo, hi = -50.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if column(mid) < c else (lo, mid)
    closed = torch.sigmoid(logit + lo / w)
    refined = darp_refine(a, torch.tensor([0.3, 0.7], dtype=torch.float64), num_iter=100, alpha=None)
    assert torch.allclose(refined[:, 0], closed, atol=1e-8)

    def objective(m):
        return (w[:, None] * m * torch.log(m / a)).sum()

    # and any feasible move away from it (mass shifted between two rows) costs more
    for i, j in ((0, 1), (5, 17), (30, 2)):
        moved = refined.clone()
        moved[i, 0] += 1e-3
        moved[i, 1] -= 1e-3
        moved[j, 0] -= 1e-3
        moved[j, 1] += 1e-3
        assert objective(moved) > objective(refined)


def test_refinery_satisfies_the_optimality_conditions_three_classes():
    """Stationarity: w_i log(M_ij / A_ij) = −w_i − λ_i − ν_j, so w_i (log(M_ij/A_ij) − log(M_i0/A_i0)) = ν_0 − ν_j
    is the same for every row i."""
    a = _probs(50, 3, 2)
    refined = darp_refine(a, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), num_iter=100, alpha=None)
    r = _weights(a)[:, None] * torch.log(refined / a)
    diff = r - r[:, :1]
    assert torch.allclose(diff, diff.mean(0, keepdim=True).expand_as(diff), atol=1e-6)
    assert diff[:, 1:].abs().max() > 0.1  # the projection did move the rows


def test_an_aligned_set_is_left_unchanged():
    a = _probs(200, 5, 3)
    refined = darp_refine(a, a.sum(0), num_iter=10, alpha=None)
    assert torch.allclose(refined, a, atol=1e-10)
    assert darp_refine(a.float(), a.sum(0).float(), alpha=None).dtype == torch.float32


def test_noisy_entry_removal_keeps_the_alpha_c_most_confident_per_class():
    a = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]], dtype=torch.float64)
    totals = torch.tensor([1.0, 3.0], dtype=torch.float64)  # α 1.5: class 0 keeps 1 row, class 1 keeps 4
    out = remove_noisy_entries(a, totals, alpha=1.5)
    assert torch.allclose(out.sum(1), torch.ones(4, dtype=torch.float64))
    kept0 = torch.tensor([1.0 / 0.9 * 0.9, 0, 0, 0], dtype=torch.float64)  # scaled by c_0 / (kept sum)
    kept1 = a[:, 1] * 3.0 / a[:, 1].sum()
    expected = torch.stack([kept0, kept1], 1) + 1e-6
    assert torch.allclose(out, expected / expected.sum(1, keepdim=True), atol=1e-9)
    assert out[1, 1] > 0.99  # row 1 preferred class 0 but class 0's one slot went to row 0


def test_refinery_and_target_refuse_bad_inputs():
    a = _probs(10, 3, 4)
    with pytest.raises(ValueError, match=r"target must have shape \(3,\)"):
        darp_refine(a, torch.ones(4))
    with pytest.raises(ValueError, match="every entry > 0"):
        darp_refine(a, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="finite and non-negative"):
        darp_refine(-a, torch.ones(3))
    with pytest.raises(ValueError, match="num_iter must be an integer >= 1"):
        darp_refine(a, torch.ones(3), num_iter=0)
    with pytest.raises(ValueError, match="alpha must be a number > 0"):
        darp_refine(a, torch.ones(3), alpha=0.0)
    assert torch.allclose(darp_target(torch.tensor([6, 3, 1]), 50), torch.tensor([30.0, 15, 5], dtype=torch.float64))


# --------------------------------------------------------------------------------------------------------- method
def _method(**overrides):
    stage = tiny_stage("d", "darp", data=LONG_TAIL, train={"steps": 4, "batch_size": 8}, **overrides)
    return build_semi_method(stage)


def _naive_ce(logits, labels):
    return -(logits - torch.logsumexp(logits, dim=1, keepdim=True)).gather(1, labels[:, None]).squeeze(1)


def test_darp_step_by_hand_bank_warmup_and_refinery():
    method, data = _method(threshold=0.5, warmup_epochs=1, num_refine_iter=3, iter_t=5)
    n_u = len(data.unlabeled)
    counts = torch.bincount(data.train.labels[data.labeled], minlength=10).double()
    assert torch.allclose(method.target.double(), counts / counts.sum() * n_u, rtol=1e-6)
    assert method.bank.shape == (n_u, 10) and method.target[0] > method.target[-1]
    batch = semi_batch(data, 4, 2)
    torch.manual_seed(7)
    x, w, s = torch.randn(4, 10), torch.randn(8, 10) * 3, torch.randn(8, 10, requires_grad=True)
    method.views = lambda batch: (None, None, None)
    method.forward_views = lambda *args, network=None: (x, w, s)
    p = torch.softmax(w, 1)
    # warm-up (epoch 1 is not > warmup_epochs 1): FixMatch on the raw prediction; the bank takes it in
    with pytest.warns(UserWarning, match="refinery never runs"):
        out = method.training_step(batch, Progress(4, 8, 1, 4))
    mask = (p.max(1).values >= 0.5).float()
    expected = _naive_ce(x, batch.y).mean() + (_naive_ce(s, p.argmax(1)) * mask).mean()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5) and float(out["darp_refining"]) == 0
    assert torch.allclose(method.bank[batch.u_index], p) and int(method.refined_step) == -1
    # epoch 2, step 8 (not divisible by 3): the first refinery runs anyway, on the whole bank
    out = method.training_step(batch, Progress(8, 12, 2, 4))
    refined = darp_refine(method.bank, method.target, 5, 2.0)
    assert int(method.refined_step) == 8 and torch.allclose(method.refined, refined)
    q = refined[batch.u_index]
    mask = (q.max(1).values >= 0.5).float()
    expected = _naive_ce(x, batch.y).mean() + (_naive_ce(s, q.argmax(1)) * mask).mean()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5) and float(out["darp_refining"]) == 1
    # step 10: no refinery (10 % 3 != 0), the bank changes but the last refinery's rows are used
    w.mul_(-1)
    out = method.training_step(batch, Progress(10, 12, 2, 4))
    assert int(method.refined_step) == 8 and torch.allclose(method.bank[batch.u_index], torch.softmax(w, 1))
    assert torch.allclose(method.refined, refined)
    method.training_step(batch, Progress(12, 16, 3, 4))  # step 12: due
    assert int(method.refined_step) == 12 and not torch.allclose(method.refined, refined)
    state = method.state_dict()
    assert {"bank", "refined", "refined_step", "target"} <= set(state)
    fresh, _ = _method(threshold=0.5, warmup_epochs=1, num_refine_iter=3, iter_t=5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.refined, method.refined) and int(fresh.refined_step) == 12


def test_darp_one_real_step_is_finite_and_moves_the_parameters():
    method, data = _method(threshold=0.0, warmup_epochs=0)
    method.train()
    batch = semi_batch(data, 8, 2)
    before = [p.detach().clone() for p in method.parameters()]
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    out = method.training_step(batch, Progress(4, 8, 1, 4))
    assert math.isfinite(out["loss"].item()) and float(out["darp_refining"]) == 1
    assert out["unsupervised_loss"].item() > 0 and int(method.refined_step) == 4
    out["loss"].backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, method.parameters()))


def test_darp_config_errors_are_clear():
    with pytest.raises(ConfigError, match="DARP aligns the pseudo-labels' class distribution itself"):
        validate_recipe({"stages": [tiny_stage("d", "darp", threshold_policy={"distribution_alignment": True})]})
    for key, value in (("alpha", 0.0), ("iter_t", 0), ("num_refine_iter", 0), ("warmup_epochs", -1)):
        with pytest.raises(ConfigError, match=key):
            validate_recipe({"stages": [tiny_stage("d", "darp", **{key: value})]})
    with pytest.raises(ConfigError, match="warmup_epochs and warmup_fraction both set"):
        validate_recipe({"stages": [tiny_stage("d", "darp", warmup_epochs=3, warmup_fraction=0.5)]})
    with pytest.raises(ConfigError, match="warmup_fraction"):
        validate_recipe({"stages": [tiny_stage("d", "darp", warmup_fraction=1.5)]})
    with pytest.raises(ConfigError, match="iter_T"):
        validate_recipe({"stages": [tiny_stage("d", "darp", iter_T=5)]})  # USB's spelling is not ours: refused


def test_darp_default_warmup_is_usbs_proportion_of_any_run():
    """Unset warmup_epochs: the refinery starts at 200/256 of the run's steps, whatever their number (a 16-step run
    refines from step 12.5, i.e. step 13); an explicit warmup_epochs counts epochs as the references do."""
    method, _ = _method()
    assert method.cfg.warmup_epochs is None and method.cfg.warmup_fraction == 200 / 256
    assert [method.refining(Progress(step, 16, step // 4, 4)) for step in (0, 12, 13, 15)] == [False, False, True,
                                                                                                  True]
    assert method.refining(Progress(1000, 1280, 0, 10_000)) and not method.refining(Progress(999, 1280, 0, 10_000))
    by_epoch, _ = _method(warmup_epochs=2)
    assert [by_epoch.refining(Progress(s, 16, s // 4, 4)) for s in (11, 12)] == [False, True]  # epoch 3 > 2


def test_darp_run_resumes_exactly_with_its_bank(tmp_path):
    """Long-tailed digits, 7 steps an epoch: the refinery runs from step 7 (epoch 1) every 2 steps; a run stopped at
    step 10 and resumed from its step-9 checkpoint (bank and refinery restored; step 9 uses the step-8 refinery)
    repeats the uninterrupted run."""
    stage = tiny_stage("d", "darp", data=LONG_TAIL, warmup_epochs=0, num_refine_iter=2, iter_t=3,
                       train={"steps": 10, "batch_size": 32, "checkpoint_every_steps": 3})
    recipe = validate_recipe({"seed": 0, "name": "darp", "stages": [stage]})
    reference, resumed = interrupted_then_resumed(recipe, tmp_path, crash_step=10)

    def steps(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: (row["loss"], row.get("darp_refining")) for row in rows if row.get("kind") == "step"}

    a, b = steps("a"), steps("b")
    assert a == b and all(math.isfinite(loss) for loss, _ in a.values())
    assert [refining for _, (_, refining) in sorted(a.items())][-1] == 1.0
    drop = ("d/train_seconds", "d/images_per_s")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in reference.items() if k not in drop}
