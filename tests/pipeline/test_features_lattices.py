"""The slide-context model on CLAM files with several tissue contours: each contour's lattice on
its own exact grid, nothing moved (issue #10); single-grid files exactly as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from fastinsight import InsightConfig, InsightModel
from fastinsight.context_bands import banded_raw_heatmap
from fastinsight.errors import InputError
from fastinsight.features import read_features, unstitch
from fastinsight.predict.features import predict_features
from fastinsight.predict.slide import PredictOptions
from tests.support.h5_layouts import clam_contours, write_clam_features, write_clam_patches

OPTS = PredictOptions(progress=False, num_workers=0, device="cpu")
D = 16
PITCH = 512  # CLAM patch level 1 (downsample 2): 256 px patches are 512 level-0 px
BLOCK_A = np.array([[r, c] for r in range(3) for c in range(3)])
BLOCK_B = np.array([[r, c] for r in range(3) for c in range(2)])


@pytest.fixture(scope="module")
def model() -> InsightModel:
    torch.manual_seed(3)
    cfg = InsightConfig(
        in_dim=D, grid_size=(1, 1), norm="channel", context="slide", encoder="uni_v1",
        tile_size_px=256, patch_size_px=256, target_mpp=0.5,
    )  # fmt: skip
    m = InsightModel(cfg, backend="reference").eval()
    with torch.no_grad():  # a context branch strong enough to tell neighbours apart
        for p in m.context_block.parameters():
            p.mul_(3.0)
    return m


def _clam(root: Path, xy: np.ndarray, seed: int = 1) -> tuple[Path, Path, np.ndarray]:
    feats = np.random.default_rng(seed).standard_normal((len(xy), D)).astype(np.float32)
    patches = write_clam_patches(
        root / "patches" / "s.h5", xy, patch_size=256, patch_level=1, downsample=(2.0, 2.0),
        level_dim=(3000, 2000), name="s",
    )  # fmt: skip
    h5 = write_clam_features(root / "h5_files" / "s.h5", feats, xy)
    return h5, patches, feats


def _per_lattice_oracle(model: InsightModel, h5: Path, patches: Path) -> tuple[Tensor, Tensor]:
    """Raw heatmap of every tile, each contour's lattice stitched whole and run through the
    model's plain forward, then the threshold over the slide: ``(raw, heatmap)`` ``[N, K]``."""
    sf = read_features(h5, patches_h5=patches)
    raw = torch.empty(sf.num_tiles, model.config.num_classes)
    with torch.no_grad():
        for index, st in sf.stitched_lattices():
            out = model(st.grid, st.cell_mask)  # [1, K, H, W]
            raw[index] = unstitch(out, st.tile_rc, (1, 1))[:, :, 0, 0]
        heat, _, _ = model.threshold_and_pool(raw[:, :, None, None], sf.tile_mask())
    return raw, heat[:, :, 0, 0]


def _at(res, x: float, y: float, raw: bool = False) -> float:  # noqa: ANN001 - a SlideResult
    cell = res.grid.l0_cell_size
    return float((res.raw_cells if raw else res.cells)[0, int(y // cell), int(x // cell)])


def test_each_contour_lattice_lands_where_its_coordinates_say(
    tmp_path: Path, model: InsightModel
) -> None:
    """Two contours next to each other, origins 100 px and 37 px apart from any whole number of
    tiles: every tile's heatmap value is the one of its own lattice's exact grid, at its
    coordinates; snapping both onto one grid (the old input) moves B and changes A's context."""
    xy = clam_contours(
        [((1000, 1000), BLOCK_A), ((1000 + 3 * PITCH + 100, 1000 + 37), BLOCK_B)], PITCH
    )
    h5, patches, _ = _clam(tmp_path, xy)
    sf = read_features(h5, patches_h5=patches)
    assert [len(i) for i, _ in sf.lattices()] == [9, 6]
    res = predict_features(h5, model, OPTS, patches_h5=str(patches), slide=None)
    raw, heat = _per_lattice_oracle(model, h5, patches)
    assert res.grid.l0_cell_size < PITCH  # a raster finer than a tile holds both lattices
    assert res.report()["model"]["backend"] == "reference"  # which implementation ran
    for i, (x, y) in enumerate(xy.astype(float)):
        for f in (0.05, 0.5, 0.95):  # inside tile i's footprint, and nowhere else's
            px, py = x + f * PITCH, y + f * PITCH
            assert _at(res, px, py, raw=True) == pytest.approx(float(raw[i, 0]), abs=1e-6)
            assert _at(res, px, py) == pytest.approx(float(heat[i, 0]), abs=1e-6)
    np.testing.assert_allclose(res.scores, model.pool(heat.T, None).numpy(), atol=1e-6)

    snapped = predict_features(h5, model, OPTS, patches_h5=str(patches), snap=True)
    a_right = [int(i) for i in np.flatnonzero(BLOCK_A[:, 1] == 2)]  # A's column next to B
    snapped_raw = snapped.raw_cells[0, BLOCK_A[a_right, 0] + 2, BLOCK_A[a_right, 1] + 2]
    # With B rounded next to A, A's edge tiles see B's tissue: a different context.
    assert not np.allclose(snapped_raw, raw[a_right, 0].numpy(), atol=1e-4)


def test_contours_that_snapping_would_collide_are_placed_exactly(
    tmp_path: Path, model: InsightModel
) -> None:
    """B's lattice overlaps A's last column by 312 px: rounding puts B's first column on A's
    last (the old slide-context input refused the file); each lattice on its own grid runs."""
    xy = clam_contours([((0, 0), BLOCK_A), ((2 * PITCH + 200, 37), BLOCK_B)], PITCH)
    h5, patches, _ = _clam(tmp_path, xy, seed=2)
    with pytest.raises(InputError, match="fall on the same"):
        predict_features(h5, model, OPTS, patches_h5=str(patches), snap=True)
    with pytest.raises(InputError, match="fall on the same grid cell"):
        read_features(h5, patches_h5=patches).stitched(snap=True)
    res = predict_features(h5, model, OPTS, patches_h5=str(patches))
    raw, _ = _per_lattice_oracle(model, h5, patches)
    b = slice(len(BLOCK_A), None)
    for i, (x, y) in list(enumerate(xy.astype(float)))[b]:  # B's own right part: B alone
        got = _at(res, x + 0.9 * PITCH, y + 0.5 * PITCH, raw=True)
        assert got == pytest.approx(float(raw[i, 0]), abs=1e-6)
    # Where the lattices overlap, the raster holds the mean of the two tiles.
    x, y = 2 * PITCH + 300, 100  # A's tile (0, 2) and B's tile (0, 0)
    want = (float(raw[2, 0]) + float(raw[len(BLOCK_A), 0])) / 2
    assert _at(res, x, y, raw=True) == pytest.approx(want, abs=1e-6)


def test_one_contour_is_exactly_the_single_grid_computation(
    tmp_path: Path, model: InsightModel
) -> None:
    """A single lattice (one CLAM contour, off the slide's corner) goes through exactly the
    computation it went through before lattices existed: bit for bit."""
    xy = clam_contours([((1000, 2000), BLOCK_A)], PITCH)
    h5, patches, feats = _clam(tmp_path, xy, seed=4)
    sf = read_features(h5, patches_h5=patches)
    ((index, rc),) = sf.lattices()
    assert torch.equal(index, torch.arange(9)) and torch.equal(rc, sf.tile_rc())
    res = predict_features(h5, model, OPTS, patches_h5=str(patches))
    with torch.no_grad():
        mask = sf.tile_mask()
        raw = banded_raw_heatmap(sf.tokens, sf.tile_rc(), model.head_weights(), mask)
        heat, thresholds, scores = model.threshold_and_pool(raw, mask)
    assert np.array_equal(res.scores, scores.numpy())
    assert np.array_equal(res.thresholds, thresholds.numpy())
    cell = res.grid.l0_cell_size
    for i, (x, y) in enumerate(xy):
        r, c = int((y + 1) // cell), int((x + 1) // cell)
        assert res.cells[0, r, c] == heat[i, 0, 0, 0].item()
        assert res.raw_cells[0, r, c] == raw[i, 0, 0, 0].item()


def test_tile_geojson_puts_each_file_tile_where_the_file_put_it(
    tmp_path: Path, model: InsightModel
) -> None:
    """Per-tile GeoJSON of a CLAM run: one square per file tile at its own coordinates (two
    contour lattices off the grid's), scored from its own cells; not the grid's (0, 0)-anchored
    tiles, each the max over pieces of up to four real tiles."""
    import json

    xy = clam_contours(
        [((1000, 1000), BLOCK_A), ((1000 + 3 * PITCH + 100, 1000 + 37), BLOCK_B)], PITCH
    )
    h5, patches, _ = _clam(tmp_path, xy)
    res = predict_features(h5, model, OPTS, patches_h5=patches)
    out = tmp_path / "tiles.geojson"
    assert res.write_geojson(out) == len(xy)
    features = json.loads(out.read_text())["features"]
    corners = sorted(tuple(f["geometry"]["coordinates"][0][0]) for f in features)
    assert corners == sorted((float(x), float(y)) for x, y in xy)
    for f in features:
        x0, y0 = f["geometry"]["coordinates"][0][0]
        x1, y1 = f["geometry"]["coordinates"][0][2]
        assert (x1 - x0, y1 - y0) == (PITCH, PITCH)
    by_corner = {tuple(f["geometry"]["coordinates"][0][0]): f for f in features}
    for i, (x, y) in enumerate(xy):  # 1x1 grids: the tile's score is its one cell
        score = by_corner[(float(x), float(y))]["properties"]["measurements"]["score"]
        assert score == pytest.approx(float(res.tile_cells[0, i, 0]))
    per_cell = tmp_path / "cells.geojson"
    assert res.write_geojson(per_cell, per="cell") > 0  # cells stay on the raster
