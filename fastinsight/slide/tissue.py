"""Tissue detection on a low-resolution image of the slide, and its per-tile / per-cell fractions.

Modes (the ``--tissue`` flag):

- ``"brightfield"`` (H&E, IHC): stained tissue is coloured on a bright, grey-white background.
  A pixel is tissue when its HSV saturation exceeds a threshold and it is not near-black (every
  channel at least ``black_level``: black borders, pen and out-of-field areas are not tissue;
  this also makes bright-field detection find nothing on a fluorescence slide, whose pixels
  have at least one channel at zero). The threshold is Otsu's on the saturation of the
  non-black pixels, clipped to ``[0.05, 0.15]``: Otsu alone would split a slide that is all
  tissue into pale and dark tissue, and the clip keeps pale stroma in while never taking the
  white background (saturation < 0.05).
- ``"fluorescence"``: signal on a dark background. The brightest channel is smoothed over about
  ``fluorescence_sigma_um`` (so scattered nuclei merge into a tissue region) and thresholded
  with Otsu, floored at ``min_signal`` (out of 255) so an empty dark slide stays empty.
- ``"all"``: every pixel of the slide.

Both real modes then close one-pixel gaps, drop objects smaller than ``min_object_um2`` and fill
holes smaller than ``max_hole_um2`` (scipy.ndimage). Sizes need the slide's mpp; without one a
0.5 um/px slide is assumed for them.

Fractions are exact areas: :meth:`TissueMask.box_fractions` integrates the mask (piecewise
constant over its pixels) over any axis-aligned grid of level-0 boxes through a summed-area
table, so a tile or heatmap cell gets the fraction of its area that is tissue, whatever the mask
resolution. Area outside the slide counts as non-tissue.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from fastinsight.errors import InputError, SlideError
from fastinsight.slide.grid import Tile, TileGrid
from fastinsight.slide.readers import SlideReader, read_overview

TissueMode = Literal["brightfield", "fluorescence", "all"]
TISSUE_MODES: tuple[str, ...] = ("brightfield", "fluorescence", "all")

_ASSUMED_MPP = 0.5  # only for object sizes when a slide has no mpp


@dataclass(frozen=True, eq=False)
class TissueMask:
    """A low-resolution boolean tissue mask covering the whole slide from (0, 0).

    Mask pixel ``(y, x)`` covers level-0 ``[x * l0_per_px_x, (x + 1) * l0_per_px_x)`` and
    likewise in y. ``threshold`` is the value the mode thresholded (NaN for ``"all"``).

    Shapes: ``mask`` bool ``[h, w]``.
    """

    mask: np.ndarray
    slide_width: int
    slide_height: int
    mode: str
    threshold: float = float("nan")
    mask_mpp: float | None = None
    level: int | None = None
    reader: str = ""
    sampling: str = ""

    def provenance(self) -> dict[str, object]:
        """Which reader and level served tissue detection, at what mpp and how (for reports)."""
        return {
            "reader": self.reader,
            "level": self.level,
            "mask_mpp": self.mask_mpp,
            "sampling": self.sampling,
            "mask_shape": list(self.shape),
        }

    def __post_init__(self) -> None:
        if self.mask.ndim != 2 or self.mask.dtype != bool or 0 in self.mask.shape:
            raise InputError(
                f"tissue mask must be a non-empty 2-D bool array; got {self.mask.dtype} "
                f"{self.mask.shape}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.mask.shape[0]), int(self.mask.shape[1]))

    @property
    def l0_per_px_x(self) -> float:
        return self.slide_width / self.mask.shape[1]

    @property
    def l0_per_px_y(self) -> float:
        return self.slide_height / self.mask.shape[0]

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide area that is tissue."""
        return float(self.mask.mean())

    def box_fractions(self, l0_x_edges: np.ndarray, l0_y_edges: np.ndarray) -> np.ndarray:
        """Tissue fraction of every box of a separable grid of level-0 boxes.

        Box ``(i, j)`` is ``[x_edges[j], x_edges[j+1]) x [y_edges[i], y_edges[i+1])``; edges
        must increase. Shapes: ``[nx + 1]``, ``[ny + 1]`` -> float64 ``[ny, nx]`` in [0, 1].
        """
        h, w = self.shape
        xs = np.asarray(l0_x_edges, dtype=np.float64) / self.l0_per_px_x
        ys = np.asarray(l0_y_edges, dtype=np.float64) / self.l0_per_px_y
        if xs.ndim != 1 or ys.ndim != 1 or xs.size < 2 or ys.size < 2:
            raise InputError("box edges must be 1-D arrays of at least two values")
        if np.any(np.diff(xs) <= 0) or np.any(np.diff(ys) <= 0):
            raise InputError("box edges must be strictly increasing")
        sat = np.zeros((h + 1, w + 1), dtype=np.int64)
        np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.int64), axis=1, out=sat[1:, 1:])
        # The integral of a piecewise-constant mask is linear in x between pixel edges (and
        # in y): interpolating the summed-area table is exact for fractional edges.
        fx = _interp_along(sat, np.clip(xs, 0, w), axis=1)  # [h + 1, nx + 1]
        fxy = _interp_along(fx, np.clip(ys, 0, h), axis=0)  # [ny + 1, nx + 1]
        area = np.diff(np.diff(fxy, axis=0), axis=1)
        box_area = np.outer(np.diff(ys), np.diff(xs))
        return np.clip(area / box_area, 0.0, 1.0)

    def to_image(self) -> np.ndarray:
        """The mask as a uint8 image (255 = tissue). Shapes: -> ``[h, w]``."""
        return self.mask.astype(np.uint8) * 255


def _interp_along(table: np.ndarray, pos: np.ndarray, axis: int) -> np.ndarray:
    n = table.shape[axis] - 1
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, max(n - 1, 0))
    frac = pos - i0
    a = np.take(table, i0, axis=axis).astype(np.float64)
    b = np.take(table, np.minimum(i0 + 1, n), axis=axis).astype(np.float64)
    shape = [1, 1]
    shape[axis] = -1
    frac = frac.reshape(shape)
    return a * (1.0 - frac) + b * frac


# ===================================================================================== detection


def otsu_threshold_uint8(values: np.ndarray) -> float:
    """Otsu's threshold of values in [0, 255] on a 256-bin histogram (one bin per level).

    Returns the threshold ``t``; the foreground is ``values > t``. A constant input returns
    its value.
    """
    v = np.asarray(values).ravel()
    if v.size == 0:
        return float("nan")
    counts = np.bincount(np.clip(np.rint(v), 0, 255).astype(np.int64), minlength=256).astype(
        np.float64
    )
    centres = np.arange(256, dtype=np.float64)
    nonzero = np.nonzero(counts)[0]
    if nonzero.size == 1:
        return float(nonzero[0])
    w1 = np.cumsum(counts)
    w2 = np.cumsum(counts[::-1])[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        m1 = np.cumsum(counts * centres) / w1
        m2 = (np.cumsum((counts * centres)[::-1]) / np.cumsum(counts[::-1]))[::-1]
        var = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    var = np.nan_to_num(var, nan=-1.0)
    return float(centres[int(np.argmax(var))])


def brightfield_mask(
    rgb: np.ndarray,
    *,
    black_level: int = 8,
    saturation_range: tuple[float, float] = (0.05, 0.15),
) -> tuple[np.ndarray, float]:
    """Raw bright-field tissue mask (before clean-up) and the saturation threshold used.

    Shapes: ``uint8 [h, w, 3]`` -> bool ``[h, w]``.
    """
    img = np.asarray(rgb)
    mx = img.max(axis=-1).astype(np.float32)
    mn = img.min(axis=-1).astype(np.float32)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0).astype(np.float32)
    sat = ndimage.median_filter(sat, size=3, mode="nearest")
    not_black = mn >= black_level
    if not not_black.any():
        return np.zeros(sat.shape, dtype=bool), float("nan")
    t = otsu_threshold_uint8(sat[not_black] * 255.0) / 255.0
    t = float(np.clip(t, saturation_range[0], saturation_range[1]))
    return (sat > t) & not_black, t


def fluorescence_mask(
    rgb: np.ndarray, *, sigma_px: float = 1.0, min_signal: float = 8.0
) -> tuple[np.ndarray, float]:
    """Raw fluorescence tissue mask (signal above a dark background) and its threshold (0..255).

    Shapes: ``uint8 [h, w, 3]`` -> bool ``[h, w]``.
    """
    signal = np.asarray(rgb).max(axis=-1).astype(np.float32)
    if sigma_px > 0:
        signal = ndimage.gaussian_filter(signal, sigma=sigma_px, mode="nearest")
    # Otsu on log(1 + signal): fluorescence spans decades, and on a linear scale Otsu splits
    # bright nuclei clusters from dim tissue instead of tissue from background.
    scale = 255.0 / math.log1p(255.0)
    t_log = otsu_threshold_uint8(np.log1p(signal) * scale)
    t = max(math.expm1(t_log / scale), float(min_signal))
    return signal > t, t


def clean_mask(mask: np.ndarray, *, min_object_px: float, max_hole_px: float) -> np.ndarray:
    """Close one-pixel gaps, drop small objects, fill small holes (8-connectivity).

    Shapes: bool ``[h, w]`` -> bool ``[h, w]``.
    """
    structure = np.ones((3, 3), dtype=bool)
    closed = ndimage.binary_dilation(mask, structure)
    # border_value=1 so the closing does not eat tissue that touches the image edge
    closed = ndimage.binary_erosion(closed, structure, border_value=1)
    labels, n = ndimage.label(closed, structure)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_object_px
        keep[0] = False
        closed = keep[labels]
    holes = ndimage.binary_fill_holes(closed) & ~closed
    labels, n = ndimage.label(holes)
    if n:
        sizes = np.bincount(labels.ravel())
        fill = sizes <= max_hole_px
        fill[0] = False
        closed = closed | fill[labels]
    return closed


def detect_tissue(
    reader: SlideReader,
    mode: TissueMode = "brightfield",
    *,
    mask_mpp: float = 8.0,
    max_size: int = 4096,
    min_object_um2: float = 10_000.0,
    max_hole_um2: float = 10_000.0,
    black_level: int = 8,
    fluorescence_sigma_um: float = 16.0,
    min_signal: float = 8.0,
    thumbnail: np.ndarray | None = None,
) -> TissueMask:
    """Detect tissue on a low-resolution image of the slide.

    The image has exactly ``mask_mpp`` um per pixel (8 um: one heatmap cell at 0.5 um/px x 16
    px; coarser only if its longer side would pass ``max_size``), built by area averaging the
    best level (:func:`~fastinsight.slide.readers.read_overview`; strided tile sampling on a
    giant single-level image). So the same pixels give the same mask whatever the container
    (SVS, generic TIFF, OME-TIFF) and its levels. A slide without mpp gets a 2048 px image.
    Pass ``thumbnail`` (RGB of the whole slide, any size) to skip reading one.

    Raises SlideError when no tissue is found, with a hint to the other modes.
    """
    if mode not in TISSUE_MODES:
        raise InputError(f"tissue mode must be one of {list(TISSUE_MODES)}; got {mode!r}")
    width, height = reader.dimensions
    slide_mpp = reader.mpp if reader.has_mpp else None
    level: int | None = None
    sampling = "given"
    eff_mpp: float | None = None
    if thumbnail is None:
        if slide_mpp is not None:
            # A fixed physical pixel (mask_mpp, coarser only when max_size caps it), so the
            # image -- and the mask -- depend on the slide's pixels and mpp, not on which
            # levels its container happens to hold.
            eff_mpp = max(mask_mpp, max(width, height) * slide_mpp / max_size)
            out_w = max(1, round(width * slide_mpp / eff_mpp))
            out_h = max(1, round(height * slide_mpp / eff_mpp))
        else:
            scale = max(1.0, max(width, height) / float(min(max_size, 2048)))
            out_w, out_h = max(1, round(width / scale)), max(1, round(height / scale))
        overview = read_overview(reader, out_w, out_h)
        thumbnail, level, sampling = overview.image, overview.level, overview.sampling
    info = {
        "mask_mpp": eff_mpp,
        "level": level,
        "reader": getattr(reader, "backend", ""),
        "sampling": sampling,
    }
    thumb = np.asarray(thumbnail)
    if thumb.ndim != 3 or thumb.shape[-1] != 3 or thumb.dtype != np.uint8:
        raise InputError(f"thumbnail must be uint8 [h, w, 3] RGB; got {thumb.dtype} {thumb.shape}")
    h, w = thumb.shape[:2]
    if mode == "all":
        return TissueMask(np.ones((h, w), dtype=bool), width, height, "all", **info)  # type: ignore[arg-type]

    px_um = (slide_mpp or _ASSUMED_MPP) * max(width / w, height / h)
    px_area_um2 = px_um * px_um
    if mode == "brightfield":
        raw, threshold = brightfield_mask(thumb, black_level=black_level)
    else:
        raw, threshold = fluorescence_mask(
            thumb, sigma_px=fluorescence_sigma_um / px_um, min_signal=min_signal
        )
    mask = clean_mask(
        raw, min_object_px=min_object_um2 / px_area_um2, max_hole_px=max_hole_um2 / px_area_um2
    )
    if not mask.any():
        raise SlideError(_no_tissue_message(reader, mode))
    return TissueMask(mask, width, height, mode, threshold, **info)  # type: ignore[arg-type]


def _no_tissue_message(reader: SlideReader | None, mode: str) -> str:
    where = f" in slide {str(reader.path)!r}" if reader is not None else ""
    other = (
        "for fluorescence slides use --tissue fluorescence"
        if mode == "brightfield"
        else "for bright-field (H&E, IHC) slides use --tissue brightfield"
    )
    return (
        f"no tissue found{where} with --tissue {mode}; {other}, or --tissue all to keep every tile"
    )


# ============================================================================ grid fractions


def cell_tissue_fraction(grid: TileGrid, tissue: TissueMask) -> np.ndarray:
    """Tissue fraction of every heatmap cell. Shapes: -> float64 ``grid.cell_shape``."""
    _check_same_slide(grid, tissue)
    rows, cols = grid.cell_shape
    size = grid.l0_cell_size
    return tissue.box_fractions(np.arange(cols + 1) * size, np.arange(rows + 1) * size)


def tile_tissue_fraction(grid: TileGrid, tissue: TissueMask) -> np.ndarray:
    """Tissue fraction of every tile. Shapes: -> float64 ``[rows, cols]``."""
    _check_same_slide(grid, tissue)
    size = grid.l0_tile_size
    return tissue.box_fractions(np.arange(grid.cols + 1) * size, np.arange(grid.rows + 1) * size)


def tissue_tiles(
    grid: TileGrid, tissue: TissueMask, min_tissue_fraction: float = 0.1
) -> list[Tile]:
    """Tiles with at least ``min_tissue_fraction`` of their area on tissue, row-major.

    ``min_tissue_fraction=0`` keeps every tile that touches tissue at all. Raises SlideError
    when no tile qualifies.
    """
    if not 0.0 <= min_tissue_fraction <= 1.0:
        raise InputError(f"min_tissue_fraction must be in [0, 1]; got {min_tissue_fraction}")
    if tissue.mode == "all":
        return list(grid.tiles())
    fraction = tile_tissue_fraction(grid, tissue)
    keep = fraction >= min_tissue_fraction if min_tissue_fraction > 0 else fraction > 0
    tiles = grid.tiles_where(keep)
    if not tiles:
        raise SlideError(
            f"no tile has at least {min_tissue_fraction:.0%} tissue with --tissue {tissue.mode} "
            f"(largest: {fraction.max():.1%}); lower --min-tissue, or use --tissue all to keep "
            "every tile"
        )
    return tiles


def cell_tissue_mask(
    grid: TileGrid,
    tissue: TissueMask,
    min_cell_fraction: float = 0.5,
    tiles: Sequence[Tile] | None = None,
) -> np.ndarray:
    """Boolean heatmap-cell mask: cells at least ``min_cell_fraction`` tissue (and, if
    ``tiles`` is given, inside one of those tiles). ``"all"`` marks every cell inside the slide.

    Shapes: -> bool ``grid.cell_shape``.
    """
    if tissue.mode == "all":
        rows, cols = grid.cell_shape
        size = grid.l0_cell_size
        mask = np.zeros((rows, cols), dtype=bool)
        mask[
            : math.ceil(grid.slide_height / size - 1e-9),
            : math.ceil(grid.slide_width / size - 1e-9),
        ] = True
    else:
        fraction = cell_tissue_fraction(grid, tissue)
        mask = fraction >= min_cell_fraction if min_cell_fraction > 0 else fraction > 0
    if tiles is not None:
        from fastinsight.slide.grid import tiles_cell_mask

        mask &= tiles_cell_mask(tiles, grid)
    return mask


def _check_same_slide(grid: TileGrid, tissue: TissueMask) -> None:
    if (grid.slide_width, grid.slide_height) != (tissue.slide_width, tissue.slide_height):
        raise InputError(
            f"tissue mask is for a {tissue.slide_width}x{tissue.slide_height} slide but the grid "
            f"for a {grid.slide_width}x{grid.slide_height} one; detect tissue on the same slide"
        )
