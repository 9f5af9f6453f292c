"""Classes 1 and 3 of issue #16 (config part): a model config with NaN, nonsense types or sizes,
or class names that cannot be file names is refused when the model is made or loaded, with the
field named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastinsight.cli import main
from fastinsight.errors import CheckpointError
from fastinsight.models.checkpoints import CONFIG_KEY, FORMAT_KEY, load_model
from fastinsight.models.config import InsightConfig, class_name_problem
from fastinsight.models.insight import InsightModel
from tests.hardening.conftest import assert_one_error_line, run_cli, tiny_config

BAD_FIELDS = [
    ({"smoothmax_a": math.nan}, "smoothmax_a must be finite"),
    ({"smoothmax_a": math.inf}, "smoothmax_a must be finite"),
    ({"lse_r0": math.nan}, "lse_r0 must be finite"),
    ({"norm_eps": 0.0}, "norm_eps must be > 0"),
    ({"norm_eps": -1e-5}, "norm_eps must be > 0"),
    ({"in_dim": "1024"}, "in_dim must be an integer"),
    ({"in_dim": 8.0}, "in_dim must be an integer"),
    ({"in_dim": True}, "in_dim must be an integer"),
    ({"num_classes": 0}, "num_classes must be in"),
    ({"reduce_dim": -3}, "reduce_dim must be in"),
    ({"in_dim": 2**40}, "in_dim must be in"),
    ({"grid_size": (14,)}, "grid_size must be a pair"),
    ({"grid_size": (14, 14, 14)}, "grid_size must be a pair"),
    ({"grid_size": (14, -1)}, "grid_size entry must be in"),
    ({"widths": (8, 4)}, "widths must be three"),
    ({"widths": (8, 4, "x")}, "widths entry must be an integer"),
    ({"otsu_bins": 1}, "otsu_bins must be >= 2"),
    ({"target_mpp": 0.0}, "target_mpp must be in"),
    ({"target_mpp": math.nan}, "target_mpp must be finite"),
    ({"tile_size_px": 8, "patch_size_px": 16}, "patch_size_px (16) must not exceed"),
    ({"encoder": ""}, "encoder must name"),
    ({"encoder": 3}, "encoder must be a string"),
    ({"pooling": None}, "pooling must be a string"),
]


@pytest.mark.parametrize(("change", "message"), BAD_FIELDS)
def test_bad_fields_are_refused_with_the_field_named(change: dict, message: str) -> None:
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(**change)


BAD_NAMES = ["a/b", "../x", "..", ".", "", "tumour\x00", "line\nbreak", "tab\there", "a\\b",
             "CON", "nul.txt", "com1", "what?", "a:b", " lead", "trail ", "dot.", "x" * 101]  # fmt: skip
GOOD_NAMES = ["tumour", "Präparat_µ", "腫瘍", "grade-2", "a.b", "Ünïcödé", "x" * 100]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_unsafe_class_names_are_refused(name: str) -> None:
    assert class_name_problem(name) is not None
    with pytest.raises(CheckpointError, match="class name|repeat"):
        tiny_config(num_classes=2, class_names=(name, "ok"))


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_names_in_any_script_are_fine(name: str) -> None:
    assert class_name_problem(name) is None
    cfg = tiny_config(num_classes=2, class_names=(name, "other"))
    assert cfg.names == (name, "other")


def test_duplicate_names_are_refused_ignoring_case() -> None:
    with pytest.raises(CheckpointError, match="repeat a name"):
        tiny_config(num_classes=2, class_names=("Tumour", "tumour"))


def _write_with_config(path: Path, config_json: str) -> Path:
    """A safetensors checkpoint whose embedded config is ``config_json`` (hand-edited)."""
    model = InsightModel(tiny_config(), backend="reference")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={CONFIG_KEY: config_json, FORMAT_KEY: "1"})
    return path


def _edited(**changes) -> str:
    raw = json.loads(tiny_config().to_json())
    raw.update(changes)
    return json.dumps(raw)  # json writes NaN as the bare literal NaN, as a hand edit would


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"smoothmax_a": math.nan}, "smoothmax_a"),
        ({"norm_eps": 0}, "norm_eps"),
        ({"in_dim": "8"}, "in_dim"),
        ({"grid_size": [1]}, "grid_size"),
        ({"widths": [8, -4, 4]}, "widths"),
        ({"class_names": ["../x"]}, "class name"),
    ],
)
def test_loading_a_hand_edited_config_names_the_field(tmp_path: Path, changes, field) -> None:
    path = _write_with_config(tmp_path / "m.safetensors", _edited(**changes))
    with pytest.raises(CheckpointError, match=field):
        load_model(path, backend="reference", device="cpu")


def test_config_json_that_is_not_an_object(tmp_path: Path) -> None:
    path = _write_with_config(tmp_path / "m.safetensors", "[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        load_model(path, backend="reference", device="cpu")


def test_cli_info_refuses_nan_config_in_one_line(tmp_path: Path, capsys) -> None:
    path = _write_with_config(tmp_path / "m.safetensors", _edited(smoothmax_a=math.nan))
    assert main(["info", str(path)]) == CheckpointError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("fastinsight: error:") and "smoothmax_a must be finite" in err
    proc = run_cli("info", path)
    assert "smoothmax_a" in assert_one_error_line(proc, CheckpointError.exit_code)


def test_official_defaults_still_valid() -> None:
    cfg = InsightConfig()
    assert InsightConfig.from_json(cfg.to_json()) == cfg
    InsightModel(tiny_config(num_classes=3, class_names=("a", "b", "c")))
    assert torch.isfinite(torch.tensor(cfg.smoothmax_a))
