"""The multi-resolution LSE-LBA network: geometry, pooling (fastinsight.ops.pooling), files."""

from __future__ import annotations

import pytest
import torch

from fastinsight.errors import CheckpointError, InputError
from fastinsight.models.multires import MultiResConfig, MultiResModel, load_multires, save_multires
from fastinsight.ops.pooling import lse_lba
from fastinsight.radiograph.predict import load_radiograph_model


def _small(**kw) -> MultiResModel:
    cfg = MultiResConfig(num_classes=3, width=4, growth=4, dense_layers=2, **kw)
    return MultiResModel(cfg).eval()


def test_default_geometry_512_to_64() -> None:
    model = _small()
    out = model.predict(torch.randn(2, 1, 512, 512))
    assert out.logits.shape == (2, 3, 64, 64) and out.scores.shape == (2, 3)


def test_pooling_is_lse_lba_of_the_probability_map() -> None:
    model = _small(r0=10.0)
    with torch.no_grad():
        model.beta.copy_(torch.tensor([-1.0, 0.0, 2.0]))
    out = model.predict(torch.randn(2, 1, 128, 128))
    p = torch.sigmoid(out.logits)
    for b in range(2):
        want = lse_lba(p[b].reshape(3, -1), None, 10.0 + torch.exp(model.beta))
        torch.testing.assert_close(out.scores[b], want)
    flat = p.flatten(2)
    assert bool(
        (out.scores >= flat.mean(-1) - 1e-6).all() and (out.scores <= flat.amax(-1) + 1e-6).all()
    )


def test_logit_map_option_and_sharpness_limits() -> None:
    model = _small(map_is_prob=False, r0=0.0)
    with torch.no_grad():
        model.beta.fill_(-30.0)  # r -> 0: the mean of the logits
    out = model.predict(torch.randn(1, 1, 128, 128))
    torch.testing.assert_close(
        out.scores, torch.sigmoid(out.logits.mean(dim=(-2, -1))), atol=1e-5, rtol=0
    )
    sharp = _small(r0=1e4)
    sharp.load_state_dict(model.state_dict())
    out = sharp.predict(torch.zeros(1, 1, 128, 128) + 0.3)
    torch.testing.assert_close(
        out.scores, torch.sigmoid(out.logits).amax(dim=(-2, -1)), atol=1e-3, rtol=0
    )


def test_beta_learns_and_sides_checked() -> None:
    model = _small().train()
    logits = model(torch.randn(2, 1, 64, 64))
    model.pool(logits).sum().backward()
    assert model.beta.grad is not None and bool(model.beta.grad.abs().sum() > 0)
    with pytest.raises(InputError, match="multiples of 64"):
        model(torch.randn(1, 1, 100, 128))


def test_safetensors_round_trip_and_dispatch(tmp_path) -> None:
    model = _small(upsample="bilinear")
    save_multires(model, tmp_path / "m.safetensors")
    again = load_radiograph_model(tmp_path / "m.safetensors", device="cpu")
    assert isinstance(again, MultiResModel) and again.config == model.config
    x = torch.randn(1, 1, 128, 128)
    torch.testing.assert_close(again.predict(x).scores, model.predict(x).scores)
    assert load_multires(tmp_path / "m.safetensors", device="cpu").config.upsample == "bilinear"
    torch.save(model.state_dict(), tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="save_multires"):
        load_radiograph_model(tmp_path / "m.pth", device="cpu")
