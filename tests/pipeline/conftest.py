"""Fixtures for slide-pipeline tests: a small random-init model paired with the vit-tiny encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastinsight import InsightConfig, InsightModel
from fastinsight.models.pylon import PylonConfig, PylonModel, save_pylon


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fastinsight checkpoint for the random-init ``vit-tiny`` encoder (64 x 14 x 14 tokens)."""
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    # Seeded: the same weights whichever tests ran before (the global RNG's state would
    # otherwise make every score depend on the test order).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = InsightModel(
            InsightConfig(
                in_dim=64, num_classes=2, class_names=("tumour", "necrosis"), encoder="vit-tiny"
            ),
            backend="reference",
        )
    model.save(str(path))
    return path


@pytest.fixture(scope="session")
def pylon_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init PYLON (radiograph) checkpoint: what the slide functions must refuse."""
    path = tmp_path_factory.mktemp("pylon") / "pylon.safetensors"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = PylonModel(
            PylonConfig(num_classes=1, stem_width=4, layers=(1, 1, 1, 1), dec_channels=4)
        )
    save_pylon(model, path)
    return path
