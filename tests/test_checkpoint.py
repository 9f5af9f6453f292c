"""Checkpoint formats and every way a model file can be wrong."""

from __future__ import annotations

import pytest
import torch

from fastinsight import InsightConfig, InsightModel, load_model
from fastinsight.errors import CheckpointError
from fastinsight.models.checkpoints import sniff_format
from tests.support.official import random_official_state_dict


def _save(state, path):
    torch.save(state, path)
    return path


def test_official_small_dims_are_read_off_shapes(tmp_path) -> None:
    state = random_official_state_dict(96, 2, h=7, w=5)
    model = load_model(_save(state, tmp_path / "m.pth"), backend="reference", device="cpu")
    assert model.config.in_dim == 96 and model.config.num_classes == 2
    assert model.config.grid_size == (7, 5)
    assert model(torch.randn(1, 96, 7, 5)).shape == (1, 2, 7, 5)


def test_dataparallel_prefix_and_wrapped_state_dict(tmp_path) -> None:
    state = random_official_state_dict(32, 1)
    prefixed = {f"module.{k}": v for k, v in state.items()}
    a = load_model(_save(prefixed, tmp_path / "a.pth"), backend="reference", device="cpu")
    b = load_model(
        _save({"state_dict": state}, tmp_path / "b.pth"), backend="reference", device="cpu"
    )
    x = torch.randn(2, 32, 14, 14)
    torch.testing.assert_close(a(x), b(x))


def test_missing_extra_and_misshaped_keys_are_named(tmp_path) -> None:
    state = random_official_state_dict(32, 1)
    missing = dict(state)
    del missing["context_block.7.bias"]
    with pytest.raises(CheckpointError, match="missing key 'context_block.7.bias'"):
        load_model(_save(missing, tmp_path / "a.pth"), device="cpu")
    extra = dict(state, **{"head.fc.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="unexpected key 'head.fc.weight'"):
        load_model(_save(extra, tmp_path / "b.pth"), device="cpu")
    bad = dict(state)
    bad["backbone_block.3.weight"] = torch.zeros(64, 128, 3, 3)
    with pytest.raises(CheckpointError, match="'backbone_block.3.weight' has shape"):
        load_model(_save(bad, tmp_path / "c.pth"), device="cpu")


def test_checkpoint_of_another_architecture(tmp_path) -> None:
    resnet_like = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64)}
    with pytest.raises(CheckpointError, match="not an INSIGHT checkpoint"):
        load_model(_save(resnet_like, tmp_path / "r.pth"), device="cpu")


def test_pickled_objects_are_refused(tmp_path) -> None:
    import datetime

    path = tmp_path / "evil.pth"
    torch.save({"x": datetime.date(2020, 1, 1)}, path)  # not on the weights_only allow-list
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(path, device="cpu")


def test_files_that_are_not_checkpoints(tmp_path) -> None:
    text = tmp_path / "model.pth"
    text.write_text("this is not a model\n")
    with pytest.raises(CheckpointError, match="neither a PyTorch"):
        load_model(text, device="cpu")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.pth", device="cpu")
    good = _save(random_official_state_dict(32, 1), tmp_path / "good.pth")
    truncated = tmp_path / "trunc.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot load"):
        load_model(truncated, device="cpu")


def test_safetensors_without_config_is_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    assert sniff_format(path) == "safetensors"
    with pytest.raises(CheckpointError, match="without a fastinsight config"):
        load_model(path, device="cpu")


def test_save_is_atomic_and_leaves_nothing_on_failure(tmp_path) -> None:
    model = InsightModel(InsightConfig(in_dim=16), backend="reference")
    from fastinsight.errors import OutputError

    with pytest.raises(OutputError, match="does not exist"):
        model.save(str(tmp_path / "missing-dir" / "m.safetensors"))
    assert list(tmp_path.iterdir()) == []
    model.save(str(tmp_path / "m.safetensors"))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_config_json_round_trip_and_unknown_fields() -> None:
    cfg = InsightConfig(in_dim=7, num_classes=2, class_names=("x", "y"), grid_size=(3, 4))
    assert InsightConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(CheckpointError, match="unknown fields"):
        InsightConfig.from_json('{"in_dim": 3, "warp_drive": true}')
    with pytest.raises(CheckpointError, match="class_names"):
        InsightConfig(num_classes=2, class_names=("only-one",))


def test_atomic_outputs_get_the_usual_file_mode(tmp_path) -> None:
    import os

    from fastinsight.atomic import atomic_path

    with atomic_path(tmp_path / "x.txt") as tmp:
        tmp.write_text("hi")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_saved_models_are_readable_like_any_file(tmp_path) -> None:
    import os

    InsightModel(InsightConfig(in_dim=8), backend="reference").save(str(tmp_path / "m.safetensors"))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_one_state_check_for_every_model_family() -> None:
    """``check_state`` (INSIGHT, PYLON, the multi-resolution network, INSIGHT-CT all load through
    it): each offence is named, the first in order, and nothing is loaded by the check."""
    from torch import nn

    from fastinsight.models.statefiles import check_state

    model = nn.BatchNorm1d(3)  # floating weights and an integer counter
    expected = model.state_dict()
    good = {k: v.clone() for k, v in expected.items()}
    check_state(expected, good, "m.pth")
    cases = [
        (dict(good, extra=torch.zeros(1)), "unexpected key 'extra'; hint", "; hint"),
        ({k: v for k, v in good.items() if k != "bias"}, "missing key 'bias'", ""),
        (dict(good, weight=torch.zeros(4)), r"'weight' has shape \[4\], expected \[3\]", ""),
        (dict(good, num_batches_tracked=torch.tensor(1.0)), "expected torch.int64", ""),
        (dict(good, bias=torch.tensor([0.0, float("nan"), float("inf")])),
         r"'bias' holds 2 non-finite values \(NaN/inf\)", ""),
        (dict(good, running_var=torch.full((3,), 1e300, dtype=torch.float64)),
         "beyond float32's range", ""),
    ]  # fmt: skip
    for state, message, hint in cases:
        with pytest.raises(CheckpointError, match=message):
            check_state(expected, state, "m.pth", hint)
    # An extra key is named before a bad one.
    with pytest.raises(CheckpointError, match="unexpected key 'zz'"):
        check_state(expected, dict(good, weight=torch.zeros(9), zz=torch.zeros(1)), "m.pth")


def test_non_finite_official_weights_are_refused_before_loading(tmp_path) -> None:
    state = random_official_state_dict(32, 1)
    state["context_block.1.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"'context_block.1.weight' holds 1 non-finite"):
        load_model(_save(state, tmp_path / "nan.pth"), device="cpu")
