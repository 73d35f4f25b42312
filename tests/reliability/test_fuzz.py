"""Property-based fuzzing of what users type: config overrides and dataset spec strings are either accepted or
rejected with an ssl_kit error (a clear message), never an unhandled exception."""
from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ssl_kit.cli import bundled_recipe_dir
from ssl_kit.recipe_files import load_recipe
from ssl_kit.data.specs import parse_spec
from ssl_kit.errors import SslKitError

QUICKSTART = bundled_recipe_dir() / "quickstart.yaml"
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


# ------------------------------------------------------------------------- issue 18: new hostile input kinds
YAML_TOKENS = st.sampled_from([
    "seed: 1\n", "stages:\n", "- name: s\n", "  method: supervised\n", "  backbone: {name: small_cnn, kwargs: ", "}\n",
    "&a ", "*a", "&b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]", "[", "]", "{", "}", ", ", ": ", "<<: *a\n",
    "!!python/object/apply:os.system ['echo pwned']\n", "!!binary AAAA\n", "- ", "\t", "'", '"', "? ", "--- \n",
    "name: ../../x\n", "data: {root: 'a,download=true'}\n", "seed: -1\n", "seed: .nan\n", "1e400", "0x10", "~"])
RECIPE_TEXT = st.one_of(st.lists(YAML_TOKENS, max_size=25).map("".join), st.text(max_size=200))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(RECIPE_TEXT)
def test_recipe_yaml_text_is_loaded_or_rejected_clearly(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", errors="replace"))
    try:
        load_recipe(path)
    except SslKitError as exc:
        assert str(exc).strip() and len(str(exc)) < 20_000


def _backbone_bytes() -> bytes:
    import io

    import torch

    from ssl_kit.engine.checkpoint import backbone_record
    from ssl_kit.models.cnn import SmallCNN

    net = SmallCNN(1, width=2)
    record = backbone_record("small_cnn", {"width": 2}, {"channels": 1, "image_size": 8, "mean": [0.5], "std": [0.2],
                                                         "dataset": "digits", "classes": [], "num_classes": 10},
                             net, torch.nn.Linear(8, 10))
    buffer = io.BytesIO()
    torch.save(record, buffer)
    return buffer.getvalue()


GOOD_CHECKPOINT = _backbone_bytes()
MUTATION = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, len(GOOD_CHECKPOINT))),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, len(GOOD_CHECKPOINT) - 1), st.integers(0, 255)),
                                        min_size=1, max_size=20)),
    st.tuples(st.just("random"), st.binary(max_size=2000)))


def _mutate(mutation) -> bytes:
    kind, arg = mutation
    if kind == "truncate":
        return GOOD_CHECKPOINT[:arg]
    if kind == "random":
        return arg
    data = bytearray(GOOD_CHECKPOINT)
    for index, value in arg:
        data[index] = value
    return bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(MUTATION)
def test_corrupt_checkpoint_bytes_load_or_fail_clearly(tmp_path, mutation):
    from ssl_kit.engine.checkpoint import build_from_record, resolve_checkpoint

    path = tmp_path / "fuzz.pt"
    path.write_bytes(_mutate(mutation))
    try:
        build_from_record(resolve_checkpoint(path, "--checkpoint"))
    except SslKitError as exc:
        assert "weights_only=False" not in str(exc) and "weights_only` set to `False" not in str(exc)


CRAFTED_FIELDS = st.fixed_dictionaries({}, optional={
    "arch": st.one_of(st.sampled_from(["small_cnn", "resnet18", "vit_tiny", "nope"]), st.integers(), st.none()),
    "kwargs": st.one_of(st.dictionaries(st.sampled_from(["width", "depth", "patch_size", "dim", "heads", "norm"]),
                                        st.one_of(st.integers(-2**40, 2**40), st.floats(), st.text(max_size=5),
                                                  st.none()), max_size=3), st.integers(), st.text(max_size=5)),
    "data": st.one_of(st.fixed_dictionaries({}, optional={
        "channels": st.one_of(st.integers(-5, 10**9), st.text(max_size=3)),
        "image_size": st.one_of(st.integers(-5, 10**12), st.floats()),
        "mean": st.lists(st.floats(), max_size=4), "std": st.lists(st.floats(), max_size=4)}), st.none()),
    "state_dict": st.one_of(st.just("weights"), st.dictionaries(st.text(max_size=8), st.integers(), max_size=2)),
    "head": st.one_of(st.none(), st.fixed_dictionaries({"num_classes": st.integers(-3, 10**7)})),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(CRAFTED_FIELDS, st.sampled_from(["ssl_kit.backbone", "ssl_kit.checkpoint", "other"]))
def test_crafted_checkpoint_fields_fail_clearly(tmp_path, fields, kind):
    import torch

    from ssl_kit.engine.checkpoint import build_from_record, resolve_checkpoint

    record = dict(fields)
    if record.get("state_dict") == "weights":
        record["state_dict"] = torch.load(__import__("io").BytesIO(GOOD_CHECKPOINT), weights_only=True)["state_dict"]
    if kind == "ssl_kit.checkpoint":
        record = {"format": kind, "backbone": {k: v for k, v in record.items() if k != "state_dict"},
                  "method": {f"backbone.{k}": v for k, v in (record.get("state_dict") or {}).items()}
                  if isinstance(record.get("state_dict"), dict) else record.get("state_dict")}
    else:
        record["format"] = kind
    torch.save(record, tmp_path / "crafted.pt")
    try:
        build_from_record(resolve_checkpoint(tmp_path / "crafted.pt", "--checkpoint"))
    except SslKitError as exc:
        assert str(exc).strip()


IDX_HEADER = st.tuples(st.sampled_from([0, 1]), st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07, 0xFF]),
                       st.lists(st.integers(0, 2**32 - 1), max_size=4) | st.lists(st.integers(0, 4), max_size=4),
                       st.integers(0, 300), st.booleans())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(IDX_HEADER)
@example((0, 8, [0, 722, 5382549, 2_373_365_020], 0, False))  # found by this test: numpy cannot shape it even empty
def test_idx_headers_are_read_or_rejected_clearly(tmp_path, header):
    import gzip
    import math
    import struct

    from ssl_kit.data.formats import read_idx

    magic, code, dims, payload, compress = header
    data = bytes([0, magic, code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + bytes(payload)
    path = tmp_path / ("f.gz" if compress else "f")
    path.write_bytes(gzip.compress(data) if compress else data)
    try:
        array = read_idx(path)
    except SslKitError as exc:
        assert str(exc).strip()
    else:
        assert array.shape == tuple(dims) and array.nbytes == payload and math.prod(dims) * array.itemsize == payload
