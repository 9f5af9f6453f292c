"""Slide side of fastinsight: readers, tissue detection, tile grid, tiler and heatmap outputs.

No model code lives here. A pipeline::

    from fastinsight import slide

    with slide.open_slide("x.svs", mpp=None) as reader:               # SlideError if unreadable
        tissue = slide.detect_tissue(reader, "brightfield")            # low-res mask
        grid = slide.TileGrid.for_slide(reader, target_mpp=0.5, tile_px=224, cells_per_side=14)
        tiles = slide.tissue_tiles(grid, tissue, min_tissue_fraction=0.1)
        for batch in slide.Tiler(reader, grid, tiles, num_workers=4).batches(64):
            ...  # batch.images uint8 [B, 224, 224, 3] -> encoder -> head -> [B, K, 14, 14]
        placed = slide.grid_placement(tiles, grid)                     # one lattice from (0, 0)
        cells = slide.paste(per_tile, placed, grid.cell_shape)         # [K, rows*14, cols*14]
        cells[:, ~slide.cell_tissue_mask(grid, tissue, tiles=tiles)] = float("nan")
        slide.write_heatmap_tiff("x.tumour.tif", cells[k], grid, class_name="tumour")
        slide.write_scores_sidecar("x.scores.npz", cells, grid)
        slide.write_overlay("x.png", reader.thumbnail(1024), cells[k],
                            cell_scale=slide.cell_scale_for(grid, thumb.shape))
        slide.write_geojson("x.geojson", cells[k], grid, per="tile")
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from fastinsight.slide.colormap import COLORMAPS, apply_colormap, colorize
from fastinsight.slide.direct import DirectTiffReader, decode_jpeg_batch
from fastinsight.slide.geojson import heatmap_features, heatmap_geojson, write_geojson
from fastinsight.slide.gpu_tiler import DeviceJpegTiler
from fastinsight.slide.grid import Tile, TileGrid, tiles_cell_mask
from fastinsight.slide.heatmap_tiff import (
    HeatmapGeometry,
    ScoresSidecar,
    decode_scores,
    encode_scores,
    read_scores_sidecar,
    write_heatmap_tiff,
    write_scores_sidecar,
)
from fastinsight.slide.levels import LEVEL_TOLERANCE, best_level
from fastinsight.slide.overlay import cell_scale_for, render_overlay, write_overlay
from fastinsight.slide.placement import (
    Placement,
    grid_placement,
    paste,
    place_tiles,
    rc_placement,
)
from fastinsight.slide.prefetch import DeviceBatch, DevicePrefetcher
from fastinsight.slide.provenance import reading_provenance
from fastinsight.slide.readers import (
    ArrayReader,
    OpenSlideReader,
    Overview,
    SlideReader,
    TiffFileReader,
    open_slide,
    read_overview,
    read_resampled,
)
from fastinsight.slide.tiler import TileBatch, Tiler
from fastinsight.slide.tissue import (
    TISSUE_MODES,
    TissueMask,
    cell_tissue_fraction,
    cell_tissue_mask,
    detect_tissue,
    tile_tissue_fraction,
    tissue_tiles,
)

__all__ = [
    "COLORMAPS",
    "TISSUE_MODES",
    "LEVEL_TOLERANCE",
    "ArrayReader",
    "DeviceBatch",
    "DeviceJpegTiler",
    "DevicePrefetcher",
    "DirectTiffReader",
    "HeatmapGeometry",
    "OpenSlideReader",
    "Placement",
    "ScoresSidecar",
    "SlideReader",
    "Tile",
    "TileBatch",
    "TileGrid",
    "Tiler",
    "TiffFileReader",
    "TissueMask",
    "apply_colormap",
    "best_level",
    "cell_scale_for",
    "cell_tissue_fraction",
    "cell_tissue_mask",
    "colorize",
    "decode_jpeg_batch",
    "decode_scores",
    "detect_tissue",
    "encode_scores",
    "grid_placement",
    "heatmap_features",
    "heatmap_geojson",
    "Overview",
    "open_slide",
    "paste",
    "place_tiles",
    "read_overview",
    "reading_provenance",
    "read_resampled",
    "read_scores_sidecar",
    "render_overlay",
    "tile_tissue_fraction",
    "tiles_cell_mask",
    "tissue_tiles",
    "write_geojson",
    "write_heatmap_tiff",
    "write_overlay",
    "write_scores_sidecar",
]


def stitch_cells(values: Any, tiles: Any, grid: TileGrid, fill: float = float("nan")) -> Any:
    """Deprecated: ``paste(values, grid_placement(tiles, grid), grid.cell_shape, fill)``.

    Kept so old code keeps working (issue #10); ``fastinsight.slide.placement`` is the one
    placement rule. A torch tensor comes back as a tensor on its device, as before.
    Shapes: ``[N, K, c, c]`` -> ``[K, rows * c, cols * c]``; ``[N, c, c]`` -> ``[rows * c, cols * c]``.
    """
    warnings.warn(
        "fastinsight.slide.stitch_cells is deprecated; use fastinsight.slide.paste(values, "
        "fastinsight.slide.grid_placement(tiles, grid), grid.cell_shape)",
        DeprecationWarning,
        stacklevel=2,
    )
    c = int(values.shape[-1])
    shape = (grid.rows * c, grid.cols * c)
    placement = rc_placement(grid_placement(tiles, grid).cell_rc // grid.cells_per_side, c)
    out = paste(values, placement, shape, fill)
    if type(values).__module__.startswith("torch"):
        import torch

        return torch.from_numpy(out).to(device=values.device, dtype=values.dtype)
    return out.astype(np.asarray(values).dtype, copy=False)
