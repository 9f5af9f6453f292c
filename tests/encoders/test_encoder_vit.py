"""ViT numerics against hand-written float64 computations, and its output grid."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from fastinsight.encoders import ViTConfig, ViTEncoder, build_encoder
from fastinsight.encoders.vit import resample_pos_embed
from fastinsight.errors import InputError


def explicit_attention(x: torch.Tensor, sd: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, written out; q, k, v are row blocks of ``qkv``."""
    b, n, dim = x.shape
    hd = dim // heads
    w, bias = sd["qkv.weight"], sd["qkv.bias"]
    q = x @ w[:dim].T + bias[:dim]
    k = x @ w[dim : 2 * dim].T + bias[dim : 2 * dim]
    v = x @ w[2 * dim :].T + bias[2 * dim :]
    out = torch.empty_like(x)
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(hd)
        probs = torch.exp(scores - scores.amax(-1, keepdim=True))
        probs = probs / probs.sum(-1, keepdim=True)
        out[..., sl] = probs @ v[..., sl]
    return out @ sd["proj.weight"].T + sd["proj.bias"]


def explicit_layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * w + b


def explicit_vit(x: torch.Tensor, sd: dict[str, torch.Tensor], cfg: ViTConfig) -> torch.Tensor:
    """The whole UNI-style ViT from its state_dict, in float64, returning the [B, D, h, w] grid."""
    b = x.shape[0]
    p, d = cfg.patch_size_px, cfg.embed_dim
    g = x.shape[-1] // p
    # Patchify by hand: token n = i * g + j covers rows i*p.., cols j*p.. (row-major).
    patches = x.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)
    tokens = patches @ sd["patch_embed.proj.weight"].reshape(d, -1).T + sd["patch_embed.proj.bias"]
    t = torch.cat([sd["cls_token"].expand(b, 1, d), tokens], 1) + sd["pos_embed"]
    for i in range(cfg.depth):
        blk = {k[len(f"blocks.{i}.") :]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        attn = {k[5:]: v for k, v in blk.items() if k.startswith("attn.")}
        y = explicit_layer_norm(t, blk["norm1.weight"], blk["norm1.bias"])
        t = t + blk["ls1.gamma"] * explicit_attention(y, attn, cfg.num_heads)
        y = explicit_layer_norm(t, blk["norm2.weight"], blk["norm2.bias"])
        hidden = y @ blk["mlp.fc1.weight"].T + blk["mlp.fc1.bias"]
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        t = t + blk["ls2.gamma"] * (hidden @ blk["mlp.fc2.weight"].T + blk["mlp.fc2.bias"])
    t = explicit_layer_norm(t, sd["norm.weight"], sd["norm.bias"])
    return t[:, 1:].reshape(b, g, g, d).permute(0, 3, 1, 2)


def randomise(model: torch.nn.Module, seed: int = 3) -> None:
    """Give every weight (LayerScale and norms included) a sizeable random value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


def test_attention_matches_explicit_softmax(tiny_vit_config: ViTConfig) -> None:
    model = ViTEncoder(tiny_vit_config, seed=0).double()
    attn = model.blocks[0].attn
    randomise(attn)
    x = torch.randn(2, 17, tiny_vit_config.embed_dim, dtype=torch.float64)
    want = explicit_attention(x, {k: v for k, v in attn.state_dict().items()}, 4)
    torch.testing.assert_close(attn(x), want, rtol=1e-10, atol=1e-12)


def test_attention_float32_close_to_float64(tiny_vit_config: ViTConfig) -> None:
    model = ViTEncoder(tiny_vit_config, seed=0)
    attn = model.blocks[0].attn
    randomise(attn)
    x = torch.randn(2, 17, tiny_vit_config.embed_dim)
    sd64 = {k: v.double() for k, v in attn.state_dict().items()}
    want = explicit_attention(x.double(), sd64, 4)
    torch.testing.assert_close(attn(x).double(), want, rtol=1e-5, atol=1e-5)


def test_whole_vit_matches_explicit_float64(tiny_vit_config: ViTConfig) -> None:
    model = ViTEncoder(tiny_vit_config, seed=0).double()
    randomise(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = explicit_vit(x, model.state_dict(), tiny_vit_config)
    got = model(x)
    assert got.shape == (2, 32, 4, 4) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_forward_features_keeps_class_token_first(tiny_vit_config: ViTConfig) -> None:
    model = ViTEncoder(tiny_vit_config, seed=0)
    x = torch.randn(3, 3, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, 1 + 16, 32)
    grid = model(x)
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), tokens[:, 1:])


def test_token_grid_is_spatially_aligned(tiny_vit_config: ViTConfig) -> None:
    """Changing one 8 px patch changes only its own cell before attention mixes tokens."""
    model = ViTEncoder(dataclasses.replace(tiny_vit_config, depth=0), seed=0)
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[:, :, 8:16, 24:32] += 1.0  # row 1, column 3
    diff = (model(x) - model(y)).abs().sum(1)[0]
    assert diff[1, 3] > 0
    diff[1, 3] = 0
    assert torch.count_nonzero(diff) == 0


@pytest.mark.parametrize(
    ("tile", "patch", "grid"),
    [(224, 16, 14), (32, 16, 2), (48, 8, 6), (16, 16, 1)],
    ids=lambda v: str(v),
)
def test_vit_tiny_grid_shapes(tile: int, patch: int, grid: int) -> None:
    enc = build_encoder("vit-tiny", tile_size_px=tile, patch_size_px=patch)
    out = enc.encode(torch.zeros(2, tile, tile, 3, dtype=torch.uint8))
    assert out.shape == (2, 64, grid, grid)
    assert out.dtype == torch.float32
    assert enc.grid_size == (grid, grid) and enc.embed_dim == 64
    assert torch.isfinite(out).all()


def test_vit_tiny_default_is_64x14x14() -> None:
    enc = build_encoder("vit-tiny")
    assert (enc.embed_dim, enc.grid_size, enc.tile_size_px, enc.patch_size_px) == (
        64,
        (14, 14),
        224,
        16,
    )
    assert len(enc.blocks) == 2 and enc.blocks[0].attn.num_heads == 4


def test_layerscale_initialised_to_init_values(tiny_vit_config: ViTConfig) -> None:
    model = ViTEncoder(tiny_vit_config, seed=0)
    for blk in model.blocks:
        assert torch.all(blk.ls1.gamma == 1e-5) and torch.all(blk.ls2.gamma == 1e-5)
    no_ls = ViTEncoder(dataclasses.replace(tiny_vit_config, init_values=None), seed=0)
    assert not any("gamma" in k for k in no_ls.state_dict())


def test_pos_embed_resampling() -> None:
    pos = torch.randn(1, 1 + 14 * 14, 8)
    assert resample_pos_embed(pos, 14, (14, 14)) is pos
    up = resample_pos_embed(pos, 14, (16, 16))
    assert up.shape == (1, 1 + 256, 8)
    torch.testing.assert_close(up[:, :1], pos[:, :1])  # class token entry untouched
    want = F.interpolate(
        pos[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2),
        size=(16, 16),
        mode="bicubic",
        antialias=True,
    )
    torch.testing.assert_close(up[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 256, 8))


def test_uni_architecture_on_other_tile_size_resamples_pos_embed(
    tiny_vit_config: ViTConfig,
) -> None:
    cfg = dataclasses.replace(tiny_vit_config, tile_size_px=48)  # pos_embed stays 4 x 4
    model = ViTEncoder(cfg, seed=0)
    assert model.pos_embed.shape == (1, 17, 32)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 32, 6, 6)


def test_wrong_tile_size_is_a_clear_error(tiny_vit_config: ViTConfig) -> None:
    model = ViTEncoder(tiny_vit_config, seed=0)
    with pytest.raises(InputError, match=r"expects 32 x 32 px tiles, found 40 x 40.*tile_size_px"):
        model(torch.randn(1, 3, 40, 40))
    with pytest.raises(InputError, match=r"\[B, 3, 32, 32\]"):
        model(torch.randn(1, 32, 32, 3))


def test_bad_config_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="not divisible by num_heads"):
        ViTConfig(embed_dim=30, num_heads=4)
    with pytest.raises(InputError, match="multiple of patch_size_px"):
        ViTConfig(tile_size_px=100, patch_size_px=16)
