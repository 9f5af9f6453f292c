"""A CT volume through an encoder and INSIGHT: a heatmap volume on the scan's own voxel grid.

``predict_volume(volume, model, encoder, options)``:

1. preprocessing as the official code (``fastinsight.volume.preprocess``);
2. the chosen slices through the encoder in batches (bf16 autocast on CUDA, as ``encode`` does),
   each slice a ``[C, h, w]`` token grid; ``middle32`` appends the official zero grids;
3. INSIGHT over the bag of slice grids: Otsu threshold over all cells, SmoothMax over all cells
   (padding grids included, as the official loader feeds them);
4. cells back to voxels: slice ``k``'s grid covers its resized ``S x S`` image, which
   ``zoom(order=1)`` maps corner to corner onto ``[X, Y]``; voxel ``i`` sits at resized pixel
   ``u = i (S - 1) / (X - 1)`` and takes the value of the cell holding pixel ``round(u)``
   (nearest: the heatmap is a cell map, not smoothed). Depth is 1:1; unscored slices are 0.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastinsight.atomic import atomic_path
from fastinsight.encoders.base import Encoder
from fastinsight.errors import ConfigError, InputError
from fastinsight.inputs import check_loaded_model, check_options, lent_to, option_int
from fastinsight.models.insight import InsightModel
from fastinsight.volume.io import Volume, check_volume, write_nifti
from fastinsight.volume.model import slice_context_of
from fastinsight.volume.preprocess import (
    PreprocessOptions,
    iter_slice_batches,
    prepare_hu,
    select_slices,
)


@dataclass(frozen=True)
class VolumeOptions:
    """Preprocessing plus how to run: ``batch_size`` slices per encoder call; ``progress``: a
    progress bar over the slices on stderr (shown on a terminal only).

    Checked when made (ConfigError naming the field), not when a volume is half encoded."""

    preprocess: PreprocessOptions = field(default_factory=PreprocessOptions)
    batch_size: int = 16
    progress: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.preprocess, PreprocessOptions):
            raise ConfigError(
                "preprocess must be a PreprocessOptions (fastinsight.volume.preprocess), got "
                f"{type(self.preprocess).__name__}; build one, or take a model's with "
                "info.preprocess()",
                fields=("preprocess",),
            )
        object.__setattr__(self, "batch_size", option_int(self.batch_size, "batch_size", 1))
        if not isinstance(self.progress, bool):
            raise ConfigError(
                f"progress must be True or False, got {self.progress!r}", fields=("progress",)
            )


def build_volume_encoder(
    name: str,
    tile_size: int | None,
    *,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    options: dict[str, Any] | None = None,
) -> Encoder:
    """An encoder of the registry for CT slices: no ImageNet normalisation (mean 0, std 1).

    ``tile_size`` None: the encoder's own (518 px for the DINOv2 encoders)."""
    from fastinsight.encoders import build_encoder

    opts = dict(options or {})
    opts.setdefault("mean", (0.0, 0.0, 0.0))
    opts.setdefault("std", (1.0, 1.0, 1.0))
    return build_encoder(name, weights, tile_size_px=tile_size, device=device, **opts)


def encode_volume(
    data_hu: np.ndarray,
    encoder: Encoder,
    preprocess: PreprocessOptions,
    *,
    batch_size: int = 16,
    mask: np.ndarray | None = None,
    progress: bool = False,
) -> tuple[Tensor, list[int], int]:
    """The token grids of a volume's chosen slices (official preprocessing); ``progress``: a
    bar over the slices on stderr (on a terminal only: tqdm's ``disable=None``).

    Shapes: data_hu ``[X, Y, Z]`` -> (tokens ``[n + pad, C, h, w]`` float32 on the encoder's
    device, the ``n`` slice indices, ``pad`` zero grids appended).
    """
    if encoder.tile_size_px != preprocess.tile_size:
        raise InputError(
            f"encoder {encoder.name!r} takes {encoder.tile_size_px} px tiles but the slices are "
            f"resized to {preprocess.tile_size} px; build the encoder with that tile size"
        )
    hu, _ = prepare_hu(data_hu, preprocess, mask)
    indices, pad = select_slices(hu.shape[2], preprocess.slices)
    from tqdm.auto import tqdm

    parts = []
    bar = tqdm(
        total=len(indices),
        unit="slice",
        desc="encoding",
        disable=None if progress else True,
        leave=False,
        dynamic_ncols=True,
    )
    with bar:
        for _, images in iter_slice_batches(hu, indices, preprocess, batch_size):
            parts.append(encoder.encode(torch.from_numpy(images)).float())
            bar.update(images.shape[0])
    tokens = torch.cat(parts)
    if pad:
        tokens = torch.cat([tokens, tokens.new_zeros((pad, *tokens.shape[1:]))])
    return tokens, indices, pad


def cell_index(n_voxels: int, size: int, cells: int) -> np.ndarray:
    """For each voxel along an in-plane axis, the grid cell that covers it (see module doc)."""
    if n_voxels == 1:
        u = np.zeros(1)
    else:
        u = np.arange(n_voxels) * (size - 1) / (n_voxels - 1)
    pixel = np.floor(u + 0.5)
    return np.minimum(cells - 1, (pixel * cells / size).astype(np.int64))


def cells_to_voxels(
    cells: np.ndarray, indices: list[int], shape: tuple[int, int, int], tile_size: int
) -> np.ndarray:
    """Slice cell maps to a voxel volume (nearest cell; unscored slices 0).

    Shapes: cells ``[n, K, h, w]`` -> ``[X, Y, Z, K]`` float32.
    """
    x, y, z = shape
    n, k, h, w = cells.shape
    rows = cell_index(x, tile_size, h)
    cols = cell_index(y, tile_size, w)
    out = np.zeros((x, y, z, k), dtype=np.float32)
    for m, s in enumerate(indices):
        out[:, :, s, :] = cells[m][:, rows][:, :, cols].transpose(1, 2, 0)
    return out


@dataclass
class VolumeResult:
    """What INSIGHT says about one CT volume.

    Shapes: scores, thresholds ``[K]``; cells ``[n, K, h, w]`` (thresholded, scored slices
    only); voxels ``[X, Y, Z, K]`` float32 on the input's grid.
    """

    scores: np.ndarray
    thresholds: np.ndarray
    cells: np.ndarray
    voxels: np.ndarray
    slice_indices: list[int]
    padded: int
    volume: Volume
    class_names: tuple[str, ...]
    timings: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)

    def heatmap(self, class_index: int = 0) -> np.ndarray:
        """Shapes: -> ``[X, Y, Z]`` float32 for one class."""
        return self.voxels[..., class_index]

    def max_location(self, class_index: int = 0) -> dict[str, Any]:
        """Slice, cell and world position (RAS mm, voxel centre) of the hottest voxel."""
        hm = self.heatmap(class_index)
        i, j, k = (int(v) for v in np.unravel_index(int(np.argmax(hm)), hm.shape))
        world = self.volume.affine @ np.array([i, j, k, 1.0])
        return {
            "value": float(hm[i, j, k]),
            "slice": k,
            "voxel": [i, j, k],
            "world_ras_mm": [round(float(v), 4) for v in world[:3]],
        }

    def report(self) -> dict[str, Any]:
        return {
            "scores": {n: float(s) for n, s in zip(self.class_names, self.scores, strict=True)},
            "thresholds": {
                n: float(t) for n, t in zip(self.class_names, self.thresholds, strict=True)
            },
            "maximum": {n: self.max_location(i) for i, n in enumerate(self.class_names)},
            "slices_scored": self.slice_indices,
            "zero_slices_padded": self.padded,
            "geometry": self.volume.geometry(),
            "source": dict(self.volume.facts),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            **self.info,
        }

    def write_heatmap(self, path: str | os.PathLike[str]) -> None:
        """NIfTI float32 with the input's shape and affine (4-D ``[X, Y, Z, K]`` when K > 1)."""
        data = self.voxels[..., 0] if self.voxels.shape[-1] == 1 else self.voxels
        write_nifti(data, self.volume.affine, path, header=self.volume.header)

    def write_report(self, path: str | os.PathLike[str]) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.report(), indent=2) + "\n")

    def write_overlay(self, path: str | os.PathLike[str], n_slices: int = 6) -> None:
        """PNG montage of the ``n_slices`` most salient slices with a colour bar."""
        from fastinsight.volume.overlay import render_montage

        image = render_montage(
            self.volume.data, self.heatmap(0), n_slices=n_slices, affine=self.volume.affine
        )
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")


def check_volume_model(model: object) -> None:
    """``model`` is an INSIGHT model for CT (per-slice or :class:`CrossSliceInsight`); a
    radiograph model, a path or anything else is an InputError that names it and what to do."""
    check_loaded_model(
        model, InsightModel, "CT volume", "fastinsight.volume.checkpoint.load_volume_model"
    )


def check_volume_encoder(encoder: object) -> None:
    """``encoder`` is an encoder object (:func:`build_volume_encoder`); a name, None or another
    object is a ConfigError that says how to build one."""
    made = "fastinsight.volume.predict.build_volume_encoder(name, tile_size)"
    if isinstance(encoder, (str, os.PathLike)):
        raise ConfigError(
            f"encoder must be an encoder object, got the {type(encoder).__name__} "
            f"{os.fspath(encoder)!r}; build it with {made}"
        )
    if not (hasattr(encoder, "encode") and hasattr(encoder, "tile_size_px")):
        raise ConfigError(
            f"encoder must be an encoder object ({made}), got {type(encoder).__name__}"
        )


def predict_volume(
    volume: Volume,
    model: InsightModel,
    encoder: Encoder,
    options: VolumeOptions | None = None,
    *,
    mask: np.ndarray | None = None,
) -> VolumeResult:
    """Heatmap volume and scores for one CT volume (see the module doc for the steps).

    ``mask``: a lung mask volume on the same grid (wins over ``options.preprocess.lung_mask``).
    Arguments of the wrong kind (a radiograph model, an encoder name, None) are refused before
    anything is encoded, each with its own error.
    """
    opts = check_options(options, VolumeOptions, "VolumeOptions")
    pre = opts.preprocess
    if not isinstance(volume, Volume):
        raise InputError(
            f"expected a fastinsight.volume.Volume (read_volume(path), or Volume(data, affine)), "
            f"got {type(volume).__name__}"
        )
    # Once per volume, as read_volume does for files: a Volume built in Python (an embedder's
    # own reader) is checked too, so an inf slice cannot score silently.
    check_volume_model(model)
    check_volume_encoder(encoder)
    check_volume(volume.data, volume.affine, str(volume.facts.get("path") or "the volume"))
    t0 = time.perf_counter()
    # Eval mode for the run (dropout off), the caller's training flags put back afterwards.
    with lent_to(None, model, encoder):
        tokens, indices, pad = encode_volume(
            volume.data, encoder, pre, batch_size=opts.batch_size, mask=mask, progress=opts.progress
        )
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        dev = next(model.parameters()).device
        pred = model.predict(tokens.to(dev))
    cells = pred.heatmap.float().cpu().numpy()[: len(indices)]
    t2 = time.perf_counter()
    voxels = cells_to_voxels(cells, indices, volume.shape, pre.tile_size)
    t3 = time.perf_counter()
    timings = {
        "encode": t1 - t0,
        "insight": t2 - t1,
        "to_voxels": t3 - t2,
        "total": t3 - t0,
        "slices_per_s": len(indices) / max(t1 - t0, 1e-9),
    }
    info = {
        "encoder": encoder.identity(),
        "slice_context": slice_context_of(model),
        "preprocess": {
            "tile_size": pre.tile_size,
            "window_hu": list(pre.window),
            "slices": pre.slices,
            "lung_mask": "user" if mask is not None else pre.lung_mask,
        },
        "grid": list(cells.shape[2:]),
    }
    scores = pred.scores.float().cpu().numpy()
    if not np.all(np.isfinite(scores)) or math.isnan(float(scores.sum())):
        raise InputError("INSIGHT returned a non-finite score; check the encoder's output")
    return VolumeResult(
        scores=scores,
        thresholds=pred.thresholds.float().cpu().numpy(),
        cells=cells,
        voxels=voxels,
        slice_indices=indices,
        padded=pad,
        volume=volume,
        class_names=model.config.names,
        timings=timings,
        info=info,
    )
