"""Overlay PNG, colour maps and the QuPath GeoJSON companion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastinsight.errors import InputError
from fastinsight.slide import (
    TileGrid,
    apply_colormap,
    cell_scale_for,
    heatmap_geojson,
    render_overlay,
    write_geojson,
    write_overlay,
)

GRID = TileGrid(slide_width=300, slide_height=200, slide_mpp=0.5, tile_px=32, cells_per_side=4)


def _cells() -> np.ndarray:
    cells = np.full(GRID.cell_shape, np.nan, dtype=np.float32)
    cells[4:12, 8:16] = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    return cells


# -------------------------------------------------------------------------------- colour maps


def test_colormaps() -> None:
    turbo = apply_colormap(np.linspace(0, 1, 11), "turbo").astype(int)
    assert turbo.shape == (11, 3)
    # turbo-like ramp: dark at 0, blue-dominant low, green-dominant middle, red-dominant high
    assert turbo[0].sum() < 150 and turbo[10].sum() < 250
    assert turbo[2].argmax() == 2 and turbo[5].argmax() == 1 and turbo[8].argmax() == 0
    assert apply_colormap(np.array([np.nan, -1.0, 2.0])).tolist() == (
        apply_colormap(np.array([0.0, 0.0, 1.0])).tolist()
    )
    jet = apply_colormap(np.array([0.0, 0.5, 1.0]), "jet").tolist()
    assert jet == [[0, 0, 128], [128, 255, 128], [128, 0, 0]]
    with pytest.raises(InputError, match="colormap"):
        apply_colormap(np.zeros(2), "viridis")


# ------------------------------------------------------------------------------------ overlay


def test_overlay_blends_only_tissue() -> None:
    thumb = np.full((100, 150, 3), 200, dtype=np.uint8)
    scale = cell_scale_for(GRID, thumb.shape)
    assert scale == pytest.approx((GRID.l0_cell_size * 150 / 300, GRID.l0_cell_size * 100 / 200))
    image = render_overlay(thumb, _cells(), cell_scale=scale, colorbar=False, alpha=0.5)
    out = np.asarray(image)
    assert out.shape == thumb.shape
    # cell (r, c) covers thumbnail pixels [r * 4, (r + 1) * 4) (scale 4 here)
    assert (out[:16] == 200).all() and (out[:, :32] == 200).all()  # NaN cells: untouched
    assert (out[17:47, 33:63] != 200).any()
    first = apply_colormap(np.array(0.0)).astype(float)
    np.testing.assert_allclose(out[17, 33], np.rint(0.5 * 200 + 0.5 * first), atol=1)


def test_overlay_with_colorbar_and_title(tmp_path: Path) -> None:
    thumb = np.full((100, 150, 3), 230, dtype=np.uint8)
    path = tmp_path / "overlay.png"
    image = write_overlay(
        path, thumb, _cells(), cell_scale=cell_scale_for(GRID, thumb.shape), title="test"
    )
    assert image.width > 150 and image.height > 100  # colour bar on the right, title on top
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == image.size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay.png"]


def test_overlay_stretch_when_no_scale() -> None:
    thumb = np.zeros((40, 40, 3), dtype=np.uint8)
    heat = np.array([[0.0, np.nan], [np.nan, 1.0]])
    out = np.asarray(render_overlay(thumb, heat, colorbar=False, alpha=1.0))
    np.testing.assert_array_equal(
        out[:20, :20], np.broadcast_to(apply_colormap(np.array(0.0)), (20, 20, 3))
    )
    assert (out[:20, 20:] == 0).all()
    np.testing.assert_array_equal(
        out[20:, 20:], np.broadcast_to(apply_colormap(np.array(1.0)), (20, 20, 3))
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"alpha": 1.5}, {"colormap": "nope"}, {"value_range": (1, 1)}, {"cell_scale": (0, 1)}],
)
def test_overlay_bad_input_writes_nothing(tmp_path: Path, kwargs: dict[str, object]) -> None:
    thumb = np.zeros((40, 40, 3), dtype=np.uint8)
    with pytest.raises(InputError):
        write_overlay(tmp_path / "o.png", thumb, np.zeros((2, 2)), **kwargs)
    with pytest.raises(InputError, match="thumbnail"):
        write_overlay(tmp_path / "o.png", thumb[..., 0], np.zeros((2, 2)))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ GeoJSON


def _check_feature(feature: dict, grid: TileGrid) -> None:
    assert feature["type"] == "Feature"
    geometry = feature["geometry"]
    assert geometry["type"] == "Polygon"
    ring = geometry["coordinates"][0]
    assert len(ring) == 5 and ring[0] == ring[-1]
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    assert 0 <= min(xs) < max(xs) <= grid.slide_width
    assert 0 <= min(ys) < max(ys) <= grid.slide_height
    props = feature["properties"]
    assert props["objectType"] == "tile"
    assert props["classification"] == {"name": "tumour", "color": [200, 0, 0]}
    assert set(props["measurements"]) == {"score"}


def test_geojson_per_cell_and_tile(tmp_path: Path) -> None:
    cells = _cells()
    path = tmp_path / "cells.geojson"
    count = write_geojson(path, cells, GRID, per="cell", class_name="tumour", color=(200, 0, 0))
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    assert count == len(data["features"]) == int(np.isfinite(cells).sum()) == 64
    for feature in data["features"]:
        _check_feature(feature, GRID)
    first = data["features"][0]
    x0, y0 = first["geometry"]["coordinates"][0][0]
    assert (x0, y0) == pytest.approx((8 * GRID.l0_cell_size, 4 * GRID.l0_cell_size), abs=0.01)
    assert first["properties"]["measurements"]["score"] == pytest.approx(0.0)

    tiles = heatmap_geojson(cells, GRID, per="tile", class_name="tumour", color=(200, 0, 0))
    assert len(tiles["features"]) == 4  # cells [4:12, 8:16] lie in tiles (1..2, 2..3)
    for feature in tiles["features"]:
        _check_feature(feature, GRID)
    top_left = tiles["features"][0]
    assert top_left["properties"]["measurements"]["score"] == pytest.approx(
        float(np.nanmax(cells[4:8, 8:12]))
    )
    means = heatmap_geojson(cells, GRID, per="tile", tile_reduce="mean")
    assert means["features"][0]["properties"]["measurements"]["score"] == pytest.approx(
        float(np.nanmean(cells[4:8, 8:12]))
    )


def test_geojson_clips_edge_tiles() -> None:
    cells = np.full(GRID.cell_shape, 0.5, dtype=np.float32)
    data = heatmap_geojson(cells, GRID, per="tile", class_name="tumour", color=(200, 0, 0))
    assert len(data["features"]) == GRID.n_tiles
    for feature in data["features"]:
        _check_feature(feature, GRID)


def test_geojson_bad_input_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cell shape"):
        write_geojson(tmp_path / "x.geojson", np.zeros((3, 3)), GRID)
    with pytest.raises(InputError, match="per"):
        write_geojson(tmp_path / "x.geojson", _cells(), GRID, per="pixel")
    assert list(tmp_path.iterdir()) == []
