"""Any TorchScript module as a patch encoder.

The user gives the tile size, and optionally the patch size and the input normalisation
(:class:`TorchScriptOptions`; on the command line ``--patch-size``, ``--mean R G B`` and
``--std R G B``); the module's output layout is found once, at load time, on a dummy batch, and
must be one of:

- ``"grid"``:       ``[B, C, h, w]`` (a CNN feature map), used as is;
- ``"tokens"``:     ``[B, h*w, C]`` (ViT patch tokens, row-major), reshaped to ``[B, C, h, w]``;
- ``"cls+tokens"``: ``[B, 1 + h*w, C]`` (class token first), class token dropped, then reshaped.

With ``patch_size_px`` omitted, the grid side is read off the output (a square number of tokens,
or a square map) and the patch size is ``tile_size_px / side``; with ``mean``/``std`` omitted the
ImageNet statistics are used. ``identity()`` records which of the three the user gave
(``given_options``), so a report or an exported graph tells a stated value from a default.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastinsight.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder
from fastinsight.encoders.weights import PathLike
from fastinsight.errors import CheckpointError, ConfigError, InputError
from fastinsight.fileformat import file_sha256
from fastinsight.quiet import quiet

LAYOUTS: tuple[str, ...] = ("grid", "tokens", "cls+tokens")
_DUMMY_BATCH = 2
PREFIX = "torchscript"
# As InsightConfig's limit on tile and patch sides (fastinsight.models.config.MAX_TILE_PX).
MAX_PATCH_PX = 65_536


def is_torchscript_name(name: str | None) -> bool:
    """``torchscript:PATH`` (or a bare ``torchscript`` with the file given as its weights)."""
    low = (name or "").strip().lower()
    return low == PREFIX or low.startswith(PREFIX + ":")


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _values(value: Any) -> tuple[Any, ...] | None:
    """A sequence's items (a tuple, list or array), or None for anything else."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        return tuple(value)
    except TypeError:
        return None


@dataclass(frozen=True)
class TorchScriptOptions:
    """What a TorchScript module cannot say about itself, as the user states it.

    - ``patch_size_px``: side in tile px of one token-grid cell (None: read off the module's
      output, which must then be a square grid);
    - ``mean``, ``std``: the RGB normalisation ``(x - mean) / std`` of tiles in [0, 1] the module
      was trained with (None: ImageNet's).

    The CLI flags ``--patch-size``, ``--mean R G B`` and ``--std R G B`` map onto it. A bad value
    is a ConfigError naming the field (exit 2), before the module is loaded; whether the patch
    size divides the tile is :meth:`check_tile` (the tile size may come later, from a model).
    """

    patch_size_px: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        fields: list[str] = []
        patch = self.patch_size_px
        if patch is not None and (
            isinstance(patch, bool)
            or not isinstance(patch, numbers.Integral)
            or not 1 <= patch <= MAX_PATCH_PX
        ):
            problems.append(
                f"patch_size_px must be a whole number in 1..{MAX_PATCH_PX}, got {patch!r}"
            )
            fields.append("patch_size_px")
        elif patch is not None:
            object.__setattr__(self, "patch_size_px", int(patch))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None:
                continue
            shown = f"{name} (--{name})"
            items = _values(value)
            if items is None or len(items) != 3:
                problems.append(f"{shown} must be 3 numbers (R G B), got {value!r}")
            elif not all(_is_number(v) and math.isfinite(v) for v in items):
                problems.append(f"{shown} must be 3 finite numbers (R G B), got {list(items)!r}")
            elif name == "std" and min(float(v) for v in items) <= 0:
                problems.append(
                    f"{shown} must be > 0 for every channel (tiles are divided by it), got "
                    f"{[float(v) for v in items]!r}"
                )
            else:
                object.__setattr__(self, name, tuple(float(v) for v in items))
        if problems:
            raise ConfigError(
                "invalid torchscript encoder options: " + "; ".join(problems), fields=tuple(fields)
            )

    def check_tile(self, tile_size_px: int) -> None:
        """``patch_size_px`` must divide the tile into whole cells: ConfigError otherwise."""
        patch = self.patch_size_px
        if patch is None or tile_size_px < 1:  # a bad tile size is the tile's own error
            return
        if patch <= tile_size_px and tile_size_px % patch == 0:
            return
        near = min(
            (d for d in range(1, tile_size_px + 1) if tile_size_px % d == 0),
            key=lambda d: (abs(d - patch), d),
        )
        raise ConfigError(
            f"patch_size_px {patch} px does not divide the {tile_size_px} px tile into whole "
            f"cells; pass the patch size the module was made with, a divisor of the tile such "
            f"as {near}, or another tile size",
            fields=("patch_size_px",),
        )

    def build_options(self) -> dict[str, Any]:
        """The options of ``build_encoder("torchscript:PATH", ...)`` the user gave."""
        values = {"patch_size_px": self.patch_size_px, "mean": self.mean, "std": self.std}
        return {k: v for k, v in values.items() if v is not None}


def _isqrt_exact(n: int) -> int | None:
    r = math.isqrt(n) if n >= 0 else -1
    return r if r >= 1 and r * r == n else None


class TorchScriptEncoder(Encoder):
    """Wraps ``torch.jit.load(path)``; output checked and its layout fixed at load time.

    Shapes: ``forward``: ``[B, 3, T, T]`` -> ``[B, C, h, w]`` whatever the module's layout.
    """

    arch = "TorchScript module"
    weights_hint = "a TorchScript file saved with torch.jit.save"

    def __init__(
        self,
        path: PathLike,
        *,
        tile_size_px: int,
        patch_size_px: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        name: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        autocast: bool = True,
    ) -> None:
        # Option values, and the patch size against the tile, before the module is loaded.
        stated = TorchScriptOptions(patch_size_px, mean, std)
        stated.check_tile(int(tile_size_px))
        p = Path(path).expanduser()
        if not p.is_file():
            raise CheckpointError(
                f"TorchScript file {str(p)!r} does not exist or is not a file; pass the path of "
                "a module saved with torch.jit.save (torchscript:PATH)"
            )
        target = torch.device(device) if device is not None else torch.device("cpu")
        try:
            # torch >= 2.9 marks TorchScript as deprecated; loading still works.
            # torch 2.14 warns with a FutureWarning instead; neither is the user's concern.
            with (
                quiet(DeprecationWarning),
                quiet(FutureWarning, r".*torch\.jit\.load.* is deprecated"),
            ):
                module = torch.jit.load(str(p), map_location=target)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(
                f"cannot load {str(p)!r} as a TorchScript module ({first}); pass a file saved "
                "with torch.jit.save (a state_dict is not enough: use --encoder uni or "
                "resnet50-trunc with --encoder-weights for those)"
            ) from exc
        module.eval()
        if dtype is not None:
            module.to(dtype=dtype)
        layout, channels, side = self._probe(module, p, tile_size_px, patch_size_px, target, dtype)
        if tile_size_px % side:
            raise InputError(
                f"{str(p)!r}: a {side} x {side} token grid does not divide {tile_size_px} px tiles "
                "evenly; pass patch_size_px (a build_encoder option) and a matching tile size"
            )
        super().__init__(
            name=name or f"torchscript:{p.name}",
            tile_size_px=tile_size_px,
            patch_size_px=tile_size_px // side,
            embed_dim=channels,
            mean=stated.mean or IMAGENET_MEAN,
            std=stated.std or IMAGENET_STD,
            autocast=autocast,
        )
        self.given_options = tuple(stated.build_options())
        self.module = module
        self.output_layout = layout
        self.weights_path = str(p)
        self.weights_sha256 = file_sha256(p)
        self._device = target

    @staticmethod
    def _probe(
        module: Any,
        path: Path,
        tile: int,
        patch: int | None,
        device: torch.device,
        dtype: torch.dtype | None,
    ) -> tuple[str, int, int]:
        """Run a dummy batch; return (layout, channels, grid side)."""
        if tile < 1 or (patch is not None and (patch < 1 or tile % patch)):
            raise InputError(
                f"tile size {tile} px is not a positive multiple of patch size {patch} px; "
                "pass matching tile_size_px and patch_size_px (build_encoder options)"
            )
        gen = torch.Generator(device="cpu").manual_seed(0)
        dummy = torch.randn(_DUMMY_BATCH, 3, tile, tile, generator=gen)
        dummy = dummy.to(device=device, dtype=dtype or torch.float32)
        src = repr(str(path))
        try:
            with torch.no_grad():
                out = module(dummy)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(
                f"{src} fails on a [{_DUMMY_BATCH}, 3, {tile}, {tile}] batch ({first}); pass the "
                "tile size the module was traced for (--tile-size)"
            ) from exc
        expected = "[B, C, h, w], [B, h*w, C] or [B, 1+h*w, C]"
        if not isinstance(out, Tensor):
            raise CheckpointError(
                f"{src} returns a {type(out).__name__}, expected one tensor {expected}; wrap the "
                "module so that it returns the token tensor only"
            )
        shape = list(out.shape)
        if out.ndim not in (3, 4) or shape[0] != _DUMMY_BATCH or not out.is_floating_point():
            raise CheckpointError(
                f"{src} returns {out.dtype} of shape {shape} for a batch of {_DUMMY_BATCH}, "
                f"expected a float tensor {expected}; wrap the module to return token grids"
            )
        want = tile // patch if patch is not None else None
        if out.ndim == 4:
            _, c, h, w = shape
            if h != w or (want is not None and h != want):
                raise CheckpointError(
                    f"{src} returns a {h} x {w} grid for {tile} px tiles, expected "
                    f"{want or 'a square'} x {want or 'grid'}; check tile_size_px / patch_size_px"
                )
            return "grid", c, h
        _, n, c = shape
        if want is not None:
            if n == want * want:
                return "tokens", c, want
            if n == 1 + want * want:
                return "cls+tokens", c, want
            raise CheckpointError(
                f"{src} returns {n} tokens for {tile} px tiles, expected {want * want} (a "
                f"{want} x {want} grid) or {1 + want * want} (with a class token); check "
                "tile_size_px / patch_size_px"
            )
        side = _isqrt_exact(n)
        if side is not None:
            return "tokens", c, side
        side = _isqrt_exact(n - 1)
        if side is not None:
            return "cls+tokens", c, side
        raise CheckpointError(
            f"{src} returns {n} tokens, neither a square grid nor a class token plus a square "
            "grid; pass patch_size_px (a build_encoder option) or wrap the module"
        )

    @property
    def device(self) -> torch.device:
        t = self._first_tensor()
        return t.device if t is not None else self._device

    def forward(self, x: Tensor) -> Tensor:
        """Run the module and bring its output to the channels-first grid.

        Shapes: ``[B, 3, T, T]`` -> ``[B, C, h, w]``.
        """
        self._check_input(x)
        out = self.module(x)
        b = x.shape[0]
        h, w = self.grid_size
        if self.output_layout == "grid":
            return out
        if self.output_layout == "cls+tokens":
            out = out[:, 1:]
        return out.transpose(1, 2).reshape(b, self.embed_dim, h, w).contiguous()

    def to(self, *args: Any, **kwargs: Any) -> TorchScriptEncoder:
        out = super().to(*args, **kwargs)
        dev = self._first_tensor()
        if dev is not None:
            self._device = dev.device
        return out  # type: ignore[return-value]

    def extra_identity(self) -> dict[str, Any]:
        # Which of patch size, mean and std the user stated; the others were read off the
        # module's output (the patch size) or defaulted (ImageNet's mean and std).
        return {"output_layout": self.output_layout, "given_options": list(self.given_options)}
