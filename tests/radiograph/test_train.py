"""Radiograph training: the papers' losses, resume from the state file, early stopping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastinsight.errors import CheckpointError
from fastinsight.models.multires import MultiResConfig, MultiResModel
from fastinsight.models.pylon import PylonConfig, PylonModel
from fastinsight.ops.pooling import lse_lba
from fastinsight.radiograph.train import (
    RadiographTrainConfig,
    image_loss,
    train_radiograph_model,
)


def _tiny_pylon() -> PylonModel:
    torch.manual_seed(0)
    return PylonModel(PylonConfig(num_classes=2, stem_width=4, layers=(1, 1, 1, 1), dec_channels=4))


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 256, 256, generator=g), (torch.rand(n, 2, generator=g) > 0.5).float()


def test_losses_are_the_papers() -> None:
    logits = torch.randn(3, 2, 8, 8)
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    pylon = _tiny_pylon()
    want = F.binary_cross_entropy_with_logits(logits.amax(dim=(-2, -1)), y)
    torch.testing.assert_close(image_loss(pylon, logits, y), want)
    yao = MultiResModel(MultiResConfig(num_classes=2, width=4, growth=4, r0=10.0))
    p = torch.stack(
        [lse_lba(torch.sigmoid(logits[b]).reshape(2, -1), None, yao.sharpness) for b in range(3)]
    )
    want = F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), y)
    torch.testing.assert_close(image_loss(yao, logits, y), want)
    yao_logit = MultiResModel(MultiResConfig(num_classes=2, width=4, growth=4, map_is_prob=False))
    q = torch.stack(
        [lse_lba(logits[b].reshape(2, -1), None, yao_logit.sharpness) for b in range(3)]
    )
    torch.testing.assert_close(
        image_loss(yao_logit, logits, y), F.binary_cross_entropy_with_logits(q, y)
    )


def test_resume_gives_the_same_weights_as_one_run(tmp_path) -> None:
    train, val = _data(6, 1), _data(2, 2)
    cfg3 = RadiographTrainConfig(epochs=3, batch_size=3, lr=1e-2, patience=10, seed=5)
    whole = _tiny_pylon()
    r = train_radiograph_model(whole, train, val, cfg3)
    assert r.epochs_run == 3
    state = tmp_path / "train.state"
    part = _tiny_pylon()
    cfg2 = RadiographTrainConfig(epochs=2, batch_size=3, lr=1e-2, patience=10, seed=5)
    train_radiograph_model(part, train, val, cfg2, state_path=state)
    with pytest.raises(CheckpointError, match="other training settings"):
        train_radiograph_model(_tiny_pylon(), train, val, cfg3, state_path=state)
    # Same settings but more epochs: rewrite the stored config as a user would by re-running.
    saved = torch.load(state, weights_only=True)
    saved["config"]["epochs"] = 3
    torch.save(saved, state)
    resumed = _tiny_pylon()
    r2 = train_radiograph_model(resumed, train, val, cfg3, state_path=state)
    assert r2.resumed_from == 2 and r2.epochs_run == 3 and len(r2.history) == 3
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, msg=k)


def test_early_stopping_and_best_weights() -> None:
    train, val = _data(4, 3), _data(2, 4)
    model = _tiny_pylon()
    r = train_radiograph_model(
        model, train, val, RadiographTrainConfig(epochs=50, batch_size=2, lr=0.0, patience=1)
    )
    assert r.best_epoch == 0 and r.epochs_run == 2
