"""Any TorchScript module as a patch encoder.

The user gives the tile size, and optionally the patch size and the input normalisation; the
module's output layout is found once, at load time, on a dummy batch, and must be one of:

- ``"grid"``:       ``[B, C, h, w]`` (a CNN feature map), used as is;
- ``"tokens"``:     ``[B, h*w, C]`` (ViT patch tokens, row-major), reshaped to ``[B, C, h, w]``;
- ``"cls+tokens"``: ``[B, 1 + h*w, C]`` (class token first), class token dropped, then reshaped.

With ``patch_size_px`` omitted, the grid side is read off the output (a square number of tokens,
or a square map) and the patch size is ``tile_size_px / side``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastinsight.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder
from fastinsight.encoders.weights import PathLike
from fastinsight.errors import CheckpointError, InputError
from fastinsight.fileformat import file_sha256

LAYOUTS: tuple[str, ...] = ("grid", "tokens", "cls+tokens")
_DUMMY_BATCH = 2


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
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        name: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        autocast: bool = True,
    ) -> None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise CheckpointError(
                f"TorchScript file {str(p)!r} does not exist or is not a file; pass the path of "
                "a module saved with torch.jit.save (torchscript:PATH)"
            )
        target = torch.device(device) if device is not None else torch.device("cpu")
        try:
            with warnings.catch_warnings():
                # torch >= 2.9 marks TorchScript as deprecated; loading still works.
                warnings.simplefilter("ignore", DeprecationWarning)
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
            mean=mean,
            std=std,
            autocast=autocast,
        )
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
        return {"output_layout": self.output_layout}
