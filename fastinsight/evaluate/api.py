"""``evaluate``: slide AUC per class and Dice per slide and pooled; ``evaluate_from_folder``."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastinsight.errors import InputError
from fastinsight.evaluate.io import EvalInput, load_predictions
from fastinsight.evaluate.labels import Labels, read_labels
from fastinsight.evaluate.masks import RESAMPLE, find_ground_truth, ground_truth_on_grid
from fastinsight.evaluate.metrics import dice, roc_auc
from fastinsight.evaluate.result import ClassEval, EvalResult, SlideEval


@dataclass(frozen=True)
class _GroundTruth:
    """Ground truth per slide and class on the prediction's grid, read once and cached.

    With several classes, a mask TIFF applies to ``gt_k`` only (``--gt-class``); GeoJSON polygons
    go to the class their classification names, or all to ``gt_k`` when it is given.
    """

    files: Mapping[str, str | os.PathLike[str]]
    names: tuple[str, ...]
    gt_k: int | None
    resample: str
    mask_downsample: float | None
    mask_values: Sequence[int] | None
    geojson_classes: Iterable[str] | None
    cache: dict[tuple[str, int | None], tuple[np.ndarray, dict[str, Any]]] = field(
        default_factory=dict
    )

    def __call__(self, pr: EvalInput, k: int, *, positive: bool = False) -> np.ndarray | None:
        """Ground truth of class ``k`` on ``pr``'s grid, or None when there is none.
        Shapes: -> ``[H, W]`` bool.

        ``positive``: the slide is labelled positive for ``k``, so a GeoJSON file that yields no
        polygon for it is refused (``_no_polygon``) rather than scored as "no lesion" (Dice 0).
        """
        entry = self._entry(pr, k)
        if entry is None:
            return None
        grid, info = entry
        if positive and info.get("polygons") == 0:
            raise _no_polygon(pr.slide_id, self.names[k], info)
        return grid

    def _entry(self, pr: EvalInput, k: int) -> tuple[np.ndarray, dict[str, Any]] | None:
        if pr.slide_id not in self.files:
            return None
        path = Path(self.files[pr.slide_id])
        if path.suffix.lower() in (".geojson", ".json"):
            if self.gt_k is not None and k != self.gt_k:
                return None
            # Several classes and no --gt-class: polygons go to the class they are named after.
            wanted = [self.names[k]] if self.gt_k is None else self.geojson_classes
            key: tuple[str, int | None] = (pr.slide_id, None if self.gt_k is not None else k)
            if key not in self.cache:
                self.cache[key] = ground_truth_on_grid(
                    path, pr, method=self.resample, geojson_classes=wanted
                )
            return self.cache[key]
        if self.gt_k is None:
            raise InputError(
                f"labels have several classes {list(self.names)} and {path.name} is a mask "
                "image; pass --gt-class to say which class the masks show"
            )
        if k != self.gt_k:
            return None
        key = (pr.slide_id, None)
        if key not in self.cache:
            self.cache[key] = ground_truth_on_grid(
                path,
                pr,
                method=self.resample,
                mask_downsample=self.mask_downsample,
                mask_values=self.mask_values,
            )
        return self.cache[key]


def _no_polygon(slide_id: str, name: str, info: Mapping[str, Any]) -> InputError:
    """A positive slide whose GeoJSON yields no polygon: say what the file held instead."""
    held = [f"{info.get('features', 0)} features"]
    if info.get("null_geometries"):
        held.append(f"{info['null_geometries']} with geometry null")
    if info.get("no_area"):
        held.append(f"{info['no_area']} points, lines or rings under 3 positions")
    if info.get("classes"):
        held.append(f"classes {info['classes'][:5]}")
    return InputError(
        f"slide {slide_id!r} is positive for {name} but its ground truth {info.get('source')!r} "
        f"yields no polygon for it ({', '.join(held)}); scoring it would count a Dice of 0: fix "
        "the annotation (or its classification, or --gt-class), or remove the file to leave "
        "the slide out of the Dice"
    )


def _check_predictions(predictions: Sequence[EvalInput], labels: Labels) -> None:
    """Every prediction has a labels row with the same classes in the same order."""
    names = labels.class_names
    for pr in predictions:
        if pr.slide_id not in labels.values:
            raise InputError(
                f"prediction for slide {pr.slide_id!r} has no row in the labels CSV; add it or "
                "remove the prediction"
            )
        if pr.heatmap.shape[0] != len(names):
            raise InputError(
                f"slide {pr.slide_id!r}: the prediction has {pr.heatmap.shape[0]} classes, the "
                f"labels CSV {len(names)} ({list(names)})"
            )
        if pr.class_names and tuple(pr.class_names) != names:
            raise InputError(
                f"slide {pr.slide_id!r}: prediction classes {list(pr.class_names)} differ from "
                f"the labels CSV columns {list(names)}; reorder the CSV"
            )


def _gt_class_index(names: tuple[str, ...], gt_class: str | None) -> int | None:
    """The class a mask TIFF shows: ``gt_class``'s index, class 0 when there is one, else None."""
    if gt_class is not None:
        if gt_class not in names:
            raise InputError(f"--gt-class {gt_class!r} is not a class of the labels {list(names)}")
        return names.index(gt_class)
    return 0 if len(names) == 1 else None


def _score_slide(
    pr: EvalInput,
    y: tuple[int, ...],
    truth_for: _GroundTruth,
    *,
    threshold: float,
    dice_on: str,
    has_gt: bool,
    notes: list[str],
) -> SlideEval:
    """One slide's Dice and cell counts per class (None where it takes no part).

    A cell is predicted positive when its thresholded heatmap value is above ``threshold`` and it
    is tissue. Positive slides are scored against their ground truth; with ``dice_on="all"``
    negative slides too, against their ground truth or an empty one.
    """
    dices: list[float | None] = []
    pc: list[int | None] = []
    tc: list[int | None] = []
    oc: list[int | None] = []
    for k in range(len(y)):
        truth: np.ndarray | None = None
        if y[k] == 1:
            truth = truth_for(pr, k, positive=True)
            if truth is None and has_gt:
                notes.append(
                    f"slide {pr.slide_id!r} is positive for {truth_for.names[k]} but has no "
                    "ground truth; left out of the Dice"
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
    return SlideEval(
        slide_id=pr.slide_id,
        labels=y,
        scores=tuple(float(s) for s in pr.scores),
        dice=tuple(dices),
        pred_cells=tuple(pc),
        truth_cells=tuple(tc),
        overlap_cells=tuple(oc),
        cell_size_l0=pr.cell_size_l0,
    )


def _class_summary(k: int, name: str, slides: Sequence[SlideEval], notes: list[str]) -> ClassEval:
    """Class ``k``: slide AUC; Dice mean +- population sd over the slides scored, and pooled
    ``2 sum|P&G| / (sum|P| + sum|G|)`` (1 when both are empty everywhere)."""
    ys = np.array([s.labels[k] for s in slides])
    ss = np.array([s.scores[k] for s in slides])
    auc = roc_auc(ss, ys)
    if not math.isfinite(auc):
        notes.append(f"{name}: AUC undefined (only one label value among the slides)")
    scored = [s for s in slides if s.dice[k] is not None]
    pooled = dm = dsd = None
    if scored:
        inter = sum(s.overlap_cells[k] or 0 for s in scored)
        tot = sum((s.pred_cells[k] or 0) + (s.truth_cells[k] or 0) for s in scored)
        pooled = 1.0 if tot == 0 else 2.0 * inter / tot
        d_arr = np.asarray([s.dice[k] for s in scored], dtype=np.float64)
        dm, dsd = float(d_arr.mean()), float(d_arr.std())
    return ClassEval(
        name=name,
        auc=auc,
        n_pos=int((ys == 1).sum()),
        n_neg=int((ys == 0).sum()),
        dice_mean=dm,
        dice_sd=dsd,
        dice_pooled=pooled,
        dice_slides=len(scored),
    )


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
    gt_k = _gt_class_index(names, gt_class)
    _check_predictions(predictions, labels)
    notes: list[str] = []
    missing = sorted(set(labels.values) - {p.slide_id for p in predictions})
    if missing:
        notes.append(f"{len(missing)} labelled slides have no prediction: {missing[:5]}")
    gt = dict(ground_truth or {})
    unused_gt = sorted(set(gt) - {p.slide_id for p in predictions})
    if unused_gt:
        notes.append(f"{len(unused_gt)} ground-truth files match no prediction: {unused_gt[:5]}")
    truth_for = _GroundTruth(
        gt, names, gt_k, resample, mask_downsample, mask_values, geojson_classes
    )
    slides = [
        _score_slide(
            pr,
            labels.values[pr.slide_id],
            truth_for,
            threshold=threshold,
            dice_on=dice_on,
            has_gt=bool(gt),
            notes=notes,
        )
        for pr in sorted(predictions, key=lambda p: p.slide_id)
    ]
    classes = [_class_summary(k, name, slides, notes) for k, name in enumerate(names)]
    return EvalResult(
        classes=tuple(classes),
        slides=tuple(slides),
        threshold=float(threshold),
        resample=resample,
        dice_on=dice_on,
        cell_size_l0=tuple(p.cell_size_l0 for p in predictions),
        mpp=tuple(p.mpp for p in predictions if p.mpp is not None),
        mpp_of_cell=tuple(p.mpp * p.cell_size_l0 for p in predictions if p.mpp is not None),
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
