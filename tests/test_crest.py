"""CReST / CReST+ (Wei et al. CVPR 2021) on FixMatch: sampling rates and the per-class choice against hand-computed
values (and USB's formula on an exponential profile), the progressive temperature and alignment against naive
formulas, generation boundaries, a hand-made step (bank, choice, loss), one real step, exact resume, config errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import build_semi_method, interrupted_then_resumed, semi_batch, tiny_stage
from ssl_kit.config import validate_recipe
from ssl_kit.errors import ConfigError
from ssl_kit.losses.crest import (crest_sampling_rates, crest_select, frequency_rank, generation_of,
                                  progressive_alignment, progressive_temperature, tempered_target)
from ssl_kit.methods.base import Progress

LONG_TAIL = {"dataset": "digits", "image_size": 16, "labels_per_class": 20, "long_tail": {"ratio": 10}}


# ------------------------------------------------------------------------------------------------ sampling rates
def test_sampling_rates_by_hand_classes_ranked_by_labeled_count():
    counts = torch.tensor([8, 1, 2, 4])  # ranks: class 0, 3, 2, 1 (most frequent first)
    assert frequency_rank(counts).tolist() == [0, 3, 2, 1]
    # alpha 1: rank l takes N_{K+1-l} / N_1: rank 1 -> 1/8, rank 2 -> 2/8, rank 3 -> 4/8, rank 4 -> 8/8
    assert crest_sampling_rates(counts, 1.0).tolist() == [0.125, 1.0, 0.5, 0.25]
    # alpha 3 (the default): the cube roots
    expected = torch.tensor([0.5, 1.0, 0.5 ** (1 / 3), 0.25 ** (1 / 3)], dtype=torch.float64)
    assert torch.allclose(crest_sampling_rates(counts, 3.0), expected, atol=1e-12)
    # equal counts: ties ranked by class index; a balanced set keeps everything
    assert frequency_rank(torch.tensor([3, 5, 5])).tolist() == [2, 0, 1]
    assert crest_sampling_rates(torch.tensor([7, 7, 7]), 3.0).tolist() == [1.0, 1.0, 1.0]


def test_sampling_rates_equal_usbs_formula_on_an_exponential_profile():
    """USB (and the paper's code) assume class index = frequency rank and an exponential profile with ratio γ:
    rate_c = (μ^(K−1−c))^(1/alpha), μ = (1/γ)^(1/(K−1))."""
    k, gamma, alpha = 10, 100.0, 3.0
    counts = 1500 * gamma ** (-torch.arange(k, dtype=torch.float64) / (k - 1))
    mu = (1 / gamma) ** (1 / (k - 1))
    usb = torch.tensor([(mu ** (k - 1 - c)) ** (1 / alpha) for c in range(k)], dtype=torch.float64)
    assert torch.allclose(crest_sampling_rates(counts, alpha), usb, rtol=1e-10)
    shuffled = torch.randperm(k, generator=torch.Generator().manual_seed(0))  # any class order: ranked by count
    assert torch.allclose(crest_sampling_rates(counts[shuffled], alpha), usb[shuffled], rtol=1e-10)


def test_sampling_rates_refuse_bad_inputs():
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        crest_sampling_rates(torch.tensor([3, 1]), 0.0)
    with pytest.raises(ValueError, match="non-negative counts"):
        crest_sampling_rates(torch.tensor([3, -1]), 3.0)
    with pytest.raises(ValueError, match="positive entry"):
        crest_sampling_rates(torch.tensor([0, 0]), 3.0)


# ------------------------------------------------------------------------------------------------------- choice
def test_choice_keeps_the_floor_of_n_times_rate_most_confident_per_class():
    confidence = torch.tensor([0.9, 0.8, 0.7, 0.95, 0.6, 0.5, 0.99, 0.4, 0.3, 0.85])
    prediction = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    rates = torch.tensor([0.5, 1.0, 0.5])
    chosen = crest_select(confidence, prediction, rates)
    # class 0: 5 images, ⌊2.5⌋ = 2 -> positions 3 (0.95), 0 (0.9); class 1: all 3; class 2: ⌊1⌋ = 1 -> position 9
    assert torch.nonzero(chosen).flatten().tolist() == [0, 3, 5, 6, 7, 9]
    # images without a prediction are not counted: class 0 has 4 valid, ⌊2⌋ = 2 -> positions 0 and 1
    valid = torch.ones(10, dtype=torch.bool)
    valid[3] = False
    assert torch.nonzero(crest_select(confidence, prediction, rates, valid)[:5]).flatten().tolist() == [0, 1]
    # equal confidence: the lower position first; a rate of 0 chooses nothing
    tied = crest_select(torch.full((4,), 0.7), torch.zeros(4, dtype=torch.long), torch.tensor([0.5, 0.0]))
    assert tied.tolist() == [True, True, False, False]
    assert not crest_select(confidence, prediction, torch.tensor([0.0, 0.0, 0.0])).any()


def test_choice_matches_a_naive_sort_per_class():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(500, 6, generator=g) * 3, dim=1)
    confidence, prediction = probs.max(1)
    rates = crest_sampling_rates(torch.tensor([60, 35, 20, 12, 7, 4]), 3.0)
    chosen = crest_select(confidence, prediction, rates)
    for c in range(6):
        members = [i for i in range(500) if prediction[i] == c]
        members.sort(key=lambda i: -float(confidence[i]))
        keep = set(members[:int(len(members) * float(rates[c]) + 1e-9)])
        assert {i for i in members if chosen[i]} == keep
    assert not chosen[prediction == 5].logical_not().any()  # the rarest class keeps all its pseudo-labels


def test_choice_refuses_bad_inputs():
    c, p = torch.rand(4), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="rates must be in"):
        crest_select(c, p, torch.tensor([1.5]))
    with pytest.raises(ValueError, match="prediction must be an integer tensor"):
        crest_select(c, p.float(), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 1\)"):
        crest_select(c, p + 1, torch.tensor([1.0]))


# -------------------------------------------------------------------------------- temperature, alignment, generations
def test_progressive_temperature_goes_linearly_from_one_to_t_min():
    assert [round(progressive_temperature(g, 6, 0.5), 12) for g in range(6)] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    assert progressive_temperature(0, 1, 0.5) == 1.0
    assert progressive_temperature(2, 3, 0.0) == 0.0
    with pytest.raises(ValueError, match="generation must be an integer in"):
        progressive_temperature(6, 6)


def test_alignment_matches_the_naive_formula():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(7, 4, generator=g, dtype=torch.float64), dim=1)
    p_model = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    target = torch.tensor([0.55, 0.25, 0.15, 0.05], dtype=torch.float64)
    for t in (1.0, 0.5, 0.0):
        out = progressive_alignment(probs, p_model, target, t)
        for i in range(7):
            goal = [float(target[j]) ** t for j in range(4)]
            goal = [x / sum(goal) for x in goal]
            row = [float(probs[i, j]) * (goal[j] + 1e-6) / (float(p_model[j]) + 1e-6) for j in range(4)]
            assert out[i].tolist() == pytest.approx([x / sum(row) for x in row], rel=1e-12)
    assert torch.allclose(tempered_target(target, 0.0), torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"p_model must have shape \(4,\)"):
        progressive_alignment(probs, p_model[:3], target, 1.0)


def test_generations_cut_the_run_into_equal_parts():
    assert [generation_of(s, 10, 3) for s in range(10)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [generation_of(s, 12, 6) for s in range(12)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert generation_of(50, 10, 3) == 2 and generation_of(0, 0, 3) == 0
    assert all(generation_of(s, 300, 6) == s // 50 for s in range(300))  # the benchmark's run: 50 steps each


# --------------------------------------------------------------------------------------------------------- method
def _method(**overrides):
    stage = tiny_stage("c", "crest", data=LONG_TAIL, train={"steps": 4, "batch_size": 8}, **overrides)
    return build_semi_method(stage)


def _naive_ce(logits, labels):
    return -(logits - torch.logsumexp(logits, dim=1, keepdim=True)).gather(1, labels[:, None]).squeeze(1)


def test_crest_step_by_hand_bank_boundary_choice_and_loss():
    method, data = _method(threshold=0.5, num_gens=3, alpha=1.0)
    n_u, k = len(data.unlabeled), 10
    counts = torch.bincount(data.train.labels[data.labeled], minlength=k).float()
    assert torch.equal(method.labeled_counts, counts)
    assert torch.allclose(method.rates.double(), crest_sampling_rates(counts, 1.0))
    assert torch.allclose(method.gate.alignment.p_target, counts / counts.sum())
    batch = semi_batch(data, 4, 4)  # 16 unlabeled rows at positions 0..15
    torch.manual_seed(7)
    x, w, s = torch.randn(4, k), torch.randn(16, k) * 3, torch.randn(16, k)
    method.views = lambda batch: (None, None, None)
    method.forward_views = lambda *args, network=None: (x, w, s)
    p = torch.softmax(w, 1)
    # generation 0 (step 0 of 30): the bank takes the raw prediction; alignment at t = 1 with p_model = first mean
    out = method.training_step(batch, Progress(0, 30, 0, 10))
    assert torch.allclose(method.bank_confidence[:16], p.max(1).values)
    assert torch.equal(method.bank_prediction[:16], p.argmax(1)) and (method.bank_prediction[16:] == -1).all()
    assert (method.chosen_label == -1).all() and float(out["crest_generation"]) == 0
    aligned = progressive_alignment(p, p.mean(0), counts / counts.sum(), 1.0)
    mask = (aligned.max(1).values >= 0.5).float()
    expected = _naive_ce(x, batch.y).mean() + (_naive_ce(s, aligned.argmax(1)) * mask).mean()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    # step 10 opens generation 1: the choice is made from the bank as it stood (the other 16 - n_u images unseen)
    with pytest.warns(UserWarning, match="have not been seen yet"):
        out = method.training_step(batch, Progress(10, 30, 1, 10))
    chosen = crest_select(p.max(1).values, p.argmax(1), method.rates)
    assert torch.equal(method.chosen_label[:16], torch.where(chosen, p.argmax(1), -1))
    assert (method.chosen_label[16:] == -1).all() and int(method.generation) == 1 and chosen.any()
    assert float(method.gate.alignment.temperature) == pytest.approx(0.75)  # t_min 0.5, generation 1 of 3
    share = int(chosen.sum()) / (float(counts.sum()) + int(chosen.sum()))
    labeled = _naive_ce(x, batch.y).mean()
    chosen_ce = _naive_ce(w[chosen], p.argmax(1)[chosen]).mean()
    p_model = 0.999 * p.mean(0) + 0.001 * p.mean(0)
    aligned = progressive_alignment(p, p_model, counts / counts.sum(), 0.75)
    mask = (aligned.max(1).values >= 0.5).float()
    expected = (1 - share) * labeled + share * chosen_ce + (_naive_ce(s, aligned.argmax(1)) * mask).mean()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["chosen_loss"].item() == pytest.approx(chosen_ce.item(), rel=1e-5)
    assert out["chosen_rows"].item() == pytest.approx(chosen.float().mean().item())
    right = (p.argmax(1)[chosen] == batch.u_y[chosen]).float().mean().item()  # diagnostic against hidden labels
    assert method.epoch_metrics()["crest/chosen_accuracy"] == pytest.approx(right)
    # the same generation again (a second micro-batch, a later step): the choice is frozen while the bank moves
    w.mul_(-1)
    method.training_step(batch, Progress(19, 30, 1, 10))
    assert torch.equal(method.chosen_label[:16], torch.where(chosen, p.argmax(1), -1))
    assert torch.equal(method.bank_prediction[:16], torch.softmax(w, 1).argmax(1))
    # generation 2: a new choice from the new bank, replacing (not adding to) the last one
    method.training_step(batch, Progress(20, 30, 2, 10))
    q = torch.softmax(w, 1)
    assert torch.equal(method.chosen_label[:16], torch.where(crest_select(q.max(1).values, q.argmax(1), method.rates),
                                                             q.argmax(1), -1))
    assert int(method.generation) == 2 and float(method.gate.alignment.temperature) == pytest.approx(0.5)
    state = method.state_dict()
    assert {"bank_confidence", "bank_prediction", "chosen_label", "generation", "gate.alignment.p_model"} <= set(state)
    fresh, _ = _method(threshold=0.5, num_gens=3, alpha=1.0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.chosen_label, method.chosen_label) and int(fresh.generation) == 2


def test_plain_crest_has_no_alignment_and_warns_when_it_cannot_rebalance():
    method, data = _method(progressive_alignment=False, num_gens=1)
    assert method.gate.alignment is None and "crest/temperature" not in method.threshold_metrics()
    with pytest.warns(UserWarning, match="num_gens 1 has no generation boundary"):
        method.training_step(semi_batch(data, 4, 2), Progress(3, 4, 0, 4))
    assert (method.chosen_label == -1).all()


def test_crest_one_real_step_is_finite_and_moves_the_parameters():
    method, data = _method(threshold=0.0, num_gens=2)
    method.train()
    batch = semi_batch(data, 8, 2)
    method.bank_prediction[:16] = torch.arange(16) % 10  # a choice at the boundary, so the chosen rows train too
    method.bank_confidence[:16] = 0.9
    before = [p.detach().clone() for p in method.parameters()]
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    out = method.training_step(batch, Progress(2, 4, 0, 4))
    assert math.isfinite(out["loss"].item()) and int(method.generation) == 1
    assert out["chosen_rows"].item() > 0 and out["chosen_loss"].item() > 0 and out["unsupervised_loss"].item() > 0
    out["loss"].backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, method.parameters()))


def test_crest_refuses_a_class_without_labels():
    from ssl_kit.methods.crest import CReST

    method, data = _method()
    labels = data.train.labels[data.labeled].clone()
    labels[labels == 9] = 0
    with pytest.raises(ValueError, match=r"classes \[9\] have no labeled image"):
        CReST(method.cfg, method.net.backbone, data.info, len(data.unlabeled), labels)


def test_crest_config_errors_are_clear():
    with pytest.raises(ConfigError, match="already aligned to the labeled distribution"):
        validate_recipe({"stages": [tiny_stage("c", "crest", threshold_policy={"distribution_alignment": True})]})
    validate_recipe({"stages": [tiny_stage("c", "crest", progressive_alignment=False,
                                           threshold_policy={"distribution_alignment": True})]})
    for key, value in (("alpha", 0.0), ("num_gens", 0), ("alignment_t_min", 1.5), ("ema_p", 1.0), ("mu", 0)):
        with pytest.raises(ConfigError, match=key):
            validate_recipe({"stages": [tiny_stage("c", "crest", **{key: value})]})
    with pytest.raises(ConfigError, match="crest_alpha"):
        validate_recipe({"stages": [tiny_stage("c", "crest", crest_alpha=3)]})  # USB's spelling is not ours
    stage = validate_recipe({"stages": [tiny_stage("c", "crest")]}).stages[0]
    assert (stage.num_gens, stage.alpha, stage.progressive_alignment, stage.alignment_t_min, stage.mu) == \
        (6, 3.0, True, 0.5, 2)


def test_crest_run_resumes_exactly_across_a_generation_boundary(tmp_path):
    """Long-tailed digits (461 unlabeled images, 64 a step), 12 steps in 3 generations (boundaries at steps 4 and 8),
    a checkpoint every 3 steps: a run stopped after 8 steps and resumed from its step-6 checkpoint (bank, choice of
    step 4, alignment restored) crosses the step-8 boundary and repeats the uninterrupted run. From step 8 the second
    pass over the unlabeled set meets images chosen before, which then train as labeled."""
    stage = tiny_stage("c", "crest", data=LONG_TAIL, num_gens=3, threshold=0.5,
                       train={"steps": 12, "batch_size": 32, "checkpoint_every_steps": 3})
    recipe = validate_recipe({"seed": 0, "name": "crest", "stages": [stage]})
    reference, resumed = interrupted_then_resumed(recipe, tmp_path, crash_step=8)

    def steps(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: (row["loss"], row.get("crest_generation"), row.get("chosen_rows"))
                for row in rows if row.get("kind") == "step"}

    a, b = steps("a"), steps("b")
    assert a == b and all(math.isfinite(loss) for loss, _, _ in a.values())
    assert [generation for _, (_, generation, _) in sorted(a.items())] == [0.0] * 4 + [1.0] * 4 + [2.0] * 4
    assert all(rows == 0 for step, (_, _, rows) in a.items() if step <= 4)
    assert all(rows > 0 for step, (_, _, rows) in a.items() if step > 8)
    drop = ("c/train_seconds", "c/images_per_s")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in reference.items() if k not in drop}
