"""Input normalisation: uint8 / float tiles, channels last, to the encoders' float input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinsight.encoders import IMAGENET_MEAN, IMAGENET_STD, ViTConfig, ViTEncoder, build_encoder
from fastinsight.errors import InputError


@pytest.fixture
def enc(tiny_vit_config: ViTConfig) -> ViTEncoder:
    return ViTEncoder(tiny_vit_config, seed=0)


def reference(images_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    x = images_uint8.double().permute(0, 3, 1, 2) / 255.0
    return (x - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64
    ).view(1, 3, 1, 1)


def test_uint8_matches_float64_reference(enc: ViTEncoder, tiles: torch.Tensor) -> None:
    out = enc.normalize(tiles)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(
        out.double(), reference(tiles, IMAGENET_MEAN, IMAGENET_STD), rtol=1e-6, atol=1e-6
    )


def test_channel_order_is_rgb(enc: ViTEncoder) -> None:
    img = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    img[..., 0] = 255  # pure red
    out = enc.normalize(img)
    torch.testing.assert_close(
        out[0, :, 0, 0],
        torch.tensor(
            [
                (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0],
                -IMAGENET_MEAN[1] / IMAGENET_STD[1],
                -IMAGENET_MEAN[2] / IMAGENET_STD[2],
            ]
        ),
    )


def test_float_in_unit_range_equals_uint8(enc: ViTEncoder, tiles: torch.Tensor) -> None:
    torch.testing.assert_close(enc.normalize(tiles.float() / 255), enc.normalize(tiles))
    torch.testing.assert_close(enc.normalize(tiles.double() / 255), enc.normalize(tiles))


def test_numpy_input(enc: ViTEncoder, tiles: torch.Tensor) -> None:
    torch.testing.assert_close(enc.normalize(tiles.numpy()), enc.normalize(tiles))
    strided = np.asarray(tiles.numpy())[:, ::-1]  # negative strides are copied, not refused
    assert enc.normalize(strided).shape == (2, 3, 32, 32)


def test_custom_mean_and_std(tiny_vit_config: ViTConfig, tiles: torch.Tensor) -> None:
    enc = ViTEncoder(tiny_vit_config, seed=0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    torch.testing.assert_close(
        enc.normalize(tiles).double(),
        reference(tiles, (0.5,) * 3, (0.25,) * 3),
        rtol=1e-6,
        atol=1e-6,
    )


def test_input_is_not_modified(enc: ViTEncoder, tiles: torch.Tensor) -> None:
    x = tiles.float() / 255
    before = x.clone()
    enc.normalize(x)
    assert torch.equal(x, before)


def test_encode_is_forward_of_normalize(enc: ViTEncoder, tiles: torch.Tensor) -> None:
    with torch.no_grad():
        want = enc(enc.normalize(tiles))
    got = enc.encode(tiles)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not got.requires_grad


def test_normalisation_stays_float32_for_a_bf16_encoder(tiny_vit_config: ViTConfig, tiles) -> None:
    enc = ViTEncoder(tiny_vit_config, seed=0, dtype=torch.bfloat16)
    ref32 = ViTEncoder(tiny_vit_config, seed=0)
    torch.testing.assert_close(enc.normalize(tiles), ref32.normalize(tiles), rtol=0, atol=0)
    assert enc.encode(tiles).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("shape", "dtype", "pattern"),
    [
        ((2, 3, 32, 32), torch.uint8, "look channels-first"),
        ((32, 32, 3), torch.uint8, "add a batch dimension"),
        ((2, 32, 32, 4), torch.uint8, "drop the alpha channel"),
        ((2, 32, 32), torch.uint8, r"found shape \[2, 32, 32\]"),
        ((2, 32, 32, 3), torch.int32, "found dtype torch.int32"),
    ],
    ids=["channels-first", "no-batch", "rgba", "gray", "int32"],
)
def test_bad_tiles_are_clear_errors(enc: ViTEncoder, shape, dtype, pattern) -> None:
    with pytest.raises(InputError, match=pattern):
        enc.normalize(torch.zeros(shape, dtype=dtype))


def test_float_out_of_range_is_an_error(enc: ViTEncoder, tiles: torch.Tensor) -> None:
    with pytest.raises(InputError, match=r"in \[0, 1\], found values in \[0, 255\].*divide by 255"):
        enc.normalize(tiles.float())


def test_not_a_tensor(enc: ViTEncoder) -> None:
    with pytest.raises(InputError, match="found list"):
        enc.normalize([[1, 2, 3]])  # type: ignore[arg-type]


def test_every_registry_encoder_carries_its_normalisation() -> None:
    for name in ("vit-tiny", "resnet-tiny"):
        enc = build_encoder(name, tile_size_px=32)
        assert enc.mean == IMAGENET_MEAN and enc.std == IMAGENET_STD
        assert enc.identity()["mean"] == list(IMAGENET_MEAN)
