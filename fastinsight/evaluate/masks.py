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

from fastinsight.errors import FastInsightError, InputError
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
            sw, sh = target.slide_size_l0
            ds_x, ds_y = sw / w0, sh / h0
            # One mask pixel of slack: a mask of a slide whose side is not a multiple of the
            # downsample is rounded up or down on each axis.
            if abs(ds_x - ds_y) > max(0.05 * max(ds_x, ds_y), ds_x / h0, ds_y / w0):
                raise InputError(
                    f"mask {str(p)!r} ({w0} x {h0} px) does not have the slide's aspect ratio "
                    f"({sw} x {sh} px: {ds_x:.4g}x in x but {ds_y:.4g}x in y); is it the mask "
                    "of this slide? pass its level-0 downsample (--mask-downsample) if it covers "
                    "only part of the slide"
                )
            return ds_x
        how = "estimated from the heatmap extent"
        ds_x = (ww * target.cell_size_l0 + target.origin_l0[0]) / w0
        ds_y = (hh * target.cell_size_l0 + target.origin_l0[1]) / h0
        if abs(ds_x - ds_y) > 0.05 * max(ds_x, ds_y):
            raise InputError(
                f"mask {str(p)!r} ({w0} x {h0} px) does not have the heatmap's aspect ratio "
                f"({ww} x {hh} cells); pass the mask's level-0 downsample (--mask-downsample)"
            )
        return ds_x

    try:
        positive, h0, w0, (h, w), block = _read_mask_level(p, ds0_of, target.cell_size_l0, values)
    except FastInsightError:
        raise
    except (OSError, ValueError, RuntimeError, IndexError, KeyError, EOFError) as exc:
        # tifffile opens a truncated file (the header is intact) and fails only when it reads
        # the pixels: "failed to read 1806336 bytes, got 601941".
        raise InputError(
            f"cannot read mask TIFF {str(p)!r}: {exc}; the file is truncated or damaged: "
            "write it again"
        ) from exc
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


# Geometry types without an area: skipped (a QuPath export mixes points and lines in).
_NO_AREA = frozenset({"Point", "MultiPoint", "LineString", "MultiLineString"})
_NESTING = (
    "a Polygon is [[[x, y], ...], ...] (rings of positions), a MultiPolygon "
    "[[[[x, y], ...], ...], ...] (polygons of rings)"
)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fits_float(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _ring(ring: Any, where: str) -> np.ndarray | None:
    """One linear ring as ``[M, 2]`` float64 level-0 px; None for a ring of under 3 positions
    (no area). Raises ``InputError`` for anything that is not a list of finite [x, y] numbers."""
    if not isinstance(ring, list):
        raise InputError(f"{where}: a ring is {_short(ring)}, not a list of [x, y] positions")
    if ring and not isinstance(ring[0], list):
        raise InputError(
            f"{where}: found {_short(ring[0])} where a position [x, y] was expected; the "
            f"coordinates miss a nesting level ({_NESTING})"
        )
    for pos in ring:
        if (
            not isinstance(pos, list)
            or len(pos) < 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pos[:2])
        ):
            raise InputError(f"{where}: position {_short(pos)} is not [x, y] numbers")
    if len(ring) < 3:
        return None
    try:
        xy = np.asarray([pos[:2] for pos in ring], dtype=np.float64)
    except OverflowError:
        # A JSON integer beyond float64 (1 followed by 400 zeros): as non-finite as 1e400.
        bad = next(
            pos for pos in ring if any(isinstance(v, int) and not _fits_float(v) for v in pos[:2])
        )
        raise InputError(
            f"{where}: position {_short(bad)} is not finite (a number too large for a coordinate)"
        ) from None
    if not np.isfinite(xy).all():
        bad = ring[int(np.flatnonzero(~np.isfinite(xy).all(axis=1))[0])]
        raise InputError(f"{where}: position {_short(bad)} is not finite (NaN or inf)")
    return xy


def _polygon(coords: Any, where: str) -> list[np.ndarray]:
    """A Polygon's ``coordinates``: its rings (exterior first), each ``[M, 2]``."""
    if not isinstance(coords, list):
        raise InputError(f"{where}: coordinates are {_short(coords)}, not a list of rings")
    rings = [_ring(r, where) for r in coords]
    return [r for r in rings if r is not None]


def _rings_of(geometry: Mapping[str, Any], where: str) -> list[list[np.ndarray]]:
    """Polygons (each a list of rings [M, 2] in level-0 px, exterior first) of a geometry.

    Strict: coordinates that are not what the geometry's type says (a missing or extra nesting
    level, null or text positions, NaN) are an ``InputError`` naming ``where`` (file and
    feature), never an empty result: an annotation read as nothing would be scored as a
    ground truth without lesion (Dice 0) without a word.
    """
    kind = geometry.get("type")
    if kind in _NO_AREA:
        return []  # points and lines have no area
    if kind == "GeometryCollection":
        parts = geometry.get("geometries")
        if not isinstance(parts, list):
            raise InputError(
                f"{where}: GeometryCollection 'geometries' is {_short(parts)}, not a list"
            )
        out: list[list[np.ndarray]] = []
        for j, g in enumerate(parts):
            if not isinstance(g, Mapping):
                raise InputError(f"{where}: geometry {j} of the collection is {_short(g)}")
            out += _rings_of(g, f"{where}, geometry {j}")
        return out
    if kind not in ("Polygon", "MultiPolygon"):
        raise InputError(
            f"{where}: geometry type {_short(kind)} is not a GeoJSON geometry type; expected "
            "Polygon, MultiPolygon, GeometryCollection (or a point or line, which have no area)"
        )
    coords = geometry.get("coordinates")
    if kind == "Polygon":
        return [_polygon(coords, where)]
    if not isinstance(coords, list):
        raise InputError(f"{where}: coordinates are {_short(coords)}, not a list of polygons")
    return [_polygon(poly, where) for poly in coords]


def _classification_name(props: Mapping[str, Any] | None) -> str | None:
    if not isinstance(props, Mapping):
        return None
    c = props.get("classification")
    if isinstance(c, Mapping):
        return str(c.get("name")) if c.get("name") is not None else None
    if isinstance(c, str):
        return c
    name = props.get("name")
    return str(name) if name is not None else None


def _geojson_features(data: Any, p: Path) -> list[Any]:
    """The features of a parsed GeoJSON document (FeatureCollection, feature list, Feature or
    bare geometry)."""
    if isinstance(data, Mapping) and data.get("type") == "FeatureCollection":
        feats = data.get("features")
        if not isinstance(feats, list):
            raise InputError(
                f"{str(p)!r}: the FeatureCollection's 'features' is {_short(feats)}, not a list "
                "of Feature objects"
            )
        return feats
    if isinstance(data, list):
        return data
    if isinstance(data, Mapping) and data.get("type") == "Feature":
        return [data]
    if isinstance(data, Mapping) and "coordinates" in data:
        return [{"type": "Feature", "geometry": data, "properties": {}}]
    raise InputError(f"{str(p)!r} is not GeoJSON (no FeatureCollection, Feature or geometry)")


def read_geojson(
    path: str | os.PathLike[str], classes: Iterable[str] | None = None
) -> tuple[list[list[np.ndarray]], dict[str, Any]]:
    """``read_geojson_polygons`` with a summary of what the file held: ``features``,
    ``null_geometries``, ``no_area`` (points and lines) and ``classes`` (the classification
    names found), so an annotation that yields no polygon can say why."""
    p = Path(path).expanduser()
    try:
        # utf-8-sig: Windows tools (QuPath on Windows, Notepad) start the file with a BOM.
        data = loads_json(p.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise InputError(f"GeoJSON file {str(p)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {str(p)!r} as GeoJSON: {exc}") from exc
    feats = _geojson_features(data, p)
    keep = None if classes is None else set(classes)
    polys: list[list[np.ndarray]] = []
    summary: dict[str, Any] = {"features": len(feats), "null_geometries": 0, "no_area": 0}
    found: set[str] = set()
    for i, f in enumerate(feats):
        fid = f.get("id") if isinstance(f, Mapping) else None
        where = f"{str(p)!r} feature {i}" + (f" (id {_short(fid)})" if fid is not None else "")
        if not isinstance(f, Mapping):
            raise InputError(f"{where} is {_short(f)}, not a GeoJSON Feature object")
        geometry = f.get("geometry")
        if geometry is None:
            summary["null_geometries"] += 1  # an unlocated feature: valid GeoJSON, no area
            continue
        if not isinstance(geometry, Mapping):
            raise InputError(f"{where}: geometry is {_short(geometry)}, not a geometry object")
        # Parsed before the class filter: a malformed feature is an error whatever its class.
        rings_list = [rings for rings in _rings_of(geometry, where) if rings]
        if not rings_list:
            summary["no_area"] += 1
        name = _classification_name(f.get("properties"))
        if name is not None:
            found.add(name)
        if keep is None or name in keep:
            polys += rings_list
    summary["classes"] = sorted(found)
    return polys, summary


def read_geojson_polygons(
    path: str | os.PathLike[str], classes: Iterable[str] | None = None
) -> list[list[np.ndarray]]:
    """Polygons of a QuPath GeoJSON export (FeatureCollection, feature list, Feature or geometry).

    ``classes`` keeps only features whose classification name is one of them. Malformed
    geometry is an ``InputError`` naming the file and the feature (see ``_rings_of``).
    """
    return read_geojson(path, classes)[0]


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
        polys, summary = read_geojson(p, geojson_classes)
        grid = rasterize_polygons(
            polys, target.grid_shape, target.cell_size_l0, target.origin_l0, method
        )
        return grid, {"source": str(p), "polygons": len(polys), **summary}
    return read_mask_tiff(p, target, downsample=mask_downsample, method=method, values=mask_values)
