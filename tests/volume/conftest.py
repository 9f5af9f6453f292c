"""Fixtures: a small volume model (random head, vit-tiny slice encoder at 56 px -> 4 x 4 grid)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastinsight.models.config import InsightConfig
from fastinsight.volume.checkpoint import VolumeModelInfo, save_volume_model
from fastinsight.volume.model import build_volume_model

TILE = 56
ENCODER_OPTIONS = {"patch_size_px": 14, "seed": 0}


def small_model_file(folder: Path, slice_context: str = "2d", slices: str = "all") -> Path:
    torch.manual_seed(0)
    cfg = InsightConfig(
        in_dim=64,
        reduce_dim=16,
        widths=(16, 8, 8),
        grid_size=(4, 4),
        norm="channel",
        encoder="vit-tiny",
        tile_size_px=TILE,
        patch_size_px=14,
        class_names=("lesion",),
    )
    model = build_volume_model(cfg, slice_context, backend="reference")
    info = VolumeModelInfo(
        encoder="vit-tiny", encoder_options=ENCODER_OPTIONS, tile_size=TILE, slices=slices
    )
    path = folder / f"model_{slice_context}_{slices}.safetensors"
    save_volume_model(model, info, path)
    return path


@pytest.fixture(scope="session")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_model_file(tmp_path_factory.mktemp("model"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors on a shared CPU: one torch thread is much faster than contended several."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
