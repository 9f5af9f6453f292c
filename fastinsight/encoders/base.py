"""The encoder contract: RGB tiles in, a channels-first token grid out.

Token layout (every encoder, see :data:`TOKEN_LAYOUT`): ``encode`` and ``forward`` return
``[B, C, h, w]`` with ``(h, w) = grid_size = (tile_size_px // patch_size_px,) * 2``. Cell
``(i, j)`` holds the token of the tile pixels ``rows i*p .. (i+1)*p - 1`` and
``cols j*p .. (j+1)*p - 1`` (``p = patch_size_px``), i.e. the row-major patch order of a ViT
(token ``n = i * w + j``) laid out as an image. A ViT's class token and register tokens are
dropped (the official INSIGHT setup: UNI's 196 patch tokens reshaped to 14 x 14, spec section 1;
DINOv2-reg4's 1369 tokens after the class and 4 register tokens as 37 x 37 for CT). The grid is
contiguous and is what the INSIGHT head takes as ``x``; ``encode_tokens`` gives the same tokens
channels-last as ``[B, h*w, C]``.

Weights are loaded from local files only; random-initialised variants are seeded so that the same
name and seed always give the same encoder (``identity()`` records the seed).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastinsight.atomic import atomic_path
from fastinsight.encoders.weights import (
    PathLike,
    check_state_dict,
    read_state_dict,
    resolve_weights_path,
)
from fastinsight.errors import CheckpointError, InputError
from fastinsight.fileformat import file_sha256
from fastinsight.models.statefiles import bad_tensor

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

TOKEN_LAYOUT = (
    "[B, C, h, w] channels-first; cell (i, j) = tile px rows i*p..(i+1)*p-1, cols j*p..(j+1)*p-1; "
    "ViT patch tokens in row-major order (n = i*w + j), class token dropped (and register tokens)"
)

# Tolerance on float input in [0, 1]: resampled tiles overshoot a little (bicubic ringing).
_FLOAT_RANGE_TOL = 1e-3


class Encoder(nn.Module):
    """Base class of the patch encoders.

    Attributes:
        name: registry name (``"uni"``, ``"vit-tiny"``, ...).
        tile_size_px: side of the square RGB tile the encoder takes.
        patch_size_px: side of one token-grid cell (one heatmap cell) in tile px.
        embed_dim: C, the channels of the token grid.
        grid_size: ``(h, w) = (tile_size_px // patch_size_px,) * 2``.
        mean, std: per-channel input normalisation (ImageNet by default), applied to RGB in [0, 1].
        token_layout: how tokens map to tile pixels (:data:`TOKEN_LAYOUT`).
        autocast: run ``encode`` under bf16 autocast when the encoder is on CUDA.
        arch: a human description of the architecture, for reports and errors.
        weights_path, weights_sha256: the weight file loaded, or ``None`` (random init).
        seed: the seed of a random initialisation, or ``None`` when weights were loaded.
        load_notes: what loading the weights stripped, unwrapped or ignored.
    """

    arch: str = "encoder"
    weights_hint: str = "the encoder's weight file"

    def __init__(
        self,
        *,
        name: str,
        tile_size_px: int,
        patch_size_px: int,
        embed_dim: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        autocast: bool = True,
    ) -> None:
        super().__init__()
        if patch_size_px < 1 or tile_size_px < patch_size_px or tile_size_px % patch_size_px:
            raise InputError(
                f"encoder {name!r}: tile size {tile_size_px} px is not a positive multiple of the "
                f"patch size {patch_size_px} px; pass a tile size that is (e.g. "
                f"{max(1, round(tile_size_px / max(patch_size_px, 1))) * patch_size_px})"
            )
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise InputError(
                f"encoder {name!r}: mean and std must be 3 values (std > 0), found mean={mean}, "
                f"std={std}; pass RGB statistics such as the ImageNet ones {IMAGENET_MEAN}, "
                f"{IMAGENET_STD}"
            )
        self.name = name
        self.tile_size_px = int(tile_size_px)
        self.patch_size_px = int(patch_size_px)
        self.embed_dim = int(embed_dim)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.token_layout = TOKEN_LAYOUT
        self.autocast = bool(autocast)
        self.weights_path: str | None = None
        self.weights_sha256: str | None = None
        self.seed: int | None = None
        self.load_notes: list[str] = []
        self._norm_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ geometry and placement
    @property
    def grid_size(self) -> tuple[int, int]:
        """``(h, w)`` of the token grid."""
        g = self.tile_size_px // self.patch_size_px
        return (g, g)

    def _first_tensor(self) -> Tensor | None:
        return next(itertools.chain(self.parameters(), self.buffers()), None)

    @property
    def device(self) -> torch.device:
        """Device of the encoder's weights."""
        t = self._first_tensor()
        return t.device if t is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the encoder's weights (what ``encode`` casts its input to)."""
        for t in list(self.parameters()) + list(self.buffers()):
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    # ------------------------------------------------------------------------- input handling
    def _norm_tensors(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # Kept in float32 outside the state_dict: a bf16 copy would round 0.485 to 0.484375.
        if device not in self._norm_cache:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
            self._norm_cache[device] = (mean.to(device), std.to(device))
        return self._norm_cache[device]

    def normalize(self, images: Tensor | np.ndarray) -> Tensor:
        """RGB tiles, channels last, to the normalised float input of ``forward``.

        ``images`` is uint8 in [0, 255] or float in [0, 1], on any device (moved to the encoder's
        device, non-blocking from pinned memory). Returns float32 ``(x / 255 - mean) / std``.

        Shapes: images ``[B, H, W, 3]`` -> ``[B, 3, H, W]`` (contiguous, float32).
        """
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, Tensor):
            raise InputError(
                f"expected a tensor or numpy array of RGB tiles, found {type(images).__name__}; "
                "pass a uint8 [B, H, W, 3] array"
            )
        shape = list(images.shape)
        if images.ndim != 4 or shape[-1] != 3:
            if images.ndim == 3 and shape[-1] == 3:
                hint = "add a batch dimension (images[None])"
            elif images.ndim == 4 and shape[1] == 3:
                hint = "these look channels-first; pass images.permute(0, 2, 3, 1)"
            elif images.ndim == 4 and shape[-1] == 4:
                hint = "drop the alpha channel (images[..., :3])"
            else:
                hint = "pass RGB tiles as [B, H, W, 3]"
            raise InputError(f"expected RGB tiles [B, H, W, 3], found shape {shape}; {hint}")
        if images.dtype == torch.uint8:
            scale = 255.0
        elif images.is_floating_point():
            scale = 1.0
            if images.numel():
                lo, hi = float(images.min()), float(images.max())
                if lo < -_FLOAT_RANGE_TOL or hi > 1.0 + _FLOAT_RANGE_TOL:
                    raise InputError(
                        f"float tiles must be RGB in [0, 1], found values in [{lo:g}, {hi:g}]; "
                        "pass uint8 tiles or divide by 255"
                    )
        else:
            raise InputError(
                f"expected uint8 or float RGB tiles, found dtype {images.dtype}; pass uint8 tiles"
            )
        device = self.device if self.device.type != "meta" else images.device
        src = images.to(device, non_blocking=True).permute(0, 3, 1, 2)
        # Always a fresh float32 buffer: the in-place ops below never touch the caller's tensor
        # (nor an expanded view, e.g. a grey CT slice broadcast to 3 channels).
        x = torch.empty(src.shape, dtype=torch.float32, device=device).copy_(src)
        mean, std = self._norm_tensors(device)
        if scale != 1.0:
            x.div_(scale)
        return x.sub_(mean).div_(std)

    def _check_input(self, x: Tensor) -> None:
        """Raise InputError unless ``x`` is ``[B, 3, tile, tile]`` float."""
        t = self.tile_size_px
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(
                f"encoder {self.name!r} expects normalised tiles [B, 3, {t}, {t}], found shape "
                f"{list(x.shape)}; pass RGB tiles through encoder.normalize() or encode()"
            )
        if x.shape[2] != t or x.shape[3] != t:
            raise InputError(
                f"encoder {self.name!r} expects {t} x {t} px tiles, found "
                f"{x.shape[2]} x {x.shape[3]}; resample the tiles to {t} px or build the encoder "
                f"with tile_size_px={x.shape[2]}"
            )
        if not x.is_floating_point():
            raise InputError(
                f"encoder {self.name!r}.forward expects normalised float input, found {x.dtype}; "
                "call encode() with uint8 tiles instead"
            )

    # ------------------------------------------------------------------------------- running
    def forward(self, x: Tensor) -> Tensor:
        """Normalised tiles to the token grid.

        Shapes: x ``[B, 3, tile, tile]`` -> ``[B, C, h, w]``.
        """
        raise NotImplementedError

    def _run(self, fn: Any, images: Tensor | np.ndarray, autocast: bool | None) -> Tensor:
        use_amp = self.autocast if autocast is None else autocast
        with torch.no_grad():
            x = self.normalize(images)
            low_precision = self.dtype in (torch.bfloat16, torch.float16)
            if use_amp and x.device.type == "cuda" and not low_precision:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return fn(x)
            # bf16 weights: the input and the whole residual stream are bf16, no autocast needed.
            return fn(x.to(self.dtype))

    def encode(self, images: Tensor | np.ndarray, *, autocast: bool | None = None) -> Tensor:
        """RGB tiles to the token grid: ``forward(normalize(images))`` without autograd.

        With float32 weights on CUDA, runs under bf16 autocast when ``autocast`` (default: the
        encoder's ``autocast`` attribute) is true; the grid then comes back in the dtype the last
        layer produced (float32 after a ViT's final LayerNorm, bf16 for the ResNet). With bf16
        weights (the default of registry encoders built on CUDA) the input is cast to bf16 and the
        grid is bf16. Elsewhere the input is cast to the encoder's dtype.

        Shapes: images ``[B, tile, tile, 3]`` uint8 (or float in [0, 1]) -> ``[B, C, h, w]``.
        """
        return self._run(self, images, autocast)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Normalised tiles to patch tokens in row-major order.

        Shapes: x ``[B, 3, tile, tile]`` -> ``[B, h*w, C]``.
        """
        return self(x).flatten(2).transpose(1, 2)

    def encode_tokens(self, images: Tensor | np.ndarray, *, autocast: bool | None = None) -> Tensor:
        """RGB tiles to contiguous patch tokens ``[B, h*w, C]`` (channels last), what the INSIGHT
        head takes as ``[N, h*w, C]``; for a ViT no transpose is made (the fast path on CUDA).

        Shapes: images ``[B, tile, tile, 3]`` -> ``[B, h*w, C]``.
        """
        return self._run(self.forward_tokens, images, autocast).contiguous()

    # ------------------------------------------------------------------------------ reporting
    def extra_identity(self) -> dict[str, Any]:
        """Architecture details that subclasses add to :meth:`identity`."""
        return {}

    def identity(self) -> dict[str, Any]:
        """What a report needs to name this encoder exactly (JSON-serialisable).

        ``weights`` is the SHA-256 of the weight file, or ``"random-init"`` (then ``seed`` says
        which initialisation).
        """
        ident: dict[str, Any] = {
            "name": self.name,
            "arch": self.arch,
            "weights": self.weights_sha256 or "random-init",
            "weights_file": Path(self.weights_path).name if self.weights_path else None,
            "seed": self.seed,
            "tile_size_px": self.tile_size_px,
            "patch_size_px": self.patch_size_px,
            "embed_dim": self.embed_dim,
            "grid_size": list(self.grid_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "token_layout": self.token_layout,
        }
        ident.update(self.extra_identity())
        return ident


class StateDictEncoder(Encoder):
    """An encoder defined in Python whose weights come from a state_dict or a seeded init.

    Subclasses build their modules on the ``meta`` device (no memory, no RNG use), then call
    :meth:`_materialize`, which either loads a weight file straight into them (``assign=True``:
    a 1.2 GB file is not copied twice) or allocates them and runs :meth:`_reset_parameters` with a
    ``torch.Generator`` seeded from ``seed``; torch's global RNG is never touched.
    """

    config: Any

    def _reset_parameters(self, generator: torch.Generator) -> None:
        raise NotImplementedError

    def _ignorable_key(self, key: str) -> bool:
        """Keys a weight file may carry that this encoder does not use (dropped with a note)."""
        return False

    def _optional_key(self, key: str) -> bool:
        """Keys of this encoder a weight file may lack (filled by :meth:`_fill_optional`)."""
        return False

    def _fill_optional(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return state

    def _adapt_state(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """Convert a file's own layout (e.g. DINOv2's torch-hub keys) to this encoder's; notes."""
        return state, []

    def _snapshot_archs(self) -> tuple[str, ...]:
        """timm architecture names a hub snapshot's ``config.json`` may declare for this encoder."""
        return ()

    def _pos_embed_grid(self) -> tuple[int, int] | None:
        """``(h, w)`` patch positions of the ``pos_embed`` parameter, for a ViT with an absolute
        position embedding (a file trained on another grid is resampled to it on load); None for
        encoders without one."""
        return None

    def _materialize(
        self,
        *,
        weights: PathLike | None,
        seed: int | None,
        device: str | torch.device | None,
        dtype: torch.dtype | None,
    ) -> None:
        target = torch.device(device) if device is not None else torch.device("cpu")
        if weights is not None:
            self.load_weights(weights)
        elif target.type != "meta":
            self.to_empty(device="cpu")
            self.seed = 0 if seed is None else int(seed)
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            with torch.no_grad():
                self._reset_parameters(gen)
        else:
            self.seed = seed
        if target.type != "meta":
            self.to(device=target)
        if dtype is not None:
            self.to(dtype=dtype)
        self.eval()

    def load_weights(self, path: PathLike) -> None:
        """Load a weight file strictly (names the first bad key); records path and SHA-256.

        The one change made to a tensor: a ViT position embedding trained on another grid of
        patch positions is resampled to the encoder's (see :func:`check_state_dict`), with a
        note in ``load_notes`` (logged at INFO).

        Raises CheckpointError for a missing, truncated or foreign file.
        """
        file = resolve_weights_path(path, what=self.weights_hint, expect=self._snapshot_archs())
        state, notes = read_state_dict(file, what=self.weights_hint)
        state, adapt_notes = self._adapt_state(state)
        notes = notes + adapt_notes
        source = repr(str(file))
        path = file
        expected = self.state_dict(keep_vars=True)
        kept, check_notes = check_state_dict(
            expected,
            state,
            source=source,
            arch=self.arch,
            what=self.weights_hint,
            ignorable=self._ignorable_key,
            optional=self._optional_key,
            pos_embed_grid=self._pos_embed_grid(),
        )
        kept = self._fill_optional(kept)
        bad = bad_tensor(kept.items())
        if bad is not None:  # a NaN weight (or an inf running variance) spoils every token
            raise CheckpointError(
                f"{source}: {bad}; the weight file is damaged: pass {self.weights_hint}"
            )
        on_meta = any(t.is_meta for t in expected.values())
        if on_meta:
            # Assign the file's tensors as the parameters themselves (no second copy); floating
            # ones become float32 so that a later .to(dtype=...) starts from full precision.
            ref_dtypes = {k: v.dtype for k, v in expected.items()}
            kept = {
                k: (v.to(torch.float32) if v.is_floating_point() else v.to(ref_dtypes[k]))
                for k, v in kept.items()
            }
            self.load_state_dict(kept, strict=True, assign=True)
            for p in self.parameters():
                p.requires_grad_(True)
        else:
            try:
                self.load_state_dict(kept, strict=True)
            except RuntimeError as exc:  # pragma: no cover - check_state_dict catches these first
                raise CheckpointError(f"{source}: {exc}; pass {self.weights_hint}") from exc
        self.weights_path = str(Path(path).expanduser())
        self.weights_sha256 = file_sha256(self.weights_path)
        self.seed = None
        self.load_notes = notes + check_notes
        for note in self.load_notes:
            logger.info("encoder %s, %s: %s", self.name, Path(path).name, note)

    def save_weights(self, path: PathLike) -> None:
        """Write the state_dict as safetensors, atomically (read back with ``weights=path``)."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"fastinsight.encoder": self.name, "fastinsight.arch": self.arch}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=meta)

    def extra_identity(self) -> dict[str, Any]:
        cfg = self.config
        if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
            return {"config": dataclasses.asdict(cfg)}
        return {}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, tile={self.tile_size_px}, patch={self.patch_size_px}"


def check_device(device: str | torch.device | None) -> torch.device | None:
    """Turn a device name into a ``torch.device``; BackendError when CUDA is asked for but absent."""
    from fastinsight.errors import BackendError

    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(
            f"unknown device {device!r}; pass 'cpu', 'cuda' or 'cuda:N' (--device)"
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(
                f"device {str(dev)!r} was requested but CUDA is not available here; "
                "pass --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackendError(
                f"device {str(dev)!r} was requested but only {torch.cuda.device_count()} CUDA "
                "device(s) exist; pass another --device"
            )
    return dev
