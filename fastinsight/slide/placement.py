"""Tiles on a slide's heatmap raster: the one placement rule for every source of tiles.

One origin convention: a tile's position is the level-0 (x, y) of its top-left corner measured
from the slide's top-left corner (0, 0), and the heatmap raster starts there too, with square
cells of ``cell_l0`` level-0 px (so the heatmap TIFF lines up with the slide by scale alone).

Tiles come on lattices of pitch ``pitch_l0``. The slide pipeline's and TRIDENT's lattice starts at
(0, 0). CLAM starts one lattice at each tissue contour's bounding-box corner
(``WholeSlideImage.process_contour``: ``range(start_y, stop_y, step_y)`` from
``cv2.boundingRect``), so a CLAM slide carries one lattice per contour, each with its own phase
(its origin modulo the pitch). A tile is placed where its file put it: its top-left cell is raster
cell ``round(l0 / cell_l0)``. The raster is ``subdivision`` times finer than the model's cells
(``cell_l0 = pitch_l0 / (cells_per_tile * subdivision)``), the smallest subdivision up to
``MAX_SUBDIVISION`` that puts every lattice exactly on raster cells; when none does, every tile is
off by at most half a raster cell, and ``max_shift_l0`` says how far the worst one moved.

Where tiles of two lattices overlap, a raster cell takes the mean of the tiles covering it.

The slide-context model's input (``context="slide"``: 3x3 convolutions across neighbouring tiles)
needs tiles on one regular lattice of the model's cells, so its positions are counted on each
tile's own lattice (:func:`lattice_rc`): every lattice is one exact grid, nothing is moved, and
tiles of different lattices never share a context grid (see ``fastinsight.predict.features``
for why that is what a pathologist expects of CLAM's per-contour grids). :func:`one_grid_rc` is
the single grid of files that have one, and ``--snap-to-grid``'s rounding of every tile onto it.

A slide run's own tiles (``TileGrid``) form one lattice from (0, 0): :func:`grid_placement`.
numpy only; no model code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fastinsight.errors import InputError

if TYPE_CHECKING:
    from fastinsight.slide.grid import Tile, TileGrid

# Raster cells per model cell side at most: a 512 px CLAM tile then maps onto 32 px cells.
MAX_SUBDIVISION = 16
# Positions within half a level-0 pixel of a raster cell count as on it: files store whole
# pixels, rounded from float lattices (224 px at 0.5 um/px on a 0.499 um/px slide).
_ON_CELL_L0 = 0.5


@dataclass(frozen=True)
class Placement:
    """Where each tile's cells sit on the slide's heatmap raster.

    Shapes: ``l0_xy`` ``[N, 2]`` float64 top-left (l0_x, l0_y); ``cell_rc`` ``[N, 2]`` int64
    raster (cell_row, cell_col) of each tile's top-left cell; ``lattice`` ``[N]`` int64, the lattice
    (CLAM contour grid) of each tile; ``phases_l0`` ``[L, 2]`` each lattice's (x, y) origin modulo
    the pitch.
    """

    l0_xy: np.ndarray
    pitch_l0: float
    cells_per_tile: int
    subdivision: int
    cell_rc: np.ndarray
    lattice: np.ndarray
    phases_l0: np.ndarray
    max_shift_l0: float

    @property
    def raster_cells_per_tile(self) -> int:
        """Raster cells along one tile side: ``cells_per_tile * subdivision``."""
        return self.cells_per_tile * self.subdivision

    @property
    def cell_l0(self) -> float:
        """Level-0 px one raster cell spans."""
        return self.pitch_l0 / self.raster_cells_per_tile

    @property
    def num_lattices(self) -> int:
        return int(self.phases_l0.shape[0])

    @property
    def exact(self) -> bool:
        """True when every tile sits on the raster exactly where its file put it."""
        return self.max_shift_l0 <= _ON_CELL_L0

    def raster_shape(self, slide_size_l0: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the raster over a slide of (width, height) level-0 px: whole tiles of
        the (0, 0) lattice, as ``TileGrid.cell_shape``. Shapes: -> ``(H, W)``."""
        w, h = slide_size_l0
        per = self.raster_cells_per_tile
        rows = max(1, math.ceil(h / self.pitch_l0 - 1e-9))
        cols = max(1, math.ceil(w / self.pitch_l0 - 1e-9))
        return rows * per, cols * per

    def outside(self, slide_size_l0: tuple[int, int]) -> np.ndarray:
        """Tiles whose top-left corner lies outside the slide. Shapes: -> ``[N]`` bool."""
        w, h = slide_size_l0
        x, y = self.l0_xy[:, 0], self.l0_xy[:, 1]
        return (x < 0) | (y < 0) | (x >= w) | (y >= h)


def _lattices(l0_xy: np.ndarray, pitch_l0: float) -> tuple[np.ndarray, np.ndarray]:
    """Lattice index of every tile and each lattice's phase (origin modulo the pitch).

    Shapes: ``[N, 2]`` -> (``[N]`` int64, ``[L, 2]`` float64).
    """
    phase = np.mod(l0_xy, pitch_l0)
    # Phases within half a pixel of the pitch are phase 0 (rounded float lattices).
    phase[pitch_l0 - phase <= _ON_CELL_L0] = 0.0
    key = np.rint(phase).astype(np.int64)  # lattices closer than a pixel are one lattice
    if key.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.float64)
    _, first, ids = np.unique(key, axis=0, return_index=True, return_inverse=True)
    return ids.reshape(-1).astype(np.int64), phase[first]


def _subdivision(phases_l0: np.ndarray, model_cell_l0: float, max_subdivision: int) -> int:
    """The smallest s in 1..max whose raster cells (model cell / s) hold every phase exactly."""
    for s in range(1, max_subdivision + 1):
        units = phases_l0 / (model_cell_l0 / s)
        if np.all(np.abs(units - np.rint(units)) * (model_cell_l0 / s) <= _ON_CELL_L0):
            return s
    return max_subdivision


def place_tiles(
    l0_xy: Any,
    pitch_l0: float,
    cells_per_tile: int,
    *,
    max_subdivision: int = MAX_SUBDIVISION,
) -> Placement:
    """Place tiles given by their top-left level-0 corners on the slide's heatmap raster.

    ``max_subdivision=1`` keeps the model's own cells (raster cell = pitch / cells_per_tile) and
    rounds off-lattice tiles to the nearest cell: that is what ``--snap-to-grid`` asks for.
    Shapes: ``l0_xy`` ``[N, 2]`` (any integer or float dtype) -> ``Placement``.
    """
    xy = np.asarray(l0_xy, dtype=np.float64).reshape(-1, 2)
    if not (math.isfinite(pitch_l0) and pitch_l0 > 0):
        raise InputError(f"the tile pitch must be a positive number of level-0 px, got {pitch_l0}")
    if cells_per_tile < 1 or max_subdivision < 1:
        raise InputError(
            f"cells_per_tile and max_subdivision must be >= 1, got {cells_per_tile}, "
            f"{max_subdivision}"
        )
    if xy.size and not np.isfinite(xy).all():
        raise InputError("tile coordinates must be finite level-0 px")
    lattice, phases = _lattices(xy, pitch_l0)
    s = _subdivision(phases, pitch_l0 / cells_per_tile, max_subdivision)
    cell = pitch_l0 / (cells_per_tile * s)
    cell_rc = np.rint(xy[:, ::-1] / cell).astype(np.int64)
    shift = float(np.abs(cell_rc[:, ::-1] * cell - xy).max()) if xy.size else 0.0
    return Placement(
        l0_xy=xy,
        pitch_l0=float(pitch_l0),
        cells_per_tile=int(cells_per_tile),
        subdivision=s,
        cell_rc=cell_rc,
        lattice=lattice,
        phases_l0=phases,
        max_shift_l0=shift,
    )


def rc_placement(tile_rc: Any, cells_per_tile: int, pitch_l0: float = 1.0) -> Placement:
    """Tiles at ``(tile_row, tile_col)`` of one grid anchored at the raster's origin, on the
    model's own cells (``subdivision`` 1): tile ``(r, q)`` -> cell ``(r * c, q * c)``. Exact by
    construction. Shapes: ``[N, 2]`` int -> ``Placement``.
    """
    rc = np.asarray(tile_rc, dtype=np.int64).reshape(-1, 2)
    n = rc.shape[0]
    return Placement(
        l0_xy=rc[:, ::-1].astype(np.float64) * float(pitch_l0),
        pitch_l0=float(pitch_l0),
        cells_per_tile=int(cells_per_tile),
        subdivision=1,
        cell_rc=rc * int(cells_per_tile),
        lattice=np.zeros(n, dtype=np.int64),
        phases_l0=np.zeros((1 if n else 0, 2), dtype=np.float64),
        max_shift_l0=0.0,
    )


def grid_placement(tiles: Sequence[Tile], grid: TileGrid) -> Placement:
    """The tiles of a slide run's ``TileGrid``: one lattice from the slide's corner at pitch
    ``grid.l0_tile_size``, on the model's own cells (see :func:`rc_placement`).

    Shapes: N tiles -> ``Placement`` with ``cell_rc`` ``[N, 2]``.
    """
    n = len(tiles)
    rc = np.fromiter(
        (v for t in tiles for v in (t.tile_row, t.tile_col)), dtype=np.int64, count=2 * n
    ).reshape(n, 2)
    if n and (rc.min() < 0 or rc[:, 0].max() >= grid.rows or rc[:, 1].max() >= grid.cols):
        raise InputError(
            f"a tile lies outside the {grid.rows}x{grid.cols} grid; was it made by another grid?"
        )
    return rc_placement(rc, grid.cells_per_side, grid.l0_tile_size)


def one_grid_rc(
    l0_xy: Any, pitch_l0: float, *, snap: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Every tile on ONE tile grid of pitch ``pitch_l0`` whose origin is the tiles' smallest
    l0_x and smallest l0_y: ``(tile_row, tile_col) = (y - y_min, x - x_min) / pitch``.

    Returns the positions and which tiles are off that grid (their offset from the origin is
    no whole number of pitches; their position is then meaningless). With ``snap`` every tile is
    rounded to the nearest grid point instead, halves up (``floor((2 d + p) / 2p)``), and none is
    off: that is ``--snap-to-grid``, moving a tile by up to half a pitch.
    Shapes: ``[N, 2]`` (x, y) -> (``[N, 2]`` int64 (row, col), ``[N]`` bool).
    """
    xy = np.asarray(l0_xy)
    xy = xy.reshape(-1, 2) if np.issubdtype(xy.dtype, np.integer) else xy.astype(np.float64)
    if xy.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=bool)
    step = pitch_l0 if not np.issubdtype(xy.dtype, np.integer) else int(pitch_l0)
    offset = xy - xy.min(axis=0)
    if snap:
        rc = np.floor_divide(offset * 2 + step, 2 * step)
        off = np.zeros(xy.shape[0], dtype=bool)
    else:
        rc = np.floor_divide(offset, step)
        off = (np.mod(offset, step) != 0).any(axis=1)
    return np.ascontiguousarray(rc[:, ::-1], dtype=np.int64), off


def lattice_rc(placement: Placement) -> np.ndarray:
    """Each tile's ``(tile_row, tile_col)`` on its OWN lattice's grid, counted from that
    lattice's smallest l0_x and l0_y: ``round((xy - min over the lattice) / pitch)``.

    Exact: tiles of one lattice differ by whole pitches (up to the sub-pixel rounding that
    ``place_tiles`` merges lattices over), so no tile moves. With one lattice this is
    ``one_grid_rc`` of the whole file. Shapes: -> ``[N, 2]`` int64.
    """
    xy, lat = placement.l0_xy, placement.lattice
    n_lat = placement.num_lattices
    if xy.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.int64)
    origin = np.full((n_lat, 2), np.inf)
    np.minimum.at(origin, lat, xy)
    rc = np.rint((xy - origin[lat]) / placement.pitch_l0).astype(np.int64)
    return np.ascontiguousarray(rc[:, ::-1])


def disjoint(placement: Placement) -> bool:
    """True when no raster cell is covered by two tiles: one lattice, no tile twice."""
    if placement.num_lattices > 1:
        return False
    rc = placement.cell_rc
    return rc.shape[0] == np.unique(rc, axis=0).shape[0]


def cut(raster: Any, placement: Placement) -> np.ndarray:
    """Each tile's cells out of a slide raster: the inverse of :func:`paste` on the model's own
    cells (``subdivision`` 1). Cells past the raster's edge read as False / zero.

    Shapes: ``[H, W]`` -> ``[N, c, c]``; ``[K, H, W]`` -> ``[N, K, c, c]``.
    """
    arr = np.asarray(raster)
    if placement.subdivision != 1:
        raise InputError(
            f"cut reads the model's own cells; this placement is {placement.subdivision}x finer"
        )
    squeeze = arr.ndim == 2
    a = arr[None] if squeeze else arr
    if a.ndim != 3:
        raise InputError(f"raster must be [H, W] or [K, H, W], got {tuple(arr.shape)}")
    c = placement.cells_per_tile
    rows = placement.cell_rc[:, 0, None, None] + np.arange(c)[None, :, None]  # [N, c, 1]
    cols = placement.cell_rc[:, 1, None, None] + np.arange(c)[None, None, :]  # [N, 1, c]
    inside = (rows >= 0) & (rows < a.shape[1]) & (cols >= 0) & (cols < a.shape[2])
    out = a[:, rows.clip(0, a.shape[1] - 1), cols.clip(0, a.shape[2] - 1)]  # [K, N, c, c]
    out = np.where(inside[None], out, np.zeros((), dtype=a.dtype))
    out = np.moveaxis(out, 0, 1)
    return np.ascontiguousarray(out[:, 0] if squeeze else out)


def paste(
    values: Any,
    placement: Placement,
    raster_shape: tuple[int, int],
    fill: float = float("nan"),
    *,
    chunk: int = 4096,
) -> np.ndarray:
    """Per-tile cell grids onto the slide raster, each tile where ``placement`` puts it.

    Each model cell covers ``subdivision x subdivision`` raster cells; cells past the raster's
    edge (tiles sticking out of the slide) are dropped; a raster cell covered by several tiles
    takes their mean; cells covered by none get ``fill``.
    Shapes: ``[N, K, c, c]`` -> ``[K, H, W]``; ``[N, c, c]`` -> ``[H, W]`` (float32).
    """
    vals = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
    squeeze = vals.ndim == 3
    if squeeze:
        vals = vals[:, None]
    n, k = vals.shape[0], vals.shape[1]
    c = placement.cells_per_tile
    if vals.ndim != 4 or vals.shape[2:] != (c, c) or n != placement.cell_rc.shape[0]:
        raise InputError(
            f"values must be [{placement.cell_rc.shape[0]}, K, {c}, {c}] (one cell grid per "
            f"placed tile), got {tuple(vals.shape)}"
        )
    h, w = raster_shape
    s = placement.subdivision
    per = c * s
    dr, dc = np.meshgrid(np.arange(per), np.arange(per), indexing="ij")
    if disjoint(placement):
        # One lattice: every raster cell has at most one tile, so its value is written as it
        # is (no float64 round trip; a slide run's whole-slide raster is built this way).
        out = np.full((k, h * w), fill, dtype=np.float32)
        for a in range(0, n, chunk):
            rc = placement.cell_rc[a : a + chunk]
            rows = rc[:, 0, None, None] + dr
            cols = rc[:, 1, None, None] + dc
            inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
            fine = vals[a : a + chunk].repeat(s, axis=2).repeat(s, axis=3)
            out[:, (rows * w + cols)[inside]] = np.moveaxis(fine, 1, -1)[inside].T
        raster = out.reshape(k, h, w)
        return raster[0] if squeeze else raster
    total = np.zeros((k, h * w), dtype=np.float64)
    count = np.zeros(h * w, dtype=np.int64)
    for a in range(0, n, chunk):
        rc = placement.cell_rc[a : a + chunk]
        rows = rc[:, 0, None, None] + dr  # [n, per, per]
        cols = rc[:, 1, None, None] + dc
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        flat = (rows * w + cols)[inside]
        fine = vals[a : a + chunk].repeat(s, axis=2).repeat(s, axis=3)  # [n, K, per, per]
        picked = np.moveaxis(fine, 1, -1)[inside]  # [cells, K]
        np.add.at(count, flat, 1)
        for j in range(k):
            np.add.at(total[j], flat, picked[:, j])
    out = np.full((k, h * w), fill, dtype=np.float32)
    hit = count > 0
    out[:, hit] = (total[:, hit] / count[hit]).astype(np.float32)
    raster = out.reshape(k, h, w)
    return raster[0] if squeeze else raster


__all__ = [
    "MAX_SUBDIVISION",
    "Placement",
    "cut",
    "disjoint",
    "grid_placement",
    "lattice_rc",
    "one_grid_rc",
    "paste",
    "place_tiles",
    "rc_placement",
]
