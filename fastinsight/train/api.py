"""The training entry points: ``train_on_bags`` (token grids in memory) and ``train_from_folder``
(feature files and a labels CSV, what ``fastinsight train`` runs)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from fastinsight.atomic import check_writable
from fastinsight.errors import ConfigError, InputError
from fastinsight.evaluate.labels import Labels, read_labels
from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel
from fastinsight.train.config import FolderOptions, TrainConfig
from fastinsight.train.data import (
    Bag,
    build_model_config,
    items_from_bags,
    require_both_classes,
    stratified_split,
)
from fastinsight.train.folder import find_slides, slide_items, split_slides
from fastinsight.train.loop import _fit, kept_global_rng
from fastinsight.train.state import (
    EpochMetrics,
    metrics_paths_for,
    refuse_previous_run,
    state_path_for,
)


@kept_global_rng()
def train_on_bags(
    bags: Sequence[Bag | tuple[Tensor, Tensor | None, Any]],
    config: TrainConfig,
    model_config: InsightConfig,
    *,
    val_bags: Sequence[Bag | tuple[Tensor, Tensor | None, Any]] | None = None,
    out_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[InsightModel, list[EpochMetrics]]:
    """Train on token grids already in memory (the demo's path).

    ``bags``: ``Bag`` or ``(tokens, mask, label)`` tuples (see ``Bag`` for shapes; a slide-context
    model takes one stitched grid per slide). Without ``val_bags`` a seeded stratified
    ``config.val_fraction`` of the bags validates. With ``out_path`` the best model, the metrics
    and the resume state are written as ``train_from_folder`` writes them (each epoch's set
    renamed into place together). Unlike ``train_from_folder`` a fresh run replaces existing
    outputs at ``out_path``: the caller chose the path (the demo rewrites its own folder); call
    ``fastinsight.train.state.refuse_previous_run`` first to refuse instead.
    Returns the model with the best validation loss (eval mode) and the per-epoch history.
    The run seeds Python's, numpy's and torch's global generators from ``config.seed`` and
    gives the caller's back when it returns or fails
    (:func:`~fastinsight.train.loop.kept_global_rng`).
    """
    k = model_config.num_classes
    all_items = items_from_bags(bags, k, "bag")
    if len({it.slide_id for it in all_items}) != len(all_items):
        raise InputError("bags have duplicate slide ids; give each Bag a unique slide_id")
    if val_bags is not None:
        train, val = all_items, items_from_bags(val_bags, k, "val")
    else:
        ids = [it.slide_id for it in all_items]
        labs = [tuple(int(v) for v in it.labels.tolist()) for it in all_items]
        tr_ids, va_ids = stratified_split(ids, labs, config.val_fraction, config.seed)
        by_id = {it.slide_id: it for it in all_items}
        train, val = [by_id[s] for s in tr_ids], [by_id[s] for s in va_ids]
    require_both_classes(
        {it.slide_id: [int(v) for v in it.labels.tolist()] for it in train},
        model_config.names,
        "training bags",
        "give bags of both labels (and val_bags of their own, or a lower val_fraction)",
    )
    model, prog = _fit(
        train,
        val,
        model_config,
        config,
        out_path=Path(out_path) if out_path is not None else None,
        resume=resume,
        progress=progress,
        log=log,
    )
    return model, list(prog.history)


@dataclass(frozen=True)
class TrainResult:
    """What ``train_from_folder`` did and wrote."""

    model_path: Path
    state_path: Path
    metrics_csv: Path
    metrics_json: Path
    model_config: InsightConfig
    config: TrainConfig
    history: tuple[EpochMetrics, ...]
    best_epoch: int
    best_val_loss: float | None
    stopped_early: bool
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    notes: tuple[str, ...] = ()
    model: InsightModel | None = field(default=None, repr=False, compare=False)


def _folder_options(options: FolderOptions | None, fields: Mapping[str, Any]) -> FolderOptions:
    """``options``, or a ``FolderOptions`` of the keyword fields (not both)."""
    unknown = sorted(set(fields) - FolderOptions.field_names())
    if unknown:
        raise ConfigError(
            f"train_from_folder got unknown options {unknown}; expected fields of FolderOptions "
            f"{sorted(FolderOptions.field_names())} or resume/overwrite/progress/log",
            fields=tuple(unknown),
        )
    if options is not None and fields:
        raise ConfigError(
            f"give the data options either as options=FolderOptions(...) or as keywords, not "
            f"both (got both, keywords {sorted(fields)})",
            fields=tuple(sorted(fields)),
        )
    return options if options is not None else FolderOptions(**fields)


def _check_out(out_path: str | os.PathLike[str], *, resume: bool, overwrite: bool) -> Path:
    """The model path of a run, checked before any work: a ``.safetensors`` name, writable,
    and not a previous run's unless resumed or overwritten (``refuse_previous_run``)."""
    out = Path(out_path).expanduser()
    if out.suffix != ".safetensors":
        raise InputError(
            f"--out {str(out_path)!r} must end in .safetensors: training writes a fastinsight "
            "checkpoint (safetensors + config), with .train.pt and .metrics.* beside it"
        )
    check_writable(out)
    refuse_previous_run(out, resume=resume, overwrite=overwrite)
    return out


def _training_split(
    ids: list[str], labels: Labels, cfg: TrainConfig
) -> tuple[list[str], list[str]]:
    """``split_slides``, then both labels of every class among the *training* slides.

    Done before the features are read (``slide_items`` may read them all), and on the training
    split rather than the cohort: a split column whose ``train`` rows are one label, or a split
    that sent a label's only slide to validation, would otherwise train on one label silently.
    """
    tr_ids, va_ids = split_slides(ids, labels, cfg)
    require_both_classes(
        {s: labels.values[s] for s in tr_ids},
        labels.class_names,
        f"training slides ({len(va_ids)} more validate)",
        "put slides of both labels in the 'train' rows of the split column, or add slides",
    )
    return tr_ids, va_ids


@kept_global_rng()
def train_from_folder(
    features_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    config: TrainConfig | None = None,
    options: FolderOptions | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **option_fields: Any,
) -> TrainResult:
    """Train INSIGHT on a folder of feature files (any layout) and a labels CSV.

    Slides are matched by file stem. Labels CSV: ``slide_id,<class>,...`` with 0/1 values (the
    header's class names become the model's); an optional ``split`` column (train/val/test) fixes
    the split, else a seeded stratified ``config.val_fraction`` validates. The data options
    (``model_options``, ``patches_dir``, ``patch_size_l0``, ``snap_to_grid``, ``encoder``,
    ``tile_size_px``, ``mpp``, ``skip_missing``, ``cache``) come as ``options=FolderOptions(...)``
    or as keywords of the same names.
    Writes ``out_path`` (safetensors with the config), ``<out>.train.pt`` (resume state),
    ``<out>.metrics.csv``, ``<out>.metrics.json``; a fresh run refuses existing ones unless
    ``overwrite`` (``refuse_previous_run``). The caller's global random generators come back
    as they were (:func:`~fastinsight.train.loop.kept_global_rng`), also when the run fails.
    """
    cfg = config or TrainConfig()
    opts = _folder_options(options, option_fields)
    out = _check_out(out_path, resume=resume, overwrite=overwrite)
    labels = read_labels(labels_csv)
    slides = find_slides(features_dir, labels, opts)
    mcfg = build_model_config(
        slides.infos,
        labels.class_names,
        encoder=opts.encoder,
        tile_size_px=opts.tile_size_px,
        mpp=opts.mpp,
        model_options=opts.model_options,
    )
    tr_ids, va_ids = _training_split(list(slides.infos), labels, cfg)
    item_of = slide_items(slides, labels, mcfg, opts)
    if log:
        log(
            f"{len(tr_ids)} training / {len(va_ids)} validation slides; model: {mcfg.in_dim} ch "
            f"{mcfg.grid_size[0]}x{mcfg.grid_size[1]} grid, norm={mcfg.norm}, "
            f"context={mcfg.context}, pooling={mcfg.pooling}, classes {list(mcfg.names)}"
        )
    model, prog = _fit(
        [item_of[s] for s in tr_ids],
        [item_of[s] for s in va_ids],
        mcfg,
        cfg,
        out_path=out,
        resume=resume,
        progress=progress,
        log=log,
    )
    if not out.exists():  # e.g. resumed a finished run whose model file was removed
        model.save(str(out))
    csv_path, json_path = metrics_paths_for(out)
    return TrainResult(
        model_path=out,
        state_path=state_path_for(out),
        metrics_csv=csv_path,
        metrics_json=json_path,
        model_config=mcfg,
        config=cfg,
        history=tuple(prog.history),
        best_epoch=prog.best_epoch,
        best_val_loss=None if not math.isfinite(prog.best_val_loss) else prog.best_val_loss,
        stopped_early=prog.stopped_early,
        train_ids=tuple(tr_ids),
        val_ids=tuple(va_ids),
        notes=slides.notes,
        model=model,
    )


__all__ = ["TrainResult", "train_from_folder", "train_on_bags"]
