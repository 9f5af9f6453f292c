"""Training slides: ``Bag`` (in memory), the split, and the model configuration the features imply."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastinsight.errors import FastInsightError, InputError
from fastinsight.features import FeatureFileInfo
from fastinsight.models.config import InsightConfig


@dataclass(frozen=True)
class Bag:
    """One training slide: its token grids, tissue mask and slide labels.

    Shapes: per-tile model: tokens ``[N, C, h, w]``, mask ``[N, h, w]`` bool or None (all
    tissue); slide-context model: tokens ``[1, C, H, W]`` (a stitched grid), mask ``[1, H, W]``.
    labels ``[K]`` float in {0, 1}.
    """

    tokens: Tensor
    mask: Tensor | None
    labels: Tensor
    slide_id: str = ""


@dataclass(frozen=True)
class _Item:
    """A training slide whose inputs load on demand (cached or read from disk each time)."""

    slide_id: str
    labels: Tensor
    load: Callable[[], tuple[Tensor, Tensor | None]]


def _constant(
    value: tuple[Tensor, Tensor | None],
) -> Callable[[], tuple[Tensor, Tensor | None]]:
    """A loader of inputs already in memory."""
    return lambda: value


def _as_labels(label: Any, k: int | None, where: str) -> Tensor:
    t = torch.as_tensor(label, dtype=torch.float32).reshape(-1)
    if k is not None and t.numel() != k:
        raise InputError(f"{where}: {t.numel()} labels, the model has {k} classes")
    if not bool(((t == 0) | (t == 1)).all()):
        raise InputError(f"{where}: labels must be 0 or 1, got {t.tolist()}")
    return t


def stratified_split(
    ids: Sequence[str], labels: Sequence[Sequence[int]], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Seeded split stratified by label pattern; each stratum keeps at least one train slide.

    Strata of one slide go to training. When rounding leaves validation empty although
    ``val_fraction > 0``, the largest stratum of at least two slides gives one; when every
    stratum is a single slide, validation stays empty (taking the only slide of a label pattern
    would leave training without it: with one positive and one negative slide, training would
    see one class).
    """
    if val_fraction <= 0 or len(ids) < 2:
        return list(ids), []
    rng = np.random.default_rng(seed)
    strata: dict[tuple[int, ...], list[str]] = {}
    for sid, lab in zip(ids, labels, strict=True):
        strata.setdefault(tuple(int(v) for v in lab), []).append(sid)
    val: list[str] = []
    for key in sorted(strata):
        members = sorted(strata[key])
        rng.shuffle(members)
        n_val = min(len(members) - 1, int(math.floor(val_fraction * len(members) + 0.5)))
        val += members[: max(0, n_val)]
    spare = [key for key in sorted(strata) if len(strata[key]) >= 2]
    if not val and spare:
        biggest = max(spare, key=lambda k: len(strata[k]))
        members = sorted(strata[biggest])
        val = [members[int(rng.integers(len(members)))]]
    val_set = set(val)
    train = [s for s in ids if s not in val_set]
    return train, [s for s in ids if s in val_set]


def require_both_classes(
    labels: Mapping[str, Sequence[int]],
    class_names: Sequence[str],
    what: str,
    hint: str,
) -> None:
    """Every class needs a positive and a negative slide among ``labels`` (slide id -> 0/1 per
    class), else ``InputError``: a slide-level loss of one label value trains nothing useful.

    ``what`` names the slides (``"training slides"``); ``hint`` says what to change. Checked on
    the training split itself: a split column or a stratified split can leave the training slides
    one-sided although the cohort has both.
    """
    for k, name in enumerate(class_names):
        column = [int(v[k]) for v in labels.values()]
        if len(column) < 2 or min(column) == max(column):
            side = "positive" if column and column[0] else "negative"
            raise InputError(
                f"class {name!r}: the {len(column)} {what} are all {side}; slide-level training "
                f"needs at least one positive and one negative training slide per class: {hint}"
            )


def check_encoder_dim(encoder: str, in_dim: int) -> None:
    """Refuse features whose dimension is not what the named registry encoder produces.

    The model records ``encoder``; ``predict`` on a slide builds that encoder and its tokens
    must have ``in_dim`` channels. A mismatch (``--encoder vit-tiny``, 64 channels, on 16-channel
    features) trains and saves a model no slide can be predicted with. Names outside the
    registry (TRIDENT's ``uni_v1``, ``timm:``/``torchscript:`` encoders, free text) are not
    checked: their dimension is unknown without their files. The encoder is built on the meta
    device (no memory, no weights) to read its ``embed_dim``.
    """
    from fastinsight.encoders import build_encoder, list_encoders

    key = encoder.strip().lower().replace("_", "-")
    if key not in list_encoders():
        return
    try:
        dim = int(build_encoder(key, device="meta").embed_dim)
    except FastInsightError:
        return  # cannot be built here: nothing to compare with
    if dim != in_dim:
        raise InputError(
            f"encoder {encoder!r} gives {dim}-channel tokens but the feature files hold "
            f"{in_dim}-channel features; a model recording {encoder!r} could not predict any "
            "slide: pass the --encoder that made the features"
        )


def _consistent(values: Mapping[str, Any], what: str, flag: str) -> Any:
    distinct = sorted({v for v in values.values() if v is not None}, key=str)
    if len(distinct) > 1:
        first = {v: next(s for s, x in values.items() if x == v) for v in distinct}
        shown = ", ".join(f"{v!r} ({s})" for v, s in list(first.items())[:3])
        raise InputError(
            f"feature files disagree on the {what}: {shown}; train on features of one "
            f"extraction, or pass {flag}"
        )
    return distinct[0] if distinct else None


def build_model_config(
    infos: Mapping[str, FeatureFileInfo],
    class_names: Sequence[str],
    *,
    encoder: str | None = None,
    tile_size_px: int | None = None,
    mpp: float | None = None,
    model_options: Mapping[str, Any] | None = None,
) -> InsightConfig:
    """The model's configuration from the features (C, grid, what the files record), the
    classes and the user's options.

    Token grids default to the official per-tile model (``norm="tile"``, ``context="tile"``);
    per-tile vectors to the grid-agnostic slide-context model (``norm="channel"``,
    ``context="slide"``: the context branch sees neighbouring tiles of the stitched grid).
    """
    in_dims = {s: i.in_dim for s, i in infos.items()}
    grids = {s: i.grid_size for s, i in infos.items()}
    in_dim = _consistent(in_dims, "feature dimension", "features of one encoder")
    grid = _consistent(grids, "token grid size", "features of one encoder")
    file_encoder = _consistent({s: i.encoder for s, i in infos.items()}, "encoder", "--encoder")
    file_tile = _consistent(
        {s: i.geometry.tile_size_px for s, i in infos.items()}, "tile size", "--tile-size"
    )
    file_mpp = _consistent({s: i.geometry.mpp for s, i in infos.items()}, "magnification", "--mpp")
    enc = encoder or file_encoder
    tile = tile_size_px or file_tile
    res = mpp or file_mpp
    missing = [
        flag for flag, v in (("--encoder", enc), ("--tile-size", tile), ("--mpp", res)) if v is None
    ]
    if missing:
        raise InputError(
            "the feature files do not record the "
            + ", ".join(m.lstrip("-") for m in missing)
            + " the model must carry (only TRIDENT records them); pass "
            + " ".join(missing)
        )
    check_encoder_dim(str(enc), int(in_dim))
    vector = grid == (1, 1)
    base: dict[str, Any] = {
        "in_dim": int(in_dim),
        "num_classes": len(class_names),
        "grid_size": tuple(grid),
        "class_names": tuple(class_names),
        "norm": "channel" if vector else "tile",
        "context": "slide" if vector else "tile",
        "encoder": str(enc),
        "tile_size_px": int(tile),  # type: ignore[arg-type]
        "patch_size_px": max(1, int(tile) // int(grid[1])),  # type: ignore[arg-type]
        "target_mpp": float(res),  # type: ignore[arg-type]
    }
    opts = dict(model_options or {})
    fixed = sorted(set(opts) & {"in_dim", "num_classes", "grid_size", "class_names"})
    if fixed:
        raise InputError(f"model options {fixed} come from the data and the labels; drop them")
    unknown = sorted(set(opts) - {f.name for f in dataclasses.fields(InsightConfig)})
    if unknown:
        raise InputError(f"unknown model options {unknown}")
    base.update({k: v for k, v in opts.items() if v is not None})
    if base["context"] == "slide" and "norm" not in opts:
        base["norm"] = "channel"
    return InsightConfig(**base)


def items_from_bags(
    bags: Sequence[Bag | tuple[Tensor, Tensor | None, Any]], k: int, prefix: str
) -> list[_Item]:
    """In-memory training slides from ``Bag`` or ``(tokens, mask, label)`` tuples; slides without
    an id are named ``<prefix><index>``."""
    out = []
    for i, b in enumerate(bags):
        bag = b if isinstance(b, Bag) else Bag(b[0], b[1], torch.as_tensor(b[2]))
        sid = bag.slide_id or f"{prefix}{i:05d}"
        labels = _as_labels(bag.labels, k, f"bag {sid}")
        out.append(_Item(sid, labels, _constant((bag.tokens, bag.mask))))
    return out
