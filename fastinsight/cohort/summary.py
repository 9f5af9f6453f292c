"""Outcomes: one ``SlideOutcome`` per slide, ``summary.csv`` (rewritten atomically as slides
finish) and the ``CohortReport`` that ``predict_cohort`` returns."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastinsight.atomic import atomic_path
from fastinsight.cohort.layout import EXIT_SLIDES_FAILED, SUMMARY_NAME
from fastinsight.inputs import allow_long_csv_fields
from fastinsight.predict.slide import STAGES
from fastinsight.text import clean_text


@dataclass(frozen=True)
class SlideOutcome:
    """One row of ``summary.csv``. ``scores`` in the model's class order (empty unless ok/skipped)."""

    slide_id: str
    status: str
    slide_path: str
    scores: tuple[float, ...] = ()
    error: str = ""
    n_tiles: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    tiles_per_s: float = float("nan")
    node: str = ""
    internal: bool = False  # failed for a reason other than the slide (worker died, a bug)

    def as_json(self) -> dict[str, Any]:
        """What the completion marker records of the outcome (read back by :meth:`skipped`)."""
        return {
            "scores": list(self.scores),
            "n_tiles": self.n_tiles,
            "timings": self.timings,
            "tiles_per_s": self.tiles_per_s,
            "node": self.node,
        }

    @classmethod
    def skipped(cls, slide_id: str, slide_path: str, recorded: dict[str, Any]) -> SlideOutcome:
        """A slide whose outputs are complete: its outcome as its marker recorded it
        (``recorded`` is what :meth:`as_json` gave when the slide was done)."""
        return cls(
            slide_id=slide_id,
            status="skipped",
            slide_path=slide_path,
            scores=tuple(float(s) for s in recorded.get("scores", ())),
            n_tiles=int(recorded.get("n_tiles", 0)),
            timings={k: float(v) for k, v in recorded.get("timings", {}).items()},
            tiles_per_s=float(recorded.get("tiles_per_s", float("nan"))),
            node=str(recorded.get("node", "")),
        )


def _one_line(text: str) -> str:
    """``text`` on one line (newlines and runs of spaces become one space)."""
    return " ".join(str(text).split())


def _fmt(x: float) -> str:
    """A CSV cell: empty for NaN."""
    return "" if x != x else format(float(x), ".9g")  # 9 digits round-trip float32 exactly


def summary_header(class_names: Sequence[str]) -> list[str]:
    """The columns of ``summary.csv``: one score per class, one time per pipeline stage."""
    return [
        "slide_id",
        "status",
        *(f"score_{c}" for c in class_names),
        "error",
        "n_tiles",
        "seconds",
        "tiles_per_s",
        *(f"{s}_s" for s in STAGES),
        "node",
        "slide_path",
    ]


def write_summary(path: Path, outcomes: Sequence[SlideOutcome], class_names: Sequence[str]) -> None:
    """Rewrite ``summary.csv`` atomically: a reader never sees half a file."""
    # UTF-8 whatever the locale; file names that are not UTF-8 are written as \xNN.
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(summary_header(class_names))
        for o in outcomes:
            scores = [_fmt(s) for s in o.scores] if o.scores else [""] * len(class_names)
            done = o.status in ("ok", "skipped")
            w.writerow(
                [
                    clean_text(o.slide_id),
                    o.status,
                    *scores,
                    clean_text(_one_line(o.error)),
                    o.n_tiles if done else "",
                    _fmt(o.timings.get("total", float("nan"))) if done else "",
                    _fmt(o.tiles_per_s) if done else "",
                    *(_fmt(o.timings[s]) if done and s in o.timings else "" for s in STAGES),
                    o.node,
                    clean_text(str(o.slide_path)),
                ]
            )


def read_summary(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a ``summary.csv`` as dicts (for tests and notebooks)."""
    allow_long_csv_fields()  # error messages of failed slides can be long
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@dataclass(frozen=True)
class CohortReport:
    """What a cohort run did: one outcome per slide (input order), and how many tasks it ran."""

    out_dir: Path
    outcomes: tuple[SlideOutcome, ...]
    class_names: tuple[str, ...]
    submitted: int
    tiles_per_s: float

    @property
    def summary_path(self) -> Path:
        return self.out_dir / SUMMARY_NAME

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    def by_id(self) -> dict[str, SlideOutcome]:
        return {o.slide_id: o for o in self.outcomes}

    @property
    def exit_code(self) -> int:
        """0 when every slide is ok or skipped, :data:`EXIT_SLIDES_FAILED` otherwise."""
        return (
            0 if all(o.status in ("ok", "skipped") for o in self.outcomes) else EXIT_SLIDES_FAILED
        )


__all__ = [
    "CohortReport",
    "SlideOutcome",
    "read_summary",
    "summary_header",
    "write_summary",
]
