"""Slide AUC and localisation Dice: ``fastinsight evaluate``.

- **Slide AUC** per class: the rank-based Mann-Whitney estimate with average ranks for ties (equal
  to the area under the ROC curve with ties counted one half). No sklearn.
- **Dice** of the thresholded heatmap against ground truth on the heatmap grid (the "stated
  resolution": level-0 px per heatmap cell, and the mpp when known). A cell is predicted positive
  when its (already Otsu-thresholded) heatmap value is above ``threshold``; the default 0.5 is the
  official ``evaluation.py`` default; ``threshold=0`` scores exactly the cells the model's own
  Otsu threshold kept. As in the official evaluation, Dice is computed on slides labelled positive
  (``dice_on="positive"``); ``"all"`` adds negative slides (empty ground truth; Dice 1 when
  nothing is predicted, else 0). Reported: the per-slide mean +- sd (population sd, numpy's
  default) and the pooled Dice ``2 sum|P&G| / (sum|P| + sum|G|)`` over the same slides.
- **Ground truth**: a mask TIFF (any level or size, pyramidal or not; nonzero = lesion, or the
  given label values) resampled to the heatmap grid by ``nearest`` (the mask value at each cell
  centre) or ``area`` (a cell is positive when at least half its footprint is); or QuPath GeoJSON
  (Polygon / MultiPolygon in level-0 px, holes honoured) rasterised at cell centres (``nearest``)
  or at 8x8 samples per cell (``area``).

Predictions come as ``EvalInput`` (per slide: scores ``[K]``, heatmap ``[K, H, W]`` with its
level-0 cell size, tissue mask ``[H, W]``), e.g. from npz files with keys ``scores``,
``heatmap``, ``mask``, ``cell_size_l0``, ``slide_id`` (optional ``class_names``, ``origin_l0``,
``slide_size_l0``, ``mpp``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastinsight.atomic import atomic_path
from fastinsight.errors import InputError
from fastinsight.text import clean_text, dumps_json

GT_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".geojson", ".json")
RESAMPLE: tuple[str, ...] = ("nearest", "area")
AREA_SUPERSAMPLE = 8


# --------------------------------------------------------------------------------------------
# AUC
# --------------------------------------------------------------------------------------------
def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of their ranks. Shapes: ``[n]`` -> ``[n]`` float64."""
    v = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    # Start of each run of equal values.
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], v.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic (ties count one half).

    Shapes: scores ``[n]``, labels ``[n]`` in {0, 1} -> float; NaN when only one class is present.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise InputError(f"roc_auc: {s.size} scores but {y.size} labels")
    if not np.isin(y, (0, 1)).all():
        raise InputError(f"roc_auc: labels must be 0 or 1, found {sorted(set(y.tolist()))}")
    if not np.isfinite(s).all():
        raise InputError("roc_auc: scores contain NaN or inf")
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(s)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# --------------------------------------------------------------------------------------------
# Dice
# --------------------------------------------------------------------------------------------
def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice ``2|P&G| / (|P| + |G|)`` of two boolean masks; 1.0 when both are empty."""
    p, g = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if p.shape != g.shape:
        raise InputError(f"dice: prediction {p.shape} and truth {g.shape} differ in shape")
    denom = int(p.sum()) + int(g.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & g).sum()) / denom


# --------------------------------------------------------------------------------------------
# predictions
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalInput:
    """One slide's prediction as evaluation takes it.

    Shapes: scores ``[K]``, heatmap ``[K, H, W]`` (the thresholded heatmap, zero off tissue),
    mask ``[H, W]`` bool tissue cells or None. Heatmap cell (row i, col j) covers level-0 px
    ``origin_l0 + (j, i) * cell_size_l0`` onwards. ``slide_size_l0`` (width, height) tells how a
    ground-truth mask image maps onto level 0 when it does not say so itself.
    """

    slide_id: str
    scores: np.ndarray
    heatmap: np.ndarray
    cell_size_l0: float
    mask: np.ndarray | None = None
    origin_l0: tuple[float, float] = (0.0, 0.0)
    slide_size_l0: tuple[int, int] | None = None
    mpp: float | None = None
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        hm = np.asarray(self.heatmap)
        if hm.ndim == 2:
            hm = hm[None]
        if hm.ndim != 3:
            raise InputError(
                f"{self.slide_id}: heatmap must be [K, H, W] or [H, W], got {np.shape(self.heatmap)}"
            )
        object.__setattr__(self, "heatmap", hm)
        scores = np.atleast_1d(np.asarray(self.scores, dtype=np.float64))
        if scores.shape != (hm.shape[0],):
            raise InputError(
                f"{self.slide_id}: {scores.size} scores for a heatmap of {hm.shape[0]} classes"
            )
        object.__setattr__(self, "scores", scores)
        if self.mask is not None and np.shape(self.mask) != hm.shape[1:]:
            raise InputError(
                f"{self.slide_id}: tissue mask {np.shape(self.mask)} differs from the heatmap "
                f"grid {hm.shape[1:]}"
            )
        if not (self.cell_size_l0 > 0 and math.isfinite(self.cell_size_l0)):
            raise InputError(f"{self.slide_id}: cell_size_l0 must be > 0, got {self.cell_size_l0}")

    @property
    def grid_shape(self) -> tuple[int, int]:
        return int(self.heatmap.shape[1]), int(self.heatmap.shape[2])


def _npz_str(value: Any) -> str:
    arr = np.asarray(value)
    return str(arr.item() if arr.ndim == 0 else arr.ravel()[0])


def load_prediction_npz(path: str | os.PathLike[str]) -> EvalInput:
    """Read a prediction npz: keys ``scores``, ``heatmap``, ``mask``, ``cell_size_l0``,
    ``slide_id`` (optional ``class_names``, ``origin_l0``, ``slide_size_l0``, ``mpp``)."""
    p = Path(path).expanduser()
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise InputError(f"prediction file {str(p)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {str(p)!r} as an npz prediction: {exc}") from exc
    if "geometry" in data:  # the sidecar of `fastinsight predict --scores` / predict-cohort
        return _from_sidecar(p)
    missing = [k for k in ("scores", "heatmap", "cell_size_l0") if k not in data]
    if missing:
        raise InputError(
            f"{str(p)!r} lacks {missing} (found {sorted(data)}); expected the npz sidecar of a "
            "fastinsight prediction"
        )
    names = (
        tuple(str(n) for n in np.asarray(data["class_names"]).ravel())
        if "class_names" in data
        else ()
    )
    origin = (
        tuple(float(v) for v in np.asarray(data["origin_l0"]).ravel()[:2])
        if "origin_l0" in data
        else (0.0, 0.0)
    )
    size = (
        tuple(int(v) for v in np.asarray(data["slide_size_l0"]).ravel()[:2])
        if "slide_size_l0" in data
        else None
    )
    return EvalInput(
        slide_id=_npz_str(data["slide_id"]) if "slide_id" in data else p.stem,
        scores=np.asarray(data["scores"], dtype=np.float64),
        heatmap=np.asarray(data["heatmap"], dtype=np.float32),
        mask=np.asarray(data["mask"], dtype=bool) if "mask" in data else None,
        cell_size_l0=float(np.asarray(data["cell_size_l0"]).ravel()[0]),
        origin_l0=origin,  # type: ignore[arg-type]
        slide_size_l0=size,  # type: ignore[arg-type]
        mpp=float(np.asarray(data["mpp"]).ravel()[0]) if "mpp" in data else None,
        class_names=names,
    )


def _from_sidecar(path: Path) -> EvalInput:
    """An ``EvalInput`` from the slide pipeline's scores sidecar (NaN cells are non-tissue)."""
    from fastinsight.slide import read_scores_sidecar

    side = read_scores_sidecar(path)
    meta = side.metadata
    if "scores" not in meta:
        raise InputError(f"{str(path)!r} is a scores sidecar without slide scores in its metadata")
    grid = side.grid
    return EvalInput(
        slide_id=str(meta.get("slide_id") or path.stem),
        scores=np.asarray(meta["scores"], dtype=np.float64),
        heatmap=np.nan_to_num(side.scores, nan=0.0),
        mask=side.mask,
        cell_size_l0=grid.l0_cell_size,
        slide_size_l0=(grid.slide_width, grid.slide_height),
        mpp=grid.slide_mpp,
        class_names=side.class_names,
    )


def save_prediction_npz(pred: EvalInput, path: str | os.PathLike[str]) -> None:
    """Write ``pred`` in the npz layout ``load_prediction_npz`` reads (atomically)."""
    arrays: dict[str, Any] = {
        "slide_id": np.asarray(pred.slide_id),
        "scores": pred.scores.astype(np.float32),
        "heatmap": pred.heatmap.astype(np.float32),
        "cell_size_l0": np.asarray(pred.cell_size_l0, dtype=np.float64),
        "origin_l0": np.asarray(pred.origin_l0, dtype=np.float64),
    }
    if pred.mask is not None:
        arrays["mask"] = np.asarray(pred.mask, dtype=bool)
    if pred.slide_size_l0 is not None:
        arrays["slide_size_l0"] = np.asarray(pred.slide_size_l0, dtype=np.int64)
    if pred.mpp is not None:
        arrays["mpp"] = np.asarray(pred.mpp, dtype=np.float64)
    if pred.class_names:
        arrays["class_names"] = np.asarray(pred.class_names)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def load_predictions(folder: str | os.PathLike[str]) -> list[EvalInput]:
    """Every ``*.npz`` prediction of a folder, sorted by slide id; also the ``<slide>/scores.npz``
    layout that ``predict-cohort`` and ``demo`` write."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InputError(f"predictions folder {str(root)!r} does not exist or is not a folder")
    files = sorted(root.glob("*.npz")) or sorted(root.glob("*/scores.npz"))
    preds = [load_prediction_npz(f) for f in files]
    if not preds:
        raise InputError(f"no .npz predictions in {str(root)!r}; run fastinsight predict first")
    seen: dict[str, int] = {}
    for pr in preds:
        seen[pr.slide_id] = seen.get(pr.slide_id, 0) + 1
    dups = sorted(k for k, v in seen.items() if v > 1)
    if dups:
        raise InputError(f"several predictions for slide(s) {dups[:5]} in {str(root)!r}")
    return sorted(preds, key=lambda pr: pr.slide_id)


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Labels:
    """Slide labels from a CSV: first column the slide id, then one 0/1 column per class.

    A column named ``split`` (values train / val / test) is not a class; it fixes the split.
    """

    class_names: tuple[str, ...]
    values: Mapping[str, tuple[int, ...]]
    split: Mapping[str, str] = field(default_factory=dict)

    @property
    def slide_ids(self) -> tuple[str, ...]:
        return tuple(self.values)


def read_labels(path: str | os.PathLike[str]) -> Labels:
    """Parse a labels CSV (``slide_id,<class>,...``; values 0/1; optional ``split`` column)."""
    from fastinsight.inputs import allow_long_csv_fields

    p = Path(path).expanduser()
    allow_long_csv_fields()
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    except FileNotFoundError:
        raise InputError(f"labels file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read labels file {str(p)!r}: {exc}") from exc
    if len(rows) < 2:
        raise InputError(
            f"{str(p)!r} has no data rows; expected a header 'slide_id,<class>,...' and one row "
            "per slide"
        )
    header = [h.strip() for h in rows[0]]
    if header[0].lower() not in ("slide_id", "slide", "case_id", "id"):
        raise InputError(
            f"{str(p)!r}: the first column is {header[0]!r}; expected a header "
            "'slide_id,<class>,...' with the slide ids (file stems) in the first column"
        )
    split_col = next((i for i, h in enumerate(header) if h.lower() == "split" and i > 0), None)
    class_cols = [i for i in range(1, len(header)) if i != split_col]
    if not class_cols:
        raise InputError(
            f"{str(p)!r}: header {header} has no class column; expected 'slide_id,<class>,...'"
        )
    names = tuple(header[i] for i in class_cols)
    if len(set(names)) != len(names) or any(not n for n in names):
        raise InputError(f"{str(p)!r}: class columns {list(names)} must be unique and non-empty")
    values: dict[str, tuple[int, ...]] = {}
    split: dict[str, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise InputError(
                f"{str(p)!r} line {line}: {len(row)} fields, the header has {len(header)}"
            )
        sid = row[0].strip()
        if not sid:
            raise InputError(f"{str(p)!r} line {line}: empty slide id")
        if sid in values:
            raise InputError(f"{str(p)!r} line {line}: slide {sid!r} is listed twice")
        labs = []
        for i in class_cols:
            cell = row[i].strip().lower()
            if cell in ("1", "1.0", "true"):
                labs.append(1)
            elif cell in ("0", "0.0", "false"):
                labs.append(0)
            else:
                raise InputError(
                    f"{str(p)!r} line {line}: {header[i]}={row[i]!r} for slide {sid!r}; "
                    "labels must be 0 or 1"
                )
        values[sid] = tuple(labs)
        if split_col is not None:
            s = row[split_col].strip().lower()
            if s not in ("train", "val", "test", ""):
                raise InputError(
                    f"{str(p)!r} line {line}: split={row[split_col]!r}; expected train, val or test"
                )
            if s:
                split[sid] = s
    return Labels(class_names=names, values=values, split=split)


# --------------------------------------------------------------------------------------------
# ground truth onto the heatmap grid
# --------------------------------------------------------------------------------------------
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
    cell is positive when at least ``area_fraction`` of the mask pixels under it are.
    Cells beyond the mask image are negative.
    """
    if method not in RESAMPLE:
        raise InputError(f"resample must be one of {RESAMPLE}, got {method!r}")
    m = np.asarray(mask, dtype=bool)
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
    integral = np.zeros((hm + 1, wm + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(m, axis=0, dtype=np.int64), axis=1)
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


def _read_mask_level(path: Path, ds0_of: Any, cell_size_l0: float) -> tuple[np.ndarray, int, int]:
    """Open a mask TIFF, pick the coarsest level still at least as fine as a heatmap cell, read it.

    ``ds0_of(h0, w0)`` gives the finest level's level-0 downsample. Returns (plane, h0, w0).
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
        plane = _plane(chosen[2].asarray(), chosen[3])
    if plane.ndim != 2:
        raise InputError(f"mask TIFF {str(path)!r} has image shape {plane.shape}; expected [H, W]")
    return plane, h0, w0


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

    plane, h0, w0 = _read_mask_level(p, ds0_of, target.cell_size_l0)
    positive = np.isin(plane, list(values)) if values else plane != 0
    ds_level = ds0_of(h0, w0) * w0 / plane.shape[1]
    out = resample_mask(positive, ds_level, (hh, ww), target.cell_size_l0, target.origin_l0, method)
    info = {
        "source": str(p),
        "mask_level_size": [int(plane.shape[1]), int(plane.shape[0])],
        "mask_downsample_l0": ds_level,
        "scale": how,
    }
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
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"GeoJSON file {str(p)!r} does not exist") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
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


# --------------------------------------------------------------------------------------------
# the evaluation
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlideEval:
    """Per-slide results; ``dice`` etc. are None where the slide took no part in localisation."""

    slide_id: str
    labels: tuple[int, ...]
    scores: tuple[float, ...]
    dice: tuple[float | None, ...]
    pred_cells: tuple[int | None, ...]
    truth_cells: tuple[int | None, ...]
    overlap_cells: tuple[int | None, ...]
    cell_size_l0: float


@dataclass(frozen=True)
class ClassEval:
    """One class: slide AUC and localisation Dice (mean +- population sd, and pooled)."""

    name: str
    auc: float
    n_pos: int
    n_neg: int
    dice_mean: float | None
    dice_sd: float | None
    dice_pooled: float | None
    dice_slides: int


@dataclass(frozen=True)
class EvalResult:
    """Everything ``evaluate`` measured, with the settings that define it."""

    classes: tuple[ClassEval, ...]
    slides: tuple[SlideEval, ...]
    threshold: float
    resample: str
    dice_on: str
    cell_size_l0: tuple[float, ...]
    mpp: tuple[float, ...] = ()
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        def clean(x: Any) -> Any:
            if isinstance(x, float) and not math.isfinite(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x

        return clean(
            {
                "classes": [asdict(c) for c in self.classes],
                "localisation": {
                    "threshold": self.threshold,
                    "rule": "cell positive when thresholded heatmap > threshold",
                    "resample": self.resample,
                    "dice_on": self.dice_on,
                    "resolution": {
                        "cell_size_l0_px": sorted(set(self.cell_size_l0)),
                        "mpp_of_cell": sorted(set(self.mpp)),
                    },
                    "sd": "population (ddof=0)",
                },
                "slides": [asdict(s) for s in self.slides],
                "notes": list(self.notes),
            }
        )

    def write_json(self, path: str | os.PathLike[str]) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(
                dumps_json(self.as_dict(), "evaluation", nan_as_null=True, indent=2) + "\n",
                encoding="utf-8",
            )

    def write_csv(self, path: str | os.PathLike[str]) -> None:
        """One row per slide: labels, scores and Dice per class."""
        names = [c.name for c in self.classes]
        header = ["slide_id"]
        for n in names:
            header += [
                f"label_{n}",
                f"score_{n}",
                f"dice_{n}",
                f"pred_cells_{n}",
                f"truth_cells_{n}",
            ]
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for s in self.slides:
                row: list[Any] = [clean_text(s.slide_id)]  # undecodable file-name bytes
                for k in range(len(names)):
                    d = s.dice[k]
                    row += [
                        s.labels[k],
                        f"{s.scores[k]:.6g}",
                        "" if d is None else f"{d:.6g}",
                        "" if s.pred_cells[k] is None else s.pred_cells[k],
                        "" if s.truth_cells[k] is None else s.truth_cells[k],
                    ]
                w.writerow(row)

    def summary(self) -> str:
        lines = []
        for c in self.classes:
            auc = "n/a" if not math.isfinite(c.auc) else f"{c.auc:.3f}"
            line = f"{c.name}: AUC {auc} ({c.n_pos} pos / {c.n_neg} neg)"
            if c.dice_mean is not None:
                line += (
                    f"; Dice {100 * c.dice_mean:.1f} +- {100 * (c.dice_sd or 0):.1f} "
                    f"(pooled {100 * (c.dice_pooled or 0):.1f}, {c.dice_slides} slides, "
                    f"threshold {self.threshold:g})"
                )
            lines.append(line)
        return "\n".join(lines)


def evaluate(
    predictions: Sequence[EvalInput],
    labels: Labels,
    *,
    ground_truth: Mapping[str, str | os.PathLike[str]] | None = None,
    threshold: float = 0.5,
    resample: str = "nearest",
    dice_on: str = "positive",
    gt_class: str | None = None,
    mask_downsample: float | None = None,
    mask_values: Sequence[int] | None = None,
    geojson_classes: Iterable[str] | None = None,
) -> EvalResult:
    """Slide AUC per class and, where ground truth is given, Dice per slide and pooled.

    ``ground_truth`` maps slide id -> mask TIFF / GeoJSON. With several classes, a TIFF applies
    to ``gt_class``; GeoJSON polygons go to the class their classification names (or to
    ``gt_class`` when given). Predictions of slides without a label are an error; labelled
    slides without a prediction are left out and noted.
    """
    if resample not in RESAMPLE:
        raise InputError(f"resample must be one of {RESAMPLE}, got {resample!r}")
    if dice_on not in ("positive", "all"):
        raise InputError(f"dice_on must be 'positive' or 'all', got {dice_on!r}")
    if not predictions:
        raise InputError("no predictions to evaluate")
    names = labels.class_names
    k_count = len(names)
    gt_k: int | None = None
    if gt_class is not None:
        if gt_class not in names:
            raise InputError(f"--gt-class {gt_class!r} is not a class of the labels {list(names)}")
        gt_k = names.index(gt_class)
    elif k_count == 1:
        gt_k = 0
    notes: list[str] = []
    for pr in predictions:
        if pr.slide_id not in labels.values:
            raise InputError(
                f"prediction for slide {pr.slide_id!r} has no row in the labels CSV; add it or "
                "remove the prediction"
            )
        if pr.heatmap.shape[0] != k_count:
            raise InputError(
                f"slide {pr.slide_id!r}: the prediction has {pr.heatmap.shape[0]} classes, the "
                f"labels CSV {k_count} ({list(names)})"
            )
        if pr.class_names and tuple(pr.class_names) != names:
            raise InputError(
                f"slide {pr.slide_id!r}: prediction classes {list(pr.class_names)} differ from "
                f"the labels CSV columns {list(names)}; reorder the CSV"
            )
    missing = sorted(set(labels.values) - {p.slide_id for p in predictions})
    if missing:
        notes.append(f"{len(missing)} labelled slides have no prediction: {missing[:5]}")
    gt = dict(ground_truth or {})
    unused_gt = sorted(set(gt) - {p.slide_id for p in predictions})
    if unused_gt:
        notes.append(f"{len(unused_gt)} ground-truth files match no prediction: {unused_gt[:5]}")

    slides: list[SlideEval] = []
    gt_cache: dict[tuple[str, int | None], np.ndarray] = {}

    def truth_for(pr: EvalInput, k: int) -> np.ndarray | None:
        """Ground truth of class k on the slide's grid, or None when there is none."""
        if pr.slide_id not in gt:
            return None
        path = Path(gt[pr.slide_id])
        if path.suffix.lower() in (".geojson", ".json"):
            if gt_k is not None and k != gt_k:
                return None
            # Several classes and no --gt-class: polygons go to the class they are named after.
            wanted = [names[k]] if gt_k is None else geojson_classes
            key: tuple[str, int | None] = (pr.slide_id, None if gt_k is not None else k)
            if key not in gt_cache:
                gt_cache[key] = ground_truth_on_grid(
                    path, pr, method=resample, geojson_classes=wanted
                )[0]
            return gt_cache[key]
        if gt_k is None:
            raise InputError(
                f"labels have several classes {list(names)} and {path.name} is a mask image; "
                "pass --gt-class to say which class the masks show"
            )
        if k != gt_k:
            return None
        key = (pr.slide_id, None)
        if key not in gt_cache:
            gt_cache[key] = ground_truth_on_grid(
                path,
                pr,
                method=resample,
                mask_downsample=mask_downsample,
                mask_values=mask_values,
            )[0]
        return gt_cache[key]

    for pr in sorted(predictions, key=lambda p: p.slide_id):
        y = labels.values[pr.slide_id]
        dices: list[float | None] = []
        pc: list[int | None] = []
        tc: list[int | None] = []
        oc: list[int | None] = []
        for k in range(k_count):
            truth: np.ndarray | None = None
            if y[k] == 1:
                truth = truth_for(pr, k)
                if truth is None and gt:
                    notes.append(
                        f"slide {pr.slide_id!r} is positive for {names[k]} but has no ground "
                        "truth; left out of the Dice"
                    )
            elif dice_on == "all":
                truth = truth_for(pr, k)
                if truth is None:
                    truth = np.zeros(pr.grid_shape, dtype=bool)
            if truth is None:
                dices.append(None)
                pc.append(None)
                tc.append(None)
                oc.append(None)
                continue
            pred = pr.heatmap[k] > threshold
            if pr.mask is not None:
                pred &= pr.mask
            dices.append(dice(pred, truth))
            pc.append(int(pred.sum()))
            tc.append(int(truth.sum()))
            oc.append(int((pred & truth).sum()))
        slides.append(
            SlideEval(
                slide_id=pr.slide_id,
                labels=y,
                scores=tuple(float(s) for s in pr.scores),
                dice=tuple(dices),
                pred_cells=tuple(pc),
                truth_cells=tuple(tc),
                overlap_cells=tuple(oc),
                cell_size_l0=pr.cell_size_l0,
            )
        )

    classes = []
    for k, name in enumerate(names):
        ys = np.array([s.labels[k] for s in slides])
        ss = np.array([s.scores[k] for s in slides])
        auc = roc_auc(ss, ys)
        if not math.isfinite(auc):
            notes.append(f"{name}: AUC undefined (only one label value among the slides)")
        ds = [s.dice[k] for s in slides if s.dice[k] is not None]
        if ds:
            inter = sum(s.overlap_cells[k] or 0 for s in slides if s.dice[k] is not None)
            tot = sum(
                (s.pred_cells[k] or 0) + (s.truth_cells[k] or 0)
                for s in slides
                if s.dice[k] is not None
            )
            pooled = 1.0 if tot == 0 else 2.0 * inter / tot
            d_arr = np.asarray(ds, dtype=np.float64)
            dm, dsd = float(d_arr.mean()), float(d_arr.std())
        else:
            pooled = dm = dsd = None  # type: ignore[assignment]
        classes.append(
            ClassEval(
                name=name,
                auc=auc,
                n_pos=int((ys == 1).sum()),
                n_neg=int((ys == 0).sum()),
                dice_mean=dm,
                dice_sd=dsd,
                dice_pooled=pooled,
                dice_slides=len(ds),
            )
        )
    return EvalResult(
        classes=tuple(classes),
        slides=tuple(slides),
        threshold=float(threshold),
        resample=resample,
        dice_on=dice_on,
        cell_size_l0=tuple(p.cell_size_l0 for p in predictions),
        mpp=tuple(p.mpp for p in predictions if p.mpp is not None),
        notes=tuple(notes),
    )


def evaluate_from_folder(
    predictions_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    *,
    ground_truth_dir: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> EvalResult:
    """``evaluate`` over a folder of prediction npz files, a labels CSV and a ground-truth folder."""
    preds = load_predictions(predictions_dir)
    labels = read_labels(labels_csv)
    gt = find_ground_truth(ground_truth_dir) if ground_truth_dir is not None else None
    return evaluate(preds, labels, ground_truth=gt, **kwargs)


__all__ = [
    "ClassEval",
    "EvalInput",
    "EvalResult",
    "Labels",
    "SlideEval",
    "average_ranks",
    "dice",
    "evaluate",
    "evaluate_from_folder",
    "find_ground_truth",
    "ground_truth_on_grid",
    "load_prediction_npz",
    "load_predictions",
    "rasterize_polygons",
    "read_geojson_polygons",
    "read_labels",
    "read_mask_tiff",
    "resample_mask",
    "roc_auc",
    "save_prediction_npz",
]
