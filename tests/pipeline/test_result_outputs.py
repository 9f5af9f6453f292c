"""One place writes every output of a result (SlideResult.write_outputs), all or nothing, in the npz format
that evaluation reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastinsight import InsightConfig, InsightModel
from fastinsight.errors import InputError
from fastinsight.evaluate import load_prediction_npz
from fastinsight.predict.features import predict_features
from fastinsight.predict.slide import Outputs, PredictOptions
from tests.support.h5_layouts import grid_coords, write_trident


@pytest.fixture
def result(tmp_path: Path):
    xy = grid_coords(np.array([[0, 0], [0, 1], [1, 1]]), 512)
    feats = np.random.default_rng(3).standard_normal((3, 16)).astype(np.float32)
    h5 = write_trident(tmp_path / "s3.h5", feats, xy, level0_size=(1536, 1024))
    cfg = InsightConfig(in_dim=16, grid_size=(1, 1), norm="channel", context="tile",
                        encoder="uni_v1", tile_size_px=256, patch_size_px=256)  # fmt: skip
    model = InsightModel(cfg, backend="reference")
    return predict_features(h5, model, PredictOptions(progress=False, device="cpu"))


def test_every_named_output_is_written_report_last(result, tmp_path: Path) -> None:
    outs = Outputs(
        heatmap=tmp_path / "h.tif",
        geojson=tmp_path / "t.geojson",
        scores=tmp_path / "s.npz",
        report=tmp_path / "r.json",
    )
    written = result.write_outputs(outs)
    assert written == [tmp_path / n for n in ("h.tif", "t.geojson", "s.npz", "r.json")]
    assert all(p.stat().st_size > 0 for p in written)
    assert "write" in json.loads((tmp_path / "r.json").read_text())["timings_s"]
    pred = load_prediction_npz(tmp_path / "s.npz")  # the sidecar is what evaluate reads
    assert pred.slide_id == "s3" and pred.heatmap.shape == result.cells.shape
    np.testing.assert_allclose(pred.scores, result.scores, rtol=1e-6)
    layout = Outputs.folder(tmp_path / "slide", geojson=True)
    assert Path(layout.heatmap).name == "heatmap.tif" and Path(layout.scores).name == "scores.npz"
    assert layout.any() and not Outputs().any()


def test_a_failed_write_leaves_nothing_behind(result, tmp_path: Path) -> None:
    outs = Outputs(
        heatmap=tmp_path / "h.tif", overlay=tmp_path / "o.png", report=tmp_path / "r.json"
    )
    (tmp_path / "r.json").write_text("previous run\n")
    with pytest.raises(InputError, match="thumbnail"):  # a feature run has no slide thumbnail
        result.write_outputs(outs)
    assert not list(tmp_path.glob("h*.tif")) and not (tmp_path / "o.png").exists()
    assert (tmp_path / "r.json").read_text() == "previous run\n"  # the old version is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "s3.h5"]  # no temp files
