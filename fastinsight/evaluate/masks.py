"""Ground truth onto the heatmap grid: mask TIFFs (resampled by ``nearest`` or ``area``) and
QuPath GeoJSON polygons (rasterised at cell centres or supersampled), found by slide id.

A mask TIFF is read at its coarsest pyramid level still as fine as a heatmap cell; a level too
large for memory (a single-level level-0 mask) is read tile by tile into per-block lesion
fractions instead, blocks of at most half a cell."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastinsight.errors import InputError
from fastinsight.evaluate.io import EvalInput
from fastinsight.text import loads_json

GT_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".geojson", ".json")
RESAMPLE: tuple[str, ...] = ("nearest", "area")
AREA_SUPERSAMPLE = 8


def _cell_edges(n: int, origin: float, cell: float) -> np.ndarray:
    return origin + np.arange(n + 1, dtype=np.float64) * cell


def resample_mask(
    mask: np.ndarray,
    downsample: float,
    grid_shape: tuple[int, int],
    cell_size_l0: float,
    origin_l0: tuple[float, float] = (0.0, 0.0),
    method: str = "nearest",
    area_fraction: float = 0.5,
) -> np.ndarray:
    """A boolean mask image onto the heatmap grid.

    Shapes: mask ``[Hm, Wm]`` bool whose pixel (r, c) covers level-0 px ``(c, r) * downsample``
    onwards -> ``[H, W]`` bool. ``nearest``: the mask pixel under each cell centre; ``area``: the
    cell is positive when at least ``area_fraction`` of the mask pixels under it are. A float
    mask holds each (block) pixel's lesion fraction: ``nearest`` takes the block under the centre
    when at least half of it is lesion, ``area`` weighs every block by its fraction.
    Cells beyond the mask image are negative.
    """
    if method not in RESAMPLE:
        raise InputError(f"resample must be one of {RESAMPLE}, got {method!r}")
    m = np.asarray(mask)
    fractions = m.dtype.kind == "f"  # a block-reduced mask: each pixel's lesion fraction
    if fractions and method == "nearest":
        m = m >= 0.5
    elif not fractions:
        m = m.astype(bool, copy=False)
    hh, ww = grid_shape
    hm, wm = m.shape
    if method == "nearest":
        cy = (origin_l0[1] + (np.arange(hh) + 0.5) * cell_size_l0) / downsample
        cx = (origin_l0[0] + (np.arange(ww) + 0.5) * cell_size_l0) / downsample
        iy, ix = np.floor(cy).astype(np.int64), np.floor(cx).astype(np.int64)
        vy, vx = (iy >= 0) & (iy < hm), (ix >= 0) & (ix < wm)
        out = np.zeros((hh, ww), dtype=bool)
        out[np.ix_(vy, vx)] = m[np.ix_(iy[vy], ix[vx])]
        return out
    # area: integral image over each cell's footprint in mask pixels
    kind = np.float64 if fractions else np.int64
    integral = np.zeros((hm + 1, wm + 1), dtype=kind)
    integral[1:, 1:] = np.cumsum(np.cumsum(m, axis=0, dtype=kind), axis=1)
    ey = _cell_edges(hh, origin_l0[1], cell_size_l0) / downsample
    ex = _cell_edges(ww, origin_l0[0], cell_size_l0) / downsample
    y0 = np.clip(np.floor(ey[:-1] + 1e-9).astype(np.int64), 0, hm)
    y1 = np.clip(np.maximum(np.ceil(ey[1:] - 1e-9).astype(np.int64), y0 + 1), 0, hm)
    x0 = np.clip(np.floor(ex[:-1] + 1e-9).astype(np.int64), 0, wm)
    x1 = np.clip(np.maximum(np.ceil(ex[1:] - 1e-9).astype(np.int64), x0 + 1), 0, wm)
    inside = (
        integral[np.ix_(y1, x1)]
        - integral[np.ix_(y0, x1)]
        - integral[np.ix_(y1, x0)]
        + integral[np.ix_(y0, x0)]
    )
    # The footprint's full size (pixels past the image edge count as negative).
    full_y = np.maximum(np.ceil(ey[1:] - 1e-9) - np.floor(ey[:-1] + 1e-9), 1.0)
    full_x = np.maximum(np.ceil(ex[1:] - 1e-9) - np.floor(ex[:-1] + 1e-9), 1.0)
    return inside >= area_fraction * np.outer(full_y, full_x)


def _plane(arr: np.ndarray, axes: str) -> np.ndarray:
    """The [Y, X] plane of a TIFF image (first plane of any extra axis; max over samples)."""
    a = np.asarray(arr)
    for ax in axes:
        if ax not in "YXS" and a.ndim > 2:
            a = a[0]
    if a.ndim == 3:  # samples last (RGB masks): lesion where any channel is nonzero
        a = a.max(axis=-1)
    return a


def _read_mask_level(
    path: Path, ds0_of: Any, cell_size_l0: float, values: Sequence[int] | None
) -> tuple[np.ndarray, int, int, tuple[int, int], int]:
    """Open a mask TIFF, pick the coarsest level still at least as fine as a heatmap cell, read it.

    ``ds0_of(h0, w0)`` gives the finest level's level-0 downsample. Returns (positive, h0, w0,
    (h, w) of the level read, block): ``positive`` the level's lesion pixels (bool), or, for a
    level too large for memory (a single-level level-0 mask of a whole slide), the lesion
    fraction of each ``block`` x ``block`` block, read segment by segment (``block`` = 1 when
    read whole).
    """
    import tifffile

    try:
        tif = tifffile.TiffFile(str(path))
    except Exception as exc:
        raise InputError(f"cannot open mask TIFF {str(path)!r}: {exc}") from exc
    with tif:
        levels: list[tuple[int, int, Any, str]] = []
        for series_level in tif.series[0].levels:
            axes = series_level.axes
            levels.append(
                (
                    int(series_level.shape[axes.index("Y")]),
                    int(series_level.shape[axes.index("X")]),
                    series_level,
                    axes,
                )
            )
        sizes = {(h, w) for h, w, _, _ in levels}
        # Multi-page TIFFs whose pages form a pyramid without SubFileType flags.
        for page in tif.pages:
            shape = page.shape
            if len(shape) >= 2 and (int(shape[0]), int(shape[1])) not in sizes:
                levels.append((int(shape[0]), int(shape[1]), page, "YXS"[: len(shape)]))
                sizes.add((int(shape[0]), int(shape[1])))
        if not levels:
            raise InputError(f"mask TIFF {str(path)!r} holds no image")
        levels.sort(key=lambda t: -t[0] * t[1])
        h0, w0 = levels[0][0], levels[0][1]
        ds0 = ds0_of(h0, w0)
        chosen = levels[0]
        for candidate in levels:
            if ds0 * w0 / candidate[1] <= cell_size_l0 * (1 + 1e-6):
                chosen = candidate
        from fastinsight.inputs import allocation_limit

        h, w, level, axes = chosen
        nbytes = int(np.prod(level.shape, dtype=object)) * np.dtype(level.dtype).itemsize
        if nbytes * 2 > allocation_limit():  # the level and its positive mask
            cell_px = cell_size_l0 / (ds0 * w0 / w)  # a heatmap cell in this level's pixels
            fraction, block = _stream_fraction(path, level, h, w, values, cell_px)
            return fraction, h0, w0, (h, w), block
        plane = _plane(level.asarray(), axes)
    if plane.ndim != 2:
        raise InputError(f"mask TIFF {str(path)!r} has image shape {plane.shape}; expected [H, W]")
    positive = np.isin(plane, list(values)) if values else plane != 0
    return positive, h0, w0, positive.shape, 1


# Bytes per block of a streamed mask: its lesion count, its fraction and resample_mask's integral.
_STREAM_BYTES_PER_BLOCK = 24


def _stream_fraction(
    path: Path, level: Any, h: int, w: int, values: Sequence[int] | None, cell_px: float
) -> tuple[np.ndarray, int]:
    """The lesion fraction of each ``block`` x ``block`` block of a mask level too large to read
    whole, from its tiles or strips one at a time. ``block`` is the smallest that fits in a
    quarter of the memory limit, and at most half a heatmap cell (else the level is refused)."""
    from fastinsight.inputs import allocation_limit

    page = getattr(level, "keyframe", level)
    budget = allocation_limit() // 4
    block = max(1, math.ceil(math.sqrt(h * w * _STREAM_BYTES_PER_BLOCK / max(budget, 1))))
    if block > max(1.0, cell_px / 2) or int(getattr(page, "planarconfig", 1)) == 2:
        raise InputError(
            f"mask TIFF {str(path)!r} ({w} x {h} px at its coarsest usable level) is too large "
            "to read here; save the mask with a pyramid or at a lower resolution"
        )
    hb, wb = -(-h // block), -(-w // block)
    counts = np.zeros((hb, wb), dtype=np.float64)
    for seg, index, _ in page.segments():
        if seg is None or index[1] != 0:
            continue  # a sparse (empty) segment, or a plane past the first of an extra axis
        y0, x0 = int(index[2]), int(index[3])
        arr = np.asarray(seg)[0]  # [rows, cols, samples] of the segment
        arr = arr.max(axis=-1) if arr.shape[-1] > 1 else arr[..., 0]
        arr = arr[: h - y0, : w - x0]  # edge segments are padded to the full tile size
        pos = (np.isin(arr, list(values)) if values else arr != 0).astype(np.int64)
        rows = (y0 + np.arange(pos.shape[0])) // block
        cols = (x0 + np.arange(pos.shape[1])) // block
        r_at = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
        c_at = np.r_[0, np.flatnonzero(np.diff(cols)) + 1]
        sums = np.add.reduceat(np.add.reduceat(pos, r_at, axis=0), c_at, axis=1)
        counts[np.ix_(rows[r_at], cols[c_at])] += sums
    # Pixels per block (the last row and column of blocks may be cut by the level's edge).
    bh = np.minimum(block, h - np.arange(hb) * block)
    bw = np.minimum(block, w - np.arange(wb) * block)
    return counts / np.outer(bh, bw), block


def read_mask_tiff(
    path: str | os.PathLike[str],
    target: EvalInput,
    *,
    downsample: float | None = None,
    method: str = "nearest",
    values: Sequence[int] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """A ground-truth mask TIFF resampled onto ``target``'s heatmap grid.

    The mask's finest level covers the slide: its level-0 scale is ``downsample`` when given,
    else slide width / mask width (``target.slide_size_l0``), else estimated from the heatmap's
    extent (reported as such). The coarsest pyramid level still as fine as a heatmap cell is read.
    A pixel is lesion when it is nonzero, or one of ``values``.

    Shapes: -> (``[H, W]`` bool, info dict).
    """
    p = Path(path).expanduser()
    hh, ww = target.grid_shape
    how = ""

    def ds0_of(h0: int, w0: int) -> float:
        nonlocal how
        if downsample is not None:
            how = "given"
            return float(downsample)
        if target.slide_size_l0 is not None:
            how = "slide width / mask width"
            return target.slide_size_l0[0] / w0
        how = "estimated from the heatmap extent"
        ds_x = (ww * target.cell_size_l0 + target.origin_l0[0]) / w0
        ds_y = (hh * target.cell_size_l0 + target.origin_l0[1]) / h0
        if abs(ds_x - ds_y) > 0.05 * max(ds_x, ds_y):
            raise InputError(
                f"mask {str(p)!r} ({w0} x {h0} px) does not have the heatmap's aspect ratio "
                f"({ww} x {hh} cells); pass the mask's level-0 downsample (--mask-downsample)"
            )
        return ds_x

    positive, h0, w0, (h, w), block = _read_mask_level(p, ds0_of, target.cell_size_l0, values)
    ds_level = ds0_of(h0, w0) * w0 / w
    out = resample_mask(
        positive, ds_level * block, (hh, ww), target.cell_size_l0, target.origin_l0, method
    )
    info = {
        "source": str(p),
        "mask_level_size": [int(w), int(h)],
        "mask_downsample_l0": ds_level,
        "scale": how,
    }
    if block > 1:
        info["streamed_block_px"] = block
    return out, info


def _rings_of(geometry: Mapping[str, Any]) -> list[list[np.ndarray]]:
    """Polygons (each a list of rings [M, 2] in level-0 px, exterior first) of a geometry."""
    kind = geometry.get("type")
    coords = geometry.get("coordinates") or []
    if kind == "Polygon":
        return [[np.asarray(r, dtype=np.float64)[:, :2] for r in coords if len(r) >= 3]]
    if kind == "MultiPolygon":
        return [
            [np.asarray(r, dtype=np.float64)[:, :2] for r in poly if len(r) >= 3] for poly in coords
        ]
    if kind == "GeometryCollection":
        out: list[list[np.ndarray]] = []
        for g in geometry.get("geometries", []):
            out += _rings_of(g)
        return out
    return []  # points and lines have no area


def _classification_name(props: Mapping[str, Any] | None) -> str | None:
    if not props:
        return None
    c = props.get("classification")
    if isinstance(c, Mapping):
        return str(c.get("name")) if c.get("name") is not None else None
    if isinstance(c, str):
        return c
    name = props.get("name")
    return str(name) if name is not None else None


def read_geojson_polygons(
    path: str | os.PathLike[str], classes: Iterable[str] | None = None
) -> list[list[np.ndarray]]:
    """Polygons of a QuPath GeoJSON export (FeatureCollection, feature list, Feature or geometry).

    ``classes`` keeps only features whose classification name is one of them.
    """
    p = Path(path).expanduser()
    try:
        data = loads_json(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"GeoJSON file {str(p)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {str(p)!r} as GeoJSON: {exc}") from exc
    if isinstance(data, Mapping) and data.get("type") == "FeatureCollection":
        feats = data.get("features", [])
    elif isinstance(data, list):
        feats = data
    elif isinstance(data, Mapping) and data.get("type") == "Feature":
        feats = [data]
    elif isinstance(data, Mapping) and "coordinates" in data:
        feats = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:
        raise InputError(f"{str(p)!r} is not GeoJSON (no FeatureCollection, Feature or geometry)")
    keep = None if classes is None else set(classes)
    polys: list[list[np.ndarray]] = []
    for f in feats:
        if not isinstance(f, Mapping) or not isinstance(f.get("geometry"), Mapping):
            continue
        if keep is not None and _classification_name(f.get("properties")) not in keep:
            continue
        polys += [rings for rings in _rings_of(f["geometry"]) if rings]
    return polys


def rasterize_polygons(
    polygons: Sequence[Sequence[np.ndarray]],
    grid_shape: tuple[int, int],
    cell_size_l0: float,
    origin_l0: tuple[float, float] = (0.0, 0.0),
    method: str = "nearest",
    area_fraction: float = 0.5,
) -> np.ndarray:
    """Polygons in level-0 px onto the heatmap grid (even-odd rule within a polygon: holes).

    ``nearest``: a cell is inside when its centre is; ``area``: when at least ``area_fraction``
    of an 8 x 8 lattice of points in it is. Shapes: -> ``[H, W]`` bool.
    """
    if method not in RESAMPLE:
        raise InputError(f"resample must be one of {RESAMPLE}, got {method!r}")
    s = 1 if method == "nearest" else AREA_SUPERSAMPLE
    hh, ww = grid_shape[0] * s, grid_shape[1] * s
    out = np.zeros((hh, ww), dtype=bool)
    unit = cell_size_l0 / s
    for rings in polygons:
        edges = []
        for ring in rings:
            r = (np.asarray(ring, dtype=np.float64) - np.asarray(origin_l0)) / unit
            if not np.array_equal(r[0], r[-1]):
                r = np.vstack([r, r[:1]])
            edges.append(np.hstack([r[:-1], r[1:]]))
        if not edges:
            continue
        e = np.vstack(edges)  # [E, 4] x0 y0 x1 y1 in sample units
        e = e[e[:, 1] != e[:, 3]]  # horizontal edges never cross a sample row
        if e.size == 0:
            continue
        lo = max(0, int(np.floor(min(e[:, 1].min(), e[:, 3].min()) - 0.5)))
        hi = min(hh, int(np.ceil(max(e[:, 1].max(), e[:, 3].max()) + 0.5)))
        # Rows in blocks so rows x edges stays small.
        block = max(1, 4_000_000 // len(e))
        for r0 in range(lo, hi, block):
            rows = np.arange(r0, min(hi, r0 + block))
            yc = rows[:, None] + 0.5
            y0, y1 = e[None, :, 1], e[None, :, 3]
            crosses = (y0 <= yc) != (y1 <= yc)
            with np.errstate(divide="ignore", invalid="ignore"):
                xs = e[None, :, 0] + (yc - y0) * (e[None, :, 2] - e[None, :, 0]) / (y1 - y0)
            xs = np.where(crosses, xs, np.inf)
            xs.sort(axis=1)
            ncross = crosses.sum(axis=1)
            pairs = int(ncross.max()) // 2 if ncross.size else 0
            diff = np.zeros((len(rows), ww + 1), dtype=np.int32)
            for k in range(pairs):
                xa, xb = xs[:, 2 * k], xs[:, 2 * k + 1]
                ok = np.isfinite(xa) & np.isfinite(xb)
                # sample j is inside when its centre j + 0.5 lies in [xa, xb)
                ja = np.clip(np.ceil(xa[ok] - 0.5), 0, ww).astype(np.int64)
                jb = np.clip(np.ceil(xb[ok] - 0.5), 0, ww).astype(np.int64)
                ri = np.flatnonzero(ok)
                np.add.at(diff, (ri, ja), 1)
                np.add.at(diff, (ri, jb), -1)
            out[rows] |= np.cumsum(diff, axis=1)[:, :ww] > 0
    if s == 1:
        return out
    frac = out.reshape(grid_shape[0], s, grid_shape[1], s).mean(axis=(1, 3))
    return frac >= area_fraction


def find_ground_truth(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Ground-truth files of a folder by slide id: ``<id>.tif[f]``, ``<id>.geojson``, ``<id>.json``,
    also ``<id>_mask.tif`` (the official evaluation's naming)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InputError(f"ground-truth folder {str(root)!r} does not exist or is not a folder")
    found: dict[str, Path] = {}
    for f in sorted(root.iterdir()):
        if not f.is_file() or f.suffix.lower() not in GT_SUFFIXES:
            continue
        sid = f.stem[: -len("_mask")] if f.stem.endswith("_mask") else f.stem
        if sid in found:
            raise InputError(
                f"two ground-truth files for slide {sid!r}: {found[sid].name}, {f.name}; keep one"
            )
        found[sid] = f
    return found


def ground_truth_on_grid(
    path: str | os.PathLike[str],
    target: EvalInput,
    *,
    method: str = "nearest",
    mask_downsample: float | None = None,
    mask_values: Sequence[int] | None = None,
    geojson_classes: Iterable[str] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """A mask TIFF or GeoJSON file on ``target``'s heatmap grid. Shapes: -> ``[H, W]`` bool."""
    p = Path(path)
    if p.suffix.lower() in (".geojson", ".json"):
        polys = read_geojson_polygons(p, geojson_classes)
        grid = rasterize_polygons(
            polys, target.grid_shape, target.cell_size_l0, target.origin_l0, method
        )
        return grid, {"source": str(p), "polygons": len(polys)}
    return read_mask_tiff(p, target, downsample=mask_downsample, method=method, values=mask_values)
