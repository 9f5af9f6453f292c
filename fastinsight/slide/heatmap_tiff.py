"""The viewer heatmap: a pyramidal BigTIFF that OpenSlide, tiffslide and QuPath open, aligned to
the slide by scale alone (spec section 4), plus a raw-score ``.npz`` sidecar.

File layout (``write_heatmap_tiff``):

- BigTIFF, tiles of 256 x 256, 8-bit samples, no OME-XML and no tifffile JSON description
  (``metadata=None``); the ImageDescription is plain text naming the model, class, encoding,
  colormap and value range.
- Level 0, then levels reduced by 2 (every other pixel: a heatmap cell is a flat block, and
  averaging would invent values between classes of the quantised code) as top-level IFDs in the
  main chain with SubFileType = 1, until the longer side is at most ``min_level_size`` (1024).
- ResolutionUnit = CENTIMETER and X/YResolution = 10000 / mpp of each level, so OpenSlide
  reports ``openslide.mpp-x`` = the heatmap's level-0 mpp.

Geometry (:class:`HeatmapGeometry`): one heatmap pixel covers ``factor x factor`` level-0
pixels for an integer ``factor`` (the heatmap mpp is ``slide_mpp * factor``), origin (0, 0) at
the slide's top-left, size ``ceil(slide size / factor)``. A viewer that scales the heatmap by
its mpp lands every pixel on the slide. ``factor = floor(l0_cell_size / upsample)``: with the
default ``upsample=1`` a heatmap pixel is at most one cell, so no cell is skipped, and a cell
(e.g. 16.03 level-0 px) maps to 1 or (rarely) 2 heatmap pixels, sampled nearest at each
pixel's centre.

Encodings:

- ``"score"`` (default; deflate, lossless): uint8 ``0`` = non-tissue (NaN),
  ``1 + round(254 * clip((s - vmin) / (vmax - vmin), 0, 1))`` for a score ``s``; so a score of
  exactly ``vmin`` (1) stays distinct from non-tissue (0). Decode with
  ``s = vmin + (v - 1) / 254 * (vmax - vmin)`` (:func:`decode_scores`); the step is 1/254 of
  the range.
- ``"rgb"`` (JPEG): the colormap of the normalised score; non-tissue is ``background`` (white
  by default, so it reads as empty glass next to the slide).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fastinsight.atomic import atomic_path
from fastinsight.errors import InputError
from fastinsight.slide.colormap import COLORMAPS, colorize
from fastinsight.slide.grid import TileGrid
from fastinsight.slide.pyramid import write_pyramid_tiff
from fastinsight.text import loads_json

Encoding = Literal["score", "rgb"]

_SCORE_LEVELS = 254  # codes 1..255 carry the score; 0 is non-tissue


@dataclass(frozen=True)
class HeatmapGeometry:
    """Where heatmap pixels lie on the slide: ``factor`` level-0 px per heatmap px, from (0, 0).

    ``l0_cell_size`` and ``cell_shape`` describe the slide-level cell array the pixels sample.
    ``slide_mpp_xy``: the slide's per-axis mpp where x and y differ (None: both ``slide_mpp``).
    """

    slide_width: int
    slide_height: int
    slide_mpp: float
    factor: int
    l0_cell_size: float
    cell_shape: tuple[int, int]
    slide_mpp_xy: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise InputError(f"heatmap factor must be an integer >= 1; got {self.factor}")

    @classmethod
    def from_grid(
        cls, grid: TileGrid, upsample: int = 1, factor: int | None = None
    ) -> HeatmapGeometry:
        """Geometry for ``grid``'s cells: ``factor = floor(l0_cell_size / upsample)`` (>= 1)."""
        if factor is None:
            if upsample < 1:
                raise InputError(f"upsample must be an integer >= 1; got {upsample}")
            factor = max(1, math.floor(grid.l0_cell_size / upsample + 1e-9))
        return cls(
            slide_width=grid.slide_width,
            slide_height=grid.slide_height,
            slide_mpp=grid.slide_mpp,
            factor=int(factor),
            l0_cell_size=grid.l0_cell_size,
            cell_shape=grid.cell_shape,
            slide_mpp_xy=grid.slide_mpp_xy,
        )

    @property
    def hm_width(self) -> int:
        return math.ceil(self.slide_width / self.factor)

    @property
    def hm_height(self) -> int:
        return math.ceil(self.slide_height / self.factor)

    @property
    def hm_mpp(self) -> float:
        """Micrometres per heatmap pixel at level 0 of the TIFF."""
        return self.slide_mpp * self.factor

    @property
    def hm_mpp_xy(self) -> tuple[float, float]:
        """``(x, y)`` micrometres per heatmap pixel at level 0: a pixel is ``factor`` slide
        pixels along each axis, so each axis keeps the slide's own mpp."""
        x, y = self.slide_mpp_xy or (self.slide_mpp, self.slide_mpp)
        return (x * self.factor, y * self.factor)

    def cell_index(self) -> tuple[np.ndarray, np.ndarray]:
        """The cell each heatmap row and column samples (nearest, at the pixel centre).

        Shapes: -> int64 ``[hm_height]``, ``[hm_width]``.
        """
        hm_y = (np.arange(self.hm_height) + 0.5) * self.factor
        hm_x = (np.arange(self.hm_width) + 0.5) * self.factor
        rows = np.minimum((hm_y // self.l0_cell_size).astype(np.int64), self.cell_shape[0] - 1)
        cols = np.minimum((hm_x // self.l0_cell_size).astype(np.int64), self.cell_shape[1] - 1)
        return rows, cols

    def cells_to_pixels(self, cells: np.ndarray) -> np.ndarray:
        """Sample the slide-level cell array at every heatmap pixel.

        Shapes: ``cell_shape`` -> ``[hm_height, hm_width]`` (dtype kept).
        """
        cells = np.asarray(cells)
        if cells.shape != tuple(self.cell_shape):
            raise InputError(
                f"heatmap cells must have the grid's cell shape {tuple(self.cell_shape)}; got "
                f"{cells.shape}"
            )
        rows, cols = self.cell_index()
        return cells[np.ix_(rows, cols)]


# Scores quantised at a time by encode_scores: the float64 coding makes several temporaries of
# its input's size, ~2 GB at once for a 64 MP radiograph heatmap; 2^18 keeps them ~10 MB.
ENCODE_BLOCK_PIXELS = 1 << 18


def encode_scores(scores: np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Quantise scores to the uint8 code: 0 = NaN (non-tissue), 1..255 = the clipped range.

    The coding is per value, computed ``ENCODE_BLOCK_PIXELS`` values at a time, so its float64
    temporaries stay a few MB whatever the map's size.

    Shapes: ``[...]`` float -> uint8 ``[...]``.
    """
    vmin, vmax = _check_range(value_range)
    flat = np.asarray(scores).reshape(-1)
    codes = np.empty(flat.shape, dtype=np.uint8)
    for start in range(0, flat.size, ENCODE_BLOCK_PIXELS):
        s = flat[start : start + ENCODE_BLOCK_PIXELS].astype(np.float64)
        norm = np.clip((s - vmin) / (vmax - vmin), 0.0, 1.0)
        code = 1 + np.rint(np.nan_to_num(norm, nan=0.0) * _SCORE_LEVELS)
        codes[start : start + ENCODE_BLOCK_PIXELS] = np.where(np.isnan(s), 0, code)
    return codes.reshape(np.shape(scores))


def decode_scores(codes: np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Inverse of :func:`encode_scores` (0 -> NaN). Shapes: uint8 ``[...]`` -> float32 ``[...]``."""
    vmin, vmax = _check_range(value_range)
    c = np.asarray(codes).astype(np.float32)
    out = vmin + (c - 1.0) / _SCORE_LEVELS * (vmax - vmin)
    return np.where(c == 0, np.float32(np.nan), out).astype(np.float32)


def _check_range(value_range: tuple[float, float]) -> tuple[float, float]:
    vmin, vmax = (float(v) for v in value_range)
    if not (math.isfinite(vmin) and math.isfinite(vmax) and vmax > vmin):
        raise InputError(f"value_range must be (low, high) with low < high; got {value_range}")
    return vmin, vmax


def heatmap_description(
    *,
    encoding: Encoding,
    value_range: tuple[float, float],
    colormap: str | None,
    geometry: HeatmapGeometry,
    model: str = "",
    class_name: str = "",
    slide: str = "",
    extra: dict[str, Any] | None = None,
) -> str:
    """The plain-text ImageDescription (``key: value`` lines, no JSON, no XML)."""
    vmin, vmax = value_range
    if encoding == "score":
        code = (
            f"uint8 score; 0 = non-tissue; v in 1..255 -> score = {vmin:g} + (v - 1) / 254 * "
            f"({vmax:g} - {vmin:g})"
        )
    else:
        code = f"RGB colour map {colormap} of the score over [{vmin:g}, {vmax:g}]; non-tissue = background"
    lines = [
        "fastinsight heatmap",
        f"model: {model or 'unknown'}",
        f"class: {class_name or 'unknown'}",
        f"encoding: {code}",
        f"colormap: {colormap if encoding == 'rgb' else 'none (grey levels are the score code)'}",
        f"value range: {vmin:g} {vmax:g}",
        f"mpp: {_mpp_text(geometry.hm_mpp_xy)}",
        f"level-0 pixels per heatmap pixel: {geometry.factor}",
        f"slide: {slide or 'unknown'} ({geometry.slide_width} x {geometry.slide_height} px at "
        f"{_mpp_text(geometry.slide_mpp_xy or (geometry.slide_mpp,) * 2)} um/px)",
    ]
    for key, value in (extra or {}).items():
        lines.append(f"{key}: {' '.join(str(value).split())}")
    return "\n".join(" ".join(line.split("\n")) for line in lines)


def _mpp_text(xy: tuple[float, float]) -> str:
    """One value where the axes agree, else ``x x y``."""
    return repr(xy[0]) if xy[0] == xy[1] else f"{xy[0]!r} x {xy[1]!r}"


def write_heatmap_tiff(
    path: str | os.PathLike[str],
    cells: np.ndarray,
    grid: TileGrid,
    *,
    encoding: Encoding = "score",
    value_range: tuple[float, float] = (0.0, 1.0),
    colormap: str = "turbo",
    background: tuple[int, int, int] = (255, 255, 255),
    model: str = "",
    class_name: str = "",
    slide: str = "",
    upsample: int = 1,
    min_level_size: int = 1024,
    jpeg_quality: int = 90,
    extra_description: dict[str, Any] | None = None,
) -> HeatmapGeometry:
    """Write one class's slide-level heatmap as a pyramidal viewer TIFF (atomically).

    ``cells``: the stitched cell array of ``grid`` (NaN = non-tissue). Returns the geometry.
    Shapes: ``cells`` float ``grid.cell_shape`` (or ``[1, *grid.cell_shape]``).
    """

    arr = np.asarray(cells)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise InputError(
            f"write_heatmap_tiff takes one class's cells {grid.cell_shape}; got shape "
            f"{arr.shape}; write one file per class (cells[k])"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"heatmap cells must be floats with NaN for non-tissue; got {arr.dtype}")
    if not np.isfinite(arr).any():
        raise InputError("heatmap has no tissue cell (all NaN); nothing to write")
    if encoding not in ("score", "rgb"):
        raise InputError(f"encoding must be 'score' or 'rgb'; got {encoding!r}")
    if encoding == "rgb" and colormap not in COLORMAPS:
        raise InputError(f"colormap must be one of {list(COLORMAPS)}; got {colormap!r}")
    if not 1 <= jpeg_quality <= 100:
        raise InputError(f"jpeg_quality must be in 1..100; got {jpeg_quality}")
    vmin, vmax = _check_range(value_range)
    geometry = HeatmapGeometry.from_grid(grid, upsample=upsample)
    pixels = geometry.cells_to_pixels(arr)
    if encoding == "score":
        level0 = encode_scores(pixels, (vmin, vmax))
        kwargs: dict[str, Any] = {
            "photometric": "minisblack",
            "compression": "zlib",
            "compressionargs": {"level": 6},
        }
    else:
        level0 = colorize(pixels, (vmin, vmax), colormap)
        level0[np.isnan(pixels)] = np.asarray(background, dtype=np.uint8)
        kwargs = {
            "photometric": "rgb",
            "compression": "jpeg",
            "compressionargs": {"level": int(jpeg_quality)},
        }
    description = heatmap_description(
        encoding=encoding,
        value_range=(vmin, vmax),
        colormap=colormap if encoding == "rgb" else None,
        geometry=geometry,
        model=model,
        class_name=class_name,
        slide=slide,
        extra=extra_description,
    )
    write_pyramid_tiff(
        path,
        level0,
        geometry.hm_mpp_xy,
        compression=kwargs["compression"],
        compressionargs=kwargs["compressionargs"],
        description=description,
        min_level_size=min_level_size,
    )
    return geometry


# ======================================================================================= sidecar


@dataclass(frozen=True, eq=False)
class ScoresSidecar:
    """Raw float scores with their geometry, as written by :func:`write_scores_sidecar`.

    Shapes: ``scores`` float32 ``[K, *grid.cell_shape]`` (NaN = non-tissue), ``mask`` bool
    ``grid.cell_shape``.
    """

    scores: np.ndarray
    mask: np.ndarray
    grid: TileGrid
    class_names: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)


def write_scores_sidecar(
    path: str | os.PathLike[str],
    scores: np.ndarray,
    grid: TileGrid,
    *,
    mask: np.ndarray | None = None,
    class_names: tuple[str, ...] | list[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write raw float32 scores, the tissue-cell mask and the grid to a compressed ``.npz``.

    ``mask`` defaults to the cells where every class is finite. Written atomically; read it
    back with :func:`read_scores_sidecar` (no pickle involved).
    Shapes: ``scores`` ``[K, *grid.cell_shape]`` or ``grid.cell_shape``.
    """
    arr = np.asarray(scores, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != grid.cell_shape:
        raise InputError(
            f"scores must have shape [K, {grid.cell_shape[0]}, {grid.cell_shape[1]}]; got "
            f"{np.asarray(scores).shape}"
        )
    mask_arr = np.isfinite(arr).all(axis=0) if mask is None else np.asarray(mask, dtype=bool)
    if mask_arr.shape != grid.cell_shape:
        raise InputError(f"mask must have shape {grid.cell_shape}; got {mask_arr.shape}")
    names = (
        tuple(class_names)
        if class_names is not None
        else tuple(f"class_{k}" for k in range(arr.shape[0]))
    )
    if len(names) != arr.shape[0]:
        raise InputError(f"got {len(names)} class names for {arr.shape[0]} classes")
    record = {"format": "fastinsight-scores/1", "grid": grid.to_dict(), "metadata": metadata or {}}
    try:
        geometry_json = json.dumps(record, sort_keys=True)
    except TypeError as exc:
        raise InputError(f"sidecar metadata must be JSON-serialisable: {exc}") from None
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        # A file object, so numpy does not append ".npz" to the temporary name.
        np.savez_compressed(
            fh,
            scores=arr,
            mask=mask_arr,
            class_names=np.asarray(names, dtype=np.str_),
            geometry=np.asarray(geometry_json, dtype=np.str_),
        )


def read_scores_sidecar(path: str | os.PathLike[str]) -> ScoresSidecar:
    """Read a sidecar written by :func:`write_scores_sidecar`."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            scores = data["scores"]
            mask = data["mask"]
            names = tuple(str(x) for x in data["class_names"])
            record = loads_json(str(data["geometry"]))
            if not isinstance(record, dict) or not isinstance(record.get("grid"), dict):
                raise ValueError("its geometry record is not a JSON object with a grid")
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(
            f"{str(p)!r} is not a fastinsight scores sidecar ({exc}); expected an .npz written by "
            "write_scores_sidecar"
        ) from None
    grid = TileGrid.from_dict(record["grid"])
    return ScoresSidecar(scores, mask, grid, names, record.get("metadata", {}))


def geometry_dict(geometry: HeatmapGeometry) -> dict[str, Any]:
    """Plain-dict form of a geometry (for logs and JSON reports)."""
    out = asdict(geometry)
    out.update(hm_width=geometry.hm_width, hm_height=geometry.hm_height, hm_mpp=geometry.hm_mpp)
    return out
