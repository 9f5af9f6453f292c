"""What an evaluation measured: per slide, per class, and how it is written (JSON, CSV)."""

from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

from fastinsight.atomic import atomic_path
from fastinsight.text import clean_text, dumps_json


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
    mpp: tuple[float, ...] = ()  # level-0 microns per pixel of each prediction (when known)
    mpp_of_cell: tuple[float, ...] = ()  # microns per heatmap cell: level-0 mpp x cell size
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
                        "mpp_l0": sorted(set(self.mpp)),
                        "mpp_of_cell": sorted(set(self.mpp_of_cell)),
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
