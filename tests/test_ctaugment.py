"""CTAugment (ReMixMatch, Berthelot et al. 2020; google-research/remixmatch libml/ctaugment.py): the weight update
equals the reference's update_rates applied image by image and a hand-computed example; training draws only
segments next to a bin above the threshold (the largest weight always passes); `apply` with a fixed choice is the
single ops by hand; under two ranks the gathered update leaves identical weights; ReMixMatch with
`augment: ctaugment` trains on its defaults and moves the weights, resumes exactly, and the default leaves its
strong views and checkpoint keys as before; a bad `augment` is named."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_semi_method, interrupted_then_resumed, semi_batch, tiny_stage
from ssl_kit.config import validate_recipe
from ssl_kit.data.ctaugment import CTA_OPS, OP_FUNCTIONS, OP_NAMES, CTAChoice, CTAugment
from ssl_kit.errors import ConfigError
from ssl_kit.methods.base import Progress
from tests.test_distributed import _set_env, spawn_ranks

OP = {name: i for i, name in enumerate(OP_NAMES)}
SEMI = dict(data={"dataset": "digits", "image_size": 16, "labels_per_class": 4},
            train={"steps": 3, "batch_size": 8, "ema_decay": 0.9, "log_every": 1})


def _reference_update(rates: dict, choice: CTAChoice, probs, labels, decay=0.99) -> None:
    """The reference's loop (cta/lib/train.py train_step + update_rates) on python lists, in place."""
    for p in range(probs.shape[0]):
        error = [float(v) for v in probs[p]]
        error[int(labels[p])] -= 1
        accuracy = 1 - 0.5 * sum(abs(e) for e in error)
        for d in range(choice.ops.shape[1]):
            name = OP_NAMES[int(choice.ops[p, d])]
            for k, rate in enumerate(rates[name]):
                b = int(float(choice.values[p, d, k]) * len(rate) * 0.999)
                rate[b] = rate[b] * decay + accuracy * (1 - decay)


def _as_tensor(rates: dict) -> torch.Tensor:
    out = torch.ones(len(CTA_OPS), 2, 17, dtype=torch.float64)
    for i, (name, _) in enumerate(CTA_OPS):
        for k, rate in enumerate(rates[name]):
            out[i, k, :len(rate)] = torch.tensor(rate, dtype=torch.float64)
    return out


# ------------------------------------------------------------------------------------------------ update
def test_update_is_the_hand_computed_formula_bin_by_bin_in_order():
    cta = CTAugment()
    # image 0: brightness 0.5 (bin int(0.5·17·0.999) = 8), rescale (0.0 -> bin 0, 1.0 -> filter bin 5)
    # image 1: brightness 0.5 again (the same bin, updated after image 0), posterize 1.0 (8 bins -> bin 7)
    choice = CTAChoice(torch.tensor([[OP["brightness"], OP["rescale"]], [OP["brightness"], OP["posterize"]]]),
                       torch.tensor([[[0.5, 0.3], [0.0, 1.0]], [[0.5, 0.9], [1.0, 0.2]]]))
    probs, labels = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]), torch.tensor([0, 2])
    scores = cta.update(choice, probs, labels)
    s0, s1 = 1 - 0.5 * (0.3 + 0.2 + 0.1), 1 - 0.5 * (0.1 + 0.6 + 0.7)  # 0.7, 0.3
    torch.testing.assert_close(scores, torch.tensor([s0, s1]))
    rates = cta.rates
    torch.testing.assert_close(rates[OP["brightness"], 0, 8], torch.tensor((0.99 + 0.01 * s0) * 0.99 + 0.01 * s1))
    torch.testing.assert_close(rates[OP["rescale"], 0, 0], torch.tensor(0.99 + 0.01 * s0))
    torch.testing.assert_close(rates[OP["rescale"], 1, 5], torch.tensor(0.99 + 0.01 * s0))
    torch.testing.assert_close(rates[OP["posterize"], 0, 7], torch.tensor(0.99 + 0.01 * s1))
    assert int((rates != 1).sum()) == 4  # nothing else moved, and brightness's second slot is not a parameter


def test_update_equals_the_reference_loop_on_random_probes():
    torch.manual_seed(0)
    cta = CTAugment()
    rates = {name: [[1.0] * n for n in bins] for name, bins in CTA_OPS}
    for _ in range(3):
        choice = cta.probe(64)
        choice.values[:5] = 0.5  # many hits on the same bins
        probs, labels = torch.softmax(torch.randn(64, 10) * 3, dim=1), torch.randint(0, 10, (64,))
        cta.update(choice, probs, labels)
        _reference_update(rates, choice, probs, labels)
    torch.testing.assert_close(cta.rates.double(), _as_tensor(rates), atol=1e-6, rtol=0)
    assert (cta.rates != 1).any()


# ------------------------------------------------------------------------------------------------ sampling
def _brightness_values(cta: CTAugment, n: int = 4000) -> torch.Tensor:
    choice = cta.sample(n)
    return torch.cat([choice.values[:, d, 0][choice.ops[:, d] == OP["brightness"]] for d in range(cta.depth)])


def test_sampling_draws_only_segments_next_to_a_bin_above_the_threshold():
    torch.manual_seed(0)
    cta = CTAugment()
    everything = _brightness_values(cta)
    assert everything.min() < 0.05 and everything.max() > 0.95  # equal weights: every segment
    cta.rates[OP["brightness"], 0] = 0.5
    cta.rates[OP["brightness"], 0, 5] = 1.0  # p = 0.51 / 1.01 < 0.8 elsewhere: only bin 5 passes
    values = _brightness_values(cta)
    assert values.numel() > 100 and values.min() >= 4 / 16 and values.max() <= 6 / 16
    p = cta.bin_probabilities()[OP["brightness"], 0]
    assert p[5] == 1 and int((p > 0).sum()) == 1


def test_sampling_falls_back_to_the_largest_weight_when_every_weight_is_low():
    torch.manual_seed(1)
    cta = CTAugment()
    cta.rates[OP["brightness"], 0] = 0.05
    cta.rates[OP["brightness"], 0, 12] = 0.1  # all far below 0.8; (0.1 + 0.01) / max = 1 keeps bin 12 alone
    values = _brightness_values(cta)
    assert values.numel() > 100 and values.min() >= 11 / 16 and values.max() <= 13 / 16
    posterize = cta.sample(4000)
    rows = posterize.ops[:, 0] == OP["posterize"]
    assert posterize.values[rows, 0, 0].max() <= 1 and int((posterize.values[rows, 0, 0] * 8 * 0.999).max()) <= 7


# ------------------------------------------------------------------------------------------------ apply
def test_apply_with_a_fixed_choice_is_each_op_by_hand():
    torch.manual_seed(2)
    x = torch.rand(4, 3, 10, 10)
    choice = CTAChoice(torch.tensor([[OP["brightness"], OP["identity"]], [OP["invert"], OP["solarize"]],
                                     [OP["translate_x"], OP["identity"]], [OP["identity"], OP["identity"]]]),
                       torch.tensor([[[0.25, 0.0], [0.7, 0.0]], [[0.4, 0.0], [0.5, 0.0]],
                                     [[1.0, 0.0], [0.3, 0.0]], [[0.9, 0.0], [0.1, 0.0]]]))
    out = CTAugment.apply(x, choice)
    torch.testing.assert_close(out[0], (x[0] * (0.1 + 1.9 * 0.25)).clamp(0, 1))  # ImageEnhance.Brightness
    inverted = 0.6 * x[1] + 0.4 * (1 - x[1])  # Image.blend(x, invert(x), 0.4)
    threshold = math.floor(0.5 * 255.999) / 255
    torch.testing.assert_close(out[1], torch.where(inverted >= threshold, 1 - inverted, inverted))
    shifted = torch.zeros_like(x[2])
    shifted[..., :7] = x[2, ..., 3:]  # (2·1 − 1) · 30% of 10 px = 3 px, black fill
    torch.testing.assert_close(out[2], shifted, atol=1e-5, rtol=0)
    assert torch.equal(out[3], x[3])
    for name in OP_NAMES:  # every op keeps the shape and the range
        y = OP_FUNCTIONS[name](x, torch.full((4,), 0.8), torch.full((4,), 0.4))
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1, name


# ------------------------------------------------------------------------------------------------ two ranks
def _update_worker(rank, world, port, out_dir):
    _set_env(rank, world, port)
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        torch.manual_seed(10 + rank)  # each rank its own probes
        cta = CTAugment()
        choice = cta.probe(16)
        probs, labels = torch.softmax(torch.randn(16, 10), dim=1), torch.randint(0, 10, (16,))
        cta.update_gathered(choice, probs, labels)
        torch.save({"rates": cta.rates, "choice": (choice.ops, choice.values), "probs": probs, "labels": labels},
                   out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_apply_the_same_gathered_update(tmp_path):
    ranks = spawn_ranks(_update_worker, 2, tmp_path)
    assert torch.equal(ranks[0]["rates"], ranks[1]["rates"])
    single = CTAugment()
    single.update(CTAChoice(torch.cat([r["choice"][0] for r in ranks]), torch.cat([r["choice"][1] for r in ranks])),
                  torch.cat([r["probs"] for r in ranks]), torch.cat([r["labels"] for r in ranks]))
    assert torch.equal(single.rates, ranks[0]["rates"])


# ------------------------------------------------------------------------------------------------ ReMixMatch
def test_remixmatch_with_ctaugment_trains_and_moves_the_weights():
    method, data = build_semi_method(tiny_stage("r", "remixmatch", augment="ctaugment", **SEMI))
    method.train()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.03, momentum=0.9)
    for step in range(3):
        torch.manual_seed(step)
        out = method.training_step(semi_batch(data, 8, 1), Progress(step=step, total_steps=16, epoch=0,
                                                                   steps_per_epoch=16))
        assert math.isfinite(out["loss"].item()) and 0 <= float(out["cta_probe_score"]) <= 1
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert method.training  # the probe's eval mode is undone
    moved = method.ctaugment.rates != 1
    assert 0 < int(moved.sum()) <= 3 * 8 * 2 * 2  # 3 steps × 8 probes × 2 ops × ≤ 2 parameters
    state = {key: value.clone() for key, value in method.state_dict().items()}
    assert "ctaugment.rates" in state and "ctaugment.bin_counts" not in state
    method.ctaugment.rates.fill_(1)
    method.load_state_dict(state)
    assert int((method.ctaugment.rates != 1).sum()) == int(moved.sum())


def test_remixmatch_with_ctaugment_resumes_exactly(tmp_path):
    stage = tiny_stage("r", "remixmatch", augment="ctaugment", data=SEMI["data"],
                       train={"steps": 6, "batch_size": 8, "checkpoint_every_steps": 2})
    recipe = validate_recipe({"seed": 0, "name": "r", "stages": [stage]})
    reference, resumed = interrupted_then_resumed(recipe, tmp_path, crash_step=5)

    def steps(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: (row["loss"], row["cta_probe_score"]) for row in rows if row.get("kind") == "step"}

    a, b = steps("a"), steps("b")
    assert len(a) == 6 and a == b and all(math.isfinite(loss) for loss, _ in a.values())
    rates = [torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=False)["method"]["ctaugment.rates"]
             for run in ("a", "b")]
    assert torch.equal(rates[0], rates[1]) and (rates[0] != 1).any()  # the weights came back from the checkpoint
    drop = ("r/train_seconds", "r/images_per_s")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in reference.items() if k not in drop}


def test_default_augment_keeps_the_strong_view_and_the_checkpoint_keys():
    method, data = build_semi_method(tiny_stage("r", "remixmatch", **SEMI))
    assert method.cfg.augment == "randaugment" and method.ctaugment is None
    assert not any("ctaugment" in key for key in method.state_dict())
    u = semi_batch(data, 8, 1).u
    torch.manual_seed(3)
    ours = method.augmented_view(u)
    torch.manual_seed(3)
    assert torch.equal(ours, method.strong_view(u))


def test_a_bad_augment_is_named():
    with pytest.raises(ConfigError, match=r"stages\[r\]\.augment: .*'randaugment' or 'ctaugment'"):
        validate_recipe({"stages": [tiny_stage("r", "remixmatch", augment="autoaugment")]})
