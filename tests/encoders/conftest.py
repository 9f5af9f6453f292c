"""Shared fixtures of the encoder tests: seeded RNG, tiny configurations, fake tiles."""

from __future__ import annotations

import pytest
import torch

from fastinsight.encoders import ResNetTruncConfig, ViTConfig


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_vit_config() -> ViTConfig:
    """A ViT small enough to run in milliseconds: D=32, 2 blocks, 4 heads, 32 px tiles, 4 x 4 grid."""
    return ViTConfig(
        embed_dim=32, depth=2, num_heads=4, patch_size_px=8, tile_size_px=32, pos_embed_grid=4
    )


@pytest.fixture
def tiny_resnet_config() -> ResNetTruncConfig:
    """A ResNet-trunc with width 4 and 1-2-1 blocks on 32 px tiles (2 x 2 grid, 64 channels)."""
    return ResNetTruncConfig(layers=(1, 2, 1), width=4, tile_size_px=32)


@pytest.fixture
def tiles() -> torch.Tensor:
    """Two uint8 RGB tiles of 32 px, channels last."""
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=gen)
