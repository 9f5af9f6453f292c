"""The configuration a trained INSIGHT model carries with it, so nothing is ever guessed."""

from __future__ import annotations

import dataclasses
import json
import math
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal

from fastinsight.errors import CheckpointError, ConfigError
from fastinsight.text import loads_json

Norm = Literal["tile", "channel"]
Pooling = Literal["smoothmax", "lse_lba", "max", "mean"]
Threshold = Literal["otsu", "none"]
PoolInput = Literal["heatmap", "logit"]
ContextMode = Literal["tile", "slide"]

POOLINGS: tuple[str, ...] = ("smoothmax", "lse_lba", "max", "mean")
NORMS: tuple[str, ...] = ("tile", "channel")


class InvalidConfigError(ConfigError, CheckpointError):
    """A model configuration built in code with invalid fields: a ConfigError (exit 2).

    Raised by ``InsightConfig`` and the radiograph configs when they are made from Python or
    from CLI flags. It also derives from CheckpointError, which earlier versions raised here, so
    code that caught that keeps working. A configuration read from a model file is a plain
    CheckpointError naming the file (``InsightConfig.from_json(text, source=path)``).
    """

    exit_code = ConfigError.exit_code


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

    An invalid field is an ``InvalidConfigError`` (a ConfigError, exit 2) naming it; the same
    config read from a model file (``from_json``) is a CheckpointError (exit 3).
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
        problems = _type_problems(self)
        if problems:  # the value checks below assume the types are right
            raise InvalidConfigError("invalid InsightConfig: " + "; ".join(problems))
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
        if self.otsu_bins < 2:
            problems.append(f"otsu_bins must be >= 2, got {self.otsu_bins}")
        if self.pooling not in POOLINGS:
            problems.append(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.pool_input not in ("heatmap", "logit"):
            problems.append(f"pool_input must be 'heatmap' or 'logit', got {self.pool_input!r}")
        if not self.norm_eps > 0:
            problems.append(f"norm_eps must be > 0 (it keeps the norm finite), got {self.norm_eps}")
        if not self.smoothmax_a > 0:
            problems.append(f"smoothmax_a must be > 0, got {self.smoothmax_a}")
        if not self.lse_r0 >= 0:
            problems.append(f"lse_r0 must be >= 0, got {self.lse_r0}")
        if not MPP_RANGE[0] <= self.target_mpp <= MPP_RANGE[1]:
            problems.append(
                f"target_mpp must be in [{MPP_RANGE[0]}, {MPP_RANGE[1]}] um/px, got {self.target_mpp}"
            )
        if self.patch_size_px > self.tile_size_px:
            problems.append(
                f"patch_size_px ({self.patch_size_px}) must not exceed tile_size_px "
                f"({self.tile_size_px})"
            )
        if not self.encoder.strip():
            problems.append("encoder must name an encoder, got an empty string")
        if self.class_names and len(self.class_names) != self.num_classes:
            problems.append(
                f"class_names has {len(self.class_names)} names for {self.num_classes} classes"
            )
        problems += class_name_problems(self.class_names)
        if problems:
            raise InvalidConfigError("invalid InsightConfig: " + "; ".join(problems))

    @property
    def names(self) -> tuple[str, ...]:
        """Class names, ``class0..`` when none were given."""
        return self.class_names or tuple(f"class{k}" for k in range(self.num_classes))

    def replace(self, **changes: Any) -> InsightConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str | None = None) -> InsightConfig:
        """Parse a config written by ``to_json``; every field is checked (types, ranges, NaN).

        The text comes from a model file, so every problem is a CheckpointError (exit 3);
        ``source`` (the file's path) is named in the message when given.
        """
        where = f" in {source!r}" if source else ""
        try:
            raw = loads_json(text)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"model config{where} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(
                f"model config{where} must be a JSON object, got {type(raw).__name__}"
            )
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise CheckpointError(
                f"model config{where} has unknown fields {unknown}; was it written by a newer "
                "fastinsight?"
            )
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        try:
            return cls(**values)
        except InvalidConfigError as exc:
            prefix = f"model file {source!r}: " if source else ""
            raise CheckpointError(f"{prefix}{exc}") from None


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
MPP_RANGE = (0.01, 1000.0)  # as fastinsight.inputs.MPP_MIN / MPP_MAX (config has no imports)
_INT_FIELDS = ("in_dim", "num_classes", "reduce_dim", "otsu_bins", "tile_size_px", "patch_size_px")
_FLOAT_FIELDS = ("norm_eps", "smoothmax_a", "lse_r0", "target_mpp")
_STR_FIELDS = ("norm", "context", "threshold", "pooling", "pool_input", "encoder")
# Sizes beyond these are garbage (a 2^31-channel conv would allocate petabytes before failing).
MAX_DIM = 65_536
MAX_CLASSES = 4096
MAX_GRID = 1024
MAX_TILE_PX = 65_536
MAX_CLASS_NAME_BYTES = 100  # OUT_STEM.<class>.tif must fit NAME_MAX = 255 bytes
# Windows device names: a file "CON.tif" cannot be created there (any extension, any case).
_WINDOWS_RESERVED = frozenset(
    {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(10)} | {f"lpt{i}" for i in range(10)}
)
_FORBIDDEN_CHARS = set('/\\<>:"|?*')


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int_problem(name: str, value: Any, limit: int) -> str | None:
    if not _is_int(value):
        return f"{name} must be an integer, got {value!r} ({type(value).__name__})"
    if not 1 <= value <= limit:
        return f"{name} must be in 1..{limit}, got {value}"
    return None


def _type_problems(cfg: InsightConfig) -> list[str]:
    """Field types and size limits; each problem names its field."""
    problems: list[str] = []
    limits = {"in_dim": MAX_DIM, "reduce_dim": MAX_DIM, "num_classes": MAX_CLASSES}
    limits |= {"otsu_bins": 1 << 20, "tile_size_px": MAX_TILE_PX, "patch_size_px": MAX_TILE_PX}
    for name in _INT_FIELDS:
        problem = _positive_int_problem(name, getattr(cfg, name), limits[name])
        if problem:
            problems.append(problem)
    for name in _FLOAT_FIELDS:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        elif not math.isfinite(value):
            problems.append(f"{name} must be finite, got {value!r}")
    for name in _STR_FIELDS:
        value = getattr(cfg, name)
        if not isinstance(value, str):
            problems.append(f"{name} must be a string, got {value!r} ({type(value).__name__})")
    for name, size, limit in (("grid_size", 2, MAX_GRID), ("widths", 3, MAX_DIM)):
        value = getattr(cfg, name)
        what = "a pair" if size == 2 else "three"
        if not isinstance(value, (tuple, list)) or len(value) != size:
            problems.append(f"{name} must be {what} of positive integers, got {value!r}")
            continue
        for v in value:
            problem = _positive_int_problem(f"{name} entry", v, limit)
            if problem:
                problems.append(f"{problem} (in {name}={list(value)!r})")
                break
    names = cfg.class_names
    if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
        problems.append(f"class_names must be a list of strings, got {names!r}")
    return problems


def class_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a class name, or None.

    A class name becomes part of file names (``--all-classes`` writes ``OUT_STEM.<class>.tif``),
    JSON keys, CSV headers and TIFF descriptions, so it must be usable as one path component on
    Linux, macOS and Windows: not empty, no ``/ \\ < > : " | ? *``, no control characters, no
    lone surrogates (undecodable bytes: no UTF-8 file, JSON or TIFF tag can hold them),
    not ``.``/``..``, no leading or trailing space or trailing dot, not a Windows device name
    (CON, NUL, COM1, ...), at most 100 bytes as UTF-8. Letters of any script are fine.
    """
    if not name:
        return "a class name is empty"
    if any(unicodedata.category(c) == "Cs" for c in name):
        return (
            f"class name {name!r} holds bytes that are not UTF-8 (lone surrogates, from an "
            "undecodable file name), which no UTF-8 CSV, JSON or TIFF tag can store"
        )
    bad = sorted(
        {
            c
            for c in name
            if c in _FORBIDDEN_CHARS or unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")
        }
    )
    if bad:
        return f"class name {name!r} contains {bad!r}, which file names cannot hold"
    if name in (".", ".."):
        return f"class name {name!r} is a folder reference"
    if name != name.strip() or name.endswith("."):
        return f"class name {name!r} starts or ends with a space or ends with a dot"
    if name.split(".")[0].lower() in _WINDOWS_RESERVED:
        return f"class name {name!r} is a reserved device name on Windows"
    if len(name.encode("utf-8")) > MAX_CLASS_NAME_BYTES:
        return f"class name {name[:20]!r}... is longer than {MAX_CLASS_NAME_BYTES} bytes"
    return None


def class_name_problems(names: tuple[str, ...]) -> list[str]:
    """Every bad name, and names that collide (also when case is ignored, as on macOS)."""
    problems = [p for p in (class_name_problem(n) for n in names) if p]
    folded = [unicodedata.normalize("NFC", n).casefold() for n in names]
    if len(set(folded)) != len(folded):
        problems.append(
            f"class_names {list(names)!r} repeat a name (ignoring case): each class needs its own "
            "file name"
        )
    if problems:
        problems[-1] += "; rename the classes (e.g. letters, digits, '-' and '_')"
    return problems
