"""Training slides from a folder of feature files and a labels CSV (``train_from_folder``'s data).

Slides are matched by file stem. Slides of the ``test`` split, slides without tiles and feature
files without a label are left out (and noted); labelled slides without features are an error
unless ``skip_missing``. Every class needs a positive and a negative slide, in the training
split too (``train.api``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fastinsight.errors import InputError
from fastinsight.evaluate.labels import Labels
from fastinsight.features import (
    FeatureFileInfo,
    find_feature_files,
    inspect_features,
    read_features,
)
from fastinsight.models.config import InsightConfig
from fastinsight.train.config import CACHE_LIMIT_BYTES, FolderOptions, TrainConfig
from fastinsight.train.data import _constant, _Item, require_both_classes, stratified_split


@dataclass(frozen=True)
class FolderSlides:
    """The labelled slides of a feature folder that can be trained on."""

    files: Mapping[str, Path]
    infos: Mapping[str, FeatureFileInfo]
    notes: tuple[str, ...]


def find_slides(
    features_dir: str | os.PathLike[str], labels: Labels, opts: FolderOptions
) -> FolderSlides:
    """The feature files of the labelled non-test slides, inspected (shapes, tiles)."""
    files = find_feature_files(features_dir)
    notes: list[str] = []
    wanted = [s for s in labels.slide_ids if labels.split.get(s) != "test"]
    missing = [s for s in wanted if s not in files]
    if missing and not opts.skip_missing:
        raise InputError(
            f"{len(missing)} labelled slides have no feature file in {str(features_dir)!r} "
            f"(first: {missing[:3]}); add them, or pass --skip-missing to train without them"
        )
    if missing:
        notes.append(f"{len(missing)} labelled slides without features left out: {missing[:5]}")
    infos = {s: inspect_features(files[s]) for s in wanted if s in files}
    empty = sorted(s for s, i in infos.items() if i.num_tiles == 0)
    if empty:
        notes.append(f"{len(empty)} slides have no tiles and are left out: {empty[:5]}")
        infos = {s: i for s, i in infos.items() if i.num_tiles > 0}
    if not infos:
        raise InputError("no labelled slide with tiles to train on")
    unlabelled = sorted(set(files) - set(labels.slide_ids))
    if unlabelled:
        notes.append(
            f"{len(unlabelled)} feature files have no label and are left out: {unlabelled[:5]}"
        )
    require_both_classes(
        {s: labels.values[s] for s in infos},
        labels.class_names,
        "labelled non-test slides with features",
        "add slides of the missing label",
    )
    return FolderSlides(files=files, infos=infos, notes=tuple(notes))


def slide_items(
    slides: FolderSlides, labels: Labels, mcfg: InsightConfig, opts: FolderOptions
) -> dict[str, _Item]:
    """One training item per slide, its inputs read on demand, or read now and kept when the
    features fit in memory (``opts.cache``; by default up to ``CACHE_LIMIT_BYTES``)."""
    patches = Path(opts.patches_dir).expanduser() if opts.patches_dir is not None else None
    if patches is not None and not patches.is_dir():
        raise InputError(f"patches folder {str(patches)!r} does not exist", fields=("patches_dir",))

    def reader(sid: str) -> Callable[[], tuple[Tensor, Tensor | None]]:
        def load() -> tuple[Tensor, Tensor | None]:
            ph = None
            if patches is not None:
                ph = patches / f"{sid}.h5"
                if not ph.exists():
                    raise InputError(f"no CLAM patches file {str(ph)!r} for slide {sid!r}")
            sf = read_features(slides.files[sid], patches_h5=ph, patch_size_l0=opts.patch_size_l0)
            return sf.model_inputs(mcfg.context, snap=opts.snap_to_grid)

        return load

    total = sum(i.nbytes_float32 for i in slides.infos.values())
    use_cache = opts.cache if opts.cache is not None else total <= CACHE_LIMIT_BYTES
    items: dict[str, _Item] = {}
    for sid in slides.infos:
        load = reader(sid)
        if use_cache:
            load = _constant(load())  # also checks every file (shapes, NaN, grid) up front
        lab = torch.tensor(labels.values[sid], dtype=torch.float32)
        items[sid] = _Item(sid, lab, load)
    return items


def split_slides(ids: list[str], labels: Labels, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """The labels CSV's ``split`` column when it names train/val slides, else a seeded stratified
    ``cfg.val_fraction`` split."""
    if labels.split and any(labels.split.get(s) in ("train", "val") for s in ids):
        tr_ids = [s for s in ids if labels.split.get(s, "train") == "train"]
        va_ids = [s for s in ids if labels.split.get(s) == "val"]
        return tr_ids, va_ids
    return stratified_split(ids, [labels.values[s] for s in ids], cfg.val_fraction, cfg.seed)
