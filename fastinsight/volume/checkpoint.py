"""Volume models on disk: fastinsight's safetensors checkpoint plus the CT recipe it was trained on.

The file is the one ``fastinsight.models.checkpoints.save_model`` writes (config JSON under
``fastinsight.config``) with one more metadata key, ``fastinsight.volume``: the slice context
(2d / 3d), the encoder (name and options) and the preprocessing (tile size, HU window, slice
selection, lung mask). A 2-D volume model is an ordinary INSIGHT checkpoint as well
(``fastinsight info`` reads it). An official ``.pth`` (no metadata) loads with the official CT
recipe: DINOv2 ViT-L/14-reg4 at 518 px, middle 32 slices.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastinsight.atomic import atomic_path
from fastinsight.errors import CheckpointError, ConfigError
from fastinsight.models.checkpoints import (
    CONFIG_KEY,
    FORMAT_KEY,
    FORMAT_VERSION,
    check_model_path,
    load_model,
    load_state_strict,
    sniff_format,
)
from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel
from fastinsight.text import loads_json
from fastinsight.volume.model import CrossSliceInsight, slice_context_of
from fastinsight.volume.preprocess import PreprocessOptions

VOLUME_KEY = "fastinsight.volume"
OFFICIAL_CT_ENCODER = "dinov2-vitl14-reg4"


@dataclass(frozen=True)
class VolumeModelInfo:
    """How a volume model's token grids are made (everything but the head's own config)."""

    slice_context: str = "2d"
    encoder: str = OFFICIAL_CT_ENCODER
    encoder_options: dict[str, Any] = field(default_factory=dict)
    tile_size: int = 518
    window: tuple[float, float] = (-1000.0, 400.0)
    slices: str = "middle32"
    lung_mask: str = "none"

    def preprocess(self, **changes: Any) -> PreprocessOptions:
        base = PreprocessOptions(
            tile_size=self.tile_size,
            window=self.window,
            slices=self.slices,
            lung_mask=self.lung_mask,
        )
        return dataclasses.replace(base, **changes) if changes else base

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VolumeModelInfo:
        try:
            raw = loads_json(text)
            if not isinstance(raw, dict):
                raise TypeError(f"expected a JSON object, got {type(raw).__name__}")
            raw["window"] = tuple(raw.get("window", (-1000.0, 400.0)))
            info = cls(**raw)
            info.preprocess()  # its recipe is checked here: a file's problem, not the user's
            return info
        except (ValueError, TypeError, ConfigError) as exc:
            raise CheckpointError(f"bad {VOLUME_KEY} metadata in the model file: {exc}") from exc


def save_volume_model(
    model: InsightModel, info: VolumeModelInfo, path: str | os.PathLike[str]
) -> None:
    """Write the head and its CT recipe as safetensors (atomically)."""
    from safetensors.torch import save_file

    info = dataclasses.replace(info, slice_context=slice_context_of(model))
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
    }
    meta = {
        CONFIG_KEY: model.config.to_json(),
        FORMAT_KEY: FORMAT_VERSION,
        VOLUME_KEY: info.to_json(),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def load_volume_model(
    path: str | os.PathLike[str], device: str | torch.device | None = None, backend: str = "auto"
) -> tuple[InsightModel, VolumeModelInfo]:
    """A volume model and its recipe; official ``.pth`` files get the official CT recipe.

    A ``path`` that is not a path (None, a loaded model) is a ConfigError. Loading leaves the
    caller's torch random generator as it was (``torch.random.fork_rng``)."""
    check_model_path(path, "load_volume_model")
    p = Path(path).expanduser()
    fmt = sniff_format(p)
    from fastinsight.inputs import resolve_device

    dev = resolve_device(device)
    if fmt != "safetensors":
        official = load_model(p, backend=backend, device=dev)
        return official, VolumeModelInfo(tile_size=official.config.grid_size[0] * 14)
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:
        raise CheckpointError(f"cannot read safetensors file {str(p)!r}: {exc}") from exc
    if CONFIG_KEY not in meta:
        raise CheckpointError(
            f"{str(p)!r} is a safetensors file without a fastinsight config; it was not written "
            "by fastinsight"
        )
    config = InsightConfig.from_json(meta[CONFIG_KEY], source=str(p))
    if VOLUME_KEY in meta:
        info = VolumeModelInfo.from_json(meta[VOLUME_KEY])
    else:  # a slide model: usable on CT only with an explicit encoder; keep its tile geometry
        info = VolumeModelInfo(encoder=config.encoder, tile_size=config.tile_size_px, slices="all")
    model: InsightModel
    with torch.random.fork_rng(
        devices=[]
    ):  # the random init is overwritten: it must not draw the caller's
        if info.slice_context == "3d":
            model = CrossSliceInsight(config)
        else:
            model = InsightModel(config, backend=backend)
    load_state_strict(model, state, str(p))
    return model.to(dev).eval(), info


def recipe_encoder(path: str | os.PathLike[str]) -> str:
    """The encoder a model's CT recipe names: a volume model's ``VolumeModelInfo.encoder``, or
    the official recipe's for any other model file (an official ``.pth``). Reads only the header,
    so flags that depend on the encoder are checked before any weights are read."""
    p = Path(path).expanduser()
    if not is_volume_model(p):
        return OFFICIAL_CT_ENCODER
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as fh:
        return VolumeModelInfo.from_json((fh.metadata() or {})[VOLUME_KEY]).encoder


def is_volume_model(path: str | os.PathLike[str]) -> bool:
    """True for a safetensors model written by ``save_volume_model`` (the CT recipe inside).

    For dispatch from a generic ``predict``: reads only the header.
    """
    p = Path(path).expanduser()
    try:
        if sniff_format(p) != "safetensors":
            return False
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            return VOLUME_KEY in (fh.metadata() or {})
    except Exception:  # unreadable: let the real loader give the clear error
        return False
