"""QuPath GeoJSON companion: the heatmap as square Polygon features in level-0 pixels.

One feature per tissue cell (``per="cell"``) or per tile (``per="tile"``, the tile's score
reduced from its cells with ``tile_reduce``: ``"max"`` or ``"mean"``). Each feature carries
``objectType: "tile"``, ``classification: {"name", "color"}`` and ``measurements: {"score"}``;
QuPath imports it with File > Import objects and colours it with Measure > Show measurement
maps. Squares are clipped to the slide. A slide of 15k tiles gives 15k features per tile but
~3M per cell: prefer ``per="tile"`` for whole slides and cells for regions.

A slide run's tiles are the grid's. Tiles from a feature file lie where the file put them
(CLAM: a lattice per tissue contour, not the grid's): ``tile_boxes`` and ``tile_values`` give
each one its own square and its own cells' values.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from fastinsight.atomic import atomic_path
from fastinsight.errors import InputError
from fastinsight.slide.grid import Tile, TileGrid, tiles_cell_mask

Per = Literal["cell", "tile"]


def _square(x0: float, y0: float, x1: float, y1: float, ndigits: int) -> list[list[list[float]]]:
    x0, y0, x1, y1 = (round(v, ndigits) for v in (x0, y0, x1, y1))
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]


def _feature(
    box: tuple[float, float, float, float],
    score: float,
    classification: dict[str, Any],
    object_type: str,
    ndigits: int,
) -> dict[str, Any]:
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": _square(*box, ndigits)},
        "properties": {
            "objectType": object_type,
            "classification": classification,
            "measurements": {"score": float(score)},
        },
    }


def heatmap_features(
    cells: np.ndarray,
    grid: TileGrid,
    *,
    per: Per = "tile",
    tiles: Sequence[Tile] | None = None,
    tile_reduce: Literal["max", "mean"] = "max",
    class_name: str = "score",
    color: tuple[int, int, int] = (255, 0, 0),
    object_type: str = "tile",
    ndigits: int = 2,
    tile_boxes: np.ndarray | None = None,
    tile_values: np.ndarray | None = None,
) -> Iterator[dict[str, Any]]:
    """GeoJSON Feature dicts, row-major, for every finite cell (or tile with a finite cell).

    ``tiles`` limits ``per="tile"`` to those tiles. ``tile_boxes`` (with ``tile_values``): the
    tiles are these level-0 boxes instead of the grid's, in that order, each scored from its own
    values. Shapes: ``cells`` float ``grid.cell_shape``; ``tile_boxes`` ``[N, 4]`` (x0, y0, x1,
    y1); ``tile_values`` ``[N, ...]`` (NaN: no tissue).
    """
    arr = np.asarray(cells, dtype=np.float64)
    if arr.shape != grid.cell_shape:
        raise InputError(
            f"cells must have the grid's cell shape {grid.cell_shape}; got {arr.shape}"
        )
    if per not in ("cell", "tile"):
        raise InputError(f"per must be 'cell' or 'tile'; got {per!r}")
    if tile_reduce not in ("max", "mean"):
        raise InputError(f"tile_reduce must be 'max' or 'mean'; got {tile_reduce!r}")
    if object_type not in ("tile", "detection", "annotation"):
        raise InputError(
            f"object_type must be 'tile', 'detection' or 'annotation'; got {object_type!r}"
        )
    classification = {"name": class_name, "color": [int(c) for c in color]}
    width, height = float(grid.slide_width), float(grid.slide_height)

    def clip(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        return (box[0], box[1], min(box[2], width), min(box[3], height))

    def reduce(values: np.ndarray) -> float:
        return float(values.max() if tile_reduce == "max" else values.mean())

    if per == "cell":
        for r, c in zip(*np.nonzero(np.isfinite(arr)), strict=True):
            box = clip(grid.cell_l0_box(int(r), int(c)))
            yield _feature(box, arr[r, c], classification, object_type, ndigits)
        return
    if tile_boxes is not None:
        boxes = np.asarray(tile_boxes, dtype=np.float64)
        values = np.asarray(tile_values, dtype=np.float64).reshape(len(boxes), -1)
        for box, vals in zip(boxes, values, strict=True):
            vals = vals[np.isfinite(vals)]
            if vals.size:
                b = (max(box[0], 0.0), max(box[1], 0.0), box[2], box[3])
                yield _feature(clip(b), reduce(vals), classification, object_type, ndigits)
        return
    k = grid.cells_per_side
    blocks = (
        arr.reshape(grid.rows, k, grid.cols, k)
        .transpose(0, 2, 1, 3)
        .reshape(grid.rows, grid.cols, -1)
    )
    finite = np.isfinite(blocks)
    has = finite.any(axis=-1)
    wanted = has if tiles is None else has & _tile_keep(tiles, grid)
    for r, c in zip(*np.nonzero(wanted), strict=True):
        tile = grid.tile(int(r), int(c))
        score = reduce(blocks[r, c][finite[r, c]])
        yield _feature(clip(tile.l0_box), score, classification, object_type, ndigits)


def _tile_keep(tiles: Sequence[Tile], grid: TileGrid) -> np.ndarray:
    """The given tiles on the tile grid (one cell per tile). Shapes: -> ``[rows, cols]`` bool."""
    return tiles_cell_mask(tiles, grid, cells_per_side=1)


def heatmap_geojson(cells: np.ndarray, grid: TileGrid, **kwargs: Any) -> dict[str, Any]:
    """A FeatureCollection dict (see :func:`heatmap_features` for the options)."""
    return {"type": "FeatureCollection", "features": list(heatmap_features(cells, grid, **kwargs))}


def write_geojson(
    path: str | os.PathLike[str], cells: np.ndarray, grid: TileGrid, **kwargs: Any
) -> int:
    """Write the FeatureCollection atomically, streaming features; returns the feature count."""
    features = heatmap_features(cells, grid, **kwargs)
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"type": "FeatureCollection", "features": [')
        for feature in features:
            if not math.isfinite(feature["properties"]["measurements"]["score"]):
                continue
            fh.write(("," if count else "") + "\n" + json.dumps(feature, separators=(",", ":")))
            count += 1
        fh.write("\n]}\n")
    return count
