"""Predictions as evaluation takes them (``EvalInput``): the prediction npz and the slide
pipeline's scores sidecar, read and written."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastinsight.atomic import atomic_path
from fastinsight.errors import InputError


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
