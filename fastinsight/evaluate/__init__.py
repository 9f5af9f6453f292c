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
level-0 cell size, tissue mask ``[H, W]``), e.g. from prediction npz files: the one layout that
``predict --scores``, ``predict-cohort``, ``demo`` and :func:`save_prediction_npz` write (the
scores sidecar: keys ``scores``, ``mask``, ``class_names``, ``geometry``; ``docs/slides.md``);
the older layout with keys ``scores``, ``heatmap``, ``cell_size_l0`` (optional ``mask``,
``slide_id``, ``class_names``, ``origin_l0``, ``slide_size_l0``, ``mpp``) is still read.

May import: ``fastinsight.errors``, ``atomic``, ``inputs``, ``text``, ``slide`` (ground-truth masks
onto a grid); never models, predict or the CLI.
"""

from __future__ import annotations

from fastinsight.evaluate.api import evaluate, evaluate_from_folder
from fastinsight.evaluate.io import (
    EvalInput,
    load_prediction_npz,
    load_predictions,
    save_prediction_npz,
)
from fastinsight.evaluate.labels import Labels, read_labels
from fastinsight.evaluate.masks import (
    AREA_SUPERSAMPLE,
    GT_SUFFIXES,
    RESAMPLE,
    find_ground_truth,
    ground_truth_on_grid,
    rasterize_polygons,
    read_geojson_polygons,
    read_mask_tiff,
    resample_mask,
)
from fastinsight.evaluate.metrics import average_ranks, dice, roc_auc
from fastinsight.evaluate.result import ClassEval, EvalResult, SlideEval

__all__ = [
    "AREA_SUPERSAMPLE",
    "GT_SUFFIXES",
    "RESAMPLE",
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
