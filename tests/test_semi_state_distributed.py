"""The cross-rank state of the semi-supervised methods under two gloo processes, each holding half of a global batch,
against one process updating on the whole batch: FlexMatch's learning status, FreeMatch's global/class thresholds
and label histogram, SoftMatch's mean and (unbiased) variance, AdaMatch's relative cut-off, distribution alignment's
running means (uniform and labeled targets), ReMixMatch's prediction history and CTAugment's bin rates, the
alignment queue of SimMatch and CoMatch, CoMatch's (and EPASS's) memory bank, and ACR's unlabeled estimate.

The end-to-end DDP equality test (`test_ddp_equality.py`) cannot see these: after 3 steps from random weights every
image is predicted as one class with nearly one confidence, so local and global statistics give the same masks.
Here the probabilities are drawn to differ between the two halves (rank 1 is more confident and prefers other
classes), so a policy that updated from its own rank's half only would fail every comparison."""
from types import SimpleNamespace

import pytest
import torch

from ssl_kit.data.ctaugment import CTA_OPS, MAX_PARAMS, CTAChoice, CTAugment
from ssl_kit.methods.acr import ACR
from ssl_kit.methods.comatch import CoMatch
from ssl_kit.methods.remixmatch import PredictionHistory
from ssl_kit.methods.simmatch import AlignmentQueue
from ssl_kit.methods.thresholds import (DistributionAlignment, FlexMatchThreshold, FreeMatchThreshold,
                                        RelativeThreshold, SoftMatchWeights)
from tests.test_distributed import _set_env, spawn_ranks

pytestmark = pytest.mark.slow  # spawns 2 processes

WORLD, N, K, STEPS = 2, 6, 4, 3  # each rank holds N rows of each step's global batch of WORLD·N; K classes
PRIOR = (0.4, 0.3, 0.2, 0.1)  # a long-tailed labeled class distribution (ACR's π, ReMixMatch's alignment target)


def global_batches() -> list[dict]:
    """STEPS global batches (identical in every process), WORLD·N rows each: unlabeled probs (·, K), their dataset
    indices, labeled probs (·, K) and labels, unit embeddings (·, 3), CTAugment probe ops (·, 2) and values
    (·, 2, MAX_PARAMS). Rank 1's probs are sharper and shifted towards classes 2, 3, so the halves' statistics
    differ."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for step in range(STEPS):
        logits = torch.randn(WORLD * N, K, generator=g)
        logits[N:] = 3 * logits[N:] + torch.tensor([0.0, 0.0, 2.0, 2.0])
        labeled = torch.randn(WORLD * N, K, generator=g)
        labeled[N:] *= 3
        batches.append({"probs": logits.softmax(1), "index": torch.arange(WORLD * N) + step * WORLD * N,
                        "labeled": labeled.softmax(1), "labels": torch.randint(K, (WORLD * N,), generator=g),
                        "embeddings": torch.nn.functional.normalize(torch.randn(WORLD * N, 3, generator=g), dim=1),
                        "cta_ops": torch.randint(len(CTA_OPS), (WORLD * N, 2), generator=g),
                        "cta_values": torch.rand(WORLD * N, 2, MAX_PARAMS, generator=g)})
    return batches


def rows(x, rank):
    return x if rank is None else x[rank * N:(rank + 1) * N]


def policies() -> dict:
    return {"flexmatch": FlexMatchThreshold(0.6, K, num_unlabeled=STEPS * WORLD * N),
            "freematch": FreeMatchThreshold(K, ema=0.7), "softmatch": SoftMatchWeights(K, ema=0.7),
            "relative": RelativeThreshold(0.9, K)}


def acr_stand_in():
    """What `ACR.estimate` reads and writes: its buffers, ema_u and the class count (labeled prior π long-tailed)."""
    return SimpleNamespace(info=SimpleNamespace(num_classes=K), cfg=SimpleNamespace(ema_u=0.7),
                           labeled_prior=torch.tensor(PRIOR),
                           unlabeled_estimate=torch.full((K,), 1.0 / K), distance_sum=torch.zeros(3),
                           distance_steps=torch.zeros(()))


def comatch_bank_stand_in(size: int = 16):
    """What `CoMatch.update_bank` writes: a ring buffer of `size` rows (smaller than STEPS · WORLD · N: it wraps)."""
    return SimpleNamespace(bank_embeddings=torch.zeros(size, 3), bank_probs=torch.zeros(size, K),
                           bank_pointer=torch.zeros((), dtype=torch.long), bank_full=torch.zeros((), dtype=torch.bool))


def run_updates(rank=None) -> dict:
    """Every compared state after STEPS updates with rank `rank`'s rows (None: the whole batch in one process);
    the alignments' outputs of the last step too (rank's rows)."""
    found, aligners = policies(), {"uniform": DistributionAlignment(K, 0.7),
                                   "labeled": DistributionAlignment(K, 0.7, follow_labeled=True),
                                   "remixmatch": PredictionHistory(torch.tensor(PRIOR), length=2),
                                   "queue": AlignmentQueue(K, length=2)}
    acr, bank, cta, aligned = acr_stand_in(), comatch_bank_stand_in(), CTAugment(decay=0.9), {}
    for batch in global_batches():
        probs, index, labeled = rows(batch["probs"], rank), rows(batch["index"], rank), rows(batch["labeled"], rank)
        for policy in found.values():
            policy.observe_labeled(labeled)
            policy.update(probs, index)
        for name, aligner in aligners.items():
            getattr(aligner, "observe_labeled", lambda p: None)(labeled)
            aligned[name] = aligner(probs)
        ACR.estimate(acr, probs.argmax(dim=1), probs.max(dim=1).values >= 0.5)
        CoMatch.update_bank(bank, rows(batch["embeddings"], rank), probs)
        cta.update_gathered(CTAChoice(rows(batch["cta_ops"], rank), rows(batch["cta_values"], rank)), probs,
                            rows(batch["labels"], rank))
    state = {name: {k: v.clone() for k, v in policy.state_dict().items()} for name, policy in found.items()}
    state.update({f"align_{name}": {**{k: v.clone() for k, v in a.state_dict().items()}, "out": aligned[name]}
                  for name, a in aligners.items()})
    state["comatch_bank"] = {k: v.clone() for k, v in vars(bank).items()}
    state["ctaugment"] = {"rates": cta.rates.clone()}
    state["acr"] = {"unlabeled_estimate": acr.unlabeled_estimate, "distance_sum": acr.distance_sum,
                    "distance_steps": acr.distance_steps}
    return state


def _worker(rank, world, port, out_dir):
    _set_env(rank, world, port)
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        torch.save(run_updates(rank), out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("semi_state_ddp"))


NAMES = ["flexmatch", "freematch", "softmatch", "relative", "align_uniform", "align_labeled", "align_remixmatch",
         "align_queue", "acr", "comatch_bank", "ctaugment"]


@pytest.mark.parametrize("name", NAMES)
def test_state_after_updates_equals_one_process_on_the_global_batch(ranks, name):
    single = run_updates()[name]
    for rank, result in enumerate(ranks):
        for key, expected in single.items():
            got = result[name][key]
            if key == "out":  # each rank aligns its own rows, with the global running means
                expected = rows(expected, rank)
            assert torch.allclose(got.float(), expected.float(), atol=1e-6), (name, key, rank, got, expected)


@pytest.mark.parametrize("name", NAMES)
def test_the_halves_alone_would_give_another_state(name):
    """The comparison above can fail: updating from rank 0's rows only changes every compared state."""
    single, half = run_updates()[name], run_updates(rank=0)[name]
    changed = [key for key in single if key != "out" and not torch.allclose(single[key].float(),
                                                                            half[key].float(), atol=1e-6)]
    assert changed, name
