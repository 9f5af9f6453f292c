"""``fastinsight predict-cohort``: many slides over the CPUs or GPUs of one machine or a Ray cluster.

Each slide is one Ray task (issue 7). The driver lists the slides (a folder, a glob or a manifest
CSV), skips those whose outputs are already complete and were made by the same model and
settings, puts the model's weights into the Ray object store once, and submits one task per
remaining slide. A task asks for one GPU when the cluster has GPUs (so N GPUs run N slides at a
time) and for CPU slots otherwise; it rebuilds the model from the object store (never from the
checkpoint file), builds the encoder the model's config names (cached per worker process), runs
:func:`fastinsight.predict.slide.predict_slide` and writes::

    DIR/<slide id>/heatmap.tif     pyramidal heatmap TIFF (heatmap.<class>.tif with --all-classes)
    DIR/<slide id>/overlay.png     heatmap over a thumbnail
    DIR/<slide id>/scores.npz      raw float heatmap cells and mask (the one prediction npz)
    DIR/<slide id>/report.json     scores, thresholds, model, encoder, geometry, timings
    DIR/<slide id>/complete.json   written last: model sha256, settings hash, slide fingerprint,
                                   size and sha256 of every file above
    DIR/summary.csv                one row per slide, rewritten atomically as slides finish

Faults. A slide that fails with a :class:`~fastinsight.errors.FastInsightError` (corrupt file, no
mpp, no tissue) is recorded as ``failed`` with its one-line message and is not retried; the
cohort goes on. A worker process that dies mid-slide (killed, out of memory, node lost) is a
system failure: Ray retries the task up to ``max_retries`` times. A task writes into
``DIR/.<id>.partial`` and renames it into place only when complete, so a crash leaves no partial
output (stale ``.partial`` folders are removed at the next start). Rerunning the same command
skips slides whose ``complete.json`` matches the model's sha256, the settings hash and the slide
file, and whose files still have the recorded sizes and sha256; everything else is redone.
SIGTERM or Ctrl-C stops the run: Ray is shut down (a connection opened before the call stays
open and its tasks are cancelled), every finished slide is kept, the others stay ``pending`` in
``summary.csv`` (exit 143 or 130); the same command resumes.

Exit code of the command: 0 when every slide is ``ok`` or ``skipped``; :data:`EXIT_SLIDES_FAILED`
(8) when at least one slide failed (the others are done, see ``summary.csv``); 2-7 for an error
that stops the whole cohort (bad model, bad manifest, no Ray; see ``fastinsight.errors``).

Modules, bottom up (each imports only those above it):

- ``layout``: the names in the output folder, ``EXIT_SLIDES_FAILED`` (torch-free);
- ``slides``: the slide list from a folder, glob, manifest or file, and slide ids (torch-free);
- ``options``: ``CohortOptions``;
- ``state``: completion markers, settings hash, slide fingerprints, ``.partial`` folders, the
  output-folder lock: what makes resume safe (torch-free);
- ``summary``: ``SlideOutcome``, ``summary.csv``, ``CohortReport``;
- ``task``: the per-slide work in a worker (``run_slide``), writing through
  ``SlideResult.write_outputs``;
- ``process_state``: what ``ray.init`` changes in the calling process (SIGTERM handler,
  environment, faulthandler), recorded before and put back after ``ray.shutdown`` (torch-free);
- ``ray_backend``: the Ray session, one task per slide, outcomes as they finish;
- ``api``: ``predict_cohort``, the driver.

May import: errors, atomic, text, inputs, fileformat, signals, models, encoders, predict; never
train/, evaluate/, cli/. The package face is lazy (PEP 562): a name is imported from its home
module the first time it is read, so ``from fastinsight.cohort import discover_slides`` loads no
torch and ``import fastinsight.cohort`` loads nothing but this file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastinsight._lazy import lazy_face

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from fastinsight.cohort.api import predict_cohort
    from fastinsight.cohort.layout import EXIT_SLIDES_FAILED
    from fastinsight.cohort.options import CohortOptions
    from fastinsight.cohort.slides import CohortSlide, discover_slides, read_manifest
    from fastinsight.cohort.state import check_complete
    from fastinsight.cohort.summary import CohortReport, SlideOutcome, read_summary

_HOMES: dict[str, tuple[str, ...]] = {
    "layout": (
        "EXIT_SLIDES_FAILED", "LOCK_NAME", "MARKER_NAME", "OLD_INFIX", "PARTIAL_SUFFIX",
        "STATUSES", "SUMMARY_NAME", "partial_dir", "slide_dir",
    ),
    "slides": (
        "SLIDE_EXTENSIONS", "CohortSlide", "check_slide_id", "check_unique", "default_slide_id",
        "discover_slides", "read_manifest", "_ID_RE", "_MANIFEST_ID_COLUMNS",
        "_MANIFEST_PATH_COLUMNS", "_RESERVED_IDS", "_is_glob", "_parse_mpp",
    ),
    "options": ("CohortOptions",),
    "state": (
        "MARKER_FORMAT", "SlideJob", "check_complete", "file_fingerprint", "options_hash",
        "remove_partials", "write_marker", "_MIB", "_clean_stale", "_cohort_lock", "_install",
    ),
    "summary": (
        "CohortReport", "SlideOutcome", "read_summary", "summary_header", "write_summary",
        "_fmt", "_one_line",
    ),
    "task": (
        "ModelPayload", "TaskPlan", "run_slide", "_WORKER_CACHE", "_model_payload",
        "_worker_encoder", "_worker_model",
    ),
    "ray_backend": (
        "_RaySession", "_collect", "_import_ray", "_plan_resources", "_ray_session", "_run_jobs",
    ),
    "api": ("predict_cohort", "_check_class", "_check_encoder"),
}  # fmt: skip

# name -> module that defines it (private names too: code that reached into the single-file
# module of earlier versions keeps working)
_LAZY: dict[str, str] = {
    name: f"fastinsight.cohort.{module}" for module, names in _HOMES.items() for name in names
}

__all__ = [
    "EXIT_SLIDES_FAILED",
    "CohortOptions",
    "CohortReport",
    "CohortSlide",
    "SlideOutcome",
    "check_complete",
    "discover_slides",
    "predict_cohort",
    "read_manifest",
    "read_summary",
]


__getattr__, __dir__ = lazy_face("fastinsight.cohort", _LAZY, globals())
