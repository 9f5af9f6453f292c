"""Feature files in the official, CLAM and TRIDENT layouts give the heatmap of a slide run."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from fastinsight import InsightConfig, InsightModel
from fastinsight.cli import main
from fastinsight.encoders import build_encoder
from fastinsight.encoders.torchscript import TorchScriptEncoder
from fastinsight.errors import InputError
from fastinsight.predict.features import predict_features
from fastinsight.predict.slide import PredictOptions, encode_slide, predict_slide
from fastinsight.synthetic import make_cohort

OPTS = PredictOptions(tissue="all", progress=False, num_workers=0, batch_size=16)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    """A positive synthetic slide of exactly 5 x 5 tiles at 0.5 um/px (level-0 tile = 224 px)."""
    out = tmp_path_factory.mktemp("cohort")
    return make_cohort(out, n_slides=2, size_px=(1120, 1120))[1].path


class _MeanTokens(nn.Module):
    """A per-tile-vector encoder: vit-tiny's token grid averaged to one 1 x 1 cell per tile."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = build_encoder("vit-tiny")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).mean(dim=(2, 3), keepdim=True)


def test_official_token_grid_h5_matches_slide_run(slide: Path, tmp_path: Path) -> None:
    encoder = build_encoder("vit-tiny")
    model = InsightModel(
        InsightConfig(in_dim=64, num_classes=2, encoder="vit-tiny"), backend="reference"
    )
    run = predict_slide(slide, model, encoder, OPTS)
    tokens, _, tiling = encode_slide(slide, encoder, 0.5, OPTS)
    h5 = tmp_path / "official.h5"
    with h5py.File(h5, "w") as f:
        f["features"] = tokens.numpy()
        f["coords"] = np.array([t.l0_xy_int for t in tiling.tiles], dtype=np.int64)
    feat = predict_features(h5, model, OPTS, slide=str(slide), patch_size_l0=224)
    np.testing.assert_allclose(feat.scores, run.scores, atol=1e-6)
    np.testing.assert_allclose(feat.cells, run.cells, atol=1e-6, equal_nan=True)
    assert feat.grid.cell_shape == run.grid.cell_shape


@pytest.mark.parametrize("layout", ["clam", "trident"])
@pytest.mark.parametrize("coord_dtype", [np.int32, np.int64], ids=["int32", "int64"])
def test_vector_h5_matches_slide_run_with_slide_context(
    slide: Path, tmp_path: Path, layout: str, coord_dtype
) -> None:
    scripted = torch.jit.trace(_MeanTokens().eval(), torch.randn(1, 3, 224, 224))
    ts_path = tmp_path / "mean_vit.pt"
    torch.jit.save(scripted, str(ts_path))
    encoder = TorchScriptEncoder(ts_path, tile_size_px=224)
    assert encoder.grid_size == (1, 1) and encoder.embed_dim == 64
    cfg = InsightConfig(  # trained on the scripted module's tokens: it records that encoder
        in_dim=64,
        grid_size=(1, 1),
        norm="channel",
        context="slide",
        encoder=f"torchscript:{ts_path}",
    )
    model = InsightModel(cfg, backend="reference")
    run = predict_slide(slide, model, encoder, OPTS)

    tokens, _, tiling = encode_slide(slide, encoder, 0.5, OPTS)
    vectors = tokens[:, :, 0, 0].numpy()
    coords = np.array([t.l0_xy_int for t in tiling.tiles], dtype=coord_dtype)
    h5 = tmp_path / f"{layout}.h5"
    with h5py.File(h5, "w") as f:
        f["features"] = vectors
        f["coords"] = coords
        if layout == "trident":
            # TRIDENT records the slide it cut: its name, level-0 size and magnification
            f["features"].attrs.update({"encoder": "vit-tiny", "name": slide.stem})
            f["coords"].attrs.update(
                {
                    "patch_size": 224,
                    "patch_size_level0": 224,
                    "level0_magnification": 20,
                    "target_magnification": 20,
                    "overlap": 0,
                    "level0_width": 1120,
                    "level0_height": 1120,
                    "name": slide.stem,
                    "savetodir": "None",
                }
            )
    extra = {} if layout == "trident" else {"patch_size_l0": 224}
    feat = predict_features(h5, model, OPTS, slide=str(slide), **extra)
    np.testing.assert_allclose(feat.scores, run.scores, atol=1e-6)
    np.testing.assert_allclose(feat.cells, run.cells, atol=1e-6, equal_nan=True)
    if layout == "trident":  # geometry and mpp from the attributes alone, no slide
        alone = predict_features(h5, model, OPTS)
        np.testing.assert_allclose(alone.cells, run.cells, atol=1e-6, equal_nan=True)
        assert alone.grid.slide_mpp == pytest.approx(0.5)


def test_features_cli_and_bad_files(slide: Path, tmp_path: Path, capsys) -> None:
    model_path = tmp_path / "m.safetensors"
    InsightModel(InsightConfig(in_dim=64, encoder="vit-tiny"), backend="reference").save(
        str(model_path)
    )
    h5 = tmp_path / "f.h5"
    with h5py.File(h5, "w") as f:
        f["features"] = np.random.rand(3, 64, 14, 14).astype(np.float32)
        f["coords"] = np.array([[0, 0], [224, 0], [448, 224]], dtype=np.int64)
    out = tmp_path / "h.tif"
    rc = main(
        [
            "predict",
            "--features",
            str(h5),
            "--slide",
            str(slide),
            "--patch-size-l0",
            "224",
            "--model",
            str(model_path),
            "--out",
            str(out),
            "--report",
            str(tmp_path / "r.json"),
            "--quiet",
        ]
    )
    assert rc == 0 and out.exists()
    assert json.loads((tmp_path / "r.json").read_text())["tiles"]["processed"] == 3
    # Off-grid coordinates, wrong feature dimension, NaN features: clear errors, nothing written.
    with h5py.File(h5, "a") as f:
        f["coords"][2] = [450, 224]
    out2 = tmp_path / "h2.tif"
    rc = main(
        [
            "predict",
            "--features",
            str(h5),
            "--slide",
            str(slide),
            "--patch-size-l0",
            "224",
            "--model",
            str(model_path),
            "--out",
            str(out2),
            "--quiet",
        ]
    )
    assert rc == 4 and not out2.exists()
    assert "not on the 224 px grid" in capsys.readouterr().err
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f["features"] = np.random.rand(2, 32, 14, 14).astype(np.float32)
        f["coords"] = np.array([[0, 0], [224, 0]])
    with pytest.raises(InputError, match="32-dim"):
        predict_features(
            wrong,
            InsightModel(InsightConfig(in_dim=64), backend="reference"),
            OPTS,
            slide=str(slide),
            patch_size_l0=224,
        )
    nan = tmp_path / "nan.h5"
    with h5py.File(nan, "w") as f:
        x = np.random.rand(2, 64, 14, 14).astype(np.float32)
        x[1, 0, 0, 0] = np.nan
        f["features"] = x
        f["coords"] = np.array([[0, 0], [224, 0]])
    with pytest.raises(InputError, match="NaN|finite"):
        predict_features(
            nan,
            InsightModel(InsightConfig(in_dim=64), backend="reference"),
            OPTS,
            slide=str(slide),
            patch_size_l0=224,
        )


def test_features_without_slide_or_mpp_use_the_model_geometry(tmp_path: Path) -> None:
    model = InsightModel(InsightConfig(in_dim=16, encoder="vit-tiny"), backend="reference")
    h5 = tmp_path / "f.h5"
    with h5py.File(h5, "w") as f:
        f["features"] = np.random.rand(2, 16, 14, 14).astype(np.float32)
        f["coords"] = np.array([[0, 0], [448, 0]], dtype=np.int64)
    res = predict_features(h5, model, OPTS, patch_size_l0=448)  # a 40x slide: 0.25 um/px
    assert res.grid.slide_mpp == pytest.approx(0.25)
    assert "derived" in res.slide_info["mpp_source"]
    assert res.grid.l0_tile_size == pytest.approx(448)
