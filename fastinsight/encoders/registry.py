"""Encoders by name: ``build_encoder("uni", weights="pytorch_model.bin")``.

| name                 | architecture                                   | grid (native tile)   | weights     |
| -------------------- | ---------------------------------------------- | -------------------- | ----------- |
| ``uni``              | ViT-L/16 (timm vit_large_patch16_224)          | 1024 x 14 x 14, 224  | local file  |
| ``uni2-h``           | ViT-H/14 SwiGLU, 8 registers                   | 1536 x 16 x 16, 224  | local file  |
| ``virchow2``         | ViT-H/14 SwiGLU, 4 registers                   | 1280 x 16 x 16, 224  | local file  |
| ``h-optimus-0``/``1``| ViT-g/14, 4 registers                          | 1536 x 16 x 16, 224  | local file  |
| ``prov-gigapath``    | ViT-g, patch 16                                | 1536 x 14 x 14, 224  | local file  |
| ``dinov2-vitl14-reg4``| DINOv2 ViT-L/14, 4 registers, no mean/std     | 1024 x 37 x 37, 518  | local file  |
| ``vit-tiny``         | ViT D=64, depth 2, 4 heads, patch 16           | 64 x 14 x 14, 224    | seeded init |
| ``dinov2-tiny``      | ViT D=64, depth 2, patch 14, 4 registers       | 64 x 37 x 37, 518    | seeded init |
| ``resnet50-trunc``   | ResNet-50 to layer3 (CLAM)                     | 1024 x 14 x 14, 224  | local file  |
| ``resnet-tiny``      | ResNet width 8, 1-1-1 blocks                   | 128 x 14 x 14, 224   | seeded init |
| ``timm:NAME``        | any timm architecture (``timm_kwargs``)        | read off the model   | local file  |
| ``torchscript:P``    | the TorchScript module in file ``P``           | read off output      | the file    |

The pretrained entries and their model-card constructors are in :mod:`fastinsight.encoders.models`.
Nothing is downloaded: a pretrained encoder without a local weight file is an error that says
which file to fetch and where to pass it. On CUDA, encoders are built with bf16 weights unless a
``dtype`` is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from fastinsight.encoders.base import Encoder, check_device
from fastinsight.encoders.models import IDENTITY_MEAN, IDENTITY_STD, SPECS, ModelSpec
from fastinsight.encoders.resnet import ResNetTruncConfig, ResNetTruncEncoder
from fastinsight.encoders.torchscript import TorchScriptEncoder
from fastinsight.encoders.vit import TimmEncoder, ViTConfig, ViTEncoder
from fastinsight.encoders.weights import PathLike
from fastinsight.errors import CheckpointError, ConfigError

UNI_WEIGHTS_HINT = SPECS["uni"].weights_hint
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
# A small random DINOv2-style ViT for CT tests and demos: patch 14, 4 registers, position
# embedding on patch tokens only, no input normalisation (as dinov2-vitl14-reg4).
DINOV2_TINY_CONFIG = ViTConfig(
    embed_dim=64,
    depth=2,
    num_heads=4,
    patch_size_px=14,
    tile_size_px=518,
    pos_embed_grid=37,
    reg_tokens=4,
    no_embed_class=True,
    timm_model="vit_small_patch14_reg4_dinov2",
)

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


def build_from_spec(
    spec: ModelSpec,
    weights: PathLike | None = None,
    *,
    tile_size_px: int | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    depth: int | None = None,
    **kw: Any,
) -> TimmEncoder:
    """Build a pretrained entry from its model-card constructor (``random_init`` not checked).

    ``depth`` builds a depth-reduced copy with the same widths and options (tests of the
    ViT-g/ViT-H entries, which are too big to instantiate in CI).
    """
    kwargs = spec.resolved_kwargs()
    if depth is not None:
        kwargs["depth"] = int(depth)
    kw.setdefault("mean", spec.mean)
    kw.setdefault("std", spec.std)
    return TimmEncoder(
        spec.timm_name,
        kwargs,
        tile_size_px=_tile_for(tile_size_px, spec.tile_size_px),
        name=spec.name,
        weights=weights,
        device=device,
        dtype=dtype,
        arch=_arch(spec),
        weights_hint=spec.weights_hint,
        snapshot_archs=spec.snapshot_archs,
        **kw,
    )


def _spec_builder(spec: ModelSpec) -> Callable[..., Encoder]:
    """The builder of one pretrained entry: its model-card timm constructor, weights from a file."""

    def build(
        weights: PathLike | None,
        tile_size_px: int | None,
        device: torch.device | None,
        dtype: torch.dtype | None,
        random_init: bool = False,
        **kw: Any,
    ) -> Encoder:
        if weights is None and not random_init and (device is None or device.type != "meta"):
            raise _missing_weights(spec.name, spec.weights_hint, random_ok=True)
        return build_from_spec(
            spec, weights, tile_size_px=tile_size_px, device=device, dtype=dtype, **kw
        )

    return build


def _arch(spec: ModelSpec) -> str:
    if spec.name == "uni":
        return UNI_ARCH
    return f"{spec.title} (timm {spec.timm_name})"


def _build_timm(
    timm_name: str,
    weights: PathLike | None,
    tile_size_px: int | None,
    device: torch.device | None,
    dtype: torch.dtype | None,
    random_init: bool = False,
    timm_kwargs: dict[str, Any] | None = None,
    patch_size_px: int | None = None,
    **kw: Any,
) -> Encoder:
    label = f"timm:{timm_name}"
    if tile_size_px is None:
        raise ConfigError(
            f"encoder {label!r} needs the tile size its model takes; pass --tile-size "
            "(tile_size_px=...)"
        )
    if weights is None and not random_init and (device is None or device.type != "meta"):
        raise CheckpointError(
            f"encoder {label!r} needs a local weight file in timm's layout and none was given "
            "(nothing is downloaded); pass it with --encoder-weights PATH (weights=PATH), or "
            "random_init=True for an untrained encoder (benchmarks only)"
        )
    return TimmEncoder(
        timm_name,
        dict(timm_kwargs or {}),
        tile_size_px=int(tile_size_px),
        name=label,
        weights=weights,
        device=device,
        dtype=dtype,
        patch_size_px=patch_size_px,
        weights_hint=f"a {timm_name} weight file in timm's layout",
        snapshot_archs=(timm_name,),
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


def _build_dinov2_tiny(
    weights: PathLike | None,
    tile_size_px: int | None,
    device: torch.device | None,
    dtype: torch.dtype | None,
    **kw: Any,
) -> Encoder:
    arch_keys = ("embed_dim", "depth", "num_heads", "mlp_ratio", "reg_tokens")
    overrides = {k: kw.pop(k) for k in arch_keys if k in kw}
    base = dataclasses.replace(DINOV2_TINY_CONFIG, **overrides)
    tile = _tile_for(tile_size_px, base.tile_size_px)
    if tile < base.patch_size_px or tile % base.patch_size_px:
        raise ConfigError(
            f"encoder 'dinov2-tiny' takes tiles that are a multiple of 14 px (518 for CT, 70 for "
            f"tests), found {tile}; pass such a tile size"
        )
    # Random-init: the position embedding is made for the grid it runs on, (tile / 14)^2 cells.
    cfg = dataclasses.replace(base, tile_size_px=tile, pos_embed_grid=tile // base.patch_size_px)
    kw.setdefault("mean", IDENTITY_MEAN)
    kw.setdefault("std", IDENTITY_STD)
    return ViTEncoder(cfg, name="dinov2-tiny", weights=weights, device=device, dtype=dtype, **kw)


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


_TINY_VIT_OPTIONS = (*_COMMON, "embed_dim", "depth", "num_heads", "mlp_ratio")

_REGISTRY: dict[str, EncoderEntry] = {
    e.name: e
    for e in (
        *(
            EncoderEntry(
                spec.name,
                f"{spec.title}: {spec.embed_dim} x {spec.grid} x {spec.grid} on "
                f"{spec.tile_size_px} px; needs {spec.weights_hint.split(' (')[0]}",
                True,
                (*_COMMON, "random_init"),
                _spec_builder(spec),
            )
            for spec in SPECS.values()
        ),
        EncoderEntry(
            "vit-tiny",
            "small random-init ViT (64 x 14 x 14 on 224 px), seeded; tests and demos",
            False,
            (*_TINY_VIT_OPTIONS, "patch_size_px", "init_values"),
            _build_vit_tiny,
        ),
        EncoderEntry(
            "dinov2-tiny",
            "small random-init DINOv2-style ViT (patch 14, 4 registers, no mean/std; 64 x "
            "(tile/14)^2, 518 px by default), seeded; CT tests and demos",
            False,
            (*_TINY_VIT_OPTIONS, "reg_tokens"),
            _build_dinov2_tiny,
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
_TIMM = "timm"
_TIMM_OPTIONS = (*_COMMON, "random_init", "timm_kwargs", "patch_size_px")
_TORCHSCRIPT = "torchscript"
_TORCHSCRIPT_OPTIONS = ("patch_size_px", "mean", "std", "autocast", "name")


def list_encoders() -> list[str]:
    """Names ``build_encoder`` accepts (``torchscript:<path>`` takes a file path)."""
    return [*_REGISTRY, f"{_TIMM}:<name>", f"{_TORCHSCRIPT}:<path>"]


def describe_encoders() -> dict[str, str]:
    """One line per registry name, for ``--help`` and error messages."""
    out = {name: e.description for name, e in _REGISTRY.items()}
    out[f"{_TIMM}:<name>"] = (
        "any timm architecture; give tile_size_px and timm_kwargs (weights in timm's layout)"
    )
    out[f"{_TORCHSCRIPT}:<path>"] = (
        "any TorchScript module; give tile_size_px (and patch_size_px, mean, std)"
    )
    return out


def _check_options(name: str, kw: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for key in kw:
        if key not in allowed:
            raise ConfigError(
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
    ``.pth``, DINOv2's torch-hub ``.pth``, a ``.safetensors`` written by ``encoder.save_weights``)
    or a Hugging Face hub snapshot folder (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``). Options in ``kw``:
    ``seed`` (random-init variants, default 0), ``random_init`` (``uni``/``resnet50-trunc``
    without weights, for benchmarks), ``mean``/``std``, ``autocast`` (bf16 on CUDA, default on),
    architecture overrides of the tiny variants, for ``timm:<name>`` ``timm_kwargs`` (a dict for
    ``timm.create_model``) and ``patch_size_px``, and for ``torchscript:<path>``
    ``patch_size_px`` and ``name``. On CUDA the default ``dtype`` is bf16.

    ``device="meta"`` builds the architecture without memory or weights (to inspect key tables).

    Raises ConfigError (unknown name or option), CheckpointError (missing or foreign weight file),
    BackendError (CUDA asked for but absent).
    """
    dev = check_device(device)
    raw = name.strip()
    low = raw.lower()
    if low == _TORCHSCRIPT or low.startswith(_TORCHSCRIPT + ":"):
        path = raw[len(_TORCHSCRIPT) + 1 :] if ":" in raw else None
        if path and weights is not None:
            raise ConfigError(
                f"encoder {raw!r} names its file and weights={str(weights)!r} names another; "
                "pass the TorchScript file once"
            )
        path = path or (str(weights) if weights is not None else None)
        if not path:
            raise ConfigError("encoder 'torchscript' needs a file; pass --encoder torchscript:PATH")
        if tile_size_px is None:
            raise ConfigError(
                f"encoder {raw!r} needs the tile size its module takes; pass --tile-size "
                "(tile_size_px=...), and patch_size_px=... if the output grid is not square"
            )
        _check_options(raw, kw, _TORCHSCRIPT_OPTIONS)
        return TorchScriptEncoder(path, tile_size_px=tile_size_px, device=dev, dtype=dtype, **kw)
    if low.startswith(_TIMM + ":"):
        timm_name = raw[len(_TIMM) + 1 :].strip()
        if not timm_name:
            raise ConfigError("encoder 'timm:' needs an architecture; pass timm:NAME")
        _check_options(raw, kw, _TIMM_OPTIONS)
        dtype = _default_dtype(dev, dtype)
        return _build_timm(timm_name, weights, tile_size_px, dev, dtype, **kw)
    key = low.replace("_", "-")
    entry = _REGISTRY.get(key)
    if entry is None:
        raise ConfigError(f"unknown encoder {raw!r}; expected one of: {', '.join(list_encoders())}")
    _check_options(entry.name, kw, entry.options)
    if kw.get("random_init") and weights is not None:
        raise ConfigError(
            f"encoder {entry.name!r}: random_init=True and a weights file were both given; "
            "pass one of them"
        )
    return entry.build(weights, tile_size_px, dev, _default_dtype(dev, dtype), **kw)


def _default_dtype(device: torch.device | None, dtype: torch.dtype | None) -> torch.dtype | None:
    """bf16 weights on CUDA unless asked otherwise: a bf16 residual stream, not fp32 + autocast."""
    if dtype is None and device is not None and device.type == "cuda":
        return torch.bfloat16
    return dtype


def get_spec(name: str) -> ModelSpec | None:
    """The model-card record of a pretrained registry name, or None."""
    return SPECS.get(name.strip().lower().replace("_", "-"))
