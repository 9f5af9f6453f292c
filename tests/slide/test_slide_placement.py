"""One placement rule: tiles land on the slide raster where their file put them."""

from __future__ import annotations

import numpy as np
import pytest

from fastinsight.errors import InputError
from fastinsight.slide.grid import TileGrid
from fastinsight.slide.placement import (
    MAX_SUBDIVISION,
    cut,
    disjoint,
    grid_placement,
    lattice_rc,
    one_grid_rc,
    paste,
    place_tiles,
)
from tests.support.h5_layouts import grid_coords


def _clam_contours(dtype: type) -> np.ndarray:
    """Two CLAM contours: each lattice starts at its own bounding-box corner (pitch 512)."""
    a = grid_coords(np.array([[r, c] for r in range(3) for c in range(2)]), 512, (1000, 2000))
    b = grid_coords(np.array([[0, 0], [0, 1], [1, 0]]), 512, (5123, 801))
    return np.concatenate([a, b]).astype(dtype)


def _value_at(raster: np.ndarray, cell_l0: float, x: float, y: float) -> float:
    return float(raster[int(y // cell_l0), int(x // cell_l0)])


def test_one_lattice_from_the_corner_keeps_the_models_cells() -> None:
    xy = grid_coords(np.array([[0, 0], [0, 1], [2, 3]]), 224)
    p = place_tiles(xy, 224, 14)
    assert p.subdivision == 1 and p.exact and p.num_lattices == 1
    assert p.cell_rc.tolist() == [[0, 0], [0, 14], [28, 42]]
    assert p.raster_shape((1000, 700)) == (4 * 14, 5 * 14)


@pytest.mark.parametrize("dtype", [np.int32, np.int64], ids=["int32", "int64"])
def test_clam_contour_lattices_land_where_clam_put_them(dtype: type) -> None:
    xy = _clam_contours(dtype)
    p = place_tiles(xy, 512, 1)
    assert p.num_lattices == 2 and p.subdivision == MAX_SUBDIVISION
    # 5123 is no multiple of 512 / 16 = 32 px: the worst tile moves less than half a cell.
    assert 0 < p.max_shift_l0 <= p.cell_l0 / 2
    values = np.arange(1, len(xy) + 1, dtype=np.float32)[:, None, None]
    raster = paste(values, p, p.raster_shape((7000, 4000)))
    for i, (x, y) in enumerate(xy.astype(float)):
        for fx, fy in ((0.1, 0.1), (0.5, 0.5), (0.9, 0.9)):  # inside the tile's footprint
            assert _value_at(raster, p.cell_l0, x + fx * 512, y + fy * 512) == i + 1
    covered = np.isfinite(raster).sum() * p.cell_l0**2
    assert covered == pytest.approx(len(xy) * 512**2)


def test_snapping_rounds_to_the_models_cells() -> None:
    p = place_tiles(_clam_contours(np.int64), 512, 1, max_subdivision=1)
    assert p.subdivision == 1 and p.cell_l0 == 512 and p.max_shift_l0 <= 256


def test_phases_on_a_finer_raster_are_exact() -> None:
    xy = np.concatenate(
        [grid_coords(np.array([[0, 0]]), 256), grid_coords(np.array([[0, 0]]), 256, (576, 64))]
    )
    p = place_tiles(xy, 256, 1)
    assert p.subdivision == 4 and p.exact and p.cell_l0 == 64


def test_edge_tiles_past_the_slide_are_clipped_and_overlaps_averaged() -> None:
    xy = np.array([[0, 0], [100, 0], [900, 900]])
    p = place_tiles(xy, 200, 1, max_subdivision=2)
    assert p.subdivision == 2
    raster = paste(np.array([1.0, 3.0, 5.0])[:, None, None, None], p, (10, 10))
    assert raster.shape == (1, 10, 10)
    assert raster[0, 0, 0] == 1.0 and raster[0, 0, 1] == 2.0 and raster[0, 0, 2] == 3.0
    assert raster[0, 9, 9] == 5.0 and np.isnan(raster[0, 5, 5])
    assert not p.outside((1000, 1000)).any() and p.outside((800, 1000)).tolist() == [0, 0, 1]


def test_bad_input_is_refused() -> None:
    with pytest.raises(InputError, match="pitch"):
        place_tiles(np.zeros((1, 2)), 0.0, 1)
    p = place_tiles(np.zeros((2, 2)), 10.0, 2)
    with pytest.raises(InputError, match=r"values must be \[2, K, 2, 2\]"):
        paste(np.zeros((2, 1, 3, 3)), p, (4, 4))


def test_lattice_rc_counts_each_contour_from_its_own_corner() -> None:
    xy = _clam_contours(np.int64)
    p = place_tiles(xy, 512, 1)
    rc = lattice_rc(p)
    a, b = p.lattice[0], p.lattice[-1]
    assert a != b and (p.lattice[:6] == a).all() and (p.lattice[6:] == b).all()
    assert rc[:6].tolist() == [[r, c] for r in range(3) for c in range(2)]
    assert rc[6:].tolist() == [[0, 0], [0, 1], [1, 0]]  # B from (5123, 801), not from A's corner


def test_one_grid_rc_flags_off_grid_tiles_and_snaps_halves_up() -> None:
    xy = np.array([[1000, 2000], [1512, 2000], [1000 + 256, 2512], [1000 + 255, 2000 + 3 * 512]])
    rc, off = one_grid_rc(xy, 512)
    assert off.tolist() == [False, False, True, True]
    assert rc[:2].tolist() == [[0, 0], [0, 1]]
    snapped, none_off = one_grid_rc(xy, 512, snap=True)
    assert not none_off.any()
    assert snapped.tolist() == [[0, 0], [0, 1], [1, 1], [3, 0]]  # 256 rounds up, 255 down


def test_a_slide_run_is_pasted_bit_for_bit_where_its_grid_says() -> None:
    """One lattice from (0, 0) on a fractional level-0 tile size: each tile's cells are written
    as they are (same bits, no averaging) at (tile_row * c, tile_col * c); cut reads them back."""
    grid = TileGrid(slide_width=2220, slide_height=1500, slide_mpp=0.499, tile_px=32,
                    cells_per_side=4)  # fmt: skip
    tiles = [grid.tile(0, 1), grid.tile(2, 0), grid.tile(6, 9), grid.tile(3, 3)]
    values = np.random.default_rng(0).standard_normal((4, 3, 4, 4)).astype(np.float32)
    values[1, :, 0, 0] = np.nan  # a non-tissue cell inside a tile stays NaN
    p = grid_placement(tiles, grid)
    assert disjoint(p) and p.exact and p.subdivision == 1
    out = paste(values, p, grid.cell_shape)
    expected = np.full((3, *grid.cell_shape), np.nan, dtype=np.float32)
    for t, v in zip(tiles, values, strict=True):
        expected[:, t.tile_row * 4 : t.tile_row * 4 + 4, t.tile_col * 4 : t.tile_col * 4 + 4] = v
    assert out.dtype == np.float32
    assert np.array_equal(out, expected, equal_nan=True)
    assert np.array_equal(cut(out, p), values, equal_nan=True)
    assert np.array_equal(cut(out[0], p), values[:, 0], equal_nan=True)
    with pytest.raises(InputError, match="outside"):
        other = TileGrid(slide_width=9000, slide_height=9000, slide_mpp=0.5, tile_px=32,
                         cells_per_side=4)  # fmt: skip
        grid_placement([other.tile(100, 100)], grid)


def test_overlapping_lattices_are_not_disjoint() -> None:
    p = place_tiles(_clam_contours(np.int64), 512, 1)
    assert not disjoint(p)
    with pytest.raises(InputError, match="finer"):
        cut(np.zeros(p.raster_shape((7000, 4000))), p)
