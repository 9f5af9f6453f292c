"""Which model a prediction runs, and loading it with its identity for reports."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from fastinsight.errors import CheckpointError

MODEL_ENV = "FASTINSIGHT_MODEL"


def resolve_model_path(arg: str | None) -> Path:
    """``arg`` (the --model flag), else $FASTINSIGHT_MODEL, else a CheckpointError saying how."""
    path = arg or os.environ.get(MODEL_ENV)
    if not path:
        raise CheckpointError(
            f"no model given: pass --model PATH or set {MODEL_ENV}; an official INSIGHT .pth or a "
            "fastinsight .safetensors (train one with `fastinsight train`, or run `fastinsight demo`)"
        )
    return Path(path).expanduser()


def load_for_predict(path: Path, backend: str, quiet: bool) -> tuple[Any, dict[str, Any]]:
    """The model on the CPU (the run moves it to its device) and its identity for reports."""
    from fastinsight.models.checkpoints import load_model, model_identity

    model = load_model(path, backend=backend, device="cpu")
    info = model_identity(path)
    info["name"] = path.name
    if info["format"] == "torch" and not quiet and getattr(model, "modality", "") != "radiograph":
        cfg = model.config
        print(
            f"fastinsight: official INSIGHT checkpoint: assuming {cfg.encoder.upper()} tokens "
            f"({cfg.in_dim} x {cfg.grid_size[0]} x {cfg.grid_size[1]}) on {cfg.tile_size_px} px "
            f"tiles at {cfg.target_mpp} um/px",
            file=sys.stderr,
        )
    return model, info
