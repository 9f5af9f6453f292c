"""Predictions as evaluation takes them (``EvalInput``), read from and written to the one
prediction npz: the slide pipeline's scores sidecar (``scores.npz``; keys ``scores``, ``mask``,
``class_names``, ``geometry``; see ``docs/slides.md``), written by
:func:`fastinsight.slide.write_scores_sidecar` for ``predict``, ``predict-cohort``, ``demo`` and
:func:`save_prediction_npz` alike. The reader also takes the older evaluation layout (keys
``scores``, ``heatmap``, ``cell_size_l0``, ...) that earlier versions' ``save_prediction_npz``
wrote, so files users already have keep working."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastinsight.errors import InputError
from fastinsight.slide.grid import TileGrid
from fastinsight.slide.heatmap_tiff import read_scores_sidecar, write_scores_sidecar


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
    """Read a prediction npz: the scores sidecar (it has a ``geometry`` key), or the older
    evaluation layout: keys ``scores``, ``heatmap``, ``cell_size_l0`` (optional ``mask``,
    ``slide_id``, ``class_names``, ``origin_l0``, ``slide_size_l0``, ``mpp``)."""
    p = Path(path).expanduser()
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise InputError(f"prediction file {str(p)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {str(p)!r} as an npz prediction: {exc}") from exc
    if "geometry" in data:  # the one current layout (predict, predict-cohort, demo, save_...)
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
    """An ``EvalInput`` from a scores sidecar (NaN cells are non-tissue). The metadata's
    ``origin_l0``, ``slide_size_l0``, ``mpp`` and ``class_names_given`` (written by
    :func:`save_prediction_npz`) override what the grid says; without them (files of ``predict``)
    the origin is (0, 0) and the slide size and mpp are the grid's."""
    side = read_scores_sidecar(path)
    meta = side.metadata
    if "scores" not in meta:
        raise InputError(f"{str(path)!r} is a scores sidecar without slide scores in its metadata")
    grid = side.grid
    size = meta.get("slide_size_l0", [grid.slide_width, grid.slide_height])
    mpp = meta.get("mpp", grid.slide_mpp)
    origin = meta.get("origin_l0", [0.0, 0.0])
    try:
        return EvalInput(
            slide_id=str(meta.get("slide_id") or path.stem),
            scores=np.asarray(meta["scores"], dtype=np.float64),
            heatmap=np.nan_to_num(side.scores, nan=0.0),
            mask=side.mask,
            cell_size_l0=grid.l0_cell_size,
            origin_l0=(float(origin[0]), float(origin[1])),
            slide_size_l0=None if size is None else (int(size[0]), int(size[1])),
            mpp=None if mpp is None else float(mpp),
            class_names=side.class_names if meta.get("class_names_given", True) else (),
        )
    except (TypeError, ValueError, IndexError) as exc:
        raise InputError(
            f"{str(path)!r}: unreadable prediction metadata ({exc}); expected a file written by "
            "fastinsight predict or save_prediction_npz"
        ) from None


def prediction_grid(pred: EvalInput) -> TileGrid:
    """A ``TileGrid`` whose cell grid is ``pred``'s heatmap grid (one cell per tile).

    A tile of 1 px at ``target_mpp = cell_size_l0 * mpp`` is one heatmap cell of
    ``cell_size_l0`` level-0 px. The slide size is ``pred.slide_size_l0`` when the grid covers it
    exactly as the slide pipeline would (``ceil(size / cell) == cells``), else the smallest size
    that gives the heatmap's shape; an unknown mpp is written as 1.0 (the level-0 cell size stays
    exact). :func:`save_prediction_npz` records the real values in the metadata.
    """
    rows, cols = pred.grid_shape
    cell = float(pred.cell_size_l0)
    mpp = float(pred.mpp) if pred.mpp is not None and pred.mpp > 0 else 1.0

    def make(width: int, height: int) -> TileGrid:
        return TileGrid(max(1, width), max(1, height), mpp, cell * mpp, 1, 1)

    if pred.slide_size_l0 is not None:
        grid = make(int(pred.slide_size_l0[0]), int(pred.slide_size_l0[1]))
        if grid.cell_shape == (rows, cols):
            return grid
    # floor(n * cell) lies in ((n - 1) * cell, n * cell] for cells of at least 1 px: n cells
    grid = make(math.floor(cols * cell), math.floor(rows * cell))
    if grid.cell_shape != (rows, cols):
        raise InputError(
            f"{pred.slide_id}: cannot write a {rows} x {cols} heatmap of {cell:g} px cells; cells "
            "must be at least 1 level-0 px"
        )
    return grid


def save_prediction_npz(pred: EvalInput, path: str | os.PathLike[str]) -> None:
    """Write ``pred`` in the one prediction layout (the scores sidecar, atomically), which
    :func:`load_prediction_npz` reads back.

    Shapes: ``pred.heatmap`` ``[K, H, W]`` goes to ``scores``, ``pred.mask`` ``[H, W]`` (all
    cells when None) to ``mask``. The metadata records ``slide_id``, the slide ``scores``,
    ``origin_l0``, ``slide_size_l0`` and ``mpp`` (null when unknown) and whether the class names
    were given, so the file reads back as the same ``EvalInput``.
    """
    heatmap = np.asarray(pred.heatmap, dtype=np.float32)
    k, rows, cols = heatmap.shape
    mask = np.ones((rows, cols), bool) if pred.mask is None else np.asarray(pred.mask, bool)
    write_scores_sidecar(
        path,
        heatmap,
        prediction_grid(pred),
        mask=mask,
        class_names=tuple(pred.class_names) or tuple(f"class{i}" for i in range(k)),
        metadata={
            "slide_id": pred.slide_id,
            "scores": [float(v) for v in pred.scores],
            "origin_l0": [float(v) for v in pred.origin_l0],
            "slide_size_l0": None
            if pred.slide_size_l0 is None
            else [int(v) for v in pred.slide_size_l0],
            "mpp": None if pred.mpp is None else float(pred.mpp),
            "class_names_given": bool(pred.class_names),
        },
    )


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
