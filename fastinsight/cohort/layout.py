"""The names in a cohort's output folder, and the exit code of a cohort with failed slides.

Torch-free (the slide list and the resume checks import it without loading a model)::

    DIR/<slide id>/           finished outputs of one slide (complete.json written last)
    DIR/.<slide id>.partial/  a slide being written; renamed to DIR/<slide id>/ when complete
    DIR/.<slide id>.old-*     older outputs moved aside while the new ones are put in place
    DIR/summary.csv           one row per slide
    DIR/.predict-cohort.lock  held by the run writing to DIR
"""

from __future__ import annotations

from pathlib import Path

EXIT_SLIDES_FAILED = 8
"""Exit code of ``predict-cohort`` when at least one slide failed (the rest were processed)."""

MARKER_NAME = "complete.json"
SUMMARY_NAME = "summary.csv"
LOCK_NAME = ".predict-cohort.lock"
PARTIAL_SUFFIX = ".partial"
OLD_INFIX = ".old-"
STATUSES = ("ok", "failed", "skipped", "pending")


def slide_dir(out_dir: Path, slide_id: str) -> Path:
    """Where a slide's finished outputs live."""
    return out_dir / slide_id


def partial_dir(out_dir: Path, slide_id: str) -> Path:
    """Where a slide's outputs are written before they are complete (hidden: a dot name)."""
    return out_dir / f".{slide_id}{PARTIAL_SUFFIX}"


__all__ = [
    "EXIT_SLIDES_FAILED",
    "LOCK_NAME",
    "MARKER_NAME",
    "OLD_INFIX",
    "PARTIAL_SUFFIX",
    "STATUSES",
    "SUMMARY_NAME",
    "partial_dir",
    "slide_dir",
]
