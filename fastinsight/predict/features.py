"""``fastinsight predict --features``: precomputed feature files to the same outputs as a slide run.

The tiles of an h5 file (official INSIGHT token grids, or CLAM / TRIDENT per-tile vectors) are
placed on a level-0 tile grid anchored at the slide's top-left corner, so the heatmap TIFF lines
up with the slide exactly as a slide run's does.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastinsight.errors import InputError, SlideError
from fastinsight.features import SlideFeatures, _as_number, read_features
from fastinsight.inputs import check_dimensions, check_mpp
from fastinsight.models.insight import InsightModel
from fastinsight.predict.slide import PredictOptions, SlideResult, resolve_device
from fastinsight.slide import TileGrid, open_slide, stitch_cells


def feature_grid(feats: SlideFeatures, slide_size: tuple[int, int], slide_mpp: float) -> TileGrid:
    """A TileGrid whose level-0 tile size is the feature tiles' pitch."""
    step = feats.step_l0 or feats.patch_size_l0
    if step is None:
        raise InputError(
            f"{feats.source}: the level-0 tile size is unknown; pass --patch-size-l0 or --patches-h5"
        )
    cells = int(feats.tokens.shape[-1])
    tile_px = feats.tile_size_px or 224
    tile_px = max(cells, tile_px - tile_px % cells)
    return TileGrid(
        slide_width=slide_size[0],
        slide_height=slide_size[1],
        slide_mpp=slide_mpp,
        target_mpp=step * slide_mpp / tile_px,
        tile_px=tile_px,
        cells_per_side=cells,
    )


def grid_positions(feats: SlideFeatures, grid: TileGrid, snap: bool) -> np.ndarray:
    """Tile (row, col) on ``grid`` of every feature tile. Shapes: -> int64 ``[N, 2]``."""
    xy = feats.l0_xy.numpy().astype(np.float64)
    size = grid.l0_tile_size
    rc = np.rint(xy[:, ::-1] / size).astype(np.int64)
    off = np.abs(rc[:, ::-1] * size - xy).max(axis=1)
    if not snap and (off > 1.0).any():
        i = int(np.argmax(off > 1.0))
        raise InputError(
            f"tile {i} at level-0 ({int(xy[i, 0])}, {int(xy[i, 1])}) is not on the {size:g} px grid "
            "anchored at the slide's top-left corner; pass --snap-to-grid to round tiles to it"
        )
    rows, cols = grid.shape
    bad = (rc[:, 0] < 0) | (rc[:, 1] < 0) | (rc[:, 0] >= rows) | (rc[:, 1] >= cols)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(
            f"tile {i} at level-0 ({int(xy[i, 0])}, {int(xy[i, 1])}) lies outside the "
            f"{grid.slide_width} x {grid.slide_height} px slide; is this the right --slide?"
        )
    if len(np.unique(rc, axis=0)) != len(rc):
        raise InputError("two feature tiles fall on the same grid tile; is the tile size right?")
    return rc


def _slide_geometry(
    feats: SlideFeatures, slide: str | None, mpp: float | None, cfg: Any
) -> tuple[tuple[int, int], float, np.ndarray | None, dict[str, Any]]:
    if slide is not None:
        with open_slide(slide, mpp=mpp) as reader:
            return (
                reader.dimensions,
                reader.mpp,
                reader.thumbnail(1024),
                {
                    "path": str(slide),
                    "vendor": reader.vendor,
                    "mpp": reader.mpp,
                    "dimensions": list(reader.dimensions),
                },
            )
    l0_mag = feats.attrs.get("coords.level0_magnification")
    # A hostile or damaged attribute ("x20", 0, NaN) must not become a traceback or a division
    # by zero: anything but a positive finite number counts as "not recorded".
    mag = _as_number(l0_mag)
    slide_mpp = mpp or (10.0 / mag if mag is not None and math.isfinite(mag) and mag > 0 else None)
    mpp_source = "given" if mpp else "file attributes"
    patch = feats.patch_size_l0
    if slide_mpp is None and patch:
        # The tiles were cut at the model's training geometry (e.g. 224 px at 0.5 um/px), so a
        # level-0 tile of `patch` px spans tile_size_px * target_mpp micrometres.
        tile_px = feats.tile_size_px or cfg.tile_size_px
        slide_mpp = tile_px * cfg.target_mpp / patch
        mpp_source = (
            f"derived: {tile_px} px tiles at the model's {cfg.target_mpp} um/px over {patch} "
            "level-0 px; pass --mpp or --slide if the features were cut otherwise"
        )
    if slide_mpp is None:
        raise SlideError(
            f"{feats.source}: the level-0 mpp is unknown; pass --slide SLIDE or --mpp (level 0)"
        )
    if feats.level0_size is not None:
        size = feats.level0_size
    else:
        step = feats.step_l0 or feats.patch_size_l0 or 0
        far = feats.l0_xy.max(dim=0).values + (feats.patch_size_l0 or step)
        size = (int(far[0]), int(far[1]))
    # From the file's attributes: checked before a grid is laid over them.
    size = check_dimensions(size[0], size[1], f"{feats.source} (level-0 size)")
    check_mpp(slide_mpp, f"the level-0 mpp of {feats.source} ({mpp_source})")
    info = {"path": None, "mpp": slide_mpp, "mpp_source": mpp_source, "dimensions": list(size)}
    return size, float(slide_mpp), None, info


@torch.no_grad()
def predict_features(
    path: str | os.PathLike[str],
    model: InsightModel,
    options: PredictOptions | None = None,
    *,
    slide: str | None = None,
    patches_h5: str | None = None,
    patch_size_l0: float | None = None,
    snap: bool = False,
    model_info: dict[str, Any] | None = None,
) -> SlideResult:
    """Heatmap, thresholds and scores of one feature file, as a ``SlideResult``."""
    opts = options or PredictOptions()
    start = time.perf_counter()
    device = resolve_device(opts.device)
    feats = read_features(
        path, patches_h5=patches_h5, patch_size_l0=int(patch_size_l0) if patch_size_l0 else None
    ).require_tiles()
    cfg = model.config
    if feats.in_dim != cfg.in_dim:
        raise InputError(
            f"{feats.source} holds {feats.in_dim}-dim features but the model expects {cfg.in_dim}; "
            "use features of the encoder the model was trained with"
        )
    size, slide_mpp, thumbnail, slide_info = _slide_geometry(feats, slide, opts.mpp, cfg)
    grid = feature_grid(feats, size, slide_mpp)
    rc = grid_positions(feats, grid, snap)
    model = model.to(device).eval()
    if cfg.context == "slide":
        pred = predict_slide_context(model, feats, snap, device)
    else:
        pred = model.predict(feats.tokens.to(device), feats.tile_mask().to(device))
    heat, raw = pred.heatmap, pred.raw_heatmap
    tiles = [grid.tile(int(r), int(c)) for r, c in rc]
    cells = stitch_cells(heat.float().cpu(), tiles, grid).numpy()
    raw_cells = stitch_cells(raw.float().cpu(), tiles, grid).numpy()
    mask = np.isfinite(cells).all(axis=0)
    return SlideResult(
        slide_id=feats.slide_id or Path(path).stem,
        slide_path=str(slide or path),
        scores=pred.scores.cpu().numpy(),
        thresholds=pred.thresholds.cpu().numpy(),
        cells=cells,
        raw_cells=raw_cells,
        cell_mask=mask,
        grid=grid,
        n_tiles=feats.num_tiles,
        class_names=cfg.names,
        model_info=model_info or {"name": "in-memory model"},
        encoder_info={
            "name": feats.encoder or "precomputed",
            "features": str(path),
            "layout": feats.layout,
        },
        slide_info=slide_info,
        timings={"total": time.perf_counter() - start},
        thumbnail=thumbnail,
    )


def predict_slide_context(
    model: InsightModel, feats: SlideFeatures, snap: bool, device: torch.device
) -> Any:
    """``model.predict`` of a slide-context model on the stitched tiles, in bands of tile rows.

    Same result as predicting the stitched grid (``feats.stitched()``) and cutting it back into
    tiles, without ever building the whole grid or its activations (``context_bands``).
    Shapes: -> ``SlidePrediction`` with heatmap / raw_heatmap ``[N, K, h, w]``.
    """
    from fastinsight.context_bands import banded_raw_heatmap
    from fastinsight.models.insight import SlidePrediction, non_finite_scores_error

    tokens = feats.tokens.to(device)
    if not bool(torch.isfinite(tokens).all()):
        raise InputError(f"{feats.source}: features contain NaN or inf; re-extract them")
    rc = feats.tile_rc(snap=snap).to(device)
    mask = feats.tile_mask().to(device)
    raw = banded_raw_heatmap(tokens, rc, model.head_weights(), mask)
    heatmap, thresholds, scores = model.threshold_and_pool(raw, mask)
    if not bool(torch.isfinite(scores).all()):
        raise non_finite_scores_error(raw, mask, tokens)
    return SlidePrediction(
        scores=scores,
        heatmap=heatmap,
        raw_heatmap=raw,
        thresholds=thresholds,
        mask=mask,
        class_names=model.config.names,
    )


__all__ = ["predict_slide_context", "predict_features", "feature_grid", "grid_positions"]
