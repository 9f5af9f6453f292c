"""Tile grid geometry: square tiles at an exact target mpp, aligned in level-0 pixels.

A grid covers the whole slide from its top-left corner (0, 0). One tile is ``tile_px`` pixels
at ``target_mpp``, i.e. ``l0_tile_size = tile_px * target_mpp / slide_mpp`` level-0 pixels (a
float: 224 px at 0.5 um/px on a 0.499 um/px slide is 224.449 level-0 px). Tile ``(tile_row,
tile_col)`` covers level-0 ``[tile_col * l0_tile_size, (tile_col + 1) * l0_tile_size)``
horizontally, and likewise vertically; the last row and column may stick out of the slide and
are read with white padding, so every slide pixel belongs to exactly one tile.

Each tile carries a ``cells_per_side x cells_per_side`` heatmap grid (14 x 14 for a ViT/16 on
224 px tiles: one cell is 16 x 16 target px). A slide-level heatmap is an array of
``cell_shape = (rows * cells_per_side, cols * cells_per_side)`` cells; cell ``(cell_row,
cell_col)`` covers level-0 ``[cell_col * l0_cell_size, (cell_col + 1) * l0_cell_size)``.
``fastinsight.slide.placement`` (``grid_placement`` and ``paste``) builds that array from
per-tile grids: the one placement rule of the package.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fastinsight.errors import InputError, SlideError
from fastinsight.slide.levels import LEVEL_TOLERANCE, best_level
from fastinsight.slide.placement import grid_placement, paste, rc_placement

if TYPE_CHECKING:
    from fastinsight.slide.readers import SlideReader

# A slide whose width is a whole number of tiles must not get an extra empty column from
# floating-point noise.
_EPS = 1e-9
# No glass slide is wider than this (standard 75 x 25 mm, whole-mount "giant" slides ~127 x
# 102 mm). A slide beyond it at its mpp has a wrong mpp (a 72-dpi tag, a typo in --mpp), and its
# tile grid at the model's resolution could take more memory than the machine has.
MAX_SLIDE_SIDE_MM = 200.0


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TileGrid`, in level-0 pixels (floats: tiles are not whole pixels).

    ``index`` is the row-major position in the full grid: ``tile_row * grid.cols + tile_col``.
    """

    tile_row: int
    tile_col: int
    l0_x: float
    l0_y: float
    l0_size: float
    index: int

    @property
    def l0_box(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` in level-0 pixels, end exclusive."""
        return (self.l0_x, self.l0_y, self.l0_x + self.l0_size, self.l0_y + self.l0_size)

    @property
    def l0_xy_int(self) -> tuple[int, int]:
        """Top-left rounded to whole level-0 pixels (CLAM/TRIDENT-style ``coords``)."""
        return (int(round(self.l0_x)), int(round(self.l0_y)))


def check_slide_extent(width: int, height: int, mpp: float) -> None:
    """Refuse a slide whose pixels at ``mpp`` (the file's or ``--mpp``: a real pixel size, not
    a placeholder) make it wider than :data:`MAX_SLIDE_SIDE_MM`, before its grid is built."""
    side_mm = max(width, height) * mpp / 1000.0
    if side_mm > MAX_SLIDE_SIDE_MM:
        raise SlideError(
            f"at {mpp:g} um/px the {width} x {height} px slide is {side_mm:.0f} mm wide, more "
            f"than any glass slide ({MAX_SLIDE_SIDE_MM:.0f} mm): its mpp is wrong; pass the "
            "scanner's --mpp (e.g. 0.25 at 40x, 0.5 at 20x)"
        )


@dataclass(frozen=True)
class TileGrid:
    """Square tiles of ``tile_px`` pixels at ``target_mpp`` over a whole slide.

    ``level``/``level_downsample`` say which pyramid level the tiler reads from (the coarsest
    level not coarser than the target, see :func:`best_level`); :meth:`for_slide` fills them.
    ``slide_mpp`` is the mean of the slide's x and y mpp (tiles are square);
    ``slide_mpp_xy`` keeps the two where they differ (within the readers' 5 %), so outputs that
    state a physical size (the heatmap TIFF's resolution) state each axis's own.
    """

    slide_width: int
    slide_height: int
    slide_mpp: float
    target_mpp: float = 0.5
    tile_px: int = 224
    cells_per_side: int = 14
    level: int = 0
    level_downsample: float = 1.0
    slide_mpp_xy: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.slide_width < 1 or self.slide_height < 1:
            raise InputError(
                f"slide size must be at least 1x1 px; got {self.slide_width}x{self.slide_height}"
            )
        for name in ("slide_mpp", "target_mpp", "level_downsample"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a positive number; got {value!r}")
        if self.tile_px < 1 or self.cells_per_side < 1:
            raise InputError(
                f"tile_px and cells_per_side must be >= 1; got {self.tile_px}, "
                f"{self.cells_per_side}"
            )
        if self.tile_px % self.cells_per_side:
            raise InputError(
                f"tile_px ({self.tile_px}) must be a multiple of cells_per_side "
                f"({self.cells_per_side}) so every heatmap cell covers whole pixels; e.g. 224 "
                "px with 14 cells (16 px per cell)"
            )
        if self.level < 0:
            raise InputError(f"level must be >= 0; got {self.level}")
        if self.slide_mpp_xy is not None:
            xy = tuple(self.slide_mpp_xy)
            if len(xy) != 2 or not all(
                isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in xy
            ):
                raise InputError(f"slide_mpp_xy must be two positive numbers; got {xy!r}")
            object.__setattr__(self, "slide_mpp_xy", (float(xy[0]), float(xy[1])))

    @property
    def mpp_xy(self) -> tuple[float, float]:
        """Level-0 ``(mpp_x, mpp_y)``: ``slide_mpp_xy`` where known, else ``slide_mpp`` twice."""
        return self.slide_mpp_xy or (self.slide_mpp, self.slide_mpp)

    @classmethod
    def for_slide(
        cls,
        reader: SlideReader,
        target_mpp: float = 0.5,
        tile_px: int = 224,
        cells_per_side: int = 14,
        *,
        level_tolerance: float = LEVEL_TOLERANCE,
    ) -> TileGrid:
        """The grid of ``reader`` (uses its mpp, so a slide without one raises SlideError)."""
        slide_mpp = reader.mpp
        width, height = reader.dimensions
        check_slide_extent(width, height, slide_mpp)
        if not (math.isfinite(target_mpp) and target_mpp > 0):
            raise InputError(f"target mpp must be a positive number, e.g. 0.5; got {target_mpp!r}")
        level = best_level(reader.level_downsamples, target_mpp / slide_mpp, level_tolerance)
        mpp_xy = reader.mpp_xy
        return cls(
            slide_width=width,
            slide_height=height,
            slide_mpp=slide_mpp,
            target_mpp=target_mpp,
            tile_px=tile_px,
            cells_per_side=cells_per_side,
            level=level,
            level_downsample=reader.level_downsamples[level],
            slide_mpp_xy=mpp_xy if mpp_xy[0] != mpp_xy[1] else None,
        )

    # ---------------------------------------------------------------------------- geometry
    @property
    def downsample(self) -> float:
        """Level-0 pixels per target pixel (``target_mpp / slide_mpp``)."""
        return self.target_mpp / self.slide_mpp

    @property
    def l0_tile_size(self) -> float:
        """Side of a tile in level-0 pixels (float)."""
        return self.tile_px * self.downsample

    @property
    def lvl_tile_size(self) -> float:
        """Side of a tile in pixels of the read level (resampled to ``tile_px``)."""
        return self.l0_tile_size / self.level_downsample

    @property
    def cell_px(self) -> int:
        """Side of a heatmap cell in target pixels (16 for 224 / 14)."""
        return self.tile_px // self.cells_per_side

    @property
    def l0_cell_size(self) -> float:
        """Side of a heatmap cell in level-0 pixels."""
        return self.l0_tile_size / self.cells_per_side

    @property
    def cols(self) -> int:
        return max(1, math.ceil(self.slide_width / self.l0_tile_size - _EPS))

    @property
    def rows(self) -> int:
        return max(1, math.ceil(self.slide_height / self.l0_tile_size - _EPS))

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of tiles."""
        return (self.rows, self.cols)

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols

    @property
    def cell_shape(self) -> tuple[int, int]:
        """``(rows * cells_per_side, cols * cells_per_side)``: the slide heatmap's shape."""
        return (self.rows * self.cells_per_side, self.cols * self.cells_per_side)

    @property
    def slide_extent_um(self) -> tuple[float, float]:
        """Physical slide size ``(width, height)`` in micrometres."""
        return (self.slide_width * self.slide_mpp, self.slide_height * self.slide_mpp)

    # ------------------------------------------------------------------------------- tiles
    def tile(self, tile_row: int, tile_col: int) -> Tile:
        if not (0 <= tile_row < self.rows and 0 <= tile_col < self.cols):
            raise InputError(
                f"tile ({tile_row}, {tile_col}) is outside the {self.rows}x{self.cols} grid"
            )
        size = self.l0_tile_size
        return Tile(
            tile_row=tile_row,
            tile_col=tile_col,
            l0_x=tile_col * size,
            l0_y=tile_row * size,
            l0_size=size,
            index=tile_row * self.cols + tile_col,
        )

    def tiles(self) -> Iterator[Tile]:
        """Every tile, row-major (a fresh generator on every call)."""
        for tile_row in range(self.rows):
            for tile_col in range(self.cols):
                yield self.tile(tile_row, tile_col)

    def __iter__(self) -> Iterator[Tile]:
        return self.tiles()

    def __len__(self) -> int:
        return self.n_tiles

    def tiles_where(self, keep: np.ndarray) -> list[Tile]:
        """Tiles whose entry in the boolean ``[rows, cols]`` array ``keep`` is true, row-major."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != self.shape:
            raise InputError(f"tile mask must have shape {self.shape}; got {keep.shape}")
        return [self.tile(int(r), int(c)) for r, c in zip(*np.nonzero(keep), strict=True)]

    def tile_at(self, l0_x: float, l0_y: float) -> Tile:
        """The tile containing level-0 point ``(l0_x, l0_y)``."""
        return self.tile(int(l0_y // self.l0_tile_size), int(l0_x // self.l0_tile_size))

    def cell_l0_box(self, cell_row: int, cell_col: int) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` in level-0 pixels of heatmap cell ``(cell_row, cell_col)``."""
        size = self.l0_cell_size
        return (cell_col * size, cell_row * size, (cell_col + 1) * size, (cell_row + 1) * size)

    # ---------------------------------------------------------------------------- records
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TileGrid:
        fields: dict[str, Callable[[Any], Any]] = {
            "slide_width": int,
            "slide_height": int,
            "slide_mpp": float,
            "target_mpp": float,
            "tile_px": int,
            "cells_per_side": int,
            "level": int,
            "level_downsample": float,
            "slide_mpp_xy": _mpp_pair,
        }
        missing = [k for k in ("slide_width", "slide_height", "slide_mpp") if k not in data]
        if missing:
            raise InputError(f"grid record lacks {missing}; expected the keys of TileGrid")
        return cls(**{k: conv(data[k]) for k, conv in fields.items() if k in data})


def _mpp_pair(value: Any) -> tuple[float, float] | None:
    """A recorded ``slide_mpp_xy``: None, or a pair of numbers (JSON gives a list)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InputError(f"grid record's slide_mpp_xy must be [x, y]; got {value!r}")
    return (float(value[0]), float(value[1]))


def tiles_cell_mask(
    tiles: Sequence[Tile], grid: TileGrid, cells_per_side: int | None = None
) -> np.ndarray:
    """Boolean slide-level cell mask, true on the cells of the given tiles.

    Shapes: -> ``[rows * c, cols * c]`` with ``c = cells_per_side`` (default the grid's).
    """
    c = grid.cells_per_side if cells_per_side is None else cells_per_side
    placement = rc_placement(grid_placement(tiles, grid).cell_rc // grid.cells_per_side, c)
    rows, cols = grid.shape
    ones = np.ones((len(tiles), c, c), dtype=np.float32)
    return paste(ones, placement, (rows * c, cols * c), fill=0.0) > 0
