"""Tissue detection modes and exact per-tile / per-cell tissue fractions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from slide_testutil import synthetic_reader

from fastinsight.errors import InputError, SlideError
from fastinsight.slide import (
    ArrayReader,
    TileGrid,
    TissueMask,
    cell_tissue_fraction,
    cell_tissue_mask,
    detect_tissue,
    open_slide,
    tile_tissue_fraction,
    tissue_tiles,
)
from fastinsight.slide.tissue import otsu_threshold_uint8


def _mask_on(thumb: np.ndarray, tissue: TissueMask) -> np.ndarray:
    """The mask sampled at every thumbnail pixel (nearest)."""
    h, w = thumb.shape[:2]
    rows = (np.arange(h) + 0.5) * tissue.shape[0] / h
    cols = (np.arange(w) + 0.5) * tissue.shape[1] / w
    return tissue.mask[np.ix_(rows.astype(int), cols.astype(int))]


def test_cmu_brightfield_covers_tissue_not_background(cmu: Path) -> None:
    with open_slide(cmu) as reader:
        tissue = detect_tissue(reader, "brightfield")
        thumb = reader.thumbnail(max(tissue.shape))
    assert tissue.mode == "brightfield"
    assert 0.2 < tissue.tissue_fraction < 0.6
    on = _mask_on(thumb, tissue)
    mx, mn = thumb.max(-1).astype(float), thumb.min(-1).astype(float)
    sat = (mx - mn) / np.maximum(mx, 1)
    white = mn > 225  # bare glass
    stained = sat > 0.3  # clearly stained tissue
    assert on[white].mean() < 0.05
    assert on[stained].mean() > 0.95


def test_ndpi_fluorescence_vs_brightfield(ndpi: Path) -> None:
    with open_slide(ndpi) as reader:
        with pytest.raises(SlideError, match="--tissue fluorescence") as exc:
            detect_tissue(reader, "brightfield")
        assert "--tissue all" in str(exc.value) and "\n" not in str(exc.value)
        tissue = detect_tissue(reader, "fluorescence")
        thumb = reader.thumbnail(max(tissue.shape))
    assert tissue.tissue_fraction > 0.5
    on = _mask_on(thumb, tissue)
    bright = thumb.max(-1) > 100  # nuclei
    assert on[bright].mean() > 0.9


def test_all_mode_keeps_every_tile() -> None:
    reader = synthetic_reader(300, 200)
    tissue = detect_tissue(reader, "all")
    assert tissue.mask.all()
    grid = TileGrid.for_slide(reader, target_mpp=0.5, tile_px=32, cells_per_side=4)
    assert len(tissue_tiles(grid, tissue)) == grid.n_tiles
    cells = cell_tissue_mask(grid, tissue)
    # cells touching the slide are in; cells wholly past its edge are out
    assert cells[: -(-200 // 8), : -(-300 // 8)].all()
    assert not cells[-(-200 // 8) :].any() and not cells[:, -(-300 // 8) :].any()


def test_synthetic_brightfield_finds_the_ellipse() -> None:
    reader = synthetic_reader(600, 400, mpp=0.5)
    tissue = detect_tissue(reader, "brightfield", mask_mpp=2.0, min_object_um2=100.0)
    yy, xx = np.mgrid[0 : tissue.shape[0], 0 : tissue.shape[1]]
    sy, sx = tissue.l0_per_px_y, tissue.l0_per_px_x
    inside = ((xx + 0.5) * sx - 270) ** 2 / 180**2 + ((yy + 0.5) * sy - 200) ** 2 / 120**2 < 1
    agree = (tissue.mask == inside).mean()
    assert agree > 0.97


def test_blank_slides_have_no_tissue() -> None:
    white = ArrayReader(np.full((200, 300, 3), 240, dtype=np.uint8), mpp=0.5)
    with pytest.raises(SlideError, match="no tissue found"):
        detect_tissue(white, "brightfield")
    black = ArrayReader(np.full((200, 300, 3), 3, dtype=np.uint8), mpp=0.5)
    with pytest.raises(SlideError, match="--tissue brightfield"):
        detect_tissue(black, "fluorescence")
    with pytest.raises(InputError, match="tissue mode"):
        detect_tissue(white, "phase")  # type: ignore[arg-type]


def test_box_fractions_are_exact_areas() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((13, 17)) > 0.5
    tissue = TissueMask(mask, slide_width=17 * 6, slide_height=13 * 6, mode="brightfield")
    # brute force: every mask pixel is 6 x 6 level-0 px; integrate at level 0
    l0 = np.repeat(np.repeat(mask, 6, axis=0), 6, axis=1).astype(float)
    x_edges = np.array([0.0, 7.0, 20.0, 55.0, 102.0, 130.0])  # past the slide: non-tissue
    y_edges = np.array([0.0, 11.0, 40.0, 78.0])
    got = tissue.box_fractions(x_edges, y_edges)
    padded = np.zeros((78, 130))
    padded[: l0.shape[0], : l0.shape[1]] = l0
    for i in range(3):
        for j in range(5):
            y0, y1, x0, x1 = (
                int(v) for v in (y_edges[i], y_edges[i + 1], x_edges[j], x_edges[j + 1])
            )
            assert got[i, j] == pytest.approx(padded[y0:y1, x0:x1].mean(), abs=1e-12)
    # fractional edges: halfway into one pixel counts half of it
    single = TissueMask(np.array([[True]]), slide_width=10, slide_height=10, mode="brightfield")
    assert single.box_fractions(np.array([5.0, 15.0]), np.array([0.0, 10.0]))[
        0, 0
    ] == pytest.approx(0.5)


def test_tile_and_cell_fractions_agree() -> None:
    reader = synthetic_reader(600, 400, mpp=0.5)
    tissue = detect_tissue(reader, "brightfield", mask_mpp=2.0, min_object_um2=100.0)
    grid = TileGrid.for_slide(reader, target_mpp=0.7, tile_px=32, cells_per_side=4)
    tiles_f = tile_tissue_fraction(grid, tissue)
    cells_f = cell_tissue_fraction(grid, tissue)
    assert tiles_f.shape == grid.shape and cells_f.shape == grid.cell_shape
    from_cells = cells_f.reshape(grid.rows, 4, grid.cols, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(from_cells, tiles_f, atol=1e-9)
    # total tissue area is conserved
    tile_area = grid.l0_tile_size**2
    total = tiles_f.sum() * tile_area
    assert total == pytest.approx(tissue.tissue_fraction * 600 * 400, rel=1e-9)


def test_tissue_tiles_threshold() -> None:
    reader = synthetic_reader(600, 400, mpp=0.5)
    tissue = detect_tissue(reader, "brightfield", mask_mpp=2.0, min_object_um2=100.0)
    grid = TileGrid.for_slide(reader, target_mpp=0.5, tile_px=32, cells_per_side=4)
    fraction = tile_tissue_fraction(grid, tissue)
    kept = tissue_tiles(grid, tissue, min_tissue_fraction=0.5)
    assert {(t.tile_row, t.tile_col) for t in kept} == set(
        zip(*np.nonzero(fraction >= 0.5), strict=True)
    )
    assert len(tissue_tiles(grid, tissue, 0.0)) >= len(tissue_tiles(grid, tissue, 0.1)) >= len(kept)
    cells = cell_tissue_mask(grid, tissue, 0.5, tiles=kept)
    assert cells.shape == grid.cell_shape and cells.any()
    with pytest.raises(InputError):
        tissue_tiles(grid, tissue, 1.5)
    empty = TissueMask(np.zeros((4, 4), dtype=bool), 600, 400, "brightfield")
    with pytest.raises(SlideError, match="--tissue all"):
        tissue_tiles(grid, empty, 0.1)


def test_mask_for_another_slide_is_refused() -> None:
    grid = TileGrid(slide_width=100, slide_height=100, slide_mpp=0.5, tile_px=32, cells_per_side=4)
    tissue = TissueMask(np.ones((4, 4), dtype=bool), 200, 100, "brightfield")
    with pytest.raises(InputError, match="same slide"):
        tile_tissue_fraction(grid, tissue)


def test_otsu_uint8() -> None:
    values = np.concatenate([np.full(100, 20), np.full(50, 200)])
    t = otsu_threshold_uint8(values)
    assert 20 <= t < 200
    assert otsu_threshold_uint8(np.full(10, 7)) == 7.0


def test_otsu_uint8_matches_scikit_image() -> None:
    filters = pytest.importorskip("skimage.filters")
    rng = np.random.default_rng(0)
    for _ in range(10):
        low = rng.normal(rng.uniform(10, 100), 10, 500)
        high = rng.normal(rng.uniform(120, 240), 15, 300)
        values = np.concatenate([low, high]).clip(0, 255).astype(np.uint8)
        assert otsu_threshold_uint8(values) == filters.threshold_otsu(values)
