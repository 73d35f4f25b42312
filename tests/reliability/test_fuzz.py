"""Property-based fuzzing of what users type: config overrides and dataset spec strings are either accepted or
rejected with an ssl_kit error (a clear message), never an unhandled exception."""
from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssl_kit.config import load_recipe
from ssl_kit.data.specs import parse_spec
from ssl_kit.errors import SslKitError

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
KEYS = ["seed", "name", "wandb.mode", "pretrain.temperature", "pretrain.train.epochs", "pretrain.views.crop_scale",
        "fixmatch.threshold", "fixmatch.mu", "fixmatch.data.labels_per_class", "fixmatch.optimizer.name",
        "fixmatch.train.precision", "knn.k", "transfer.targets", "transfer.corruptions", "linear_probe.epochs",
        "fixmatch.threshold_policy.policy", "pretrain.backbone.kwargs.width", "nostage.x", "pretrain", ""]
VALUES = st.one_of(
    st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["true", "null", "[]", "[1, 2]", "{a: 1}", "sgd", "lars", "bf16", "digits", "'", ": :", "[", "{"]),
    st.text(max_size=12))
KEY = st.one_of(st.sampled_from(KEYS), st.text(alphabet="abcdefghijklmnopqrstuvwxyz._[]0123456789", max_size=20))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(KEY, VALUES), min_size=1, max_size=3), st.booleans())
def test_overrides_are_accepted_or_rejected_clearly(pairs, with_equals):
    overrides = [f"{key}={value}" if with_equals else f"{key}{value}" for key, value in pairs]
    try:
        load_recipe(QUICKSTART, overrides)
    except SslKitError as exc:
        assert str(exc).strip()


SPEC_NAMES = st.sampled_from(["digits", "digits-printed", "digits-rotated", "fashion-mnist", "mnist", "cifar10",
                              "cifar100", "svhn", "stl10", "imagefolder", "imagenet", ""])
SPEC_TEXT = st.one_of(
    st.tuples(SPEC_NAMES, st.sampled_from(["", ":", ":45", ":abc", ":/nonexistent", ":-1e9", ":nan"]),
              st.lists(st.sampled_from(["download=true", "download=maybe", "per_font=3", "per_font=-1", "seed=x",
                                        "test_fraction=0.5", "test_fraction=2", "limit=3", "=", "a"]), max_size=2))
    .map(lambda t: t[0] + t[1] + "".join("," + o for o in t[2])),
    st.text(max_size=30))


@settings(max_examples=400, deadline=None)
@given(SPEC_TEXT)
def test_dataset_specs_are_parsed_or_rejected_clearly(spec):
    try:
        parse_spec(spec)
    except SslKitError as exc:
        assert str(exc).strip()
