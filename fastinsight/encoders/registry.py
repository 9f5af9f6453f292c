"""Encoders by name: ``build_encoder("uni", weights="pytorch_model.bin")``.

| name               | architecture                          | grid on 224 px  | weights                   |
| ------------------ | ------------------------------------- | --------------- | ------------------------- |
| ``uni``            | ViT-L/16, timm layout (UNI)           | 1024 x 14 x 14  | required (local file)     |
| ``vit-tiny``       | ViT D=64, depth 2, 4 heads, patch 16  | 64 x 14 x 14    | seeded random init        |
| ``resnet50-trunc`` | ResNet-50 to layer3 (CLAM)            | 1024 x 14 x 14  | required, or random_init  |
| ``resnet-tiny``    | ResNet width 8, 1-1-1 blocks          | 128 x 14 x 14   | seeded random init        |
| ``torchscript:P``  | the TorchScript module in file ``P``  | read off output | the file itself           |

Nothing is downloaded: a pretrained encoder without a local weight file is an error that says
which file to fetch and where to pass it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from fastinsight.encoders.base import Encoder, check_device
from fastinsight.encoders.resnet import ResNetTruncConfig, ResNetTruncEncoder
from fastinsight.encoders.torchscript import TorchScriptEncoder
from fastinsight.encoders.vit import ViTConfig, ViTEncoder
from fastinsight.encoders.weights import PathLike
from fastinsight.errors import CheckpointError, InputError

UNI_WEIGHTS_HINT = (
    "UNI's pytorch_model.bin (Hugging Face repo MahmoodLab/UNI; gated: log in and accept its terms)"
)
RESNET50_WEIGHTS_HINT = (
    "torchvision's ImageNet ResNet-50 weights resnet50-0676ba61.pth (IMAGENET1K_V1, "
    "https://download.pytorch.org/models/resnet50-0676ba61.pth; CLAM's older "
    "resnet50-19c8e357.pth is read as well)"
)
UNI_ARCH = "UNI ViT-L/16 (timm vit_large_patch16_224, init_values=1e-5, num_classes=0)"
RESNET50_ARCH = "ResNet-50 truncated after layer3 (CLAM resnet50_trunc, torchvision layout)"

VIT_TINY_CONFIG = ViTConfig(
    embed_dim=64, depth=2, num_heads=4, patch_size_px=16, tile_size_px=224, pos_embed_grid=14
)
RESNET_TINY_CONFIG = ResNetTruncConfig(layers=(1, 1, 1), width=8)

_COMMON = ("seed", "mean", "std", "autocast")


@dataclasses.dataclass(frozen=True)
class EncoderEntry:
    """One registry name: what it builds and whether it needs a weight file."""

    name: str
    description: str
    needs_weights: bool
    options: tuple[str, ...]
    build: Callable[..., Encoder]


def _missing_weights(name: str, hint: str, random_ok: bool) -> CheckpointError:
    alt = (
        "; or, from Python, build_encoder(..., random_init=True) for an untrained encoder "
        "(benchmarks only)"
        if random_ok
        else ""
    )
    return CheckpointError(
        f"encoder {name!r} needs pretrained weights and none were given (nothing is downloaded); "
        f"fetch {hint} and pass it with --encoder-weights PATH (weights=PATH){alt}"
    )


def _tile_for(tile_size_px: int | None, default: int) -> int:
    return default if tile_size_px is None else int(tile_size_px)


def _build_uni(
    weights: PathLike | None,
    tile_size_px: int | None,
    device: torch.device | None,
    dtype: torch.dtype | None,
    random_init: bool = False,
    **kw: Any,
) -> Encoder:
    if weights is None and not random_init and (device is None or device.type != "meta"):
        raise _missing_weights("uni", UNI_WEIGHTS_HINT, random_ok=True)
    cfg = dataclasses.replace(ViTConfig(), tile_size_px=_tile_for(tile_size_px, 224))
    return ViTEncoder(
        cfg,
        name="uni",
        weights=weights,
        device=device,
        dtype=dtype,
        arch=UNI_ARCH,
        weights_hint=UNI_WEIGHTS_HINT,
        **kw,
    )


def _build_vit_tiny(
    weights: PathLike | None,
    tile_size_px: int | None,
    device: torch.device | None,
    dtype: torch.dtype | None,
    **kw: Any,
) -> Encoder:
    arch_keys = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size_px", "init_values")
    overrides = {k: kw.pop(k) for k in arch_keys if k in kw}
    base = dataclasses.replace(VIT_TINY_CONFIG, **overrides)
    tile = _tile_for(tile_size_px, 224)
    # The tiny variant is random-init: its position embedding is made for the grid it runs on.
    grid = max(1, tile // base.patch_size_px)
    cfg = dataclasses.replace(base, tile_size_px=tile, pos_embed_grid=grid)
    return ViTEncoder(cfg, name="vit-tiny", weights=weights, device=device, dtype=dtype, **kw)


def _build_resnet50(
    weights: PathLike | None,
    tile_size_px: int | None,
    device: torch.device | None,
    dtype: torch.dtype | None,
    random_init: bool = False,
    **kw: Any,
) -> Encoder:
    if weights is None and not random_init and (device is None or device.type != "meta"):
        raise _missing_weights("resnet50-trunc", RESNET50_WEIGHTS_HINT, random_ok=True)
    cfg = ResNetTruncConfig(tile_size_px=_tile_for(tile_size_px, 224))
    return ResNetTruncEncoder(
        cfg,
        name="resnet50-trunc",
        weights=weights,
        device=device,
        dtype=dtype,
        arch=RESNET50_ARCH,
        weights_hint=RESNET50_WEIGHTS_HINT,
        **kw,
    )


def _build_resnet_tiny(
    weights: PathLike | None,
    tile_size_px: int | None,
    device: torch.device | None,
    dtype: torch.dtype | None,
    **kw: Any,
) -> Encoder:
    overrides = {k: kw.pop(k) for k in ("layers", "width") if k in kw}
    if "layers" in overrides:
        overrides["layers"] = tuple(overrides["layers"])
    cfg = dataclasses.replace(
        RESNET_TINY_CONFIG, tile_size_px=_tile_for(tile_size_px, 224), **overrides
    )
    return ResNetTruncEncoder(
        cfg, name="resnet-tiny", weights=weights, device=device, dtype=dtype, **kw
    )


_REGISTRY: dict[str, EncoderEntry] = {
    e.name: e
    for e in (
        EncoderEntry(
            "uni",
            "UNI ViT-L/16 (1024 x 14 x 14 on 224 px); needs UNI's pytorch_model.bin",
            True,
            (*_COMMON, "random_init"),
            _build_uni,
        ),
        EncoderEntry(
            "vit-tiny",
            "small random-init ViT (64 x 14 x 14 on 224 px), seeded; tests and demos",
            False,
            (
                *_COMMON,
                "embed_dim",
                "depth",
                "num_heads",
                "mlp_ratio",
                "patch_size_px",
                "init_values",
            ),
            _build_vit_tiny,
        ),
        EncoderEntry(
            "resnet50-trunc",
            "CLAM ResNet-50 to layer3 (1024 x 14 x 14 on 224 px); needs torchvision's weights",
            True,
            (*_COMMON, "random_init"),
            _build_resnet50,
        ),
        EncoderEntry(
            "resnet-tiny",
            "small random-init ResNet to layer3 (128 x 14 x 14 on 224 px), seeded; tests",
            False,
            (*_COMMON, "layers", "width"),
            _build_resnet_tiny,
        ),
    )
}
_TORCHSCRIPT = "torchscript"
_TORCHSCRIPT_OPTIONS = ("patch_size_px", "mean", "std", "autocast", "name")


def list_encoders() -> list[str]:
    """Names ``build_encoder`` accepts (``torchscript:<path>`` takes a file path)."""
    return [*_REGISTRY, f"{_TORCHSCRIPT}:<path>"]


def describe_encoders() -> dict[str, str]:
    """One line per registry name, for ``--help`` and error messages."""
    out = {name: e.description for name, e in _REGISTRY.items()}
    out[f"{_TORCHSCRIPT}:<path>"] = (
        "any TorchScript module; give tile_size_px (and patch_size_px, mean, std)"
    )
    return out


def _check_options(name: str, kw: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for key in kw:
        if key not in allowed:
            raise InputError(
                f"unknown option {key!r} for encoder {name!r}; accepted options: "
                f"{', '.join(allowed)}"
            )


def build_encoder(
    name: str,
    weights: PathLike | None = None,
    *,
    tile_size_px: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **kw: Any,
) -> Encoder:
    """Build an encoder by registry name, in eval mode, on ``device`` (default CPU).

    ``weights`` is a local weight file (UNI's ``pytorch_model.bin``, torchvision's ResNet-50
    ``.pth``, or a ``.safetensors`` written by ``encoder.save_weights``). Options in ``kw``:
    ``seed`` (random-init variants, default 0), ``random_init`` (``uni``/``resnet50-trunc``
    without weights, for benchmarks), ``mean``/``std``, ``autocast`` (bf16 on CUDA, default on),
    architecture overrides of the tiny variants, and for ``torchscript:<path>``
    ``patch_size_px`` and ``name``.

    ``device="meta"`` builds the architecture without memory or weights (to inspect key tables).

    Raises InputError (unknown name or option), CheckpointError (missing or foreign weight file),
    BackendError (CUDA asked for but absent).
    """
    dev = check_device(device)
    raw = name.strip()
    low = raw.lower()
    if low == _TORCHSCRIPT or low.startswith(_TORCHSCRIPT + ":"):
        path = raw[len(_TORCHSCRIPT) + 1 :] if ":" in raw else None
        if path and weights is not None:
            raise InputError(
                f"encoder {raw!r} names its file and weights={str(weights)!r} names another; "
                "pass the TorchScript file once"
            )
        path = path or (str(weights) if weights is not None else None)
        if not path:
            raise InputError("encoder 'torchscript' needs a file; pass --encoder torchscript:PATH")
        if tile_size_px is None:
            raise InputError(
                f"encoder {raw!r} needs the tile size its module takes; pass --tile-size "
                "(tile_size_px=...), and --patch-size if the output grid is not square"
            )
        _check_options(raw, kw, _TORCHSCRIPT_OPTIONS)
        return TorchScriptEncoder(path, tile_size_px=tile_size_px, device=dev, dtype=dtype, **kw)
    key = low.replace("_", "-")
    entry = _REGISTRY.get(key)
    if entry is None:
        raise InputError(f"unknown encoder {raw!r}; expected one of: {', '.join(list_encoders())}")
    _check_options(entry.name, kw, entry.options)
    if kw.get("random_init") and weights is not None:
        raise InputError(
            f"encoder {entry.name!r}: random_init=True and a weights file were both given; "
            "pass one of them"
        )
    return entry.build(weights, tile_size_px, dev, dtype, **kw)
