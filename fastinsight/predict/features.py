"""``fastinsight predict --features``: precomputed feature files to the same outputs as a slide run.

The tiles of an h5 file (official INSIGHT token grids, or CLAM / TRIDENT per-tile vectors) are
placed by ``fastinsight.slide.placement`` on the heatmap raster anchored at the slide's top-left
corner, where the file put them (CLAM: each tissue contour's lattice), so the heatmap TIFF lines
up with the slide as a slide run's does.

The slide-context model (``context="slide"``) runs 3x3 convolutions across neighbouring tiles, so
its input must be one regular grid of the model's cells. A CLAM file carries one lattice per
tissue contour, each starting at its contour's bounding-box corner, and two lattices whose
origins differ by no whole number of tiles cannot share one grid without moving tiles. Each
lattice therefore runs through the context chain on its own exact grid (as a file holding only
that lattice would), and the dynamic threshold and the pooling then run over every tile of the
slide together. Why this and not one rounded grid:

- nothing moves: every tile's context is its true neighbours at their true distances. Rounding a
  contour onto another contour's grid moves all its tiles by up to half a tile (256 level-0 px =
  64 um for CLAM's 512 px tiles at 0.25 um/px: a gland), and can put two tiles on one cell;
- a CLAM contour is one connected piece of tissue; between two pieces lies background, which
  the context chain sees as masked-out, empty cells anyway. What a per-lattice grid leaves out
  is only tissue of another piece within the chain's reach (4 cells), read the way a
  pathologist reads separate fragments: each on its own;
- single-grid files (official INSIGHT, TRIDENT, one-contour CLAM) are exactly what they were.

``--snap-to-grid`` (``snap=True``) keeps the old behaviour for who wants it: every tile rounded
onto one grid, e.g. to match a model trained with ``--snap-to-grid`` on such files.
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
from fastinsight.inputs import check_dimensions, check_mpp, lent_to, resolve_device
from fastinsight.models.insight import InsightModel
from fastinsight.predict.slide import (
    PredictOptions,
    SlideResult,
    _check_options,
    check_slide_model,
)
from fastinsight.slide import TileGrid, open_slide
from fastinsight.slide.grid import check_slide_extent
from fastinsight.slide.placement import MAX_SUBDIVISION, Placement, paste, place_tiles


def feature_grid(
    feats: SlideFeatures,
    slide_size: tuple[int, int],
    slide_mpp: float,
    subdivision: int = 1,
    slide_mpp_xy: tuple[float, float] | None = None,
) -> TileGrid:
    """A TileGrid whose level-0 tile size is the feature tiles' pitch, with
    ``cells * subdivision`` raster cells per tile side (see ``fastinsight.slide.placement``);
    ``slide_mpp_xy``: the slide's per-axis mpp where they differ."""
    step = feats.step_l0 or feats.patch_size_l0
    if step is None:
        raise InputError(
            f"{feats.source}: the level-0 tile size is unknown; pass --patch-size-l0 or --patches-h5"
        )
    cells = int(feats.tokens.shape[-1]) * subdivision
    tile_px = feats.tile_size_px or 224
    tile_px = max(cells, tile_px - tile_px % cells)
    check_slide_extent(slide_size[0], slide_size[1], slide_mpp)
    return TileGrid(
        slide_width=slide_size[0],
        slide_height=slide_size[1],
        slide_mpp=slide_mpp,
        target_mpp=step * slide_mpp / tile_px,
        tile_px=tile_px,
        cells_per_side=cells,
        slide_mpp_xy=slide_mpp_xy,
    )


def feature_placement(feats: SlideFeatures, slide_size: tuple[int, int], snap: bool) -> Placement:
    """Where the feature tiles sit on the slide raster: where the file put them (CLAM: each
    tissue contour's own lattice), or rounded to the model's cells with ``snap``.

    Tiles outside the slide and two tiles on one place are errors.
    """
    step = feats.step_l0 or feats.patch_size_l0
    if step is None:
        raise InputError(
            f"{feats.source}: the level-0 tile size is unknown; pass --patch-size-l0 or --patches-h5"
        )
    xy = feats.l0_xy.numpy().astype(np.float64)
    if feats.layout != "clam" and not snap:
        # Official INSIGHT and TRIDENT tile one lattice from the slide's corner; only CLAM
        # starts a lattice per tissue contour.
        off = np.abs(xy - np.rint(xy / step) * step).max(axis=1) if len(xy) else xy[:, 0]
        if (off > 1.0).any():
            i = int(np.argmax(off > 1.0))
            raise InputError(
                f"tile {i} at level-0 ({int(xy[i, 0])}, {int(xy[i, 1])}) is not on the {step:g} "
                "px grid anchored at the slide's top-left corner; pass --snap-to-grid to round "
                "tiles to it"
            )
    placement = place_tiles(
        xy,
        float(step),
        feats.grid_size[1],
        max_subdivision=1 if snap else MAX_SUBDIVISION,
    )
    bad = placement.outside(slide_size)
    if bad.any():
        i = int(np.argmax(bad))
        x, y = (int(v) for v in feats.l0_xy[i])
        if x < 0 or y < 0:
            raise InputError(
                f"{feats.source}: tile {i} has negative level-0 coordinates ({x}, {y}); the "
                "coords are damaged or not top-left corners in level-0 pixels"
            )
        raise InputError(
            f"{feats.source}: tile {i} at level-0 ({x}, {y}) lies outside the {slide_size[0]} x "
            f"{slide_size[1]} px slide; the features do not belong to this slide (a --slide "
            "given: is it the right one?)"
        )
    _, counts = np.unique(placement.cell_rc, axis=0, return_counts=True)
    if (counts > 1).any():
        raise InputError(
            f"{feats.source}: two feature tiles fall on the same place at pitch {step} px; "
            "duplicate coordinates, or the wrong tile size (--patch-size-l0)?"
        )
    return placement


# A recorded magnification is a convention (40x = 0.25 um/px), not a measurement: scanners sold as
# 40x range from about 0.22 to 0.27 um/px. A slide mpp further than this factor from it is
# another slide or another scan.
MPP_CONTRADICTION = 1.25


def file_mpp(feats: SlideFeatures) -> float | None:
    """The level-0 mpp a TRIDENT file records: ``10 / level0_magnification``, else the target
    mpp times the tile size over the level-0 tile size; None for files that record neither."""
    mag = _as_number(feats.attrs.get("coords.level0_magnification"))
    if mag is not None and math.isfinite(mag) and mag > 0:
        return 10.0 / mag
    if feats.mpp and feats.tile_size_px and feats.patch_size_l0:
        return feats.mpp * feats.tile_size_px / feats.patch_size_l0
    return None


def _file_slide_name(feats: SlideFeatures) -> str | None:
    name = feats.attrs.get("coords.name") or feats.attrs.get("features.name")
    return str(name) if name not in (None, "") else None


def check_recorded_geometry(
    feats: SlideFeatures,
    slide: str | None,
    size: tuple[int, int],
    slide_mpp: float,
    mpp_source: str,
) -> None:
    """Refuse a slide or mpp that contradicts what a TRIDENT file records of its slide: the name
    (when ``slide`` is given), the level-0 size and the magnification.

    ``mpp_source`` says where ``slide_mpp`` came from ("the slide", "--mpp"). The override is
    ``ignore_file_geometry`` (``--ignore-file-geometry``).
    """
    if feats.layout != "trident":
        return
    fix = "pass the slide the features were cut from, or --ignore-file-geometry to use it anyway"
    name = _file_slide_name(feats)
    if slide is not None and name is not None and Path(slide).stem != name:
        raise InputError(
            f"{feats.source} records slide {name!r} but --slide is {Path(slide).name!r}; {fix}"
        )
    if slide is not None and feats.level0_size is not None and tuple(size) != feats.level0_size:
        w, h = feats.level0_size
        raise InputError(
            f"{feats.source} records a {w} x {h} px slide but {Path(slide).name!r} is "
            f"{size[0]} x {size[1]} px; {fix}"
        )
    recorded = file_mpp(feats)
    if recorded is not None and not (
        1 / MPP_CONTRADICTION <= slide_mpp / recorded <= MPP_CONTRADICTION
    ):
        mag = 10.0 / recorded
        raise InputError(
            f"{feats.source} records a {mag:g}x slide (about {recorded:.3g} um/px) but "
            f"{mpp_source} says {slide_mpp:g} um/px; drop --mpp, check the slide, or pass "
            "--ignore-file-geometry to use it anyway",
            fields=("mpp",) if mpp_source == "--mpp" else (),
        )


def _open_for_features(
    feats: SlideFeatures, slide: str, mpp: float | None
) -> tuple[tuple[int, int], float, np.ndarray | None, dict[str, Any], str]:
    """The slide's size, mpp, thumbnail and record; a slide without an mpp takes the one its
    TRIDENT file records instead of asking for ``--mpp``."""
    with open_slide(slide, mpp=mpp) as reader:
        source = "--mpp" if mpp else "the slide"
        mpp_xy: tuple[float, float] | None = None
        try:
            slide_mpp = reader.mpp
            mpp_xy = reader.mpp_xy
        except SlideError:
            recorded = file_mpp(feats)
            if recorded is None:
                raise
            slide_mpp, source = recorded, "the feature file's magnification"
        info = {
            "path": str(slide),
            "vendor": reader.vendor,
            "mpp": slide_mpp,
            "mpp_source": source,
            "dimensions": list(reader.dimensions),
        }
        if mpp_xy is not None and mpp_xy[0] != mpp_xy[1]:
            info["mpp_xy"] = list(mpp_xy)
        return reader.dimensions, slide_mpp, reader.thumbnail(1024), info, source


def _slide_geometry(
    feats: SlideFeatures,
    slide: str | None,
    mpp: float | None,
    cfg: Any,
    ignore_file_geometry: bool = False,
) -> tuple[tuple[int, int], float, np.ndarray | None, dict[str, Any]]:
    """Level-0 size, mpp, thumbnail and record of the slide the features were cut from: from
    ``slide``, else from the file (TRIDENT's recorded size and magnification; CLAM's patches
    file's ``level_dim``), else from the tiles themselves."""
    if slide is not None:
        size, slide_mpp, thumb, info, source = _open_for_features(feats, slide, mpp)
        if not ignore_file_geometry:
            check_recorded_geometry(feats, slide, size, slide_mpp, source)
        return size, slide_mpp, thumb, info
    recorded = file_mpp(feats)
    known_mpp = mpp or recorded
    mpp_source = "given" if mpp else "file attributes"
    if mpp and not ignore_file_geometry:
        check_recorded_geometry(feats, None, (0, 0), mpp, "--mpp")
    patch = feats.patch_size_l0
    if known_mpp is None and patch:
        # The tiles were cut at the model's training geometry (e.g. 224 px at 0.5 um/px), so a
        # level-0 tile of `patch` px spans tile_size_px * target_mpp micrometres.
        tile_px = feats.tile_size_px or cfg.tile_size_px
        known_mpp = tile_px * cfg.target_mpp / patch
        mpp_source = (
            f"derived: {tile_px} px tiles at the model's {cfg.target_mpp} um/px over {patch} "
            "level-0 px; pass --mpp or --slide if the features were cut otherwise"
        )
    if known_mpp is None:
        raise SlideError(
            f"{feats.source}: the level-0 mpp is unknown; pass --slide SLIDE or --mpp (level 0)"
        )
    slide_mpp = known_mpp
    if feats.level0_size is not None:  # TRIDENT level0_width/height; CLAM level_dim
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
    ignore_file_geometry: bool = False,
    model_info: dict[str, Any] | None = None,
) -> SlideResult:
    """Heatmap, thresholds and scores of one feature file, as a ``SlideResult``.

    Tiles are placed where the file put them (``fastinsight.slide.placement``); ``snap`` rounds
    them to the model's cells instead. A ``slide`` or ``options.mpp`` that contradicts what a
    TRIDENT file records (slide name, level-0 size, magnification) is refused unless
    ``ignore_file_geometry``. Arguments of the wrong kind (a radiograph model, options that are
    not ``PredictOptions``, a ``path`` that is not a path) are refused first, each with its own
    error.
    """
    opts = _check_options(options)
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(
            f"path must be the path of a feature file (.h5; str or pathlib.Path), got "
            f"{type(path).__name__}"
        )
    check_slide_model(model)
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
    size, slide_mpp, thumbnail, slide_info = _slide_geometry(
        feats, slide, opts.mpp, cfg, ignore_file_geometry
    )
    placement = feature_placement(feats, size, snap)
    mpp_xy = slide_info.get("mpp_xy")
    grid = feature_grid(
        feats, size, slide_mpp, placement.subdivision, tuple(mpp_xy) if mpp_xy else None
    )
    with lent_to(device, model):  # the caller's model comes back as it was
        model.check_device(device)
        pred = _predict_tiles(model, feats, snap, device)
    heat, raw = pred.heatmap, pred.raw_heatmap
    cells = paste(heat.float(), placement, grid.cell_shape)
    raw_cells = paste(raw.float(), placement, grid.cell_shape)
    mask = np.isfinite(cells).all(axis=0)
    xy = feats.l0_xy.numpy().astype(np.float64)
    side = float(feats.patch_size_l0 or feats.step_l0 or placement.pitch_l0)
    tile_boxes = np.concatenate([xy, xy + side], axis=1)
    tile_cells = heat.float().cpu().numpy().reshape(feats.num_tiles, heat.shape[1], -1)
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
        # What "auto" resolved to on this run's device: the report says which maths ran.
        model_info={**(model_info or {"name": "in-memory model"}), "backend": model.backend_in_use},
        encoder_info={
            "name": feats.encoder or "precomputed",
            "features": str(path),
            "layout": feats.layout,
        },
        slide_info=slide_info,
        timings={"total": time.perf_counter() - start},
        thumbnail=thumbnail,
        tile_boxes=tile_boxes,
        tile_cells=np.ascontiguousarray(tile_cells.transpose(1, 0, 2)),
    )


def _predict_tiles(
    model: InsightModel, feats: SlideFeatures, snap: bool, device: torch.device
) -> Any:
    """``model.predict`` of the file's tiles: a slide-context model on each lattice's exact
    grid (CLAM: per contour phase; see the module doc), a tile model tile by tile."""
    if model.config.context == "slide":
        return predict_slide_context(model, feats, snap, device)
    return model.predict(feats.tokens.to(device), feats.tile_mask().to(device))


def predict_slide_context(
    model: InsightModel, feats: SlideFeatures, snap: bool, device: torch.device
) -> Any:
    """``model.predict`` of a slide-context model, each lattice of tiles on its own exact grid
    (``feats.lattices()``), in bands of tile rows; with ``snap`` every tile rounded onto one grid
    (``feats.tile_rc(snap=True)``) instead. The threshold and the pooling see every tile.

    Per lattice the result equals predicting the stitched grid of that lattice's tiles and
    cutting it back into tiles, without ever building the whole grid or its activations
    (``context_bands``). Shapes: -> ``SlidePrediction`` with heatmap / raw_heatmap
    ``[N, K, h, w]`` in file order.
    """
    from fastinsight.context_bands import banded_raw_heatmap

    tokens = feats.tokens.to(device)
    if not bool(torch.isfinite(tokens).all()):
        raise InputError(f"{feats.source}: features contain NaN or inf; re-extract them")
    mask = feats.tile_mask().to(device)
    if snap:
        groups = [(torch.arange(feats.num_tiles), feats.tile_rc(snap=True))]
    else:
        groups = feats.lattices()
    weights = model.head_weights()
    if len(groups) == 1:  # one grid: the file's tiles as they are (no gather, no scatter)
        raw = banded_raw_heatmap(tokens, groups[0][1].to(device), weights, mask)
    else:
        raw = torch.empty(
            (feats.num_tiles, model.config.num_classes, *feats.grid_size),
            dtype=torch.float32,
            device=device,
        )
        for index, rc in groups:
            i = index.to(device)
            raw[i] = banded_raw_heatmap(tokens[i], rc.to(device), weights, mask[i])
    return model.prediction(raw, mask, tokens)


__all__ = [
    "MPP_CONTRADICTION",
    "check_recorded_geometry",
    "feature_grid",
    "feature_placement",
    "file_mpp",
    "predict_features",
    "predict_slide_context",
]
