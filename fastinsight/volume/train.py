"""Training and evaluating INSIGHT on CT volumes: a volume is a bag of slice token grids.

Training is the slide trainer's (``fastinsight.train``): its epochs (weighted BCE on the pooled
score + spectral decoupling, Otsu per chunk, validation, early stopping, best model by
validation loss) run on the per-slice (official) model or on the cross-slice model, whose
volumes go through in one chunk. ``train-volume`` writes what ``fastinsight train`` writes after
every epoch, renamed into place together: the model (here a volume model with its CT recipe),
``<out>.train.pt`` (resume state, checked by ``fastinsight.train.state``) and
``<out>.metrics.*``; the settings it records are ``VolumeTrainConfig`` (training settings,
encoder, recipe, data digests).

Evaluation: volume AUC (``fastinsight.evaluate.roc_auc``) and voxel Dice
(``fastinsight.evaluate.dice``) of the heatmap's kept voxels (> 0 after Otsu) against a mask
NIfTI on the scan's grid, over the scored slices.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastinsight.errors import ConfigError, InputError
from fastinsight.evaluate import dice, roc_auc
from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel
from fastinsight.train import Bag, EpochMetrics, TrainConfig, stratified_split
from fastinsight.train.data import items_from_bags, require_both_classes
from fastinsight.train.loop import _fit, kept_global_rng
from fastinsight.train.state import (
    _check_resume,
    _load_state,
    _Progress,
    refuse_previous_run,
    state_path_for,
)
from fastinsight.volume.checkpoint import VolumeModelInfo, save_volume_model
from fastinsight.volume.model import build_volume_model


def read_volume_labels(path: str | os.PathLike[str]) -> dict[str, int]:
    """``volume_id,label`` CSV (0/1 labels) -> ``{volume_id: label}``."""
    p = Path(path).expanduser()
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    except OSError as exc:
        raise InputError(f"cannot read labels file {str(p)!r}: {exc}") from exc
    except UnicodeDecodeError:
        raise InputError(
            f"labels file {str(p)!r} is not UTF-8 text (a UTF-16 or Latin-1 export?); save it as "
            "'CSV UTF-8'"
        ) from None
    except csv.Error as exc:
        raise InputError(f"labels file {str(p)!r} is not a readable CSV ({exc})") from None
    if not rows or [h.strip().lower() for h in rows[0][:2]] != ["volume_id", "label"]:
        raise InputError(f"{str(p)!r}: expected a header 'volume_id,label', found {rows[:1]}")
    if len(rows) < 2:
        raise InputError(f"{str(p)!r} has no data rows; expected one 'volume_id,0|1' per volume")
    out: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < 2 or row[1].strip() not in ("0", "1"):
            raise InputError(f"{str(p)!r} line {line}: expected 'volume_id,0|1', found {row}")
        vid = row[0].strip()
        if not vid:
            raise InputError(f"{str(p)!r} line {line}: empty volume_id")
        if vid in out:
            raise InputError(f"{str(p)!r} line {line}: volume {vid!r} is listed twice")
        out[vid] = int(row[1].strip())
    return out


def find_volume(folder: str | os.PathLike[str], volume_id: str) -> Path:
    """``folder/<id>.nii.gz`` | ``<id>.nii`` | ``<id>/`` (a DICOM series folder). ``volume_id``
    names something inside ``folder`` (``site1/case7`` is fine; empty, absolute or ``..`` is not:
    an id never reads the folder itself or a file outside it)."""
    root = Path(folder)
    rel = Path(volume_id)
    if not rel.parts or rel.is_absolute() or ".." in rel.parts or "\0" in volume_id:
        raise InputError(
            f"volume id {volume_id!r} does not name a volume inside {str(root)!r}; ids are file "
            "or folder names relative to the volumes folder"
        )
    for cand in (root / f"{volume_id}.nii.gz", root / f"{volume_id}.nii", root / volume_id):
        if cand.exists():
            return cand
    raise InputError(
        f"volume {volume_id!r} of the labels is not in {str(root)!r} (looked for "
        f"{volume_id}.nii.gz, {volume_id}.nii and a folder {volume_id}/)"
    )


def _volume_split(
    ids: Sequence[str], labels: Sequence[tuple[int, ...]], cfg: TrainConfig, names: Sequence[str]
) -> tuple[list[str], list[str]]:
    """The seeded stratified split ``train_on_bags`` makes, with both labels among the training
    volumes; from the labels alone, so it is known before any volume is encoded."""
    if len(set(ids)) != len(ids):
        raise InputError("volumes have duplicate ids; give each Bag a unique slide_id")
    tr, va = stratified_split(ids, labels, cfg.val_fraction, cfg.seed)
    label_of = dict(zip(ids, labels, strict=True))
    require_both_classes(
        {v: label_of[v] for v in tr},
        names,
        f"training volumes ({len(va)} more validate)",
        "label volumes of both kinds, or lower --val-fraction",
    )
    return tr, va


def _fit_volumes(
    train: Sequence[Bag],
    val: Sequence[Bag],
    model_config: InsightConfig,
    config: TrainConfig,
    *,
    slice_context: str,
    out: tuple[Path, VolumeModelInfo] | None = None,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[InsightModel, _Progress]:
    """The slide trainer's epochs (``fastinsight.train.loop``) on a per-slice or cross-slice model.

    With ``out`` (the model path and its CT recipe) each epoch's volume model (when it improved),
    resume state ``<out>.train.pt`` and metrics ``<out>.metrics.*`` are renamed into place
    together, and ``resume`` continues from that state after ``resume_progress`` checked it.
    Returns the model with the best validation loss (eval mode) and the loop's progress.
    """
    k = model_config.num_classes
    train_items, val_items = items_from_bags(train, k, "volume"), items_from_bags(val, k, "volume")
    run_cfg = config
    if slice_context == "3d":
        # One chunk per volume: chunking along the slices would cut the 3-D context. Only the
        # run uses it; the state records the caller's config, so a resume compares like with like.
        longest = max(b.tokens.shape[0] for b in (*train, *val))
        run_cfg = dataclasses.replace(config, chunk_size=max(config.chunk_size, longest))
    if resume and out is None:
        raise InputError("resume needs out: the training state lives next to the model")
    return _fit(
        train_items,
        val_items,
        model_config,
        config,
        out_path=None if out is None else out[0],
        resume=resume,
        progress=False,
        log=log,
        build_model=partial(build_volume_model, model_config, slice_context, backend="reference"),
        run_config=run_cfg,
        # The volume model with its CT recipe, where the slide trainer writes a slide checkpoint.
        save_model=None if out is None else partial(save_volume_model, info=out[1], path=out[0]),
    )


@kept_global_rng()
def train_volume_model(
    bags: Sequence[Bag],
    model_config: InsightConfig,
    config: TrainConfig,
    *,
    slice_context: str = "2d",
    log: Callable[[str], None] | None = None,
) -> tuple[InsightModel, list[EpochMetrics]]:
    """Train on volume bags (tokens ``[D, C, h, w]`` per volume, one label vector each).

    ``"2d"``: the official per-slice model; ``"3d"``: :class:`CrossSliceInsight`; both through
    the slide trainer's epochs (loss, validation, early stopping, best model by validation
    loss). Validation: a seeded stratified ``config.val_fraction``. Writes nothing (the
    ``train-volume`` command writes the model, resume state and metrics after every epoch).
    The caller's global random generators come back as they were
    (:func:`~fastinsight.train.loop.kept_global_rng`).
    """
    ids = [b.slide_id for b in bags]
    labels = [tuple(int(v) for v in b.labels.tolist()) for b in bags]
    tr, va = _volume_split(ids, labels, config, model_config.names)
    by = {b.slide_id: b for b in bags}
    model, prog = _fit_volumes(
        [by[i] for i in tr],
        [by[i] for i in va],
        model_config,
        config,
        slice_context=slice_context,
        log=log,
    )
    return model, list(prog.history)


@dataclass(frozen=True)
class VolumeEval:
    """Per-volume score and Dice (None without a mask or for negatives with an empty mask)."""

    volume_id: str
    label: int
    score: float
    dice: float | None


def volume_dice(heatmap: np.ndarray, mask: np.ndarray, slices: Sequence[int]) -> float:
    """Voxel Dice of ``heatmap > 0`` against ``mask != 0`` over the scored ``slices``.

    Shapes: heatmap, mask ``[X, Y, Z]``.
    """
    if heatmap.shape != mask.shape:
        raise InputError(
            f"the mask is {list(mask.shape)} but the heatmap is {list(heatmap.shape)}; pass the "
            "mask made on the scan's grid"
        )
    s = list(slices)
    return dice(heatmap[:, :, s] > 0, mask[:, :, s] != 0)


def summarise(evals: Sequence[VolumeEval]) -> dict[str, Any]:
    """AUC over volumes and Dice mean/sd over the volumes that have one."""
    scores = np.array([e.score for e in evals])
    labels = np.array([e.label for e in evals])
    dices = [e.dice for e in evals if e.dice is not None]
    auc = roc_auc(scores, labels) if len(set(labels.tolist())) == 2 else float("nan")
    return {
        "auc": auc,
        "dice_mean": float(np.mean(dices)) if dices else None,
        "dice_sd": float(np.std(dices)) if dices else None,
        "volumes": [e.__dict__ for e in evals],
    }


# --------------------------------------------------------------------------------------------
# `fastinsight train-volume`
# --------------------------------------------------------------------------------------------
# Option fields -> the train-volume flags that set them (for messages; the CLI rewrites them).
_RECIPE_CHOICES: dict[str, tuple[str, ...]] = {
    "slices": ("all", "middle32"),
    "lung_mask": ("none", "auto"),
    "slice_context": ("2d", "3d"),
}


def check_recipe(**values: Any) -> None:
    """``slices`` / ``lung_mask`` / ``slice_context`` among their choices; else ConfigError.

    Checked before any volume is read (a bad ``slice_context`` used to surface after encoding)."""
    for name, value in values.items():
        choices = _RECIPE_CHOICES[name]
        if value not in choices:
            raise ConfigError(
                f"{name} must be one of {list(choices)}, got {value!r}", fields=(name,)
            )


def slice_tile_size(
    encoder: str, tile_size: int | None, options: dict[str, Any] | None = None
) -> int:
    """The slice size to train ``encoder`` on: ``tile_size``, or the encoder's own when None;
    ConfigError (naming the flags) when it does not fit the encoder's patch size.

    Builds the encoder on the ``meta`` device (no memory, no weights): nothing is loaded.
    """
    from fastinsight.volume.predict import build_volume_encoder

    if tile_size is not None and (
        isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1
    ):
        raise ConfigError(
            f"tile_size must be a positive number of px, got {tile_size!r}", fields=("tile_size",)
        )
    try:
        probe = build_volume_encoder(encoder, tile_size, device="meta", options=options)
    except InputError:
        # The architecture refused the tile (a ViT needs a multiple of its patch): say which
        # flags to change, with the encoder's own geometry.
        if tile_size is None:
            raise
        own = build_volume_encoder(encoder, None, device="meta", options=options)
        raise ConfigError(
            _tile_patch_message(encoder, tile_size, own.patch_size_px, own.tile_size_px),
            fields=("tile_size", "patch_size_px"),
        ) from None
    tile, patch = probe.tile_size_px, probe.patch_size_px
    if tile < patch or tile % patch:
        raise ConfigError(
            _tile_patch_message(encoder, tile, patch, None), fields=("tile_size", "patch_size_px")
        )
    return int(tile)


def _tile_patch_message(encoder: str, tile: int, patch: int, own_tile: int | None) -> str:
    fit = max(patch, tile - tile % patch)
    own = f"; or leave tile_size unset for the encoder's own {own_tile} px" if own_tile else ""
    return (
        f"tile_size {tile} px is not a multiple of the patch size {patch} px of encoder "
        f"{encoder!r}: its slices are cut into {patch} px patches; pass a tile_size that is a "
        f"multiple of {patch} (e.g. {fit}), or another patch_size_px{own}"
    )


@dataclass(frozen=True)
class VolumeTrainConfig(TrainConfig):
    """``TrainConfig`` plus where a ``train-volume`` run's token grids and labels come from.

    ``<out>.train.pt`` records it as the run's settings, so a resume (``resume_progress``) refuses
    a state written with another encoder, slice recipe or data, naming the field; as for slides,
    only ``RESUMABLE_CHANGES`` (epochs, patience, device) may change. The recipe fields are
    ``VolumeModelInfo``'s; ``encoder_weights``: the weight file's SHA-256, or ``random-init
    (seed N)``; ``labels_sha256``: the labels in CSV order; ``volumes_sha256``: every volume's
    id, shape, affine and voxels (HU as read).
    """

    slice_context: str = "2d"
    encoder: str = ""
    encoder_options: Mapping[str, Any] = field(default_factory=dict)
    tile_size: int = 0
    window: tuple[float, float] = (-1000.0, 400.0)
    slices: str = "all"
    lung_mask: str = "none"
    encoder_weights: str = ""
    labels_sha256: str = ""
    volumes_sha256: str = ""

    @classmethod
    def of(
        cls,
        config: TrainConfig,
        info: VolumeModelInfo,
        encoder_identity: Mapping[str, Any],
        labels: Mapping[str, int],
    ) -> VolumeTrainConfig:
        """``config`` with ``info``'s recipe, the encoder's weights and the labels' digest (the
        volumes' digest is set once they are read)."""
        weights = encoder_identity.get("weights") or "random-init"
        if weights == "random-init":
            weights = f"random-init (seed {encoder_identity.get('seed')})"
        rows = json.dumps(list(labels.items())).encode("utf-8")
        return cls(
            **{f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)},
            **{f.name: getattr(info, f.name) for f in dataclasses.fields(VolumeModelInfo)},
            encoder_weights=str(weights),
            labels_sha256=hashlib.sha256(rows).hexdigest(),
        )


def _check_resumable(
    state: Mapping[str, Any], cfg: VolumeTrainConfig, mcfg: InsightConfig, path: Path
) -> None:
    """``--resume`` before any volume is encoded: the state's settings, encoder, recipe, labels
    and model are this run's (the voxels are compared once read, by ``resume_progress``)."""
    try:
        saved = json.loads(state["train_config"]).get("volumes_sha256", "")
    except (ValueError, AttributeError):
        saved = ""  # not a JSON object: _check_resume says the state is damaged
    _check_resume(state, dataclasses.replace(cfg, volumes_sha256=saved), mcfg, path)


@kept_global_rng()
def train_from_folder(
    volumes: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    encoder: str = "vit-tiny",
    encoder_weights: str | None = None,
    encoder_options: dict[str, Any] | None = None,
    tile_size: int | None = None,
    slices: str = "all",
    lung_mask: str = "none",
    slice_context: str = "2d",
    train_config: TrainConfig | None = None,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> InsightModel:
    """Encode every labelled volume of ``volumes`` and train; writes a volume model to ``out``.

    ``tile_size`` None: the encoder's own (518 px for the DINOv2 encoders, 224 for vit-tiny).
    The encoder, tile size, patch size and recipe are checked together before anything is read.
    After every epoch the volume model (when it improved), ``<out>.train.pt`` (resume state) and
    ``<out>.metrics.csv`` / ``.json`` are renamed into place together. A fresh run refuses a
    previous run's outputs unless ``overwrite``; ``resume`` continues that run (the same final
    model as an uninterrupted one) after checking that its state holds this run's settings,
    encoder, recipe and data. Volumes are encoded in memory on every run (there is no token
    cache): a resume encodes them again. The caller's global random generators come back as
    they were (:func:`~fastinsight.train.loop.kept_global_rng`), also when the run fails.
    """
    from fastinsight.atomic import check_writable
    from fastinsight.inputs import resolve_device
    from fastinsight.volume.io import read_volume
    from fastinsight.volume.predict import build_volume_encoder, encode_volume

    if Path(out).suffix.lower() != ".safetensors":
        raise InputError(
            f"--out {str(out)!r} must end in .safetensors: train-volume writes a fastinsight "
            "checkpoint (safetensors with its CT recipe)"
        )
    check_recipe(slices=slices, lung_mask=lung_mask, slice_context=slice_context)
    tile_size = slice_tile_size(encoder, tile_size, encoder_options)
    check_writable(out)
    labels = read_volume_labels(labels_csv)
    paths = {vid: find_volume(volumes, vid) for vid in labels}
    out_path = Path(out).expanduser()
    refuse_previous_run(out_path, resume=resume, overwrite=overwrite)
    saved = _load_state(state_path_for(out_path)) if resume else None
    dev = str(resolve_device(device))
    enc = build_volume_encoder(
        encoder, tile_size, weights=encoder_weights, device=dev, options=encoder_options
    )
    info = VolumeModelInfo(
        encoder=encoder,
        encoder_options=dict(encoder_options or {}),
        tile_size=tile_size,
        slices=slices,
        lung_mask=lung_mask,
        slice_context=slice_context,
    )
    h, w = enc.grid_size
    mcfg = InsightConfig(
        in_dim=enc.embed_dim,
        grid_size=(h, w),
        norm="channel",
        encoder=encoder,
        tile_size_px=tile_size,
        patch_size_px=enc.patch_size_px,
        class_names=("lesion",),
    )
    cfg = VolumeTrainConfig.of(
        train_config or TrainConfig(device=dev), info, enc.identity(), labels
    )
    tr, va = _volume_split(list(labels), [(v,) for v in labels.values()], cfg, mcfg.names)
    if saved is not None:
        _check_resumable(saved, cfg, mcfg, state_path_for(out_path))
    pre = info.preprocess()
    digest = hashlib.sha256()
    bags = {}
    for vid, path in paths.items():
        volume = read_volume(path)
        digest.update(json.dumps([vid, list(volume.shape), volume.affine.tolist()]).encode())
        digest.update(volume.data.astype(np.float32, copy=False).tobytes())
        tokens, _, _ = encode_volume(volume.data, enc, pre)
        bags[vid] = Bag(tokens.cpu(), None, torch.tensor([float(labels[vid])]), vid)
        if log:
            log(f"encoded {vid}: {tuple(tokens.shape)}")
    cfg = dataclasses.replace(cfg, volumes_sha256=digest.hexdigest())
    model, _ = _fit_volumes(
        [bags[v] for v in tr],
        [bags[v] for v in va],
        mcfg,
        cfg,
        slice_context=slice_context,
        out=(out_path, info),
        resume=resume,
        log=log,
    )
    if not out_path.exists():  # e.g. resumed a finished run whose model file was removed
        save_volume_model(model, info, out_path)
    return model
