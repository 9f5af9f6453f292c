"""Weakly supervised localisation metrics on chest radiographs (NIH ChestX-ray14 layouts).

- **Point localisation accuracy** (PYLON): for every GT-positive image-class pair (the image has
  at least one box of that class), a hit when the arg-max pixel of the class heatmap (upsampled to
  the image size; first maximum in row-major order) lies inside any box of that class. Inside
  means ``x0 <= x <= x0 + w`` and ``y0 <= y <= y0 + h`` with ``(x, y)`` integer pixel indices and
  the box as written in the CSV (floats, image pixels). Reported per class, micro (all pairs
  pooled) and macro (mean of the per-class accuracies over classes that have pairs).
- **IoU / IoBB hit rates** at T = 0.1, 0.25, 0.5 (Wang et al. 2017's protocol, with a pixel mask
  in place of a box drawn around it): the predicted region is ``heatmap >= mask_threshold``
  (default 0.5 on the probability map); a pair is a hit when, for some GT box of the class,
  ``IoU = |M ∩ B| / |M ∪ B|`` (or ``IoBB = |M ∩ B| / |M|``) is ``>= T``. Box pixels are the
  integer pixels inside it as defined above.
- **AUROC** per class from image scores against the ``Finding Labels`` of ``Data_Entry_2017.csv``
  (labels joined by ``|``; ``No Finding`` = none), with the rank formula of
  :func:`fastinsight.evaluate.roc_auc` (ties counted half).

Input layouts: ``BBox_List_2017.csv`` = ``Image Index, Finding Label, x, y, w, h`` (the header of
the box columns reads ``Bbox [x,y,w,h]`` spread over four cells); ``Data_Entry_2017.csv`` with
``Image Index`` and ``Finding Labels`` columns.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastinsight.errors import InputError

THRESHOLDS: tuple[float, ...] = (0.1, 0.25, 0.5)


@dataclass(frozen=True)
class Box:
    """A ground-truth box in image pixels (top-left ``x, y``, size ``w, h``)."""

    label: str
    x: float
    y: float
    w: float
    h: float

    def contains(self, px: int, py: int) -> bool:
        return self.x <= px <= self.x + self.w and self.y <= py <= self.y + self.h

    def mask(self, height: int, width: int) -> np.ndarray:
        """Integer pixels inside the box. Shapes: -> bool ``[height, width]``."""
        ys = np.arange(height)
        xs = np.arange(width)
        iny = (ys >= self.y) & (ys <= self.y + self.h)
        inx = (xs >= self.x) & (xs <= self.x + self.w)
        return iny[:, None] & inx[None, :]


def read_bbox_list(path: str | os.PathLike[str]) -> dict[str, list[Box]]:
    """``BBox_List_2017.csv`` -> image name -> boxes."""
    out: dict[str, list[Box]] = defaultdict(list)
    with open(path, newline="") as fh:
        rows = csv.reader(fh)
        header = next(rows, None)
        if not header or header[0].strip() != "Image Index":
            raise InputError(
                f"{str(path)!r}: expected the NIH BBox_List_2017.csv header starting 'Image "
                f"Index, Finding Label, Bbox [x,y,w,h]'; found {header}"
            )
        for n, row in enumerate(rows, start=2):
            if not row or not row[0].strip():
                continue
            try:
                x, y, w, h = (float(v) for v in row[2:6])
            except ValueError:
                raise InputError(
                    f"{str(path)!r} line {n}: box {row[2:6]} is not four numbers"
                ) from None
            out[row[0].strip()].append(Box(row[1].strip(), x, y, w, h))
    return dict(out)


def read_data_entry(path: str | os.PathLike[str]) -> dict[str, set[str]]:
    """``Data_Entry_2017.csv`` -> image name -> set of findings (``No Finding`` -> empty)."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "Image Index" not in cols or "Finding Labels" not in cols:
            raise InputError(
                f"{str(path)!r}: expected columns 'Image Index' and 'Finding Labels'; found {cols}"
            )
        return {
            row["Image Index"].strip(): {
                lab.strip() for lab in row["Finding Labels"].split("|") if lab.strip()
            }
            - {"No Finding"}
            for row in reader
        }


def argmax_xy(heatmap: np.ndarray) -> tuple[int, int]:
    """First maximum (row-major) as ``(x, y)``. Shapes: ``[H, W]``."""
    flat = int(np.argmax(heatmap))
    y, x = divmod(flat, heatmap.shape[1])
    return x, y


@dataclass
class LocalisationResult:
    """Per-class and averaged hit rates; ``pairs`` counts GT-positive image-class pairs."""

    pairs: dict[str, int]
    point_hits: dict[str, int]
    iou_hits: dict[float, dict[str, int]]
    iobb_hits: dict[float, dict[str, int]]

    @staticmethod
    def _rates(hits: Mapping[str, int], pairs: Mapping[str, int]) -> dict[str, Any]:
        per = {c: hits.get(c, 0) / n for c, n in pairs.items() if n}
        total = sum(pairs.values())
        return {
            "per_class": per,
            "micro": (sum(hits.get(c, 0) for c in pairs) / total) if total else float("nan"),
            "macro": float(np.mean(list(per.values()))) if per else float("nan"),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "pairs": dict(self.pairs),
            "point_accuracy": self._rates(self.point_hits, self.pairs),
            "iou": {str(t): self._rates(h, self.pairs) for t, h in self.iou_hits.items()},
            "iobb": {str(t): self._rates(h, self.pairs) for t, h in self.iobb_hits.items()},
        }


def evaluate_localisation(
    heatmaps: Callable[[str, str], np.ndarray | None],
    boxes: Mapping[str, Sequence[Box]],
    classes: Sequence[str],
    *,
    thresholds: Sequence[float] = THRESHOLDS,
    mask_threshold: float = 0.5,
) -> LocalisationResult:
    """Point accuracy and IoU/IoBB hit rates over every GT-positive image-class pair.

    ``heatmaps(image, cls)`` returns that class's map at image size (``[H, W]``, probabilities),
    or None when the image was not predicted (its pairs then count as misses: nothing is
    silently dropped).
    """
    known = set(classes)
    pairs: dict[str, int] = defaultdict(int)
    point: dict[str, int] = defaultdict(int)
    iou: dict[float, dict[str, int]] = {float(t): defaultdict(int) for t in thresholds}
    iobb: dict[float, dict[str, int]] = {float(t): defaultdict(int) for t in thresholds}
    for image, image_boxes in boxes.items():
        by_class: dict[str, list[Box]] = defaultdict(list)
        for b in image_boxes:
            if b.label in known:
                by_class[b.label].append(b)
        for cls, cls_boxes in by_class.items():
            pairs[cls] += 1
            hm = heatmaps(image, cls)
            if hm is None:
                continue
            x, y = argmax_xy(hm)
            point[cls] += any(b.contains(x, y) for b in cls_boxes)
            pred = hm >= mask_threshold
            n_pred = int(pred.sum())
            best_iou = best_iobb = 0.0
            for b in cls_boxes:
                gt = b.mask(*hm.shape)
                inter = int((pred & gt).sum())
                union = int((pred | gt).sum())
                best_iou = max(best_iou, inter / union if union else 0.0)
                best_iobb = max(best_iobb, inter / n_pred if n_pred else 0.0)
            for t in iou:
                iou[t][cls] += best_iou >= t
                iobb[t][cls] += best_iobb >= t
    return LocalisationResult(
        dict(pairs),
        dict(point),
        {t: dict(v) for t, v in iou.items()},
        {t: dict(v) for t, v in iobb.items()},
    )


def evaluate_auroc(
    scores: Mapping[str, Mapping[str, float]],
    labels: Mapping[str, set[str]],
    classes: Sequence[str],
) -> dict[str, float]:
    """Per-class AUROC over images present in both maps (NaN when a class has one label value)."""
    from fastinsight.evaluate import roc_auc

    images = [i for i in scores if i in labels]
    if not images:
        raise InputError("no scored image appears in the labels file; check the image names")
    out = {}
    for c in classes:
        y = np.array([c in labels[i] for i in images], dtype=np.int64)
        s = np.array([scores[i][c] for i in images], dtype=np.float64)
        out[c] = roc_auc(s, y) if 0 < y.sum() < len(y) else float("nan")
    return out


def evaluate_radiographs(
    image_dir: str | os.PathLike[str],
    model: Any,
    boxes: Mapping[str, Sequence[Box]],
    labels: Mapping[str, set[str]] | None = None,
    *,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Predict every boxed (and labelled) image found in ``image_dir``; return all metrics."""
    from fastinsight.radiograph.predict import PredictOptions, predict_radiographs

    folder = Path(image_dir)
    names = sorted(set(boxes) | set(labels or {}))
    present = [n for n in names if (folder / n).is_file()]
    if not present:
        raise InputError(f"none of the {len(names)} listed images is in {str(folder)!r}")
    classes = tuple(model.config.names)
    maps: dict[tuple[str, str], np.ndarray] = {}
    scores: dict[str, dict[str, float]] = {}
    opts = PredictOptions(batch_size=batch_size)
    for name, r in zip(
        present, predict_radiographs([folder / n for n in present], model, opts), strict=False
    ):
        scores[name] = dict(zip(classes, (float(s) for s in r.scores), strict=False))  # type: ignore[union-attr]
        for b in boxes.get(name, ()):
            if b.label in classes and (name, b.label) not in maps:
                maps[(name, b.label)] = r.heatmap(classes.index(b.label))  # type: ignore[union-attr]
    loc = evaluate_localisation(lambda i, c: maps.get((i, c)), boxes, classes)
    result: dict[str, Any] = {"images": len(present), "localisation": loc.as_dict()}
    if labels is not None:
        result["auroc"] = evaluate_auroc(scores, labels, classes)
    return result


__all__ = [
    "Box",
    "LocalisationResult",
    "argmax_xy",
    "evaluate_auroc",
    "evaluate_localisation",
    "evaluate_radiographs",
    "read_bbox_list",
    "read_data_entry",
]
