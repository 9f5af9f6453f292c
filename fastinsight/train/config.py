"""How to train (``TrainConfig``) and where the data comes from (``FolderOptions``).

Both are frozen dataclasses that validate on construction and name the offending fields in their
errors (``epochs must be >= 1``; ``fields=("epochs",)``), so the CLI can show its own flags. The
model's own settings live in ``InsightConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastinsight.errors import InputError

# Feature sets up to this size (float32) are read once and kept in memory; larger ones are read
# from disk every epoch.
CACHE_LIMIT_BYTES = 4 << 30
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw")
GRAD_CHECKPOINT: tuple[str, ...] = ("auto", "always", "never")
TRAIN_THRESHOLD: tuple[str, ...] = ("chunk", "slide", "none")


def _raise_problems(what: str, problems: list[tuple[str, str]]) -> None:
    """One error naming every invalid field: ``invalid TrainConfig: epochs must be >= 1; ...``."""
    if problems:
        raise InputError(
            f"invalid {what}: " + "; ".join(msg for _, msg in problems),
            fields=tuple(dict.fromkeys(name for name, _ in problems)),
        )


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the model's own settings live in ``InsightConfig``).

    ``pos_weight`` / ``neg_weight`` / ``class_weights``: one value per class, or one value for
    all. ``chunk_size``: tiles per checkpointed chunk (for the slide-context model: the band of
    grid rows holding about that many tiles' cells). ``grad_checkpoint``: ``"auto"`` checkpoints
    slides of more than one chunk, ``"always"``, or ``"never"``. ``accumulate``: slides per
    optimizer step.
    """

    epochs: int = 50
    lr: float = 2e-4
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    sd_lambda: float = 0.01
    label_smoothing: float = 0.0
    pos_weight: tuple[float, ...] = (1.0,)
    neg_weight: tuple[float, ...] = (1.0,)
    class_weights: tuple[float, ...] = (1.0,)
    prob_floor: float = 1e-6
    prob_ceiling: float = 0.999
    chunk_size: int = 512
    grad_checkpoint: str = "auto"
    train_threshold: str = "chunk"
    val_fraction: float = 0.2
    patience: int = 10
    min_delta: float = 0.0
    seed: int = 0
    accumulate: int = 1
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("pos_weight", "neg_weight", "class_weights"):
            v = getattr(self, name)
            t = (float(v),) if isinstance(v, (int, float)) else tuple(float(x) for x in v)
            object.__setattr__(self, name, t)
        _raise_problems("TrainConfig", self._problems())

    def _problems(self) -> list[tuple[str, str]]:
        """``(field, message)`` for every invalid field."""
        p: list[tuple[str, str]] = []
        for name in ("epochs", "patience", "accumulate", "chunk_size"):
            if getattr(self, name) < 1:
                p.append((name, f"{name} must be >= 1, got {getattr(self, name)}"))
        if not self.lr > 0:
            p.append(("lr", f"lr must be > 0, got {self.lr}"))
        for name in ("weight_decay", "sd_lambda"):
            if getattr(self, name) < 0:
                p.append((name, f"{name} must be >= 0, got {getattr(self, name)}"))
        if self.optimizer not in OPTIMIZERS:
            p.append(("optimizer", f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}"))
        for name in ("label_smoothing", "val_fraction"):
            if not 0 <= getattr(self, name) < 1:
                p.append((name, f"{name} must be in [0, 1), got {getattr(self, name)}"))
        for name in ("pos_weight", "neg_weight", "class_weights"):
            v = getattr(self, name)
            if not v or any(not (x >= 0 and math.isfinite(x)) for x in v):
                p.append((name, f"{name} must be finite values >= 0, got {v}"))
        if not 0 < self.prob_floor < self.prob_ceiling <= 1:
            p.append(
                (
                    "prob_floor",
                    "need 0 < prob_floor < prob_ceiling <= 1, got "
                    f"{self.prob_floor}, {self.prob_ceiling}",
                )
            )
        if self.grad_checkpoint not in GRAD_CHECKPOINT:
            p.append(
                (
                    "grad_checkpoint",
                    f"grad_checkpoint must be auto/always/never, got {self.grad_checkpoint!r}",
                )
            )
        if self.train_threshold not in TRAIN_THRESHOLD:
            p.append(
                (
                    "train_threshold",
                    f"train_threshold must be chunk/slide/none, got {self.train_threshold!r}",
                )
            )
        return p

    def per_class(self, name: str, k: int) -> tuple[float, ...]:
        """``name``'s values for ``k`` classes (one value is repeated)."""
        v = getattr(self, name)
        if len(v) == 1:
            return v * k
        if len(v) != k:
            raise InputError(
                f"{name} has {len(v)} values for {k} classes; give 1 or {k}", fields=(name,)
            )
        return v

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclass(frozen=True)
class FolderOptions:
    """Where ``train_from_folder`` takes its slides from and what the model records of them.

    ``model_options``: ``InsightConfig`` fields (pooling, smoothmax_a, lse_r0, pool_input, norm,
    context, widths...). ``patches_dir``: CLAM's ``patches/`` folder (tile geometry);
    ``patch_size_l0``: tile side in level-0 px; ``snap_to_grid``: round tile coordinates to the
    nearest grid cell. ``encoder`` / ``tile_size_px`` / ``mpp``: what the model records when the
    feature files do not (only TRIDENT files record them). ``skip_missing``: train without
    labelled slides that lack a feature file. ``cache``: keep the features in memory (None: when
    they fit in ``CACHE_LIMIT_BYTES``).
    """

    model_options: Mapping[str, Any] | None = None
    patches_dir: str | os.PathLike[str] | None = None
    patch_size_l0: int | None = None
    snap_to_grid: bool = False
    encoder: str | None = None
    tile_size_px: int | None = None
    mpp: float | None = None
    skip_missing: bool = False
    cache: bool | None = None

    def __post_init__(self) -> None:
        p: list[tuple[str, str]] = []
        for name in ("patch_size_l0", "tile_size_px"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and v >= 1):
                p.append((name, f"{name} must be a whole number of pixels >= 1, got {v!r}"))
        if self.mpp is not None and not (self.mpp > 0 and math.isfinite(self.mpp)):
            p.append(("mpp", f"mpp must be a positive number of microns per pixel, got {self.mpp}"))
        if self.encoder is not None and not str(self.encoder).strip():
            p.append(("encoder", "encoder must name the encoder that made the features, got ''"))
        _raise_problems("FolderOptions", p)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))


__all__ = ["CACHE_LIMIT_BYTES", "FolderOptions", "TrainConfig"]
