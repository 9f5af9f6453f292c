"""The configuration a trained INSIGHT model carries with it, so nothing is ever guessed."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from fastinsight.errors import CheckpointError

Norm = Literal["tile", "channel"]
Pooling = Literal["smoothmax", "lse_lba", "max", "mean"]
Threshold = Literal["otsu", "none"]
PoolInput = Literal["heatmap", "logit"]
ContextMode = Literal["tile", "slide"]

POOLINGS: tuple[str, ...] = ("smoothmax", "lse_lba", "max", "mean")
NORMS: tuple[str, ...] = ("tile", "channel")


@dataclass(frozen=True)
class InsightConfig:
    """Architecture, inference settings and the slide geometry a model was trained for.

    The defaults are the official INSIGHT setup (Zhang, Chen, Kanan, MLHC 2025): UNI tokens
    (1024 x 14 x 14 per 224 px tile at 0.5 um/px), per-tile LayerNorm over ``[c, h, w]``, Otsu
    threshold, SmoothMax pooling with a = 8.

    - ``norm="tile"`` is the official ``LayerNorm([c, h, w])`` (ties the model to ``grid_size``);
      ``norm="channel"`` normalises over channels per cell and works on any grid.
    - ``context="tile"`` is the official context branch (each tile replicated at its border);
      ``context="slide"`` runs the 3x3 context convolutions over the stitched slide grid.
    - ``pool_input="logit"`` pools ``logit(H)`` and applies a sigmoid to the pooled value (one
      reading of Yao et al. 2018); the default pools the heatmap probabilities.
    """

    in_dim: int = 1024
    num_classes: int = 1
    grid_size: tuple[int, int] = (14, 14)
    reduce_dim: int = 128
    widths: tuple[int, int, int] = (128, 64, 64)
    norm: Norm = "tile"
    norm_eps: float = 1e-5
    context: ContextMode = "tile"
    threshold: Threshold = "otsu"
    otsu_bins: int = 256
    pooling: Pooling = "smoothmax"
    smoothmax_a: float = 8.0
    lse_r0: float = 5.0
    pool_input: PoolInput = "heatmap"
    class_names: tuple[str, ...] = ()
    # Slide geometry and encoder the model was trained with (used by the slide pipeline).
    encoder: str = "uni"
    tile_size_px: int = 224
    patch_size_px: int = 16
    target_mpp: float = 0.5

    def __post_init__(self) -> None:
        problems = []
        if self.in_dim < 1:
            problems.append(f"in_dim must be >= 1, got {self.in_dim}")
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        if len(self.grid_size) != 2 or min(self.grid_size) < 1:
            problems.append(f"grid_size must be two positive ints, got {self.grid_size}")
        if self.norm not in NORMS:
            problems.append(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.context not in ("tile", "slide"):
            problems.append(f"context must be 'tile' or 'slide', got {self.context!r}")
        if self.context == "slide" and self.norm != "channel":
            problems.append(
                "context='slide' needs norm='channel' (a per-tile norm has no slide grid)"
            )
        if self.threshold not in ("otsu", "none"):
            problems.append(f"threshold must be 'otsu' or 'none', got {self.threshold!r}")
        if self.pooling not in POOLINGS:
            problems.append(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.pool_input not in ("heatmap", "logit"):
            problems.append(f"pool_input must be 'heatmap' or 'logit', got {self.pool_input!r}")
        if self.smoothmax_a <= 0:
            problems.append(f"smoothmax_a must be > 0, got {self.smoothmax_a}")
        if self.lse_r0 < 0:
            problems.append(f"lse_r0 must be >= 0, got {self.lse_r0}")
        if self.class_names and len(self.class_names) != self.num_classes:
            problems.append(
                f"class_names has {len(self.class_names)} names for {self.num_classes} classes"
            )
        if problems:
            raise CheckpointError("invalid InsightConfig: " + "; ".join(problems))

    @property
    def names(self) -> tuple[str, ...]:
        """Class names, ``class0..`` when none were given."""
        return self.class_names or tuple(f"class{k}" for k in range(self.num_classes))

    def replace(self, **changes: Any) -> InsightConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> InsightConfig:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"model config is not valid JSON: {exc}") from exc
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise CheckpointError(
                f"model config has unknown fields {unknown}; was it written by a newer fastinsight?"
            )
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        return cls(**values)
