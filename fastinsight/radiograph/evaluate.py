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
``Image Index`` and ``Finding Labels`` columns. UTF-8, a BOM allowed (Excel writes one).

What is refused (one InputError line naming the file and line) and what is reported:

- a box that is not four finite numbers, has a side <= 0 or a negative corner, or reaches beyond
  its image (the NIH boxes are in the pixels of the original 1024 x 1024 images: resized copies
  put them outside); an ``Image Index`` that is absolute or holds ``..`` (the CSV must not reach
  outside the images folder); a Data_Entry row without its ``Finding Labels`` cell, or an image
  listed twice there (which row would be the truth?);
- box and finding labels are matched to the model's classes ignoring case, spaces and ``_``, and
  through :data:`LABEL_ALIASES`: NIH's box file says ``Infiltrate`` where the class (and
  Data_Entry) say ``Infiltration``, 123 of its 984 boxes. Labels the model does not know are not
  scored and counted under ``skipped.unknown_box_labels``, rather than refused: evaluating a
  model of a few classes against the full NIH file is a normal use;
- boxed images missing from the folder are skipped and counted (``skipped.missing_images``),
  not scored as misses: a wrong folder must not read as a bad model.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fastinsight.errors import InputError

THRESHOLDS: tuple[float, ...] = (0.1, 0.25, 0.5)
# Label spellings that differ between NIH's files and the class names (keys and values in the
# form of _label_key). BBox_List_2017.csv: "Infiltrate"; Data_Entry_2017.csv: "Infiltration".
LABEL_ALIASES = {"infiltrate": "infiltration"}
# A box may end on the last pixel's far edge (x + w == width); beyond that by more than this,
# it was drawn on another image size.
EDGE_TOLERANCE_PX = 1.0


@dataclass(frozen=True)
class Box:
    """A ground-truth box in image pixels (top-left ``x, y``, size ``w, h``); ``line``: its line
    in the CSV (0 when built in code), for messages."""

    label: str
    x: float
    y: float
    w: float
    h: float
    line: int = field(default=0, compare=False)

    def contains(self, px: int, py: int) -> bool:
        return self.x <= px <= self.x + self.w and self.y <= py <= self.y + self.h

    def mask(self, height: int, width: int) -> np.ndarray:
        """Integer pixels inside the box. Shapes: -> bool ``[height, width]``."""
        ys = np.arange(height)
        xs = np.arange(width)
        iny = (ys >= self.y) & (ys <= self.y + self.h)
        inx = (xs >= self.x) & (xs <= self.x + self.w)
        return iny[:, None] & inx[None, :]


def _check_image_name(name: str, path: str | os.PathLike[str], line: int) -> str:
    """An ``Image Index`` names a file inside the images folder: not absolute, no ``..``."""
    parts = name.replace("\\", "/").split("/")
    if (
        name.startswith(("/", "\\"))
        or Path(name).is_absolute()
        or ".." in parts
        or (len(name) > 1 and name[1] == ":")
    ):
        raise InputError(
            f"{str(path)!r} line {line}: Image Index {name!r} is an absolute path or leaves the "
            "images folder ('..'); give file names relative to the images folder"
        )
    return name


def _box(row: list[str], path: str | os.PathLike[str], line: int) -> Box:
    name = row[0].strip()
    try:
        x, y, w, h = (float(v) for v in row[2:6])
    except ValueError:
        raise InputError(
            f"{str(path)!r} line {line}: box {row[2:6]} of {name!r} is not four numbers"
        ) from None
    label = row[1].strip()
    problem = None
    if not label:
        problem = "has no Finding Label"
    elif not all(math.isfinite(v) for v in (x, y, w, h)):
        problem = "is not four finite numbers"
    elif w <= 0 or h <= 0:
        problem = "has a width or height <= 0"
    elif x < 0 or y < 0:
        problem = "starts left of or above the image (negative x or y)"
    if problem:
        raise InputError(
            f"{str(path)!r} line {line}: the box {row[1:6]} of image {name!r} {problem}; fix or "
            "remove the row"
        )
    return Box(label, x, y, w, h, line)


def read_bbox_list(path: str | os.PathLike[str]) -> dict[str, list[Box]]:
    """``BBox_List_2017.csv`` -> image name -> boxes (checked as the module docstring says)."""
    out: dict[str, list[Box]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = csv.reader(fh)
        header = next(rows, None)
        if not header or header[0].strip() != "Image Index":
            raise InputError(
                f"{str(path)!r}: expected the NIH BBox_List_2017.csv header starting 'Image "
                f"Index, Finding Label, Bbox [x,y,w,h]'; found {header}"
            )
        for row in rows:
            if not row or not row[0].strip():
                continue
            n = rows.line_num
            box = _box(row, path, n)
            out[_check_image_name(row[0].strip(), path, n)].append(box)
    return dict(out)


def read_data_entry(path: str | os.PathLike[str]) -> dict[str, set[str]]:
    """``Data_Entry_2017.csv`` -> image name -> set of findings (``No Finding`` -> empty)."""
    out: dict[str, set[str]] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "Image Index" not in cols or "Finding Labels" not in cols:
            raise InputError(
                f"{str(path)!r}: expected columns 'Image Index' and 'Finding Labels'; found {cols}"
            )
        for row in reader:
            n = reader.line_num
            name, found = row["Image Index"], row["Finding Labels"]
            if name is None or found is None:
                raise InputError(
                    f"{str(path)!r} line {n}: the row has no 'Finding Labels' cell (too few "
                    "cells); fix or remove the row"
                )
            name = _check_image_name(name.strip(), path, n)
            if not name:
                continue
            if name in out:
                raise InputError(
                    f"{str(path)!r} line {n}: image {name!r} is listed twice; keep one row per "
                    "image"
                )
            labels = {lab.strip() for lab in found.split("|") if lab.strip()}
            out[name] = {lab for lab in labels if _label_key(lab) != "nofinding"}
    return out


def _label_key(label: str) -> str:
    """Labels compared ignoring case, spaces, ``_`` and ``-`` ("Pleural Thickening")."""
    return "".join(c for c in label.casefold() if c.isalnum())


def match_labels(labels: Iterable[str], classes: Sequence[str]) -> dict[str, str | None]:
    """Each label -> the model class it means (same key or an alias), or None if unknown."""
    by_key = {_label_key(c): c for c in classes}
    out: dict[str, str | None] = {}
    for label in labels:
        key = _label_key(label)
        out[label] = by_key.get(key) or by_key.get(LABEL_ALIASES.get(key, ""))
    return out


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
    """Predict every boxed (and labelled) image found in ``image_dir``; return all metrics.

    ``skipped`` in the result says what was not scored: boxed images not in the folder
    (``missing_images``, with a few ``missing_examples``), box and finding labels the model does
    not know (``unknown_box_labels`` / ``unknown_finding_labels``: label -> count) and labels
    read as another spelling of a class (``renamed_labels``, e.g. Infiltrate -> Infiltration).
    """
    from fastinsight.radiograph.predict import PredictOptions, predict_radiographs

    folder = Path(image_dir)
    classes = tuple(model.config.names)
    boxes, box_skips = _boxes_for_classes(boxes, classes)
    labels, label_skips = _labels_for_classes(labels, classes)
    names = sorted(set(boxes) | set(labels or {}))
    present = [n for n in names if (folder / n).is_file()]
    if not present:
        raise InputError(f"none of the {len(names)} listed images is in {str(folder)!r}")
    missing = [n for n in sorted(boxes) if not (folder / n).is_file()]
    boxes = {n: b for n, b in boxes.items() if n not in set(missing)}
    maps: dict[tuple[str, str], np.ndarray] = {}
    scores: dict[str, dict[str, float]] = {}
    opts = PredictOptions(batch_size=batch_size)
    for name, r in zip(
        present, predict_radiographs([folder / n for n in present], model, opts), strict=False
    ):
        if isinstance(r, tuple):  # not with on_error="raise"; narrows the type
            raise r[1]
        scores[name] = dict(zip(classes, (float(s) for s in r.scores), strict=False))
        for b in boxes.get(name, ()):
            _check_inside(b, name, r.radiograph.width, r.radiograph.height)
            if (name, b.label) not in maps:
                maps[(name, b.label)] = r.heatmap(classes.index(b.label))
    loc = evaluate_localisation(lambda i, c: maps.get((i, c)), boxes, classes)
    skipped = {
        "missing_images": len(missing),
        "missing_examples": missing[:5],
        **box_skips,
        **label_skips,
    }
    result: dict[str, Any] = {
        "images": len(present),
        "localisation": loc.as_dict(),
        "skipped": skipped,
    }
    if labels is not None:
        result["auroc"] = evaluate_auroc(scores, labels, classes)
    return result


def _boxes_for_classes(
    boxes: Mapping[str, Sequence[Box]], classes: Sequence[str]
) -> tuple[dict[str, list[Box]], dict[str, Any]]:
    """Boxes relabelled with the model's class names; unknown labels dropped and counted."""
    match = match_labels({b.label for bs in boxes.values() for b in bs}, classes)
    unknown: dict[str, int] = defaultdict(int)
    out: dict[str, list[Box]] = {}
    for name, image_boxes in boxes.items():
        kept = []
        for b in image_boxes:
            cls = match[b.label]
            if cls is None:
                unknown[b.label] += 1
            else:
                kept.append(replace(b, label=cls))
        if kept:
            out[name] = kept
    renamed = {lab: cls for lab, cls in match.items() if cls is not None and cls != lab}
    return out, {"unknown_box_labels": dict(sorted(unknown.items())), "renamed_labels": renamed}


def _labels_for_classes(
    labels: Mapping[str, set[str]] | None, classes: Sequence[str]
) -> tuple[dict[str, set[str]] | None, dict[str, Any]]:
    """Finding labels as the model's class names; the unknown ones counted (AUROC ignores them)."""
    if labels is None:
        return None, {}
    match = match_labels({lab for labs in labels.values() for lab in labs}, classes)
    unknown: dict[str, int] = defaultdict(int)
    for labs in labels.values():
        for lab in labs:
            unknown[lab] += match[lab] is None
    out = {n: {c for lab in labs if (c := match[lab]) is not None} for n, labs in labels.items()}
    return out, {"unknown_finding_labels": {k: v for k, v in sorted(unknown.items()) if v}}


def _check_inside(b: Box, name: str, width: int, height: int) -> None:
    if b.x + b.w > width + EDGE_TOLERANCE_PX or b.y + b.h > height + EDGE_TOLERANCE_PX:
        where = f"line {b.line} of the boxes CSV" if b.line else "a box"
        raise InputError(
            f"{where}: the {b.label} box of {name!r} (x {b.x:g}, y {b.y:g}, {b.w:g} x {b.h:g}) "
            f"reaches beyond the image ({width} x {height} px); NIH boxes are in the pixels of "
            "the original 1024 x 1024 images: evaluate those, not resized copies"
        )


__all__ = [
    "Box",
    "LocalisationResult",
    "argmax_xy",
    "evaluate_auroc",
    "evaluate_localisation",
    "evaluate_radiographs",
    "match_labels",
    "read_bbox_list",
    "read_data_entry",
]
