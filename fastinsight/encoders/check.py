"""What ``fastinsight encoders list`` and ``fastinsight encoders check`` report (argparse-free).

- :func:`encoder_table`: one row per registry name (architecture, tile, patch, grid, width, prefix
  tokens, mean/std, the weight file to fetch).
- :func:`check_encoder`: load an encoder from its weight file, run one tile, and report the grid,
  the width, the token dtype and the file's SHA-256, so a user knows the file is the right one
  before a slide run.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fastinsight.encoders.models import IDENTITY_MEAN, IDENTITY_STD, SPECS
from fastinsight.encoders.registry import build_encoder, describe_encoders
from fastinsight.encoders.weights import PathLike
from fastinsight.errors import CheckpointError

#: Geometry of the random-init and CNN entries (the pretrained ones come from SPECS).
_OTHER_ROWS: dict[str, dict[str, Any]] = {
    "vit-tiny": {
        "arch": "ViT D=64 depth 2 (timm)",
        "tile": 224,
        "patch": 16,
        "dim": 64,
        "prefix": 1,
    },
    "dinov2-tiny": {
        "arch": "ViT D=64 depth 2, 4 registers (timm)",
        "tile": 518,
        "patch": 14,
        "dim": 64,
        "prefix": 5,
        "mean": IDENTITY_MEAN,
        "std": IDENTITY_STD,
    },
    "resnet50-trunc": {"arch": "ResNet-50 to layer3 (CLAM)", "tile": 224, "patch": 16, "dim": 1024},
    "resnet-tiny": {"arch": "ResNet width 8 to layer3", "tile": 224, "patch": 16, "dim": 128},
}


def encoder_table() -> list[dict[str, Any]]:
    """One row per encoder name (JSON-serialisable), pretrained ones first."""
    from fastinsight.encoders.base import IMAGENET_MEAN, IMAGENET_STD

    rows: list[dict[str, Any]] = []
    for name, spec in SPECS.items():
        rows.append(
            {
                "name": name,
                "arch": f"{spec.title} (timm {spec.timm_name})",
                "tile_size_px": spec.tile_size_px,
                "patch_size_px": spec.patch_size_px,
                "grid": [spec.grid, spec.grid],
                "embed_dim": spec.embed_dim,
                "num_prefix_tokens": spec.num_prefix_tokens,
                "mean": list(spec.mean),
                "std": list(spec.std),
                "weights": spec.weights_hint,
            }
        )
    descriptions = describe_encoders()
    for name, row in _OTHER_ROWS.items():
        g = row["tile"] // row["patch"]
        rows.append(
            {
                "name": name,
                "arch": row["arch"],
                "tile_size_px": row["tile"],
                "patch_size_px": row["patch"],
                "grid": [g, g],
                "embed_dim": row["dim"],
                "num_prefix_tokens": row.get("prefix", 0),
                "mean": list(row.get("mean", IMAGENET_MEAN)),
                "std": list(row.get("std", IMAGENET_STD)),
                "weights": descriptions[name],
            }
        )
    for name in ("timm:<name>", "torchscript:<path>"):
        rows.append({"name": name, "arch": descriptions[name]})
    return rows


def check_encoder(
    name: str,
    weights: PathLike | None,
    *,
    tile_size_px: int | None = None,
    device: str | torch.device | None = "cpu",
    **options: Any,
) -> dict[str, Any]:
    """Load ``name`` from ``weights``, encode one tile, and report what came out.

    Returns ``name``, ``arch``, ``weights_file``, ``sha256``, ``tile_size_px``,
    ``patch_size_px``, ``grid`` [h, w], ``embed_dim``, ``num_prefix_tokens``, ``mean``,
    ``std``, ``tokens_shape`` [1, h*w, C], ``tokens_dtype``, ``token_norm_mean`` (the mean L2
    norm of the tokens, a fingerprint of the weights) and ``load_notes``. Never downloads.
    Raises CheckpointError (missing/foreign/corrupt file, non-finite tokens), InputError.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    enc = build_encoder(name, weights, tile_size_px=tile_size_px, device=device, **options)
    t = enc.tile_size_px
    gen = torch.Generator().manual_seed(0)
    tile = torch.randint(0, 256, (1, t, t, 3), dtype=torch.uint8, generator=gen)
    tokens = enc.encode_tokens(tile)
    h, w = enc.grid_size
    if tuple(tokens.shape) != (1, h * w, enc.embed_dim):
        raise CheckpointError(
            f"encoder {enc.name!r} gave tokens of shape {list(tokens.shape)}, expected "
            f"[1, {h * w}, {enc.embed_dim}]; the weights or settings do not fit this encoder"
        )
    if not torch.isfinite(tokens).all():
        raise CheckpointError(
            f"encoder {enc.name!r} gave non-finite tokens with {weights!r}; the file is corrupt "
            "(NaN/Inf weights): fetch it again"
        )
    ident = enc.identity()
    return {
        "name": enc.name,
        "arch": enc.arch,
        "weights_file": enc.weights_path,
        "sha256": enc.weights_sha256 or "random-init",
        "tile_size_px": t,
        "patch_size_px": enc.patch_size_px,
        "grid": [h, w],
        "embed_dim": enc.embed_dim,
        "num_prefix_tokens": ident.get("num_prefix_tokens", 0),
        "mean": list(enc.mean),
        "std": list(enc.std),
        "tokens_shape": list(tokens.shape),
        "tokens_dtype": str(tokens.dtype).removeprefix("torch."),
        "token_norm_mean": float(tokens.float().norm(dim=-1).mean()),
        "device": str(enc.device),
        "load_notes": list(enc.load_notes),
    }
