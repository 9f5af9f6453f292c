"""CT slices as the official INSIGHT code feeds them to DINOv2 (``Preprocess_mosmed``).

In order, per volume (``save_crop.py`` then ``store_embedding.py``):

1. optional lung mask: voxels outside it are set to -1024 HU;
2. in-plane resize to ``S x S`` (518 officially) with ``scipy.ndimage.zoom(order=1)``, depth kept.
   The zoom factor along depth is 1, so a slice's values depend on that slice only and resizing
   slice by slice equals the official whole-volume call (bounded memory);
3. HU clipped to ``[-1000, 400]`` and scaled ``(v + 1000) / 1400`` to [0, 1];
4. slice ``k`` is ``volume[:, :, k]``: image rows = NIfTI axis 0, columns = axis 1 (no transpose);
5. grey copied to 3 channels; no ImageNet mean/std (encoders are built with mean 0, std 1).

Slice selection (``EmbeddingDataset``): ``"middle32"`` keeps slices
``[max(0, D//2 - 16), min(D, D//2 + 16))`` and, when ``D < 32``, appends ``32 - D`` all-zero
token grids after encoding; ``"all"`` (default here) keeps every slice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from fastinsight.errors import ConfigError, InputError

OFFICIAL_TILE = 518
OFFICIAL_WINDOW = (-1000.0, 400.0)
OUTSIDE_HU = -1024.0
SLICE_MODES = ("all", "middle32")
LUNG_MASKS = ("none", "auto")


@dataclass(frozen=True)
class PreprocessOptions:
    """How slices are made. Defaults are the official INSIGHT-CT recipe except ``slices="all"``.

    ``lung_mask``: ``"none"``, or ``"auto"`` (the built-in HU-threshold mask, :func:`lung_mask`);
    a user mask volume is passed to the functions directly and wins over ``"auto"``.
    """

    tile_size: int = OFFICIAL_TILE
    window: tuple[float, float] = OFFICIAL_WINDOW
    slices: str = "all"
    lung_mask: str = "none"
    outside_hu: float = OUTSIDE_HU

    def __post_init__(self) -> None:
        problems = []
        fields = []
        if isinstance(self.tile_size, bool) or not isinstance(self.tile_size, (int, np.integer)):
            problems.append(f"tile_size must be an integer, got {self.tile_size!r}")
            fields.append("tile_size")
        elif self.tile_size < 2:
            problems.append(f"tile_size must be >= 2, got {self.tile_size}")
            fields.append("tile_size")
        try:
            low, high = (float(v) for v in self.window)
            window_ok = math.isfinite(low) and math.isfinite(high) and low < high
        except (TypeError, ValueError):
            window_ok = False
        if not window_ok:
            problems.append(
                f"window must be two finite numbers (low, high) with low < high, got {self.window!r}"
            )
            fields.append("window")
        if self.slices not in SLICE_MODES:
            problems.append(f"slices must be one of {SLICE_MODES}, got {self.slices!r}")
            fields.append("slices")
        if self.lung_mask not in LUNG_MASKS:
            problems.append(f"lung_mask must be one of {LUNG_MASKS}, got {self.lung_mask!r}")
            fields.append("lung_mask")
        if problems:  # option values: exit 2, the fields named for the CLI's flags
            raise ConfigError(
                "invalid preprocessing options: " + "; ".join(problems), fields=tuple(fields)
            )


def select_slices(depth: int, mode: str = "all") -> tuple[list[int], int]:
    """Slice indices to encode and how many zero token grids to append (official rule).

    ``middle32``: ``D < 32`` -> all slices and ``32 - D`` padding grids; else
    ``range(max(0, D//2 - 16), min(D, D//2 + 16))`` (always 32 slices).
    """
    if depth < 1:
        raise InputError(f"the volume has no slices (depth {depth})")
    if mode == "all":
        return list(range(depth)), 0
    if mode == "middle32":
        if depth < 32:
            return list(range(depth)), 32 - depth
        return list(range(max(0, depth // 2 - 16), min(depth, depth // 2 + 16))), 0
    raise InputError(f"slices must be one of {SLICE_MODES}, got {mode!r}")


def apply_mask(data: np.ndarray, mask: np.ndarray, outside_hu: float = OUTSIDE_HU) -> np.ndarray:
    """``data`` with voxels where ``mask`` is 0 set to ``outside_hu`` (official: -1024).

    Shapes: data ``[X, Y, Z]``, mask ``[X, Y, Z]`` (any dtype; non-zero = keep) -> ``[X, Y, Z]``.
    """
    if mask.shape != data.shape:
        raise InputError(
            f"the lung mask is {list(mask.shape)} but the volume is {list(data.shape)}; pass the "
            "mask made for this scan (same voxel grid)"
        )
    return np.where(mask != 0, data, np.float32(outside_hu)).astype(np.float32, copy=False)


def lung_mask(data: np.ndarray, threshold_hu: float = -320.0) -> np.ndarray:
    """A simple lung mask from Hounsfield units (the official LungMask U-Net is not shipped).

    1. air-like voxels: ``HU < threshold_hu`` (-320 HU separates aerated lung from soft tissue);
    2. drop 3-D air components touching the in-plane border (the air around the body; the lungs
       may touch the first/last slice, so the depth faces do not count);
    3. keep the largest component and the second largest when it holds >= 10 % of the largest
       (two lungs; joined lungs stay one component);
    4. fill holes slice by slice (vessels, nodules and lesions enclosed by the lung).

    Shapes: ``[X, Y, Z]`` HU -> ``[X, Y, Z]`` bool.
    """
    from scipy import ndimage

    air = data < threshold_hu
    labels, n = ndimage.label(air)
    if n == 0:
        return np.zeros(data.shape, dtype=bool)
    border = np.unique(
        np.concatenate(
            [labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(), labels[:, -1].ravel()]
        )
    )
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    sizes[border] = 0
    ranked = np.argsort(sizes)[::-1]
    keep = [int(ranked[0])] if sizes[ranked[0]] > 0 else []
    if len(ranked) > 1 and keep and sizes[ranked[1]] >= 0.1 * sizes[ranked[0]]:
        keep.append(int(ranked[1]))
    mask = np.isin(labels, keep)
    for k in range(mask.shape[2]):
        mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return mask


def window(hu: np.ndarray, low: float = -1000.0, high: float = 400.0) -> np.ndarray:
    """``(clip(v, low, high) - low) / (high - low)`` in float32 (official: -1000, 400)."""
    return ((np.clip(hu, low, high) - low) / (high - low)).astype(np.float32)


def resize_slice(slice_hu: np.ndarray, size: int) -> np.ndarray:
    """One slice ``[X, Y]`` -> ``[size, size]`` with ``scipy.ndimage.zoom(order=1)``.

    Computed in float64 as the official code (``get_fdata()``) does.
    """
    from scipy import ndimage

    x, y = slice_hu.shape
    return ndimage.zoom(np.asarray(slice_hu, dtype=np.float64), (size / x, size / y), order=1)


def slice_images(
    data: np.ndarray, indices: Sequence[int], options: PreprocessOptions
) -> np.ndarray:
    """Encoder input for the given slices of a (masked) HU volume.

    Shapes: data ``[X, Y, Z]`` -> ``[len(indices), S, S, 3]`` float32 in [0, 1] (channels last,
    grey in all three).
    """
    s = options.tile_size
    out = np.empty((len(indices), s, s, 3), dtype=np.float32)
    for n, k in enumerate(indices):
        out[n] = window(resize_slice(data[:, :, k], s), *options.window)[..., None]
    return out


def iter_slice_batches(
    data: np.ndarray, indices: Sequence[int], options: PreprocessOptions, batch_size: int
) -> Iterator[tuple[list[int], np.ndarray]]:
    """``(slice indices, images [B, S, S, 3])`` in batches of ``batch_size`` slices."""
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    for a in range(0, len(indices), batch_size):
        part = list(indices[a : a + batch_size])
        yield part, slice_images(data, part, options)


def prepare_hu(
    data: np.ndarray, options: PreprocessOptions, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Step 1: the HU volume after the lung mask (user ``mask`` first, else ``"auto"``).

    Returns (HU ``[X, Y, Z]``, the mask used or None).
    """
    if mask is None and options.lung_mask == "auto":
        mask = lung_mask(data)
        if not mask.any():
            raise InputError(
                "the built-in lung mask found no lung (no air-filled region inside the body "
                "below -320 HU); pass a lung mask volume with --lung-mask PATH or run without"
            )
    if mask is None:
        return data, None
    return apply_mask(data, mask, options.outside_hu), mask != 0
