"""Radiograph training and ``load_volume_model`` leave the caller's global random generators as
they were (see ``test_rng_hygiene.py`` for the slide and volume trainers and ``load_model``).

Radiograph training seeds torch's global generator from ``config.seed``; the caller's draws
after the call must stay its own stream, also when the run fails, and the run's weights are
those of the run without the guard. ``load_volume_model`` builds its modules with random init
before the weights are overwritten; that init must not advance the caller's torch generator.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fastinsight.models.config import InsightConfig
from fastinsight.models.pylon import PylonConfig, PylonModel
from fastinsight.radiograph import train as radiograph_train
from fastinsight.radiograph.train import RadiographTrainConfig, train_radiograph_model


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _snapshot() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "random": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state().tolist(),
    }


def _caller_seeds(salt: int = 0) -> dict[str, Any]:
    """Seed the globals as a caller would, advance them a little, and return their snapshot."""
    random.seed(4321 + salt)
    np.random.seed(8765 + salt)
    torch.manual_seed(1109 + salt)
    random.random(), np.random.rand(3), torch.rand(5)
    return _snapshot()


# --------------------------------------------------------------------------------------------
# radiograph training
# --------------------------------------------------------------------------------------------
def _tiny_pylon() -> PylonModel:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return PylonModel(
            PylonConfig(num_classes=1, stem_width=4, layers=(1, 1, 1, 1), dec_channels=4)
        )


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 256, 256, generator=g), (torch.rand(n, 1, generator=g) > 0.5).float()


CFG = RadiographTrainConfig(epochs=1, batch_size=2, lr=1e-2, patience=5, seed=3)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_radiograph_training_gives_the_callers_generators_back() -> None:
    train, val = _data(4, 1), _data(2, 2)
    before = _caller_seeds()
    model = _tiny_pylon()
    train_radiograph_model(model, train, val, CFG)
    assert _snapshot() == before
    # The run is as seeded as without the guard (the old behaviour): the same weights.
    bare = _tiny_pylon()
    radiograph_train._train(bare, train, val, CFG, state_path=None, log=None)
    _caller_seeds(1)  # the bare run left torch reseeded: not for the next test
    got, want = _weights(model), _weights(bare)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_radiograph_training_gives_them_back_when_it_fails() -> None:
    def fail(_line: str) -> None:  # called after the first epoch
        raise RuntimeError("stop")

    before = _caller_seeds(2)
    with pytest.raises(RuntimeError, match="stop"):
        train_radiograph_model(_tiny_pylon(), _data(4, 3), _data(2, 4), CFG, log=fail)
    assert _snapshot() == before


# --------------------------------------------------------------------------------------------
# load_volume_model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ctx", ["2d", "3d"])
def test_load_volume_model_leaves_the_torch_generator_alone(tmp_path: Path, ctx: str) -> None:
    from fastinsight.volume.checkpoint import VolumeModelInfo, load_volume_model, save_volume_model
    from fastinsight.volume.model import build_volume_model

    cfg = InsightConfig(
        in_dim=16, reduce_dim=8, widths=(8, 8, 8), grid_size=(4, 4), norm="channel",
        encoder="vit-tiny", tile_size_px=56, patch_size_px=14,
    )  # fmt: skip
    saved = build_volume_model(cfg, ctx, backend="reference")
    path = tmp_path / f"m_{ctx}.safetensors"
    save_volume_model(saved, VolumeModelInfo(ctx, encoder="vit-tiny", tile_size=56), path)
    before = _caller_seeds(3)
    model, info = load_volume_model(path, device="cpu")
    assert _snapshot() == before
    assert info.slice_context == ctx
    want = _weights(saved)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
