"""The attentive probe (CAPI's): its stacked, reordered forward equals CAPI's AttnPoolClassifier computed as CAPI
computes it, in values and gradients; its optimizer equals torch's AdamW with the same schedule, slice by slice; it
learns what a mean-pooled linear probe cannot see; and it is reachable as a command and a recipe stage, with misuse
refused by name (a CNN before training, n_last_blocks, a streamed source)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from conftest import saved_vit

from ssl_kit.cli import main as cli_main
from ssl_kit.config import validate_recipe
from ssl_kit.errors import ConfigError, DataError
from ssl_kit.eval.attentive_probe import (AttentiveGrid, GridAdamW, WARMUP_FRACTION, attentive_probe,
                                          fit_attentive_grid, probe_heads)
from ssl_kit.eval.features import FeatureExtractor
from ssl_kit.eval.linear_probe import linear_probe
from ssl_kit.eval.mapped import is_mapped
from ssl_kit.eval.vit_readout import PatchTokens
from ssl_kit.models.registry import build_backbone

DATA = {"channels": 1, "image_size": 16, "mean": [0.5], "std": [0.25]}
KWARGS = {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2}


def capi_attn_pool(model: AttentiveGrid, g: int, tokens: torch.Tensor) -> torch.Tensor:
    """CAPI's AttnPoolClassifier.forward for grid point g, written as CAPI writes it (keys and values formed, the
    key bias included, scaled_dot_product_attention), on the tokens standardised by the model's buffers."""
    x = (tokens - model.mean) / model.std
    b, n, d = x.shape
    heads = model.heads
    q = model.query[g].expand(b, 1, -1).reshape(b, 1, heads, d // heads).permute(0, 2, 1, 3)
    kv = (x @ model.kv_weight[g].T + model.kv_bias[g]).reshape(b, n, 2, heads, d // heads).permute(2, 0, 3, 1, 4)
    k, v = torch.unbind(kv, dim=0)
    pooled = F.scaled_dot_product_attention(q, k, v).reshape(b, d)
    return pooled @ model.weight[g].T + model.bias[g]


def test_heads_follow_capi_and_divide_the_width():
    assert [probe_heads(d) for d in (96, 128, 192, 384, 768, 100, 32)] == [1, 2, 3, 6, 12, 1, 1]


@pytest.mark.parametrize("dim", [128, 96])
def test_the_grid_equals_capi_attn_pool_in_values_and_gradients(dim):
    torch.manual_seed(0)
    model = AttentiveGrid(3, dim, 5, torch.Generator().manual_seed(1))
    with torch.no_grad():  # biases and standardisation away from their neutral starts, so that each must cancel
        model.kv_bias.normal_()
        model.bias.normal_()
        model.mean.normal_()
        model.std.uniform_(0.5, 2.0)
    tokens, labels = torch.randn(6, 9, dim), torch.randint(0, 5, (6,))
    got = model(tokens)
    assert got.shape == (3, 6, 5)
    for g in range(3):
        expected = capi_attn_pool(model, g, tokens)
        torch.testing.assert_close(got[g], expected, rtol=1e-5, atol=1e-5)
        params = [model.query, model.kv_weight, model.kv_bias, model.weight, model.bias]
        ours = torch.autograd.grad(F.cross_entropy(model(tokens)[g], labels), params)
        theirs = torch.autograd.grad(F.cross_entropy(capi_attn_pool(model, g, tokens), labels), params)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a[g], b[g], rtol=1e-4, atol=1e-6)
            assert torch.count_nonzero(a[[i for i in range(3) if i != g]]) == 0  # the other probes are untouched


def test_grid_adamw_slices_follow_torch_adamw_with_the_same_schedule():
    torch.manual_seed(0)
    lrs, decays, steps = torch.tensor([1e-2, 3e-3]), torch.tensor([0.05, 0.0]), 20
    weight = torch.nn.Parameter(torch.randn(2, 4, 3))
    bias = torch.nn.Parameter(torch.randn(2, 4))
    optimizer = GridAdamW([weight, bias], [weight], lrs, decays, steps)
    references = []
    for g in range(2):
        w, b = torch.nn.Parameter(weight[g].detach().clone()), torch.nn.Parameter(bias[g].detach().clone())
        opt = torch.optim.AdamW([{"params": [w], "weight_decay": float(decays[g])},
                                 {"params": [b], "weight_decay": 0.0}], lr=float(lrs[g]), betas=(0.9, 0.95), eps=1e-8)
        warmup = round(WARMUP_FRACTION * steps)
        factor = lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) /  # noqa
                                                                                    (steps - warmup)))
        references.append((w, b, opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)))
    for step in range(steps):
        target = torch.randn(4, 3)
        ((weight - target) ** 2).sum().backward()
        (bias ** 3).sum().backward()
        optimizer.step()
        for w, b, opt, schedule in references:
            ((w - target) ** 2).sum().backward()
            (b ** 3).sum().backward()
            opt.step()
            opt.zero_grad()
            schedule.step()
    for g, (w, b, _, _) in enumerate(references):
        torch.testing.assert_close(weight[g], w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bias[g], b, rtol=1e-5, atol=1e-6)


def hidden_token_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (n, 16, 8) of noise; the class (of 4) is written into one token at a random position, on channels
    that carry a large noise everywhere else: the mean over the tokens dilutes it 16-fold into that noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=generator)
    tokens = torch.randn(n, 16, 8, generator=generator)
    tokens[:, :, :4] *= 4.0
    position = torch.randint(0, 16, (n,), generator=generator)
    tokens[torch.arange(n), position, :4] = 6.0 * F.one_hot(labels, 4).float()
    tokens[torch.arange(n), position, 4] = 12.0  # the marker the query can attend to
    return tokens, labels


def test_it_finds_the_one_token_that_carries_the_class_and_the_mean_does_not():
    train_x, train_y = hidden_token_data(400, 0)
    test_x, test_y = hidden_token_data(200, 1)
    attentive = attentive_probe(train_x.flatten(1), train_y, test_x.flatten(1), test_y, 4, 8, epochs=30, seed=0)
    linear = linear_probe(train_x.mean(1), train_y, test_x.mean(1), test_y, 4, epochs=30, seed=0)
    assert attentive["top1"] > 0.95, attentive
    assert linear["top1"] < 0.6, linear["top1"]
    assert attentive["train_size"] == 400 and attentive["heads"] == 1
    few = attentive_probe(train_x.flatten(1), train_y, test_x.flatten(1), test_y, 4, 8, epochs=2,
                          labels_per_class=3, seed=0)
    assert few["train_size"] == 12


def test_the_same_seed_gives_the_same_probe_from_float32_or_float16_tokens():
    x, y = hidden_token_data(64, 0)
    a = fit_attentive_grid(x.flatten(1), y, 8, 4, [(1e-2, 5e-4), (1e-1, 0.0)], epochs=3, seed=5)
    b = fit_attentive_grid(x.flatten(1).half(), y, 8, 4, [(1e-2, 5e-4), (1e-1, 0.0)], epochs=3, seed=5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=5e-3)  # the float16 rounding of the tokens only


def vit_backbone(tmp_path):
    return saved_vit(tmp_path / "backbone.pt", KWARGS, DATA)


def test_patch_tokens_are_the_last_block_normalised_without_cls_and_registers():
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 1, 16, dict(KWARGS, num_registers=2)).eval()
    with torch.no_grad():
        model.reg_token.normal_()
        x = torch.randn(3, 1, 16, 16)
        tokens = PatchTokens(model)(x)
        h = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(3, -1, -1),
                       model.reg_token.expand(3, -1, -1), model.embed(x)], dim=1)
        for block in model.blocks:
            h = block(h)
        torch.testing.assert_close(tokens, model.norm(h)[:, 3:], rtol=1e-5, atol=1e-5)
    assert tokens.shape == (3, 16, 32)
    cnn = build_backbone("small_cnn", 1, 16, {"width": 4})
    cnn.arch = "small_cnn"
    with pytest.raises(ConfigError, match="the attentive probe pools a ViT's block outputs; backbone 'small_cnn'"):
        PatchTokens(cnn)


def test_the_command_probes_a_vit_checkpoint(tmp_path, capsys):
    checkpoint = vit_backbone(tmp_path)
    args = ["attentive-probe", "--checkpoint", str(checkpoint), "--data", "digits", "--labels-per-class", "4",
            "--epochs", "3", "--device", "cpu", "--json"]
    assert cli_main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert 0.1 < first["top1"] <= 1.0 and first["train_size"] == 40 and first["heads"] == 1
    assert "val_top1" in first and first["chosen_lr"] > 0
    assert cli_main(args) == 0
    assert json.loads(capsys.readouterr().out) == first  # seeded: the same numbers again
    assert cli_main(args + ["--no-sweep"]) == 0
    assert json.loads(capsys.readouterr().out)["chosen_lr"] == 1e-3
    assert cli_main(["attentive-probe", "--checkpoint", str(checkpoint), "--data", "digits", "--avgpool"]) == 2
    assert "unrecognized arguments: --avgpool" in capsys.readouterr().err


def test_recipe_stage_after_a_vit_pretrain_and_refusals(tmp_path, monkeypatch):
    from ssl_kit.runner import run_recipe

    def recipe(backbone: dict, **keys):
        return validate_recipe({"seed": 0, "stages": [
            {"name": "pretrain", "method": "simclr", "data": {"dataset": "digits", "image_size": 16},
             "backbone": backbone, "train": {"steps": 2, "batch_size": 32, "device": "cpu"}},
            {"name": "attn", "method": "attentive_probe", "labels_per_class": 4, "epochs": 2, **keys}]}, "test")

    cnn = {"name": "small_cnn", "kwargs": {"width": 4}}
    with pytest.raises(ConfigError, match=r"^stages\[attn\]: the attentive probe pools .* backbone 'small_cnn'"):
        run_recipe(recipe(cnn), tmp_path / "cnn")
    assert not (tmp_path / "cnn").exists()  # refused before anything trained
    with pytest.raises(ConfigError, match="the attentive probe reads the last block's patch tokens"):
        recipe(cnn, n_last_blocks=2)
    _, summary = run_recipe(recipe({"name": "vit_tiny", "kwargs": KWARGS}), tmp_path / "vit")
    assert 0.0 < summary["attn/top1"] <= 1.0 and summary["attn/train_size"] == 40
    assert json.loads((tmp_path / "vit" / "stages" / "attn" / "eval.json").read_text())["top1"] == \
        summary["attn/top1"]


def write_digit_folder(root, per_class: int = 12) -> None:
    """imagefolder ROOT/a|b of 20 px grey images: class a bright on the left, class b bright on the right."""
    for c, name in enumerate("ab"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            array = np.full((20, 20), 20 + i, np.uint8)
            array[:, c * 10:(c + 1) * 10] = 200
            Image.fromarray(array).save(root / name / f"{i:02d}.png")


def test_a_streamed_source_goes_through_the_disk_cache_with_bounded_memory(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SSL_KIT_CACHE", str(tmp_path / "cache"))
    write_digit_folder(tmp_path / "data")
    spec = f"imagefolder:{tmp_path / 'data'},storage=stream"
    checkpoint = vit_backbone(tmp_path)
    extractor = FeatureExtractor.from_checkpoint(checkpoint, "cpu")
    splits = extractor.token_features(spec)
    train, labels, classes = splits["train"]
    assert is_mapped(train) and train.dtype == torch.float16 and train.shape[1] == 16 * 32  # L x D per row
    assert classes == ["a", "b"] and extractor.forward_passes == 24
    again = FeatureExtractor.from_checkpoint(checkpoint, "cpu")
    assert torch.equal(again.token_features(spec)["train"][0], train) and again.forward_passes == 0  # cached
    features = again.dataset_features(spec)["train"][0]
    assert features.shape[1] == 32  # the backbone's own features keep their own cache entry
    args = ["attentive-probe", "--checkpoint", str(checkpoint), "--data", spec, "--epochs", "20", "--device",
            "cpu", "--json"]
    assert cli_main(args) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == 1.0  # left against right: separable


def test_a_cache_entry_larger_than_the_free_disk_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    monkeypatch.setenv("SSL_KIT_CACHE", str(tmp_path / "cache"))
    write_digit_folder(tmp_path / "data")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    extractor = FeatureExtractor.from_checkpoint(vit_backbone(tmp_path), "cpu")
    with pytest.raises(DataError, match=r"\(\d+ x 512 float16\) take 0.0 GB in the cache folder .* 0.0 GB free; point "
                                        r"\$SSL_KIT_CACHE at a larger disk"):
        extractor.token_features(f"imagefolder:{tmp_path / 'data'},storage=stream")
    assert not list((tmp_path / "cache").rglob("*.npy"))  # nothing half written


def test_tokens_over_the_memory_budget_are_refused_before_they_are_computed(tmp_path):
    extractor = FeatureExtractor.from_checkpoint(vit_backbone(tmp_path), "cpu")
    extractor.memory_budget_gb = 1e-6
    with pytest.raises(DataError, match=r"patch tokens of its \d+ train images take .* more than the memory budget"):
        extractor.token_features("digits")
    assert extractor.forward_passes == 0


def test_non_finite_tokens_are_refused_naming_the_images(tmp_path):
    from ssl_kit.errors import TrainingError

    extractor = FeatureExtractor.from_checkpoint(vit_backbone(tmp_path), "cpu")
    with torch.no_grad():
        extractor.backbone.norm.weight[0] = float("inf")  # every token's first channel: inf or nan
    with pytest.raises(TrainingError, match=r"digits \(train\): the backbone produced non-finite features for "
                                            r"(\d+) of \1 images"):
        extractor.token_features("digits")
