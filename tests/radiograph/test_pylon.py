"""PYLON: official checkpoints in both layouts load strictly and match an independent forward."""

from __future__ import annotations

import pytest
import torch

from fastinsight.errors import CheckpointError, InputError
from fastinsight.models.pylon import PylonConfig, PylonModel, load_pylon, save_pylon
from tests.radiograph.pylon_reference import random_state_dict, reference_forward


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    scale = float(ref.abs().max())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * max(scale, 1.0))


@pytest.mark.parametrize(
    ("up_type", "side", "batch"),
    [("2layer", 256, 2), ("1layer", 256, 1), ("2layer", 512, 1)],
    ids=["2layer-256-B2", "1layer-256-B1", "2layer-512-B1"],
)
def test_official_layout_loads_and_matches_reference(tmp_path, up_type, side, batch) -> None:
    state = random_state_dict(up_type, num_classes=14, seed=1)
    path = tmp_path / "pylon,nih,256.pkl"
    torch.save(state, path)
    model = load_pylon(path, device="cpu")
    assert model.config.up_type == up_type and model.config.num_classes == 14
    assert len(model.state_dict()) == (411 if up_type == "2layer" else 390)
    x = torch.randn(batch, 1, side, side)
    r = model.predict(x)
    with torch.no_grad():
        ref = reference_forward(state, x)
    assert r.logits.shape == (batch, 14, side // 4, side // 4)
    _close(r.logits, ref)
    torch.testing.assert_close(
        r.scores, torch.sigmoid(ref.amax(dim=(-2, -1))), rtol=1e-4, atol=1e-5
    )


def test_num_classes_from_head_and_safetensors_round_trip(tmp_path) -> None:
    state = random_state_dict("1layer", num_classes=3, seed=2)
    torch.save(state, tmp_path / "m.pth")
    model = load_pylon(tmp_path / "m.pth", device="cpu")
    assert model.config.num_classes == 3 and model.config.names == ("class_0", "class_1", "class_2")
    save_pylon(model, tmp_path / "m.safetensors")
    again = load_pylon(tmp_path / "m.safetensors", device="cpu")
    assert again.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_reduced_width_variant_round_trips(tmp_path) -> None:
    cfg = PylonConfig(num_classes=2, stem_width=8, layers=(1, 1, 2, 1), dec_channels=16)
    model = PylonModel(cfg).eval()
    save_pylon(model, tmp_path / "small.safetensors")
    torch.save(model.state_dict(), tmp_path / "small.pth")  # widths are read off the shapes too
    x = torch.randn(1, 1, 256, 256)
    a = load_pylon(tmp_path / "small.safetensors", device="cpu").predict(x).logits
    b = load_pylon(tmp_path / "small.pth", device="cpu").predict(x).logits
    torch.testing.assert_close(a, model.predict(x).logits)
    torch.testing.assert_close(b, a)


def _refused(tmp_path, state, match: str) -> None:
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=match):
        load_pylon(tmp_path / "bad.pth", device="cpu")


def test_partial_and_mismatched_files_are_refused(tmp_path) -> None:
    state = random_state_dict("2layer", seed=3)
    missing = dict(state)
    del missing["net.decoder.pa.conv2.bn.running_var"]
    _refused(tmp_path, missing, r"missing key 'net\.decoder\.pa\.conv2\.bn\.running_var'")
    extra = {**state, "net.classification_head.0.weight": torch.zeros(2, 2)}
    _refused(tmp_path, extra, r"unexpected key 'net\.classification_head\.0\.weight'")
    shaped = dict(state)
    shaped["net.decoder.up2.conv1.1.conv.weight"] = torch.zeros(128, 512, 3, 3)
    _refused(tmp_path, shaped, r"'net\.decoder\.up2\.conv1\.1\.conv\.weight' has shape")
    # One decoder of each layout: the 2layer keys decide, the stray 1layer key is named.
    mixed = {**state, "net.decoder.up1.conv1.conv.weight": torch.zeros(128, 256, 1, 1)}
    _refused(tmp_path, mixed, r"unexpected key 'net\.decoder\.up1\.conv1\.conv\.weight'")
    typed = dict(state)
    typed["net.encoder.bn1.weight"] = torch.ones(64, dtype=torch.int64)
    _refused(tmp_path, typed, r"'net\.encoder\.bn1\.weight' has dtype torch\.int64")
    poisoned = dict(state)
    poisoned["net.encoder.bn1.weight"] = state["net.encoder.bn1.weight"].clone()
    poisoned["net.encoder.bn1.weight"][3] = float("inf")
    _refused(tmp_path, poisoned, r"'net\.encoder\.bn1\.weight' holds 1 non-finite values \(inf\)")
    _refused(tmp_path, {"fc.weight": torch.zeros(2, 2)}, "not a PYLON checkpoint")
    (tmp_path / "junk.pth").write_bytes(b"not a model at all")
    with pytest.raises(CheckpointError):
        load_pylon(tmp_path / "junk.pth", device="cpu")


def test_sides_that_are_not_multiples_of_256_are_refused() -> None:
    model = PylonModel(
        PylonConfig(num_classes=1, stem_width=8, layers=(1, 1, 1, 1), dec_channels=8)
    )
    with pytest.raises(InputError, match="multiples of 256"):
        model.predict(torch.zeros(1, 1, 320, 320))
    with pytest.raises(InputError, match="multiples of 256"):
        model.predict(torch.zeros(1, 1, 256, 384))
    assert model.predict(torch.zeros(1, 1, 256, 512)).logits.shape == (1, 1, 64, 128)


@pytest.mark.parametrize("bad", ["a/b", "../x", ""])
def test_radiograph_class_names_must_be_safe_in_file_names(bad: str) -> None:
    """``--all-classes`` writes ``OUT_STEM.<class>.tif``: unsafe names are refused when a model
    is made (and so when one is loaded), as for INSIGHT (issue #16 class 1)."""
    from fastinsight.errors import CheckpointError
    from fastinsight.models.multires import MultiResConfig
    from fastinsight.models.pylon import PylonConfig

    with pytest.raises(CheckpointError, match="class"):
        PylonConfig(num_classes=2, class_names=("ok", bad))
    with pytest.raises(CheckpointError, match="class"):
        MultiResConfig(num_classes=2, class_names=("ok", bad))
