"""facebookresearch/dinov2's own checkpoints (the hub's dinov2_vits14[_reg4]_pretrain.pth, a training run's
teacher_checkpoint.pth): written here in DINOv2's key names from a random timm model, loaded through
resolve_checkpoint, and the features must equal both timm's and DINOv2's forward written out from its source."""
from __future__ import annotations

import re

import pytest
import timm
import torch
import torch.nn.functional as F

from ssl_kit.engine.checkpoint import build_from_record, resolve_checkpoint
from ssl_kit.errors import CheckpointError
from ssl_kit.models.foreign import IMAGENET_MEAN, IMAGENET_STD, detect_layout, dinov2_arch


def _timm_source(registers: int = 0, giant: bool = False, depth: int = 2):
    """A random timm DINOv2 ViT at tiny size (16 px, patch 4: a 4×4 grid) and its architecture reference. Layer
    scale (1e-5 at init) and the registers (~0) are made large: a wrong name or position would change the output."""
    name = "vit_giant_patch14_dinov2" if giant else f"vit_small_patch14{'_reg4' if registers else ''}_dinov2"
    kwargs = {"embed_dim": 48 if giant else 32, "depth": depth, "num_heads": 2}  # 48: DINOv2's SwiGLU width = timm's
    kwargs.update({"reg_tokens": registers} if registers not in (0, 4) else {})
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=16, patch_size=4, **kwargs).eval()
    with torch.no_grad():
        for key, value in model.named_parameters():
            if key.endswith("gamma") or key in ("cls_token", "reg_token"):
                value.normal_(std=0.5)
    return model, f"timm:{name}," + ",".join(f"{k}={v}" for k, v in kwargs.items())


def _dinov2_keys(model, block_chunks: int = 0) -> dict:
    """timm's state dict in DINOv2's names (dinov2/models/vision_transformer.py): a cls row in pos_embed (added to
    the cls token only), register_tokens without position rows, a (1, D) mask_token, SwiGLU w12/w3, and with
    block_chunks > 0 BlockChunk keys 'blocks.C.I.' (I the global index, the Identity padding has no weights)."""
    state = dict(model.state_dict())
    dim = state["cls_token"].shape[-1]
    cls_row = torch.randn(1, 1, dim)
    if "reg_token" in state:  # timm's reg4 table (no_embed_class) has no cls row: give DINOv2's one
        state["register_tokens"] = state.pop("reg_token")
        state["cls_token"] = state["cls_token"] - cls_row
        state["pos_embed"] = torch.cat([cls_row, state["pos_embed"]], dim=1)
    state["mask_token"] = torch.zeros(1, dim)
    chunk = len(model.blocks) // block_chunks if block_chunks else 0
    out = {}
    for key, value in state.items():
        key = re.sub(r"^(blocks\.\d+\.mlp\.)fc([12])\.", lambda m: m[1] + ("w12." if m[2] == "1" else "w3."), key) \
            if model.blocks[0].mlp.__class__.__name__ == "GluMlp" else key
        if chunk and key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // chunk}.{key[len('blocks.'):]}"
        out[key] = value.clone()
    return out


def _dinov2_forward(state: dict, model, x: torch.Tensor) -> torch.Tensor:
    """DINOv2's prepare_tokens_with_masks + blocks + norm, cls token (its forward with head = Identity), from the
    DINOv2-named tensors; the blocks are timm's (the same weights)."""
    tokens = model.patch_embed(x)
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), tokens], dim=1) + state["pos_embed"]
    if "register_tokens" in state:
        x = torch.cat([x[:, :1], state["register_tokens"].expand(len(x), -1, -1), x[:, 1:]], dim=1)
    for block in model.blocks:
        x = block(x)
    return model.norm(x)[:, 0]


def _check_features(record, source, state):
    backbone = build_from_record(record).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        features = backbone(x)
        assert torch.allclose(features, source(x), atol=1e-5)
        assert torch.allclose(features, _dinov2_forward(state, source, x), atol=1e-5)


@pytest.mark.parametrize("registers", [0, 4, 2], ids=["plain", "reg4", "reg2"])
def test_hub_file_loads_with_the_source_features(tmp_path, registers):
    source, arch = _timm_source(registers)
    state = _dinov2_keys(source)
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    record = resolve_checkpoint(f"{tmp_path / 'dinov2_vits14_pretrain.pth'}@{arch}")
    assert record["source"]["layout"] == "dinov2" and record["source"]["dropped"] == ["mask_token"]
    assert record["data"]["image_size"] == 16 and record["data"]["mean"] == IMAGENET_MEAN
    assert record["data"]["std"] == IMAGENET_STD
    _check_features(record, source, state)
    forced = resolve_checkpoint(f"dinov2:{tmp_path / 'dinov2_vits14_pretrain.pth'}@{arch}")
    assert forced["source"]["layout"] == "dinov2"


@pytest.mark.parametrize("block_chunks", [0, 2, 4], ids=["flat", "chunks2", "chunks4"])
def test_training_teacher_checkpoint_loads_with_chunked_blocks(tmp_path, block_chunks):
    source, arch = _timm_source(registers=4, depth=4)
    state = _dinov2_keys(source, block_chunks)
    chunked = {2: "blocks.1.2.norm1.weight", 4: "blocks.3.3.norm1.weight"}  # chunk C of 4 // block_chunks blocks
    assert block_chunks == 0 or chunked[block_chunks] in state
    heads = {"dino_head.mlp.0.weight": torch.zeros(8, 32), "ibot_head.last_layer.weight_g": torch.ones(8, 1)}
    teacher = {**{f"backbone.{k}": v for k, v in state.items()}, **heads}
    torch.save({"teacher": teacher}, tmp_path / "teacher_checkpoint.pth")  # as dinov2/train/train.py's do_test
    record = resolve_checkpoint(f"{tmp_path / 'teacher_checkpoint.pth'}@{arch}")
    assert record["source"]["layout"] == "dinov2"
    assert sorted(record["source"]["dropped"]) == sorted([*heads, "mask_token"])
    _check_features(record, source, state)


def test_giant_swiglu_maps_onto_timms_packed_swiglu(tmp_path):
    source, arch = _timm_source(giant=True)
    state = _dinov2_keys(source)
    assert "blocks.0.mlp.w12.weight" in state and "blocks.0.mlp.fc1.weight" not in state
    x = torch.randn(2, 5, 48)
    with torch.no_grad():  # DINOv2's SwiGLUFFN: x1, x2 = w12(x).chunk(2); w3(silu(x1) * x2)
        x1, x2 = F.linear(x, state["blocks.0.mlp.w12.weight"], state["blocks.0.mlp.w12.bias"]).chunk(2, dim=-1)
        swiglu = F.linear(F.silu(x1) * x2, state["blocks.0.mlp.w3.weight"], state["blocks.0.mlp.w3.bias"])
        assert torch.allclose(swiglu, source.blocks[0].mlp(x), atol=1e-6)
    torch.save(state, tmp_path / "g.pth")
    _check_features(resolve_checkpoint(f"{tmp_path / 'g.pth'}@{arch}"), source, state)


def _meta_state(dim: int, depth: int, hidden: int, out_hidden: int, registers: int = 0) -> dict:
    state = {"patch_embed.proj.weight": torch.empty(dim, 3, 14, 14, device="meta")}
    for index in range(depth):
        state[f"blocks.{index}.mlp.fc1.weight"] = torch.empty(hidden, dim, device="meta")
        state[f"blocks.{index}.mlp.fc2.weight"] = torch.empty(dim, out_hidden, device="meta")
    if registers:
        state["reg_token"] = torch.empty(1, registers, dim, device="meta")
    return state


def test_the_published_sizes_infer_the_timm_architecture(tmp_path):
    assert dinov2_arch(_meta_state(384, 12, 1536, 1536)) == "timm:vit_small_patch14_dinov2"
    assert dinov2_arch(_meta_state(768, 12, 3072, 3072, 4)) == "timm:vit_base_patch14_reg4_dinov2"
    assert dinov2_arch(_meta_state(1024, 24, 4096, 4096, 2)) == "timm:vit_large_patch14_reg4_dinov2,reg_tokens=2"
    assert dinov2_arch(_meta_state(1536, 40, 8192, 4096)) == "timm:vit_giant_patch14_dinov2"
    assert dinov2_arch(_meta_state(1536, 40, 6144, 6144)) is None  # a ViT-g without SwiGLU is no published one
    assert dinov2_arch(_meta_state(384, 11, 1536, 1536)) is None
    source, _ = _timm_source(registers=4)
    torch.save(_dinov2_keys(source), tmp_path / "tiny.pth")  # no published size: the architecture must be given
    with pytest.raises(CheckpointError, match=r"dinov2 layout\) does not record its architecture"):
        resolve_checkpoint(str(tmp_path / "tiny.pth"))


def test_detection_leaves_timm_and_mae_files_alone():
    plain, _ = _timm_source()
    registers, _ = _timm_source(registers=4)
    assert detect_layout(dict(plain.state_dict())) == "state-dict"  # timm's dinov2: ls1.gamma, no mask_token
    assert detect_layout(dict(registers.state_dict())) == "state-dict"  # timm's reg_token
    mae = {"model": {**plain.state_dict(), "mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(1)}}
    assert detect_layout(mae) == "mae"
    assert detect_layout({"teacher": {f"backbone.{k}": v for k, v in plain.state_dict().items()}}) == "dino"
    assert detect_layout({"teacher": {f"backbone.{k}": v for k, v in _dinov2_keys(plain).items()}}) == "dinov2"


def test_dinov2_errors_name_the_key(tmp_path):
    source, arch = _timm_source(registers=4)
    state = _dinov2_keys(source)
    del state["blocks.1.ls2.gamma"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.ls2\.gamma"):
        resolve_checkpoint(f"{tmp_path / 'missing.pth'}@{arch}")
    state = _dinov2_keys(source)
    torch.save(state, tmp_path / "reg.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatch at 'pos_embed': the file has \(1, 16, 32\)"):
        resolve_checkpoint(f"{tmp_path / 'reg.pth'}@{arch},no_embed_class=False")
    with pytest.raises(CheckpointError, match=r"unexpected keys: reg_token"):
        resolve_checkpoint(f"{tmp_path / 'reg.pth'}@timm:vit_small_patch14_dinov2,embed_dim=32,depth=2,num_heads=2")
    state["cls_token"] = torch.zeros(1, 32)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"'cls_token' \(1, 32\) and 'pos_embed' \(1, 17, 32\)"):
        resolve_checkpoint(f"dinov2:{tmp_path / 'bad.pth'}@{arch}")
