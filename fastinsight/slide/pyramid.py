"""Pyramidal BigTIFF writing shared by the heatmap writer and the synthetic slides.

The layout every viewer we target opens with all its levels and the right mpp (spec section 4):
BigTIFF, 256 x 256 tiles, level 0 then /2 reductions as top-level IFDs in the main chain, each
reduction with SubFileType = 1, ResolutionUnit = CENTIMETER with X/YResolution = 10000 / mpp
of that level, a plain-text ImageDescription and no OME-XML or tifffile JSON.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fastinsight.atomic import atomic_path
from fastinsight.errors import InputError, OutputError

TIFF_TILE = 256


def tiff_text(text: str) -> bytes:
    """``text`` as the bytes of a TIFF ASCII field: UTF-8, without NUL characters.

    tifffile refuses a non-ASCII ``str`` ("TIFF strings must be 7-bit ASCII"), yet slide,
    model and class names are often not ASCII (``Präparat_µ.svs``, CJK names). UTF-8 bytes
    keep every 7-bit ASCII text unchanged, and OpenSlide (``tiff.ImageDescription``), tifffile
    and QuPath read them back as the original text. A NUL would end the field early in C
    readers, so it is dropped.
    """
    return str(text).replace("\x00", "").encode("utf-8")


def pyramid_levels(level0: np.ndarray, min_level_size: int = 1024) -> list[np.ndarray]:
    """Level 0 then every-other-pixel reductions until the longer side is <= ``min_level_size``.

    Shapes: ``[h, w(, s)]`` -> list of ``[ceil(h / 2^k), ceil(w / 2^k)(, s)]``.
    """
    levels = [level0]
    while max(levels[-1].shape[:2]) > min_level_size:
        levels.append(np.ascontiguousarray(levels[-1][::2, ::2]))
    return levels


def write_pyramid_tiff(
    path: str | os.PathLike[str],
    level0: np.ndarray,
    mpp: float | tuple[float, float],
    *,
    compression: str = "zlib",
    compressionargs: dict[str, Any] | None = None,
    description: str = "",
    min_level_size: int = 1024,
    levels: list[np.ndarray] | None = None,
) -> None:
    """Write ``level0`` (uint8 ``[h, w]`` or ``[h, w, 3]``) and its /2 pyramid, atomically.

    ``levels`` may be given precomputed (level 0 first); otherwise every-other-pixel
    reductions are made. ``mpp`` is level 0's micrometres per pixel, one value or ``(x, y)``.
    """
    import tifffile

    if level0.dtype != np.uint8 or level0.ndim not in (2, 3):
        raise InputError(
            f"pyramid TIFF levels must be uint8 [h, w] or [h, w, 3]; got {level0.dtype} "
            f"{level0.shape}"
        )
    mpp_x, mpp_y = mpp if isinstance(mpp, tuple) else (mpp, mpp)
    if not all(np.isfinite(v) and v > 0 for v in (mpp_x, mpp_y)):
        raise InputError(f"mpp must be a positive number; got {mpp!r}")
    photometric = "rgb" if level0.ndim == 3 else "minisblack"
    desc_bytes = tiff_text(description)
    levels = levels or pyramid_levels(level0, min_level_size)
    with atomic_path(path) as tmp:
        try:
            with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
                for k, data in enumerate(levels):
                    res = (10000.0 / (mpp_x * 2**k), 10000.0 / (mpp_y * 2**k))
                    tw.write(
                        data,
                        photometric=photometric,
                        compression=compression,
                        compressionargs=compressionargs or {},
                        tile=(TIFF_TILE, TIFF_TILE),
                        resolution=res,
                        resolutionunit="CENTIMETER",
                        subfiletype=1 if k else 0,
                        description=desc_bytes if k == 0 else None,
                        software="fastinsight",
                        metadata=None,
                    )
        except OSError as exc:
            raise OutputError(f"cannot write {str(path)!r}: {exc}; check disk space") from None
