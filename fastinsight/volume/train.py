"""Training and evaluating INSIGHT on CT volumes: a volume is a bag of slice token grids.

Training reuses the slide trainer (``fastinsight.train``): the per-slice (official) model goes
through ``train_on_bags`` unchanged (weighted BCE on the pooled score + spectral decoupling, Otsu
per chunk, best model by validation loss); the cross-slice model, which ``train_on_bags`` cannot
build, runs the same loss functions (``slide_forward``, ``bce_loss``) in the short loop below.

Evaluation: volume AUC (``fastinsight.evaluate.roc_auc``) and voxel Dice
(``fastinsight.evaluate.dice``) of the heatmap's kept voxels (> 0 after Otsu) against a mask
NIfTI on the scan's grid, over the scored slices.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastinsight.errors import ConfigError, InputError
from fastinsight.evaluate import dice, roc_auc
from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel
from fastinsight.train import Bag, TrainConfig, bce_loss, slide_forward, stratified_split
from fastinsight.volume.model import CrossSliceInsight, build_volume_model


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


def fit_cross_slice(
    bags: Sequence[Bag],
    val_bags: Sequence[Bag],
    model_config: InsightConfig,
    config: TrainConfig,
    *,
    log: Callable[[str], None] | None = None,
) -> tuple[CrossSliceInsight, list[dict[str, float]]]:
    """The slide trainer's loss on the cross-slice model (whole volume per step, no chunking).

    ``loss = BCE(pool(H * (H > t)), y) + lambda/2 mean(D^2)``; best state by validation loss.
    """
    dev = torch.device(
        "cuda"
        if config.device == "auto" and torch.cuda.is_available()
        else ("cpu" if config.device == "auto" else config.device)
    )
    torch.manual_seed(config.seed)
    model = CrossSliceInsight(model_config).to(dev)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    opt = cls(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best, best_loss, history = None, math.inf, []
    for epoch in range(config.epochs):
        model.train()
        total = 0.0
        for idx in np.random.default_rng([config.seed, epoch]).permutation(len(bags)).tolist():
            b = bags[idx]
            scores, sd = slide_forward(
                model,
                b.tokens,
                b.mask,
                chunk_size=max(1, b.tokens.shape[0]),
                grad_checkpoint="never",
                train_threshold=config.train_threshold,
                device=dev,
            )
            loss = (
                bce_loss(
                    scores,
                    b.labels,
                    floor=config.prob_floor,
                    ceiling=config.prob_ceiling,
                    label_smoothing=config.label_smoothing,
                )
                + 0.5 * config.sd_lambda * sd
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        model.eval()
        with torch.no_grad():
            vl = [
                float(bce_loss(model.predict(b.tokens.to(dev), b.mask).scores, b.labels))
                for b in val_bags
            ]
        val_loss = float(np.mean(vl)) if vl else total / max(1, len(bags))
        history.append(
            {"epoch": epoch + 1, "train_loss": total / max(1, len(bags)), "val_loss": val_loss}
        )
        if val_loss < best_loss or not vl:
            best_loss = val_loss
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if log:
            log(
                f"epoch {epoch + 1}/{config.epochs}: train loss {history[-1]['train_loss']:.4f}, val loss {val_loss:.4f}"
            )
    if best is not None:
        model.load_state_dict(best)
    return model.eval(), history


def train_volume_model(
    bags: Sequence[Bag],
    model_config: InsightConfig,
    config: TrainConfig,
    *,
    slice_context: str = "2d",
    log: Callable[[str], None] | None = None,
) -> tuple[InsightModel, list[Any]]:
    """Train on volume bags (tokens ``[D, C, h, w]`` per volume, one label vector each).

    ``"2d"``: ``fastinsight.train.train_on_bags`` (the slide trainer as is); ``"3d"``:
    :func:`fit_cross_slice`. Validation: a seeded stratified ``config.val_fraction``.
    """
    if slice_context == "2d":
        from fastinsight.train import train_on_bags

        model, history = train_on_bags(bags, config, model_config, log=log)
        return model, list(history)
    if slice_context != "3d":
        build_volume_model(model_config, slice_context)  # raises the clear error
    ids = [b.slide_id for b in bags]
    labs = [tuple(int(v) for v in b.labels.tolist()) for b in bags]
    tr, va = stratified_split(ids, labs, config.val_fraction, config.seed)
    by = {b.slide_id: b for b in bags}
    return fit_cross_slice([by[i] for i in tr], [by[i] for i in va], model_config, config, log=log)


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
    log: Callable[[str], None] | None = None,
) -> InsightModel:
    """Encode every labelled volume of ``volumes`` and train; writes a volume model to ``out``.

    ``tile_size`` None: the encoder's own (518 px for the DINOv2 encoders, 224 for vit-tiny).
    The encoder, tile size, patch size and recipe are checked together before anything is read.
    """
    from fastinsight.atomic import check_writable
    from fastinsight.inputs import resolve_device
    from fastinsight.volume.checkpoint import VolumeModelInfo, save_volume_model
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
    pre = info.preprocess()
    bags = []
    for vid, path in paths.items():
        tokens, _, _ = encode_volume(read_volume(path).data, enc, pre)
        bags.append(Bag(tokens.cpu(), None, torch.tensor([float(labels[vid])]), vid))
        if log:
            log(f"encoded {vid}: {tuple(tokens.shape)}")
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
    cfg = train_config or TrainConfig(device=dev)
    model, _ = train_volume_model(bags, mcfg, cfg, slice_context=slice_context, log=log)
    save_volume_model(model, info, out)
    return model
