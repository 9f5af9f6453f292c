"""Write the same pixels into three TIFF containers, the way scanners and converters do.

- ``svs``: Aperio layout (baseline, a stripped thumbnail, then the reduced levels as plain tiled
  main-chain IFDs, SubFileType 0, as Aperio writes them) with
  an Aperio ImageDescription carrying ``MPP``;
- ``tiff``: generic tiled pyramidal TIFF, reduced levels with SubFileType 1, mpp only in the
  X/YResolution tags (CENTIMETER);
- ``ome``: OME-TIFF with the reduced levels in SubIFDs and the mpp only in the OME-XML
  ``PhysicalSizeX`` (OpenSlide sees one level and no mpp).

Tests and the read benchmark use it; nothing here is committed data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tifffile

CONTAINERS = ("svs", "tiff", "ome")


def box_pyramid(level0: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """Level 0 and ``n_levels - 1`` 2x area-averaged reductions (odd edges cropped).

    Shapes: ``[h, w, 3]`` -> ``[h // 2^k, w // 2^k, 3]``.
    """
    levels = [level0]
    for _ in range(n_levels - 1):
        a = levels[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        b = a[:h, :w].astype(np.uint16).reshape(h // 2, 2, w // 2, 2, 3).sum(axis=(1, 3))
        levels.append(((b + 2) // 4).astype(np.uint8))
    return levels


def write_container(
    path: Path,
    levels: list[np.ndarray],
    mpp: float,
    kind: str,
    *,
    compression: Any = "zlib",
    tile: int = 256,
) -> Path:
    """Write ``levels`` (level 0 first, uint8 ``[h, w, 3]``) as ``kind`` (see module doc)."""
    common: dict[str, Any] = {
        "photometric": "rgb",
        "compression": compression,
        "tile": (tile, tile),
        "metadata": None,
    }
    h, w = levels[0].shape[:2]
    if kind == "svs":
        desc = (
            f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) "
            f"J2K/YUV16 Q=70|AppMag = 20|StripeWidth = 2040|MPP = {mpp:.4f}|Filename = test"
        )
        with tifffile.TiffWriter(path, bigtiff=False) as tw:
            tw.write(levels[0], description=desc, **common)
            thumb = levels[-1][::4, ::4]
            tw.write(
                thumb,
                photometric="rgb",
                compression=compression,
                description=f"Aperio Image Library v12.0.15\r\n{w}x{h} -> "
                f"{thumb.shape[1]}x{thumb.shape[0]}",
                metadata=None,
            )
            for lvl in levels[1:]:
                tw.write(
                    lvl,
                    description=f"Aperio Image Library v12.0.15\r\n{w}x{h} -> "
                    f"{lvl.shape[1]}x{lvl.shape[0]}",
                    **common,  # Aperio's levels are plain (SubFileType 0) tiled IFDs
                )
    elif kind == "tiff":
        with tifffile.TiffWriter(path, bigtiff=True) as tw:
            for k, lvl in enumerate(levels):
                scale = w / lvl.shape[1]
                px_per_cm = 10000.0 / (mpp * scale)
                tw.write(
                    lvl,
                    resolution=(px_per_cm, px_per_cm),
                    resolutionunit="CENTIMETER",
                    subfiletype=1 if k else 0,
                    **common,
                )
    elif kind == "ome":
        meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
        with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
            tw.write(
                levels[0],
                subifds=len(levels) - 1,
                photometric="rgb",
                compression=compression,
                tile=(tile, tile),
                metadata=meta,
            )
            for lvl in levels[1:]:
                tw.write(lvl, subfiletype=1, **common)
    else:
        raise ValueError(f"unknown container {kind!r}")
    return path
