"""``predict_cohort``: the driver. Lists the slides, takes the output folder's lock, loads and
checks the model and its encoder before Ray starts (a bad model fails once, not in every task),
skips the slides whose outputs are complete, runs the rest on Ray and keeps ``summary.csv``
current as slides finish."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastinsight.cohort.layout import SUMMARY_NAME, slide_dir
from fastinsight.cohort.options import CohortOptions
from fastinsight.cohort.ray_backend import _import_ray, _run_jobs
from fastinsight.cohort.slides import CohortSlide, check_unique, discover_slides
from fastinsight.cohort.state import (
    SlideJob,
    _clean_stale,
    _cohort_lock,
    check_complete,
    file_fingerprint,
    options_hash,
)
from fastinsight.cohort.summary import CohortReport, SlideOutcome, write_summary
from fastinsight.encoders import build_encoder
from fastinsight.errors import CheckpointError, InputError, OutputError
from fastinsight.inputs import check_options
from fastinsight.models.checkpoints import check_model_path
from fastinsight.models.insight import InsightModel
from fastinsight.predict.loading import load_for_predict
from fastinsight.predict.slide import check_compatible, check_slide_model, pick_class


def _check_arguments(model_path: object, options: object) -> CohortOptions:
    """``options`` (None: the defaults) as ``CohortOptions`` and ``model_path`` a path, checked
    before Ray is imported or the output folder touched; else a ConfigError."""
    check_model_path(
        model_path,
        "predict_cohort",
        loaded="save it (model.save(path)) and pass that path: each Ray task loads the file",
    )
    return check_options(options, CohortOptions, "fastinsight.cohort.CohortOptions")


def _check_slide_model_file(model: Any, path: Path) -> None:
    """The loaded ``model`` is a slide (INSIGHT) model; a radiograph or cross-slice CT model
    file is a CheckpointError that names the file and the function to use instead."""
    try:
        check_slide_model(model)
    except InputError as exc:
        raise CheckpointError(f"{str(path)!r}: {exc}") from None


def _check_class(class_: str | None, names: Sequence[str]) -> None:
    pick_class(tuple(names), class_)  # ConfigError naming the classes


def _check_encoder(config: Any, weights: str | None) -> None:
    """Check the model's encoder before Ray starts, so a missing weight file or an encoder that
    does not fit the model fails here, once, not in every slide task. With a weight file the
    architecture is built on the meta device (no memory); the file itself is read by the tasks."""
    device = "meta" if weights else "cpu"  # without weights only small random encoders build
    encoder = build_encoder(
        config.encoder, weights, tile_size_px=config.tile_size_px, device=device
    )
    check_compatible(InsightModel(config, backend="reference"), encoder)


def _weights_id(weights: str | None) -> str | None:
    """The encoder weight file's fingerprint (part of the settings hash), None without one."""
    if not weights:
        return None
    try:
        return file_fingerprint(Path(weights).expanduser())
    except OSError as exc:
        raise InputError(
            f"cannot read --encoder-weights {weights!r}: {exc.strerror or exc}"
        ) from exc


def _output_folder(out_dir: str | os.PathLike[str]) -> Path:
    """``--out-dir``, created, absolute and writable."""
    out = Path(out_dir).expanduser().absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --out-dir {str(out)!r}: {exc.strerror or exc}") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"--out-dir {str(out)!r} is not writable; choose another folder")
    return out


def _plan(
    jobs: list[SlideJob], model_sha256: str
) -> tuple[dict[str, SlideOutcome], list[SlideJob]]:
    """Every slide's outcome so far (``skipped`` when its outputs are complete, else ``pending``)
    and the jobs still to run."""
    outcomes: dict[str, SlideOutcome] = {}
    todo: list[SlideJob] = []
    for job in jobs:
        sid, path = job.slide.slide_id, str(job.slide.path)
        marker, _reason = check_complete(slide_dir(job.out_dir, sid), job, model_sha256)
        if marker is None:
            outcomes[sid] = SlideOutcome(sid, "pending", path)
            todo.append(job)
        else:
            outcomes[sid] = SlideOutcome.skipped(sid, path, marker.get("outcome", {}))
    return outcomes, todo


def _settle(jobs: Sequence[SlideJob], outcomes: dict[str, SlideOutcome], model_sha256: str) -> bool:
    """Slides still ``pending`` whose outputs are complete on disk become ``ok``, with the
    outcome their completion marker records; True when any did.

    After an interruption (Ctrl-C, SIGTERM) the driver has not collected every task that
    finished: a worker may have renamed a slide's folder into place (``complete.json`` inside)
    while the driver was stopping. The summary is written from the disk, so it cannot call
    such a slide ``pending``.
    """
    changed = False
    for job in jobs:
        sid = job.slide.slide_id
        if outcomes[sid].status != "pending":
            continue
        marker, _reason = check_complete(slide_dir(job.out_dir, sid), job, model_sha256)
        if marker is not None:
            done = SlideOutcome.skipped(sid, str(job.slide.path), marker.get("outcome", {}))
            outcomes[sid] = dataclasses.replace(done, status="ok")
            changed = True
    return changed


def predict_cohort(
    slides: str | os.PathLike[str] | Sequence[CohortSlide],
    model_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: CohortOptions | None = None,
) -> CohortReport:
    """Run every slide of a cohort through the model with Ray; see :mod:`fastinsight.cohort`.

    ``slides`` is a folder, glob or manifest (see :func:`discover_slides`) or a list of
    :class:`CohortSlide`. Returns one outcome per slide; failed slides do not raise. Raises a
    FastInsightError only for what stops the whole cohort (model, manifest, output folder, Ray).
    A ``model_path`` that is not a path (None, a loaded model) or ``options`` that are not
    ``CohortOptions`` are refused before Ray is imported; a radiograph or CT volume model file
    once it is loaded, before Ray starts.
    """
    opts = _check_arguments(model_path, options)
    _import_ray()  # a missing backend is reported before the output folder is touched
    cohort = check_unique(
        list(slides)
        if isinstance(slides, Sequence) and not isinstance(slides, str)
        else discover_slides(slides)
    )
    out = _output_folder(out_dir)
    with _cohort_lock(out):
        path = Path(model_path).expanduser()
        model, info = load_for_predict(path, opts.backend, quiet=not opts.progress)
        _check_slide_model_file(model, path)
        names = tuple(model.config.names)
        _check_class(opts.class_, names)
        _check_encoder(model.config, opts.predict.encoder_weights)
        weights_id = _weights_id(opts.predict.encoder_weights)
        _clean_stale(out)
        jobs = [
            SlideJob(
                s,
                out,
                options_hash(opts, s.mpp if s.mpp is not None else opts.predict.mpp, weights_id),
            )
            for s in cohort
        ]
        outcomes, todo = _plan(jobs, info["sha256"])
        order = [j.slide.slide_id for j in jobs]

        def flush() -> None:
            write_summary(out / SUMMARY_NAME, [outcomes[i] for i in order], names)

        flush()
        tiles_per_s = float("nan")
        try:
            if todo:
                tiles_per_s = _run_jobs(todo, model, info, opts, outcomes, flush)
        finally:
            # Also when interrupted: tasks that finished while the driver was stopping are on
            # disk (complete.json) but were never collected; the summary says so.
            if todo and _settle(todo, outcomes, info["sha256"]):
                flush()
        return CohortReport(out, tuple(outcomes[i] for i in order), names, len(todo), tiles_per_s)


__all__ = ["predict_cohort"]
