"""Tile grid geometry, level choice and stitching (synthetic; two checks on real slides)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fastinsight.errors import InputError
from fastinsight.slide import (
    TileGrid,
    best_level,
    grid_placement,
    open_slide,
    paste,
    tiles_cell_mask,
)


def test_level0_geometry_with_fractional_tile_size() -> None:
    grid = TileGrid(slide_width=2220, slide_height=2967, slide_mpp=0.499)
    assert grid.l0_tile_size == pytest.approx(224 * 0.5 / 0.499)
    assert grid.cols == math.ceil(2220 / grid.l0_tile_size) == 10
    assert grid.rows == math.ceil(2967 / grid.l0_tile_size) == 14
    assert grid.cell_px == 16
    assert grid.cell_shape == (14 * 14, 10 * 14)
    assert grid.l0_cell_size == pytest.approx(grid.l0_tile_size / 14)
    tile = grid.tile(3, 7)
    assert tile.l0_x == pytest.approx(7 * grid.l0_tile_size)
    assert tile.l0_y == pytest.approx(3 * grid.l0_tile_size)
    assert tile.index == 3 * grid.cols + 7
    assert tile.l0_box[2] - tile.l0_box[0] == pytest.approx(grid.l0_tile_size)
    # edge tiles cover the slide and stick out of it
    last = grid.tile(grid.rows - 1, grid.cols - 1)
    assert last.l0_box[2] >= 2220 and last.l0_box[0] < 2220
    assert last.l0_box[3] >= 2967 and last.l0_box[1] < 2967
    assert grid.tile_at(2219.9, 2966.9) == last
    assert grid.cell_l0_box(14, 0) == pytest.approx(
        (0.0, grid.l0_tile_size, grid.l0_cell_size, grid.l0_tile_size + grid.l0_cell_size)
    )


def test_exact_multiple_gets_no_extra_column() -> None:
    grid = TileGrid(slide_width=448 * 3, slide_height=448 * 2, slide_mpp=0.25)
    assert grid.l0_tile_size == 448.0
    assert grid.shape == (2, 3)
    assert len(grid) == 6 and grid.n_tiles == 6


def test_tiny_slide_has_one_tile() -> None:
    grid = TileGrid(slide_width=10, slide_height=7, slide_mpp=0.5)
    assert grid.shape == (1, 1)


def test_iterating_twice_gives_same_tiles() -> None:
    grid = TileGrid(slide_width=1000, slide_height=700, slide_mpp=0.3, tile_px=64, cells_per_side=4)
    first, second = list(grid), list(grid.tiles())
    assert first == second and len(first) == grid.n_tiles
    assert [t.index for t in first] == list(range(grid.n_tiles))  # row-major
    assert len({(t.tile_row, t.tile_col) for t in first}) == grid.n_tiles


def test_tiles_where_and_cell_mask() -> None:
    grid = TileGrid(slide_width=500, slide_height=300, slide_mpp=0.5, tile_px=32, cells_per_side=4)
    keep = np.zeros(grid.shape, dtype=bool)
    keep[1, 2] = keep[0, 0] = True
    tiles = grid.tiles_where(keep)
    assert [(t.tile_row, t.tile_col) for t in tiles] == [(0, 0), (1, 2)]
    mask = tiles_cell_mask(tiles, grid)
    assert mask.shape == grid.cell_shape and mask.sum() == 2 * 16
    assert mask[4:8, 8:12].all()
    with pytest.raises(InputError, match="shape"):
        grid.tiles_where(np.zeros((1, 1), dtype=bool))


def test_best_level_with_non_integer_downsample() -> None:
    downsamples = (1.0, 2.0005055, 8.002)
    assert best_level(downsamples, 2.0) == 1  # within 1 %: read level 1, resample by 0.03 %
    assert best_level(downsamples, 1.99) == 1
    assert best_level(downsamples, 1.9) == 0
    assert best_level(downsamples, 7.9) == 1
    assert best_level(downsamples, 100.0) == 2
    assert best_level(downsamples, 0.5) == 0
    assert best_level(downsamples, 2.0, tolerance=0.0) == 0


def test_for_slide_picks_level(tcga: Path, cmu: Path) -> None:
    with open_slide(tcga, mpp=0.25) as reader:
        grid = TileGrid.for_slide(reader, target_mpp=0.5)
        assert grid.level == 1
        assert grid.level_downsample == pytest.approx(2.0005055, abs=1e-6)
        assert grid.l0_tile_size == 448.0
        assert grid.lvl_tile_size == pytest.approx(448 / 2.0005055, rel=1e-6)
    with open_slide(cmu) as reader:  # single level: coarser targets come from resampling
        grid = TileGrid.for_slide(reader, target_mpp=1.0)
        assert grid.level == 0
        assert grid.l0_tile_size == pytest.approx(224 / 0.499)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tile_px": 100, "cells_per_side": 14},
        {"slide_mpp": 0.0},
        {"target_mpp": -1.0},
        {"slide_width": 0},
    ],
)
def test_invalid_grid(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"slide_width": 100, "slide_height": 100, "slide_mpp": 0.5}
    base.update(kwargs)
    with pytest.raises(InputError):
        TileGrid(**base)  # type: ignore[arg-type]


def test_grid_dict_round_trip() -> None:
    grid = TileGrid(1000, 800, 0.2501, 0.5, 224, 14, level=1, level_downsample=2.0005)
    assert TileGrid.from_dict(grid.to_dict()) == grid


def _grid_and_tiles() -> tuple[TileGrid, list]:
    grid = TileGrid(slide_width=300, slide_height=200, slide_mpp=0.5, tile_px=32, cells_per_side=4)
    tiles = [grid.tile(0, 1), grid.tile(2, 0), grid.tile(3, 5)]
    return grid, tiles


def _stitch(values, tiles, grid):  # noqa: ANN001, ANN202 - the placement rule of a slide run
    return paste(values, grid_placement(tiles, grid), grid.cell_shape)


def test_stitch_cells_numpy() -> None:
    grid, tiles = _grid_and_tiles()
    values = np.arange(3 * 2 * 4 * 4, dtype=np.float32).reshape(3, 2, 4, 4)
    out = _stitch(values, tiles, grid)
    assert out.shape == (2, grid.rows * 4, grid.cols * 4)
    np.testing.assert_array_equal(out[:, 0:4, 4:8], values[0])
    np.testing.assert_array_equal(out[:, 8:12, 0:4], values[1])
    np.testing.assert_array_equal(out[:, 12:16, 20:24], values[2])
    assert np.isnan(out).sum() == 2 * (grid.n_tiles - 3) * 16
    single = _stitch(values[:, 0], tiles, grid)  # [N, c, c] -> [rows*c, cols*c]
    np.testing.assert_array_equal(single, out[0])


def test_stitch_cells_torch_matches_numpy() -> None:
    grid, tiles = _grid_and_tiles()
    values = torch.randn(3, 2, 4, 4)
    out = _stitch(values, tiles, grid)
    assert out.dtype == np.float32
    expected = _stitch(values.numpy(), tiles, grid)
    np.testing.assert_array_equal(out, expected)


def test_stitch_one_cell_per_tile() -> None:  # CLAM/TRIDENT per-tile vectors
    grid, tiles = _grid_and_tiles()
    grid1 = TileGrid(grid.slide_width, grid.slide_height, grid.slide_mpp, tile_px=32,
                     cells_per_side=1)  # fmt: skip
    values = np.array([[[[1.0]]], [[[2.0]]], [[[3.0]]]])
    out = _stitch(values, [grid1.tile(t.tile_row, t.tile_col) for t in tiles], grid1)
    assert out.shape == (1, grid.rows, grid.cols)
    assert out[0, 0, 1] == 1.0 and out[0, 2, 0] == 2.0 and out[0, 3, 5] == 3.0


def test_stitch_errors() -> None:
    grid, tiles = _grid_and_tiles()
    with pytest.raises(InputError, match="one cell grid per placed tile"):
        _stitch(np.zeros((2, 1, 4, 4)), tiles, grid)
    with pytest.raises(InputError, match=r"values must be \[3, K, 4, 4\]"):
        _stitch(np.zeros((3, 1, 4, 5)), tiles, grid)
    with pytest.raises(InputError, match="outside"):
        other = TileGrid(
            slide_width=3000, slide_height=2000, slide_mpp=0.5, tile_px=32, cells_per_side=4
        )
        _stitch(np.zeros((1, 4, 4)), [other.tile(20, 20)], grid)


def test_deprecated_stitch_cells_warns_and_places_as_before() -> None:
    """``fastinsight.slide.stitch_cells`` (before issue #10) still works, with a warning; a
    tensor stays a tensor of its dtype, and every tile's cells land at its (row, col)."""
    from fastinsight import slide

    grid, tiles = _grid_and_tiles()
    values = torch.randn(3, 2, 4, 4)
    with pytest.warns(DeprecationWarning, match="grid_placement"):
        out = slide.stitch_cells(values, tiles, grid)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    for t, v in zip(tiles, values, strict=True):
        r, c = t.tile_row * 4, t.tile_col * 4
        assert torch.equal(out[:, r : r + 4, c : c + 4], v)
    assert int(torch.isnan(out).sum()) == 2 * (grid.n_tiles - 3) * 16
