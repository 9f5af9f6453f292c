"""ResNet-trunc numerics against a functional float64 re-computation, and its stride-16 grid."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fastinsight.encoders import ResNetTruncConfig, ResNetTruncEncoder, build_encoder
from fastinsight.errors import InputError


def bn(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    """Eval-mode BatchNorm written out: (x - running_mean) / sqrt(running_var + eps) * w + b."""
    shape = (1, -1, 1, 1)
    mean, var = sd[p + ".running_mean"].view(shape), sd[p + ".running_var"].view(shape)
    return (x - mean) / torch.sqrt(var + 1e-5) * sd[p + ".weight"].view(shape) + sd[
        p + ".bias"
    ].view(shape)


def explicit_resnet_trunc(x: torch.Tensor, sd: dict[str, torch.Tensor], layers: tuple[int, ...]):
    x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for li, n in enumerate(layers, start=1):
        for i in range(n):
            p = f"layer{li}.{i}."
            stride = 2 if (i == 0 and li > 1) else 1
            y = F.relu(bn(F.conv2d(x, sd[p + "conv1.weight"]), sd, p + "bn1"))
            y = F.relu(
                bn(F.conv2d(y, sd[p + "conv2.weight"], stride=stride, padding=1), sd, p + "bn2")
            )
            y = bn(F.conv2d(y, sd[p + "conv3.weight"]), sd, p + "bn3")
            if p + "downsample.0.weight" in sd:
                x = bn(
                    F.conv2d(x, sd[p + "downsample.0.weight"], stride=stride),
                    sd,
                    p + "downsample.1",
                )
            x = F.relu(y + x)
    return x


def test_matches_explicit_float64(tiny_resnet_config: ResNetTruncConfig) -> None:
    model = ResNetTruncEncoder(tiny_resnet_config, seed=0).double()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-trivial BatchNorm statistics so that eval-mode BN is exercised
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
            elif name.endswith(("running_mean", "bn1.bias", "bn2.bias", "bn3.bias")):
                t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = explicit_resnet_trunc(x, model.state_dict(), tiny_resnet_config.layers)
    got = model(x)
    assert got.shape == (2, 64, 2, 2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tile", [16, 32, 64, 224], ids=lambda t: f"tile={t}")
def test_stride_16_grid(tile: int) -> None:
    enc = build_encoder("resnet-tiny", tile_size_px=tile)
    out = enc.encode(torch.zeros(1, tile, tile, 3, dtype=torch.uint8))
    assert out.shape == (1, 128, tile // 16, tile // 16)
    assert enc.patch_size_px == 16 and enc.grid_size == (tile // 16, tile // 16)
    assert torch.isfinite(out).all()


def test_resnet_tiny_default_geometry() -> None:
    enc = build_encoder("resnet-tiny")
    assert (enc.embed_dim, enc.grid_size, enc.tile_size_px) == (128, (14, 14), 224)


def test_resnet50_trunc_random_init_output_is_1024x14x14() -> None:
    enc = build_encoder("resnet50-trunc", random_init=True)
    out = enc.encode(torch.zeros(1, 224, 224, 3, dtype=torch.uint8))
    assert out.shape == (1, 1024, 14, 14)


def test_always_in_eval_mode(tiny_resnet_config: ResNetTruncConfig) -> None:
    enc = ResNetTruncEncoder(tiny_resnet_config, seed=0)
    assert not enc.training
    before = enc.bn1.running_mean.clone()
    enc.encode(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8))
    assert torch.equal(enc.bn1.running_mean, before)  # BN statistics never updated


def test_bad_config_is_a_clear_error(tiny_resnet_config: ResNetTruncConfig) -> None:
    with pytest.raises(InputError, match="multiple of 16"):
        dataclasses.replace(tiny_resnet_config, tile_size_px=40)
    with pytest.raises(InputError, match="three block counts"):
        ResNetTruncConfig(layers=(1, 1))  # type: ignore[arg-type]
