"""Which reader and which pyramid level served each stage of a slide run, for the run report."""

from __future__ import annotations

from typing import Any

from fastinsight.slide.grid import TileGrid
from fastinsight.slide.readers import SlideReader
from fastinsight.slide.tissue import TissueMask


def reading_provenance(reader: SlideReader, grid: TileGrid, tissue: TissueMask) -> dict[str, Any]:
    """``{"reader", "tissue": {...}, "tiles": {...}}``: the backend that read the slide
    (``direct``, ``openslide``, ``tifffile``), the level, mpp and sampling of the tissue image,
    and the level the tiles were read from with its downsample and size.

    Two runs over the same pixels in different containers report the same levels (one level
    rule, :mod:`fastinsight.slide.levels`), which is how a report shows they are comparable.
    """
    return {
        "reader": reader.backend,
        "tissue": tissue.provenance(),
        "tiles": {
            "level": grid.level,
            "level_downsample": grid.level_downsample,
            "level_dimensions": list(reader.level_dimensions[grid.level]),
            "target_mpp": grid.target_mpp,
            "tile_px": grid.tile_px,
        },
    }
