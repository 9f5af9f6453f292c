"""Every JSON fastinsight reads from a user's file fails with its own one-line error, including
JSON nested deeper than Python's parser recurses (``json.loads`` raises RecursionError there)
and valid JSON of the wrong shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fastinsight.errors import CheckpointError, InputError
from fastinsight.text import loads_json

DEEP = "[" * 200_000 + "]" * 200_000


def test_loads_json_turns_deep_nesting_into_value_error() -> None:
    assert loads_json('{"a": [1, 2]}') == {"a": [1, 2]}
    with pytest.raises(ValueError, match="nested too deeply"):
        loads_json(DEEP)
    with pytest.raises(ValueError):
        loads_json("{not json")


def test_deep_geojson_is_an_input_error(tmp_path: Path) -> None:
    from fastinsight.evaluate.masks import read_geojson_polygons

    path = tmp_path / "deep.geojson"
    path.write_text(DEEP)
    with pytest.raises(InputError, match="nested too deeply"):
        read_geojson_polygons(path)


@pytest.mark.parametrize("text", [DEEP, "[1]", "5", '"text"'])
def test_model_metadata_of_any_shape_is_a_checkpoint_error(text: str) -> None:
    from fastinsight.models.config import InsightConfig
    from fastinsight.volume.checkpoint import VolumeModelInfo

    with pytest.raises(CheckpointError):
        VolumeModelInfo.from_json(text)
    with pytest.raises(CheckpointError):
        InsightConfig.from_json(text)


def test_scores_sidecar_with_a_bad_geometry_record(tmp_path: Path) -> None:
    from fastinsight.slide.heatmap_tiff import read_scores_sidecar

    for i, geometry in enumerate((DEEP, "[1, 2]", '{"grid": 3}')):
        path = tmp_path / f"s{i}.npz"
        np.savez(path, scores=np.zeros((1, 2, 2), np.float32), mask=np.ones((2, 2), bool),
                 class_names=np.array(["a"]), geometry=np.array(geometry))  # fmt: skip
        with pytest.raises(InputError, match="not a fastinsight scores sidecar"):
            read_scores_sidecar(path)


@pytest.mark.parametrize("text", [DEEP, "[]", '{"profile": 1}', "{"])
def test_tensorrt_sidecar_of_any_shape_is_an_input_error(tmp_path: Path, text: str) -> None:
    from fastinsight.export.tensorrt import read_engine_info, sidecar_path

    plan = tmp_path / "head.plan"
    sidecar_path(plan).write_text(text)
    with pytest.raises(InputError, match="rebuild the engine"):
        read_engine_info(plan)
