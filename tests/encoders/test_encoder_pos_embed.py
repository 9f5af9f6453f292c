"""Weight files whose ViT position embedding covers another grid than the encoder's.

timm's DINOv2 weights are trained at 518 px (patch 14: a 37 x 37 grid of patch positions); built
with ``img_size=224`` (16 x 16) the model's ``pos_embed`` is smaller. Such files are resampled on
load: the grid bicubic with antialiasing (as timm does when it loads weights at another size),
the class/register entries kept. The files here are written in the layouts users download (a
timm hub snapshot folder, DINOv2's torch-hub ``.pth``, a UNI-style ``pytorch_model.bin``) with
small random weights; the expected grid is computed here with ``F.interpolate`` directly.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fastinsight.encoders import build_encoder
from fastinsight.encoders.check import check_encoder
from fastinsight.encoders.weights import resample_grid_embed
from fastinsight.errors import CheckpointError

ARCH = "vit_small_patch14_reg4_dinov2"
SMALL = {"depth": 1, "embed_dim": 32, "num_heads": 2}  # same layout as ViT-S, tiny widths
D = SMALL["embed_dim"]
TOL = 1e-5


@pytest.fixture
def timm():
    return pytest.importorskip("timm")


def bicubic(grid_tokens: torch.Tensor, old: int, new: tuple[int, int]) -> torch.Tensor:
    """``[1, old*old, D]`` patch positions resized as an image, written out independently."""
    img = grid_tokens.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    out = F.interpolate(img, size=new, mode="bicubic", align_corners=False, antialias=True)
    return out.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)


def hub_state(timm, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    """timm's own state_dict of the small reg4 DINOv2 at its default 518 px, random values."""
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **SMALL, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randn(v.shape, generator=gen) * 0.05).contiguous()
        for k, v in model.state_dict().items()
    }


def snapshot(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """A hub snapshot folder as ``huggingface-cli download timm/...`` leaves it."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": ARCH, "num_classes": 0}))
    save_file(state, str(folder / "model.safetensors"))
    return folder


# ------------------------------------------------------------------ the documented timm example
def test_timm_weights_at_518_load_into_a_224_model(timm, tmp_path: Path, caplog) -> None:
    state = hub_state(timm)
    assert state["pos_embed"].shape == (1, 37 * 37, D)  # no_embed_class: patch positions only
    folder = snapshot(tmp_path / "snap", state)
    with caplog.at_level(logging.INFO, logger="fastinsight.encoders"):
        enc = build_encoder(
            f"timm:{ARCH}", folder, tile_size_px=224, timm_kwargs={"img_size": 224, **SMALL}
        )
    assert enc.pos_embed.shape == (1, 16 * 16, D)
    want = bicubic(state["pos_embed"], 37, (16, 16))
    assert (enc.pos_embed.detach() - want).abs().max().item() <= 1e-6
    torch.testing.assert_close(enc.cls_token.detach(), state["cls_token"], rtol=0, atol=0)
    torch.testing.assert_close(enc.reg_token.detach(), state["reg_token"], rtol=0, atol=0)
    note = "resampled 'pos_embed' from 37 x 37 to 16 x 16 patch positions"
    assert any(note in n for n in enc.load_notes)
    assert any(note in r.getMessage() for r in caplog.records)

    # Tokens equal timm's own model at img_size=224 loaded through timm's checkpoint filter.
    from timm.models.vision_transformer import checkpoint_filter_fn

    ref = timm.create_model(ARCH, pretrained=False, num_classes=0, img_size=224, **SMALL).eval()
    ref.load_state_dict(checkpoint_filter_fn(dict(state), ref))
    tiles = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    with torch.no_grad():
        x = enc.normalize(tiles)
        want_tokens = ref.forward_features(x)[:, 5:]
    got = enc.encode_tokens(tiles)
    assert got.shape == (2, 256, D)
    assert (got - want_tokens).abs().max().item() <= TOL

    # ... and the tokens of the same file in a model left at 518 px, resampled at run time.
    same = build_encoder(f"timm:{ARCH}", folder, tile_size_px=224, timm_kwargs=SMALL)
    assert same.pos_embed.shape == (1, 37 * 37, D) and not same.load_notes
    assert (same.encode_tokens(tiles) - got).abs().max().item() <= TOL


def test_encoders_check_reports_the_resampling(timm, tmp_path: Path) -> None:
    folder = snapshot(tmp_path / "snap", hub_state(timm))
    report = check_encoder(
        f"timm:{ARCH}", folder, tile_size_px=224, timm_kwargs={"img_size": 224, **SMALL}
    )
    assert report["grid"] == [16, 16]
    assert any("from 37 x 37 to 16 x 16" in n for n in report["load_notes"])


def test_position_entries_of_class_and_registers_are_kept(timm, tmp_path: Path) -> None:
    """Virchow2-style layout: the class and 4 register tokens have position entries too."""
    state = hub_state(timm, seed=1, no_embed_class=False)
    assert state["pos_embed"].shape == (1, 5 + 37 * 37, D)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    enc = build_encoder(
        f"timm:{ARCH}",
        path,
        tile_size_px=224,
        timm_kwargs={"img_size": 224, "no_embed_class": False, **SMALL},
    )
    pos = enc.pos_embed.detach()
    assert pos.shape == (1, 5 + 256, D)
    torch.testing.assert_close(pos[:, :5], state["pos_embed"][:, :5], rtol=0, atol=0)
    want = bicubic(state["pos_embed"][:, 5:], 37, (16, 16))
    assert (pos[:, 5:] - want).abs().max().item() <= 1e-6
    assert any("its 5 class/register entries kept" in n for n in enc.load_notes)


# ------------------------------------------------------------------ the registry's own ViTs
def test_dinov2_torch_hub_file_into_dinov2_tiny_at_224(tmp_path: Path) -> None:
    """DINOv2's torch-hub layout (pos_embed [1, 1 + 37*37, D] with a class entry,
    register_tokens, mask_token) in the registry's DINOv2-style ViT on 224 px tiles."""
    gen = torch.Generator().manual_seed(3)
    src = build_encoder("dinov2-tiny", tile_size_px=518, embed_dim=D, num_heads=2, depth=1)
    state = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in src.state_dict().items()}
    pos0 = torch.randn(1, 1, D, generator=gen) * 0.05
    hub = {k: v for k, v in state.items() if k not in ("pos_embed", "reg_token")}
    hub["pos_embed"] = torch.cat([pos0, state["pos_embed"]], dim=1)  # [1, 1370, D]
    hub["register_tokens"] = state["reg_token"]
    hub["mask_token"] = torch.zeros(1, D)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(hub, path)
    enc = build_encoder("dinov2-tiny", path, tile_size_px=224, embed_dim=D, num_heads=2, depth=1)
    assert enc.grid_size == (16, 16) and enc.pos_embed.shape == (1, 256, D)
    want = bicubic(state["pos_embed"], 37, (16, 16))
    assert (enc.pos_embed.detach() - want).abs().max().item() <= 1e-6
    # The class entry went into the class token (DINOv2 -> timm), registers unchanged.
    torch.testing.assert_close(enc.cls_token.detach(), state["cls_token"] + pos0)
    torch.testing.assert_close(enc.reg_token.detach(), state["reg_token"], rtol=0, atol=0)
    assert enc.encode_tokens(torch.zeros(1, 224, 224, 3, dtype=torch.uint8)).shape == (1, 256, D)


def test_uni_layout_file_at_another_tile_size(tmp_path: Path) -> None:
    """UNI's layout (class entry + 14 x 14) loaded into the same ViT on 112 px tiles: 7 x 7."""
    src = build_encoder("vit-tiny", seed=5)  # 224 px, patch 16
    path = tmp_path / "pytorch_model.bin"
    torch.save(src.state_dict(), path)
    pos = src.pos_embed.detach()
    assert pos.shape == (1, 1 + 196, 64)
    enc = build_encoder("vit-tiny", path, tile_size_px=112)
    assert enc.pos_embed.shape == (1, 1 + 49, 64)
    torch.testing.assert_close(enc.pos_embed.detach()[:, :1], pos[:, :1], rtol=0, atol=0)
    want = bicubic(pos[:, 1:], 14, (7, 7))
    assert (enc.pos_embed.detach()[:, 1:] - want).abs().max().item() <= 1e-6
    assert any("from 14 x 14 to 7 x 7" in n for n in enc.load_notes)
    # Everything else is loaded as it is.
    for key, value in src.state_dict().items():
        if key != "pos_embed":
            torch.testing.assert_close(enc.state_dict()[key], value, rtol=0, atol=0)


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("extra", "entries"),
    [({}, 37 * 37 + 1), ({"no_embed_class": False}, 5 + 37 * 37 - 3)],
    ids=["no-embed-class", "class-and-register-entries"],
)
def test_pos_embed_that_is_not_a_square_grid_is_refused(
    timm, tmp_path: Path, extra: dict, entries: int
) -> None:
    state = hub_state(timm, **extra)
    state["pos_embed"] = torch.randn(1, entries, D)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        build_encoder(
            f"timm:{ARCH}", path, tile_size_px=224, timm_kwargs={"img_size": 224, **extra, **SMALL}
        )
    msg = str(err.value)
    assert "\n" not in msg
    assert f"'pos_embed' has shape [1, {entries}, {D}]" in msg
    assert "not a square grid of patch positions" in msg and "cannot be resampled" in msg


def test_a_file_of_another_width_keeps_the_plain_shape_error(timm, tmp_path: Path) -> None:
    state = hub_state(timm)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"'cls_token' has shape \[1, 1, 32\], expected"):
        build_encoder(
            f"timm:{ARCH}",
            path,
            tile_size_px=224,
            timm_kwargs={"img_size": 224, **SMALL, "embed_dim": 48},
        )


# ------------------------------------------------------------------ the helper itself
def test_resample_grid_embed_needs_no_timm(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` would raise
    pos = torch.randn(1, 2 + 5 * 5, 6, dtype=torch.float64)
    out = resample_grid_embed(pos, (3, 4), num_prefix=2)  # a non-square target grid
    assert out.shape == (1, 2 + 12, 6) and out.dtype == torch.float64
    assert torch.equal(out[:, :2], pos[:, :2])
    img = pos[:, 2:].reshape(1, 5, 5, 6).permute(0, 3, 1, 2)
    want = F.interpolate(img, size=(3, 4), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(out[:, 2:], want.permute(0, 2, 3, 1).reshape(1, 12, 6))
    assert resample_grid_embed(pos, (5, 5), num_prefix=2) is pos
    with pytest.raises(ValueError, match="not a square grid"):
        resample_grid_embed(torch.randn(1, 26, 6), (4, 4))
