"""Whole-slide image readers: one interface over OpenSlide, tifffile and direct tile reading.

``open_slide(path)`` returns a :class:`SlideReader`. Backends: ``"direct"``
(:class:`~fastinsight.slide.direct.DirectTiffReader`: tiled TIFF family -- SVS, generic TIFF,
OME-TIFF -- read by ``pread`` and decoded in parallel threads), ``"tifffile"`` (the same files
through tifffile's seek-and-read path), ``"openslide"`` (vendor formats: Hamamatsu ndpi, MIRAX
mrxs, Leica scn, Ventana bif, DICOM WSI given as its folder or any of its files, ...).
``"auto"`` takes, for a TIFF, the direct reader unless OpenSlide sees more levels or an mpp the
TIFF view lacks (see :func:`open_slide`), and otherwise OpenSlide, then tifffile.

Coordinates follow openslide-python: ``read_region(l0_x, l0_y, level, lvl_w, lvl_h)`` takes the
top-left corner in level-0 pixels and the size in pixels of ``level``. Pixels outside the slide
come back white (255), and an alpha channel is composited over white, so every read is a plain
``uint8 [h, w, 3]`` RGB array.

Thread safety: a reader is a handle on one open file and must be used by one thread at a time.
Give every worker thread its own handle with :meth:`SlideReader.clone` (the tiler does this).
The tifffile reader also serialises its reads with a lock, so sharing one by mistake is slow,
not wrong.

Validation: ``open_slide`` checks at open time that no image data of a TIFF-based slide lies past
the end of the file (a truncated copy) and decodes a small region of the lowest level, so a bad
file fails at once with a :class:`~fastinsight.errors.SlideError`, not hours into a run.
"""

from __future__ import annotations

import abc
import logging
import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
from PIL import Image

from fastinsight.dicom import has_preamble
from fastinsight.errors import InputError, SlideError
from fastinsight.slide.levels import LEVEL_TOLERANCE, best_level

Backend = Literal["auto", "openslide", "tifffile", "direct"]
BACKENDS: tuple[str, ...] = ("auto", "direct", "openslide", "tifffile")
Resample = Literal["lanczos", "bicubic", "bilinear", "box", "nearest"]

_PIL_FILTERS: dict[str, Image.Resampling] = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}
# Half-width of each PIL filter in source pixels at scale 1 (PIL's own ``support`` values).
_FILTER_SUPPORT = {"lanczos": 3.0, "bicubic": 2.0, "bilinear": 1.0, "box": 0.5, "nearest": 0.5}

# Micrometres per unit, for OME PhysicalSize units.
_OME_UNIT_UM = {
    "µm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "nm": 1e-3,
    "pm": 1e-6,
    "Å": 1e-4,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}

# A file mpp above this many micrometres per pixel is a default (72 dpi is 352.8 um/px), not a
# microscope calibration: treated as no mpp, whichever reader or tag gave it.
_MAX_PLAUSIBLE_MPP = 100.0
# x and y pixel sizes further apart than this (relative) are refused: the pipeline tiles square
# pixels, and averaging them would misplace the heatmap by up to this fraction along one axis.
_MPP_ANISOTROPY_TOL = 0.05


def _plausible_mpp(mpp: tuple[float, float] | None) -> tuple[float, float] | None:
    """``mpp`` when both sides are positive, finite and at most :data:`_MAX_PLAUSIBLE_MPP`."""
    if mpp is None or not all(math.isfinite(v) and 0 < v <= _MAX_PLAUSIBLE_MPP for v in mpp):
        return None
    return mpp


def _slide_name(path: Path) -> str:
    return repr(str(path))


def _check_mpp_value(mpp: float | None) -> float | None:
    if mpp is None:
        return None
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise InputError(
            f"--mpp must be a number of microns per pixel, e.g. 0.25; got {mpp!r}"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise InputError(
            f"--mpp must be a positive number of microns per pixel, e.g. 0.25; got {mpp!r}"
        )
    return value


def _composite_over_white(rgba: np.ndarray) -> np.ndarray:
    """Drop alpha by compositing straight (non-premultiplied) RGBA over white.

    Shapes: ``[h, w, 4]`` uint8 -> ``[h, w, 3]`` uint8.
    """
    alpha = rgba[..., 3:4]
    rgb = rgba[..., :3]
    if alpha.size == 0 or int(alpha.min()) == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class SlideReader(abc.ABC):
    """A whole-slide image: a pyramid of RGB levels with a physical pixel size.

    Subclasses open the file in ``__init__`` and fill ``_level_dimensions``, ``_file_mpp``,
    ``_properties`` and ``_vendor``; they implement :meth:`_read_level` and :meth:`clone`.
    """

    backend: str = "?"

    def __init__(self, path: str | os.PathLike[str], mpp: float | None = None) -> None:
        self._path = Path(path)
        self._mpp_override = _check_mpp_value(mpp)
        self._level_dimensions: tuple[tuple[int, int], ...] = ()
        self._file_mpp: tuple[float, float] | None = None
        self._properties: dict[str, str] = {}
        self._vendor = "unknown"
        self._closed = False

    # ----------------------------------------------------------------------------- geometry
    @property
    def path(self) -> Path:
        """The slide file."""
        return self._path

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 size ``(width, height)`` in pixels."""
        return self._level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self._level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of every level, level 0 first."""
        return self._level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Real downsample of every level against level 0 (e.g. 2.0005), as OpenSlide computes
        it: the mean of the width and height ratios."""
        w0, h0 = self.dimensions
        return tuple((w0 / w + h0 / h) / 2.0 for w, h in self._level_dimensions)

    # ---------------------------------------------------------------------------- metadata
    @property
    def vendor(self) -> str:
        return self._vendor

    @property
    def properties(self) -> Mapping[str, str]:
        """Metadata as strings (OpenSlide's properties, or TIFF/OME/Aperio fields)."""
        return dict(self._properties)

    @property
    def file_mpp(self) -> tuple[float, float] | None:
        """``(mpp_x, mpp_y)`` from the file's own metadata, or None if it has none."""
        return self._file_mpp

    @property
    def has_mpp(self) -> bool:
        return self._mpp_override is not None or self._file_mpp is not None

    @property
    def mpp_xy(self) -> tuple[float, float]:
        """``(mpp_x, mpp_y)`` in micrometres per level-0 pixel; the ``mpp=`` override wins."""
        if self._mpp_override is not None:
            return (self._mpp_override, self._mpp_override)
        if self._file_mpp is None:
            raise SlideError(
                f"slide {_slide_name(self._path)} has no mpp (microns per pixel) in its metadata; "
                "pass --mpp, e.g. --mpp 0.5"
            )
        return self._file_mpp

    @property
    def mpp(self) -> float:
        """Micrometres per level-0 pixel: the mean of x and y, which agree on real scanners;
        pixels more than 5 % from square are refused (``--mpp`` overrides both)."""
        mpp_x, mpp_y = self.mpp_xy
        mean = (mpp_x + mpp_y) / 2.0
        if abs(mpp_x - mpp_y) > _MPP_ANISOTROPY_TOL * mean:
            raise SlideError(
                f"slide {_slide_name(self._path)} has non-square pixels ({mpp_x:.4g} x "
                f"{mpp_y:.4g} um); fastinsight tiles square pixels: resample it, or pass --mpp "
                "if one of the two values is wrong"
            )
        return mean

    # ------------------------------------------------------------------------------ levels
    def best_level_for_downsample(
        self, downsample: float, tolerance: float = LEVEL_TOLERANCE
    ) -> int:
        """The coarsest level whose downsample is at most ``downsample * (1 + tolerance)``.

        The tolerance lets a level at 2.0005 serve a requested 2.0 (a 0.03 % upsample) instead
        of falling back to a level four times larger.
        """
        return best_level(self.level_downsamples, downsample, tolerance)

    # ------------------------------------------------------------------------------ pixels
    def read_region(self, l0_x: int, l0_y: int, level: int, lvl_w: int, lvl_h: int) -> np.ndarray:
        """Read ``lvl_w x lvl_h`` pixels of ``level`` whose top-left is at level-0 (l0_x, l0_y).

        Areas outside the slide are white. Shapes: -> ``uint8 [lvl_h, lvl_w, 3]`` RGB.
        """
        self._check_open()
        if not 0 <= level < self.level_count:
            raise InputError(
                f"level must be in [0, {self.level_count - 1}] for slide "
                f"{_slide_name(self._path)}; got {level}"
            )
        lvl_w, lvl_h = int(lvl_w), int(lvl_h)
        if lvl_w < 0 or lvl_h < 0:
            raise InputError(f"region size must be non-negative; got {lvl_w} x {lvl_h}")
        if lvl_w == 0 or lvl_h == 0:
            return np.full((lvl_h, lvl_w, 3), 255, dtype=np.uint8)
        return self._read_level(int(l0_x), int(l0_y), level, lvl_w, lvl_h)

    @abc.abstractmethod
    def _read_level(self, l0_x: int, l0_y: int, level: int, lvl_w: int, lvl_h: int) -> np.ndarray:
        """Backend read; arguments already validated."""

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide, downsampled so its longer side is ``max_size``.

        Never upsamples. The output size is ``round(width / s) x round(height / s)`` with
        ``s = max(width, height) / max_size``. Built by :func:`read_overview`: an area average
        of the best level, or strided tile sampling when that level is too large to decode
        whole (a giant single-level image), so time and memory stay bounded.
        Shapes: -> ``uint8 [h, w, 3]`` RGB.
        """
        if max_size < 1:
            raise InputError(f"thumbnail max_size must be >= 1; got {max_size}")
        w0, h0 = self.dimensions
        scale = max(1.0, max(w0, h0) / float(max_size))
        out_w = max(1, round(w0 / scale))
        out_h = max(1, round(h0 / scale))
        return read_overview(self, out_w, out_h).image

    def native_tile_size(self, level: int) -> tuple[int, int]:
        """``(height, width)`` of the blocks the file stores ``level`` in (the unit of
        decoding); 256 x 256 when the backend does not say."""
        return (256, 256)

    # ----------------------------------------------------------------------------- handles
    @abc.abstractmethod
    def clone(self) -> SlideReader:
        """A new independent handle on the same file (same backend and mpp override), for
        another thread."""

    def close(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise SlideError(
                f"slide {_slide_name(self._path)} is closed; open it again with open_slide()"
            )

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        # mpp_xy, not mpp: a repr must not raise (non-square pixels make .mpp refuse).
        mpp = "x".join(f"{v:.4g}" for v in sorted(set(self.mpp_xy))) if self.has_mpp else "none"
        return (
            f"{type(self).__name__}({str(self._path)!r}, dimensions={self.dimensions}, "
            f"levels={self.level_count}, mpp={mpp}, vendor={self._vendor!r})"
        )


# ==================================================================================== OpenSlide


class OpenSlideReader(SlideReader):
    """A slide read through OpenSlide (vendor formats and tiled generic TIFF).

    OpenSlide's C library is thread-safe, but one handle per thread (``clone``) keeps the same
    rule for both backends.
    """

    backend = "openslide"

    def __init__(
        self,
        path: str | os.PathLike[str],
        mpp: float | None = None,
        *,
        cache_bytes: int = 64 * 2**20,
        _cache: Any = None,
    ) -> None:
        super().__init__(path, mpp)
        import openslide

        try:
            self._osr = openslide.OpenSlide(str(self._path))
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise SlideError(
                f"OpenSlide cannot open {_slide_name(self._path)}: {_one_line(exc)}"
            ) from None
        # One decoded-tile cache shared by a reader and its clones: neighbouring tiles read by
        # different threads often need the same source tile.
        self._cache_bytes = int(cache_bytes)
        self._os_cache = (
            _cache if _cache is not None else openslide.OpenSlideCache(self._cache_bytes)
        )
        self._osr.set_cache(self._os_cache)
        props = self._osr.properties
        self._properties = {str(k): str(v) for k, v in props.items()}
        self._vendor = self._properties.get("openslide.vendor", "unknown")
        self._level_dimensions = tuple((int(w), int(h)) for w, h in self._osr.level_dimensions)
        try:
            _check_level_dimensions(self._level_dimensions, self._path)
        except SlideError:
            self._osr.close()
            raise
        self._osr_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        mpp_x = _parse_float(self._properties.get("openslide.mpp-x"))
        mpp_y = _parse_float(self._properties.get("openslide.mpp-y"))
        if mpp_x is not None and mpp_y is not None:
            self._file_mpp = _plausible_mpp((mpp_x, mpp_y))

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._osr_downsamples

    def native_tile_size(self, level: int) -> tuple[int, int]:
        th = _parse_float(self._properties.get(f"openslide.level[{level}].tile-height"))
        tw = _parse_float(self._properties.get(f"openslide.level[{level}].tile-width"))
        if th and tw and th > 0 and tw > 0:
            return (int(th), int(tw))
        return (256, 256)

    def _read_level(self, l0_x: int, l0_y: int, level: int, lvl_w: int, lvl_h: int) -> np.ndarray:
        import openslide

        try:
            img = self._osr.read_region((l0_x, l0_y), level, (lvl_w, lvl_h))
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"OpenSlide failed to read slide {_slide_name(self._path)} at level {level}, "
                f"level-0 ({l0_x}, {l0_y}), size {lvl_w}x{lvl_h}: {_one_line(exc)}; "
                "the file may be truncated or corrupt"
            ) from None
        return _composite_over_white(np.asarray(img))

    def clone(self) -> OpenSlideReader:
        self._check_open()
        return OpenSlideReader(
            self._path, mpp=self._mpp_override, cache_bytes=self._cache_bytes, _cache=self._os_cache
        )

    def close(self) -> None:
        if not self._closed:
            self._osr.close()
        super().close()


# ===================================================================================== tifffile


class TiffFileReader(SlideReader):
    """A (pyramidal) TIFF read tile by tile through tifffile and imagecodecs.

    Reads only the tiles or strips a region touches, through a small per-handle LRU cache of
    decoded tiles. Supports 8-bit RGB, RGBA and grayscale pages (contiguous or planar), any
    compression imagecodecs decodes (JPEG, JPEG 2000 incl. Aperio 33003/33005, deflate, LZW,
    ...), and the levels of tifffile's series (SubIFD or main-chain pyramids).
    """

    backend = "tifffile"

    def __init__(
        self,
        path: str | os.PathLike[str],
        mpp: float | None = None,
        *,
        cache_bytes: int = 64 * 2**20,
        _cache: _TileCache | None = None,
    ) -> None:
        super().__init__(path, mpp)
        self._tif = _open_tifffile(self._path)
        try:
            self._setup()
        except BaseException:
            self._tif.close()
            raise
        self._lock = threading.Lock()
        # Shared by a reader and its clones (thread-safe), like OpenSlide's cache.
        self._cache = _cache if _cache is not None else _TileCache(int(cache_bytes))

    def _setup(self) -> None:
        tif = self._tif
        main = _main_series(tif)
        if main is None:
            raise SlideError(f"tifffile finds no image in {_slide_name(self._path)}")
        # Before the sample checks: a stack of 16-bit channel planes is first a stack.
        _check_one_plane(main, self._path)
        pages = []
        for level in main.levels:
            page = level.keyframe
            pages.append(page)
        pages.sort(key=_yx_area, reverse=True)
        for page in pages:
            _check_page_supported(page, self._path)
        # Before any tile is read (validate=False included): sizes against tile tables.
        _check_tiff_structure(tif, pages, self._path)
        self._pages = pages
        self._level_dimensions = tuple((int(p.imagewidth), int(p.imagelength)) for p in pages)
        first = pages[0]
        self._vendor = _tiff_vendor(tif)
        self._properties = _tiff_properties(tif, first, self._vendor)
        index = next(i for i, s in enumerate(tif.series) if s is main)
        self._file_mpp = _tiff_mpp(tif, first, index)
        if self._file_mpp is not None:
            self._properties["fastinsight.mpp-x"] = repr(self._file_mpp[0])
            self._properties["fastinsight.mpp-y"] = repr(self._file_mpp[1])

    # ------------------------------------------------------------------------------ reading
    def _read_level(self, l0_x: int, l0_y: int, level: int, lvl_w: int, lvl_h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        lvl_x = int(round(l0_x / ds))
        lvl_y = int(round(l0_y / ds))
        out = np.full((lvl_h, lvl_w, 3), 255, dtype=np.uint8)
        width, height = self._level_dimensions[level]
        x0, y0 = max(lvl_x, 0), max(lvl_y, 0)
        x1, y1 = min(lvl_x + lvl_w, width), min(lvl_y + lvl_h, height)
        if x0 >= x1 or y0 >= y1:
            return out
        page = self._pages[level]
        seg_h, seg_w = _segment_shape(page)
        n_cols = -(-width // seg_w)
        wanted = [
            (seg_row, seg_col)
            for seg_row in range(y0 // seg_h, (y1 - 1) // seg_h + 1)
            for seg_col in range(x0 // seg_w, (x1 - 1) // seg_w + 1)
        ]
        tiles = self._segments(level, [r * n_cols + c for r, c in wanted], seg_h, seg_w)
        for (seg_row, seg_col), tile in zip(wanted, tiles, strict=True):
            ty, tx = seg_row * seg_h, seg_col * seg_w
            sy0, sy1 = max(y0, ty), min(y1, ty + tile.shape[0])
            sx0, sx1 = max(x0, tx), min(x1, tx + tile.shape[1])
            if sy0 >= sy1 or sx0 >= sx1:
                continue
            out[sy0 - lvl_y : sy1 - lvl_y, sx0 - lvl_x : sx1 - lvl_x] = tile[
                sy0 - ty : sy1 - ty, sx0 - tx : sx1 - tx
            ]
        return out

    def _segments(self, level: int, indices: list[int], seg_h: int, seg_w: int) -> list[np.ndarray]:
        """The decoded segments a read needs, in order (tifffile seeks and reads: one lock)."""
        with self._lock:
            return [self._segment(level, i, seg_h, seg_w) for i in indices]

    def native_tile_size(self, level: int) -> tuple[int, int]:
        return _segment_shape(self._pages[level])

    def _segment(self, level: int, index: int, seg_h: int, seg_w: int) -> np.ndarray:
        """One decoded tile/strip as ``uint8 [h, w, 3]`` RGB, through the LRU cache."""
        key = (level, index)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        tile = self._decode_segment(self._pages[level], index, seg_h, seg_w)
        tile.setflags(write=False)
        self._cache.put(key, tile)
        return tile

    def _decode_segment(self, page: Any, index: int, seg_h: int, seg_w: int) -> np.ndarray:
        fh = self._tif.filehandle
        n_planes = page.samplesperpixel if page.planarconfig == 2 else 1
        n_per_plane = len(page.dataoffsets) // n_planes
        kwargs: dict[str, Any] = {"_fullsize": True}
        if page.compression in {6, 7, 34892, 33007}:  # JPEG flavours
            kwargs["jpegtables"] = page.jpegtables
            kwargs["jpegheader"] = page.jpegheader
        planes: list[np.ndarray | None] = []
        for plane in range(n_planes):
            i = plane * n_per_plane + index
            if not 0 <= index < n_per_plane or i >= len(page.databytecounts):
                raise _DamagedTiff(
                    f"slide {_slide_name(self._path)} is damaged: tile {i} of its "
                    f"{page.imagewidth}x{page.imagelength} level is not in its tile table "
                    f"({len(page.dataoffsets)} tiles); re-copy or re-export it"
                )
            offset, count = int(page.dataoffsets[i]), int(page.databytecounts[i])
            data: bytes | None
            if offset == 0 or count == 0:
                data = None
            else:
                fh.seek(offset)
                data = fh.read(count)
                if len(data) != count:
                    raise SlideError(
                        f"slide {_slide_name(self._path)} is truncated: tile {i} of a "
                        f"{page.imagewidth}x{page.imagelength} level ends past the end of the "
                        "file; re-copy the file"
                    )
            if data is not None:
                check_tile_fits(data, seg_h, seg_w, i, self._path)
            try:
                seg, _, _ = page.decode(data, i, **kwargs)
            except Exception as exc:
                raise SlideError(
                    f"cannot decode tile {i} of slide {_slide_name(self._path)} "
                    f"(compression {int(page.compression)}): {_one_line(exc)}; the file may be "
                    "corrupt, or imagecodecs lacks this codec"
                ) from None
            if seg is None:  # an empty (sparse) tile: background
                planes.append(None)
                continue
            arr = np.asarray(seg)
            arr = arr.reshape(arr.shape[-3], arr.shape[-2], arr.shape[-1])  # [h, w, s]
            planes.append(arr)
        if all(p is None for p in planes):
            return np.full((seg_h, seg_w, 3), 255, dtype=np.uint8)
        template = next(p for p in planes if p is not None)
        filled = [p if p is not None else np.full_like(template, 255) for p in planes]
        arr = np.concatenate(filled, axis=-1) if n_planes > 1 else filled[0]
        return _to_rgb(arr, page)

    # ------------------------------------------------------------------------------ handles
    def clone(self) -> TiffFileReader:
        self._check_open()
        return TiffFileReader(
            self._path, mpp=self._mpp_override, cache_bytes=self._cache.capacity, _cache=self._cache
        )

    def close(self) -> None:
        if not self._closed:
            self._tif.close()
        super().close()

    def check_complete(self) -> None:
        """Raise SlideError if any tile or strip of any level lies past the end of the file."""
        _check_segments_in_file(self._tif, self._pages, self._path)


# ======================================================================================== arrays


class ArrayReader(SlideReader):
    """An in-memory slide: level arrays ``uint8 [h, w, 3]``, level 0 first.

    For tests and for images already in memory (and as the smallest example of a backend).
    Clones share the (read-only) arrays.
    """

    backend = "array"

    def __init__(
        self,
        levels: np.ndarray | list[np.ndarray],
        mpp: float | None = None,
        *,
        path: str | os.PathLike[str] = "<array>",
        vendor: str = "array",
    ) -> None:
        super().__init__(path, None)
        arrays = [levels] if isinstance(levels, np.ndarray) else list(levels)
        if not arrays:
            raise InputError("ArrayReader needs at least one level array")
        for a in arrays:
            if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8 or 0 in a.shape:
                raise InputError(
                    f"levels must be non-empty uint8 [h, w, 3]; got {a.dtype} {a.shape}"
                )
        self._arrays = arrays
        self._level_dimensions = tuple((int(a.shape[1]), int(a.shape[0])) for a in arrays)
        file_mpp = _check_mpp_value(mpp)
        self._file_mpp = (file_mpp, file_mpp) if file_mpp is not None else None
        self._vendor = vendor

    def _read_level(self, l0_x: int, l0_y: int, level: int, lvl_w: int, lvl_h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        lvl_x, lvl_y = int(round(l0_x / ds)), int(round(l0_y / ds))
        out = np.full((lvl_h, lvl_w, 3), 255, dtype=np.uint8)
        src = self._arrays[level]
        x0, y0 = max(lvl_x, 0), max(lvl_y, 0)
        x1, y1 = min(lvl_x + lvl_w, src.shape[1]), min(lvl_y + lvl_h, src.shape[0])
        if x0 < x1 and y0 < y1:
            out[y0 - lvl_y : y1 - lvl_y, x0 - lvl_x : x1 - lvl_x] = src[y0:y1, x0:x1]
        return out

    def clone(self) -> ArrayReader:
        self._check_open()
        mpp = self._file_mpp[0] if self._file_mpp is not None else None
        return ArrayReader(self._arrays, mpp, path=self._path, vendor=self._vendor)


# =================================================================================== tiff helpers


class _TileCache:
    """A thread-safe LRU of decoded tiles, bounded in bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: tuple[int, int], value: np.ndarray) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._used += value.nbytes
            while self._used > self.capacity and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._used -= old.nbytes


class _TiffLogCapture(logging.Handler):
    """Collects tifffile's log warnings (it logs, not raises, on IFD offsets past the end)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


_TIFF_LOG_LOCK = threading.Lock()
_TRUNCATION_LOG = re.compile(r"invalid\b.*\boffset|offset to first page", re.IGNORECASE)


def _open_tifffile(path: Path) -> Any:
    """Open ``path`` with tifffile and load every IFD; a broken IFD chain is a SlideError.

    tifffile only logs a warning when an IFD lies past the end of the file (a truncated copy)
    and then silently drops the pages after it -- a slide would lose levels without a word.
    """
    import tifffile

    logger = logging.getLogger("tifffile")
    capture = _TiffLogCapture()
    with _TIFF_LOG_LOCK:
        logger.addHandler(capture)
        try:
            try:
                tif = tifffile.TiffFile(str(path))
            except Exception as exc:  # TiffFileError, ValueError, OSError, struct.error, ...
                raise SlideError(
                    f"tifffile cannot open {_slide_name(path)}: {_one_line(exc)}"
                ) from None
            try:
                len(tif.pages)  # walks the whole IFD chain
                for i, page in enumerate(_tiff_pages(tif)):
                    _ = page.shape
                    # Sizes against tile tables, before tifffile's series parsing divides by
                    # a zero tile size or any reader indexes past a tile table.
                    _check_page_structure(page, path, i)
                _ = tif.series  # parsed here, so its log warnings are captured, not printed
            except SlideError:
                tif.close()
                raise
            except Exception as exc:
                tif.close()
                raise _DamagedTiff(
                    f"slide {_slide_name(path)} is damaged: its TIFF structure is broken "
                    f"({_one_line(exc)}); the file may be truncated or corrupt; re-copy it"
                ) from None
        finally:
            logger.removeHandler(capture)
    # Only offsets past the end of the file are fatal (a truncated copy); tifffile also logs
    # benign oddities of vendor tags, which must not turn away a slide OpenSlide reads.
    broken = [m for m in capture.messages if _TRUNCATION_LOG.search(m)]
    if broken:
        tif.close()
        detail = re.sub(r"<[^>]*>\s*", "", _one_line(Exception(broken[0])))
        raise SlideError(
            f"slide {_slide_name(path)} is truncated or corrupt: its TIFF structure points past "
            f"the end of the file ({detail}); re-copy the file and check its size"
        )
    return tif


def _tiff_pages(tif: Any) -> list[Any]:
    """Every IFD of the main chain as a ``TiffPage``: once tifffile has parsed an OME (or
    ImageJ, ...) series it turns on ``pages.useframes``, and iterating ``tif.pages`` then
    yields ``TiffFrame``s, which lack the size and tile tags the structure checks read."""
    import tifffile

    pages = tif.pages
    count = len(pages)  # walks the whole IFD chain
    get = getattr(pages, "get", None)
    if get is not None:  # tifffile >= 2023: a TiffPage, read from file if only a frame is cached
        return [get(i, aspage=True) for i in range(count)]
    return [p if isinstance(p, tifffile.TiffPage) else p.aspage() for p in pages]


def _main_series(tif: Any) -> Any | None:
    """The main image: the largest of tifffile's series (thumbnails, labels and macros are
    smaller); None when there is no 2-D image."""
    series = [s for s in tif.series if s.keyframe is not None and len(s.shape) >= 2]
    if not series:
        return None
    return max(series, key=lambda s: _yx_area(s.keyframe))


# Series kinds whose axes say what the planes are (the file's own metadata); the vendor
# kinds (svs, ndpi, scn, bif, philips, generic) keep their focal planes' first plane, as
# OpenSlide reads them.
_PLANE_METADATA_KINDS = {"ome": "an OME-TIFF", "imagej": "an ImageJ TIFF", "shaped": "a TIFF"}


def _plane_words(axis: str, n: int) -> str:
    if axis == "C":
        return f"{n} channel planes"
    if axis == "Z":
        return f"a Z stack of {n} planes"
    if axis == "T":
        return f"{n} time points"
    return f"{n} planes along its {axis} axis"


class _MultiPlaneTiff(SlideError):
    """The main image holds several planes (channels as pages, a Z stack, a time series): every
    reader would read one plane of it as the slide, so it is refused, alone, by every reader."""


def _check_one_plane(series: Any, path: Path) -> None:
    """Refuse a main series of several planes (OME/ImageJ/tifffile axes other than Y, X and
    the samples S, of length > 1): the readers read one plane (a keyframe) as the slide, which
    for channels stored as planes is channel 0 as grey."""
    kind = _PLANE_METADATA_KINDS.get(str(getattr(series, "kind", "") or "").lower())
    if kind is None:
        return
    axes, shape = str(series.axes), tuple(int(n) for n in series.shape)
    planes = [(a, n) for a, n in zip(axes, shape, strict=False) if a not in "YXS" and n > 1]
    if not planes:
        return
    held = " and ".join(_plane_words(a, n) for a, n in planes)
    raise _MultiPlaneTiff(
        f"slide {_slide_name(path)} is {kind} with {held} (axes {axes}, shape "
        f"{'x'.join(map(str, shape))}); fastinsight reads brightfield slides stored as one "
        "plane (RGB samples, or grey); save it as one interleaved RGB image (e.g. bfconvert, "
        "or tifffile.imwrite(..., photometric='rgb') of a [H, W, 3] array)"
    )


def _yx_area(page_or_series: Any) -> int:
    page = page_or_series
    return int(getattr(page, "imagewidth", 0)) * int(getattr(page, "imagelength", 0))


def _segment_shape(page: Any) -> tuple[int, int]:
    """(height, width) of one tile or strip of ``page``."""
    if page.is_tiled:
        return int(page.tilelength), int(page.tilewidth)
    rows = int(page.rowsperstrip) if page.rowsperstrip else int(page.imagelength)
    return min(rows, int(page.imagelength)), int(page.imagewidth)


class _UnsupportedLayout(SlideError):
    """A reader parsed the file and found a pixel layout fastinsight does not read (float or
    16-bit samples, CMYK, a volume): a diagnosis, shown alone rather than beside other readers'
    guesses."""


def _check_page_supported(page: Any, path: Path) -> None:
    dtype = np.dtype(page.dtype) if page.dtype is not None else None
    if dtype != np.uint8:
        raise _UnsupportedLayout(
            f"slide {_slide_name(path)} has {dtype} samples; fastinsight reads 8-bit RGB or "
            "grayscale slides; convert it (e.g. with bfconvert or vips) to 8-bit"
        )
    if int(page.imagedepth) != 1:
        raise _UnsupportedLayout(
            f"slide {_slide_name(path)} is a volume (ImageDepth > 1); expected a 2-D slide"
        )
    photometric = int(page.photometric)
    spp = int(page.samplesperpixel)
    # 0 MinIsWhite, 1 MinIsBlack, 2 RGB, 6 YCbCr (JPEG decodes it to RGB)
    if photometric not in {0, 1, 2, 6} or spp not in {1, 2, 3, 4}:
        raise _UnsupportedLayout(
            f"slide {_slide_name(path)} has photometric {photometric} with {spp} samples; "
            "expected RGB(A) or grayscale; convert it to RGB"
        )


class _DamagedTiff(SlideError):
    """The TIFF's own tags contradict each other (sizes against tile tables, a zero or absurd
    tile size): a diagnosis, shown alone rather than beside other readers' guesses."""


# No TIFF writer makes tiles larger than this (they are 256-1024 px; the spec asks multiples of
# 16); a larger TileWidth/TileLength is a damaged tag, and decoding it would allocate GiBs
# (65535 x 65535 x 3 is 12 GiB) for a few bytes of header.
MAX_TILE_SIDE = 16384


def _check_level_dimensions(dims: Any, path: Path) -> None:
    """Every level ``(width, height)`` within 1..``MAX_SLIDE_SIDE_PX`` (docs/exit-codes.md),
    checked when the slide is opened, before any region is read."""
    from fastinsight.inputs import MAX_SLIDE_SIDE_PX

    for level, (w, h) in enumerate(dims):
        if not (1 <= int(w) <= MAX_SLIDE_SIDE_PX and 1 <= int(h) <= MAX_SLIDE_SIDE_PX):
            raise _DamagedTiff(
                f"slide {_slide_name(path)} is damaged or not a slide: level {level} is "
                f"{int(w)} x {int(h)} px, outside 1..{MAX_SLIDE_SIDE_PX} px per side; re-copy or "
                "re-export the slide"
            )


def _expected_segments(page: Any) -> int:
    """Tiles (or strips) the page's sizes call for: ceil(w/tw) * ceil(h/th) (times depth and,
    for planar data, samples); the page's sizes are known to be positive here."""
    w, h, d = int(page.imagewidth), int(page.imagelength), max(1, int(page.imagedepth))
    planes = int(page.samplesperpixel) if int(page.planarconfig) == 2 else 1
    if page.is_tiled:
        td = max(1, int(getattr(page, "tiledepth", 1) or 1))
        per = -(-w // int(page.tilewidth)) * -(-h // int(page.tilelength)) * -(-d // td)
    else:
        rows = int(page.rowsperstrip) if page.rowsperstrip else h
        per = -(-h // min(rows, h)) * d
    return per * max(1, planes)


def _check_page_structure(page: Any, path: Path, index: Any, read_here: bool = False) -> None:
    """Refuse a page whose size tags disagree with its tile table, before anything is read:
    image sizes of 0 or beyond 1,000,000 px, a TileWidth/TileLength of 0 or beyond
    :data:`MAX_TILE_SIDE`, a RowsPerStrip of 0, or a number of tile offsets other than
    ceil(w/tw) * ceil(h/th) (per plane). ``read_here``: the page is a level this package
    decodes, so one tile or strip must also fit in memory."""
    name = _slide_name(path)
    what = f"slide {name} is damaged: TIFF page {index}"
    w, h = int(page.imagewidth), int(page.imagelength)
    if w < 1 or h < 1:
        raise _DamagedTiff(f"{what} declares an image of {w} x {h} px; re-copy or re-export it")
    _check_level_dimensions([(w, h)], path)
    tags = page.tags
    tw = int(page.tilewidth or 0)
    tl = int(page.tilelength or 0)
    tagged = 322 in tags or 323 in tags
    if tagged or page.is_tiled:
        # NDPI has no tile tags: tifffile derives tiles from the JPEG restart markers, which
        # may be as wide as the image; only tag values are held to MAX_TILE_SIDE.
        limit = MAX_TILE_SIDE if tagged else 2**31
        if not (1 <= tw <= limit and 1 <= tl <= limit):
            raise _DamagedTiff(
                f"{what} declares {tw} x {tl} px tiles (expected 1 to {MAX_TILE_SIDE} px per "
                "side); re-copy or re-export it"
            )
    elif 278 in tags and int(tags[278].value) < 1:
        raise _DamagedTiff(f"{what} declares RowsPerStrip 0; re-copy or re-export it")
    n_offsets, n_counts = len(page.dataoffsets), len(page.databytecounts)
    expected = _expected_segments(page)
    if n_offsets != expected or n_counts != n_offsets:
        seg = f"{tw} x {tl} px tiles" if page.is_tiled else "strips"
        stored = f"{n_offsets}" if n_counts == n_offsets else f"{n_offsets} offsets and {n_counts}"
        raise _DamagedTiff(
            f"{what} is {w} x {h} px in {seg}, which needs {expected} tiles, but its tile table "
            f"holds {stored}; the size tags and the tile table disagree: re-copy or re-export it"
        )
    if read_here and (not tagged or not page.is_tiled):
        from fastinsight.inputs import allocation_limit

        seg_h, seg_w = _segment_shape(page)
        nbytes = seg_h * seg_w * max(3, int(page.samplesperpixel)) * 2  # decoded + RGB copy
        if nbytes > allocation_limit():
            raise _DamagedTiff(
                f"slide {name}: TIFF page {index} stores {w} x {h} px in segments of {seg_w} x "
                f"{seg_h} px; one needs {nbytes / 2**30:.1f} GiB to decode, more than this machine "
                "allows; convert it to a tiled pyramid (e.g. with vips tiffsave)"
            )


def _check_tiff_structure(tif: Any, levels: Any, path: Path) -> None:
    """:func:`_check_page_structure` with the bounds of a decoded level for every level that is
    read (including SubIFD levels; every main-chain page was checked by
    :func:`_open_tifffile`, so a damaged level-0 page whose size reads as 0 cannot drop out
    of the pyramid and leave a thumbnail as the slide)."""
    for level, page in enumerate(levels):
        index = getattr(page, "index", f"of level {level}")
        _check_page_structure(page, path, index, read_here=True)


def _to_rgb(arr: np.ndarray, page: Any) -> np.ndarray:
    """Decoded samples ``[h, w, s]`` -> ``uint8 [h, w, 3]`` RGB."""
    spp = arr.shape[-1]
    photometric = int(page.photometric)
    if spp in (1, 2):  # gray (+ alpha)
        gray = arr[..., 0]
        if photometric == 0:
            gray = 255 - gray
        rgb = np.repeat(gray[..., None], 3, axis=-1)
        if spp == 2:
            rgb = _composite_over_white(np.concatenate([rgb, arr[..., 1:2]], axis=-1))
        return np.ascontiguousarray(rgb, dtype=np.uint8)
    if spp == 4:
        return _composite_over_white(arr)
    return np.ascontiguousarray(arr[..., :3], dtype=np.uint8)


def _check_segments_in_file(tif: Any, pages: Any, path: Path) -> None:
    """Every page's tile table matches its size tags, and no tile lies past the end of file."""
    size = int(tif.filehandle.size)
    for i, page in enumerate(pages):
        _check_page_structure(page, path, getattr(page, "index", i))
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        if offsets.size == 0:
            continue
        ends = offsets + counts
        worst = int(ends.max())
        if worst > size:
            missing = int((ends > size).sum())
            raise SlideError(
                f"slide {_slide_name(path)} is truncated: {missing} of {offsets.size} tiles of its "
                f"{page.imagewidth}x{page.imagelength} level lie past the end of the file "
                f"({size} bytes, data needs {worst}); re-copy the file and check its size"
            )


def _tiff_vendor(tif: Any) -> str:
    for flag, name in (
        ("is_ome", "ome-tiff"),
        ("is_svs", "aperio"),
        ("is_ndpi", "hamamatsu"),
        ("is_scn", "leica"),
        ("is_bif", "ventana"),
        ("is_philips", "philips"),
    ):
        if getattr(tif, flag, False):
            return name
    return "generic-tiff"


def _tiff_properties(tif: Any, page: Any, vendor: str) -> dict[str, str]:
    props: dict[str, str] = {"fastinsight.backend": "tifffile", "fastinsight.vendor": vendor}
    for tag in page.tags.values():
        if tag.name in {
            "ImageDescription",
            "Software",
            "Make",
            "Model",
            "DateTime",
            "XResolution",
            "YResolution",
            "ResolutionUnit",
            "Compression",
            "Photometric",
        }:
            value = tag.value
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            props[f"tiff.{tag.name}"] = str(value)
    description = page.description or ""
    if vendor == "aperio":
        for item in description.split("|")[1:]:
            if "=" in item:
                key, _, value = item.partition("=")
                props[f"aperio.{key.strip()}"] = value.strip()
    if vendor == "hamamatsu":
        for key, value in (getattr(page, "ndpi_tags", None) or {}).items():
            if isinstance(value, (str, int, float)):
                props[f"hamamatsu.{key}"] = str(value)
    return props


def _tiff_mpp(tif: Any, page: Any, series: int = 0) -> tuple[float, float] | None:
    """mpp from OME PhysicalSize (of Image ``series``), Aperio ``MPP =``, or X/YResolution
    with ResolutionUnit; an implausible value counts as none (:func:`_plausible_mpp`)."""
    if getattr(tif, "is_ome", False) and tif.ome_metadata:
        size = (int(page.imagewidth), int(page.imagelength))
        mpp = _plausible_mpp(_ome_mpp(tif.ome_metadata, series, size))
        if mpp is not None:
            return mpp
    description = page.description or ""
    # The whole value up to the next "|" (or the end): "MPP = 0.4x90" is no mpp, not 0.4.
    match = re.search(r"\|\s*MPP\s*=([^|\r\n]*)", description)
    if match:
        value = _parse_float(match.group(1))
        if value is not None and _plausible_mpp((value, value)):
            return (value, value)
    return _plausible_mpp(_resolution_mpp(page) or _imagej_mpp(page, description))


# ImageJ's ``unit=`` spellings (Fiji writes "micron"; "\u00B5m" is its escaped µm) in um.
_IMAGEJ_UNIT_UM = {
    "micron": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0, "μm": 1.0, "\\u00b5m": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4,
    "inch": 25400.0,
}  # fmt: skip


def _imagej_mpp(page: Any, description: str) -> tuple[float, float] | None:
    """ImageJ/Fiji TIFFs: X/YResolution are pixels per the description's ``unit=`` (their
    ResolutionUnit is NONE, so the TIFF tags alone give no length)."""
    if not description.startswith("ImageJ="):
        return None
    match = re.search(r"^unit=(.+)$", description, re.MULTILINE)
    factor = _IMAGEJ_UNIT_UM.get(match.group(1).strip().lower()) if match else None
    xres_tag, yres_tag = page.tags.get("XResolution"), page.tags.get("YResolution")
    if factor is None or xres_tag is None or yres_tag is None:
        return None
    xres, yres = _rational(xres_tag.value), _rational(yres_tag.value)
    if not xres or not yres or xres <= 0 or yres <= 0:
        return None
    return (factor / xres, factor / yres)


def _resolution_mpp(page: Any) -> tuple[float, float] | None:
    tags = page.tags
    unit_tag = tags.get("ResolutionUnit")
    xres_tag, yres_tag = tags.get("XResolution"), tags.get("YResolution")
    if unit_tag is None or xres_tag is None or yres_tag is None:
        return None
    unit = int(unit_tag.value)
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # 2 = INCH, 3 = CENTIMETER; 1 = NONE
    if um_per_unit is None:
        return None
    xres, yres = _rational(xres_tag.value), _rational(yres_tag.value)
    if not xres or not yres or xres <= 0 or yres <= 0:
        return None
    return (um_per_unit / xres, um_per_unit / yres)


def _ome_mpp(
    xml: str, image: int = 0, size: tuple[int, int] | None = None
) -> tuple[float, float] | None:
    """PhysicalSizeX/Y of the OME ``Image`` that is read: the one whose Pixels SizeX x SizeY is
    ``size`` (the level-0 width and height) when exactly one matches, else the ``image``-th
    (tifffile's series of that index; tifffile leaves out Images without data in the file, so
    position alone can point at a label or macro image with its own pixel size)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    images = [e for e in root if e.tag.endswith("}Image") or e.tag == "Image"]
    found = [next((p for p in im if p.tag.endswith("Pixels")), None) for im in images]
    pixels = [p for p in found if p is not None]
    if size is not None:
        same = [p for p in pixels if (p.get("SizeX"), p.get("SizeY")) == tuple(map(str, size))]
        if len(same) == 1:
            pixels, image = same, 0
        elif len(pixels) != len(found):
            return None  # an Image without Pixels: positions no longer line up
    if not 0 <= image < len(pixels):
        return None
    elem = pixels[image]
    sizes = []
    for axis in ("X", "Y"):
        value = _parse_float(elem.get(f"PhysicalSize{axis}"))
        unit = elem.get(f"PhysicalSize{axis}Unit", "µm")
        factor = _OME_UNIT_UM.get(unit)
        if value is None or value <= 0 or factor is None:
            return None
        sizes.append(value * factor)
    return (sizes[0], sizes[1])


def _rational(value: Any) -> float | None:
    try:
        if isinstance(value, tuple):
            num, den = (_parse_float(v) for v in value)
            return num / den if num is not None and den else None
        return _parse_float(value)
    except (TypeError, ValueError):
        return None


# A plain decimal number and nothing else. ``float()`` alone also takes "1_0" (10.0), "nan" and
# "inf"; a regex ``search`` takes the prefix of "0.4x90" (0.4): a damaged mpp read as a wrong one
# misplaces every heatmap cell, so anything else is no value (audit D12).
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _parse_float(text: Any) -> float | None:
    """``text`` as a finite float when it is exactly one decimal number (surrounding white
    space allowed), else None. Numbers (not bools) pass through when finite."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
        return value if math.isfinite(value) else None
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    if not isinstance(text, str) or not _DECIMAL.fullmatch(text.strip()):
        return None
    try:
        value = float(text.strip())
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ====================================================================================== reading


def read_resampled(
    reader: SlideReader,
    l0_x: float,
    l0_y: float,
    l0_w: float,
    l0_h: float,
    out_w: int,
    out_h: int,
    *,
    level: int | None = None,
    resample: Resample = "lanczos",
    max_block_px: int = 4096,
) -> np.ndarray:
    """Read the level-0 box ``[l0_x, l0_x + l0_w) x [l0_y, l0_y + l0_h)`` resampled to exactly
    ``out_w x out_h`` pixels.

    The box may be fractional and may extend past the slide (white). ``level`` defaults to the
    coarsest level not coarser than the output (1 % tolerance). The window read around the box
    includes the resampling filter's support, so the result does not depend on how a large
    output is split into blocks (the thumbnail is assembled from blocks of at most
    ``max_block_px`` source pixels a side).

    Shapes: -> ``uint8 [out_h, out_w, 3]`` RGB.
    """
    if out_w < 1 or out_h < 1:
        raise InputError(f"output size must be at least 1x1; got {out_w}x{out_h}")
    if level is None:
        level = reader.best_level_for_downsample(min(l0_w / out_w, l0_h / out_h))
    ds = reader.level_downsamples[level]
    # Source pixels (at ``level``) per output pixel.
    scale_x = l0_w / ds / out_w
    scale_y = l0_h / ds / out_h
    block_w = max(1, int(max_block_px / max(scale_x, 1.0)))
    block_h = max(1, int(max_block_px / max(scale_y, 1.0)))
    if block_w >= out_w and block_h >= out_h:
        return _read_resampled_block(
            reader, level, l0_x / ds, l0_y / ds, scale_x, scale_y, out_w, out_h, resample
        )
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    for oy in range(0, out_h, block_h):
        bh = min(block_h, out_h - oy)
        for ox in range(0, out_w, block_w):
            bw = min(block_w, out_w - ox)
            out[oy : oy + bh, ox : ox + bw] = _read_resampled_block(
                reader,
                level,
                l0_x / ds + ox * scale_x,
                l0_y / ds + oy * scale_y,
                scale_x,
                scale_y,
                bw,
                bh,
                resample,
            )
    return out


def _read_resampled_block(
    reader: SlideReader,
    level: int,
    lvl_x: float,
    lvl_y: float,
    scale_x: float,
    scale_y: float,
    out_w: int,
    out_h: int,
    resample: Resample,
) -> np.ndarray:
    """Resample the level box at (lvl_x, lvl_y) of ``out * scale`` level px to ``out`` px."""
    lvl_w, lvl_h = out_w * scale_x, out_h * scale_y
    exact = (
        abs(scale_x - 1.0) < 1e-9
        and abs(scale_y - 1.0) < 1e-9
        and abs(lvl_x - round(lvl_x)) < 1e-6
        and abs(lvl_y - round(lvl_y)) < 1e-6
    )
    ds = reader.level_downsamples[level]
    if exact:
        x, y = int(round(lvl_x)), int(round(lvl_y))
        return reader.read_region(int(round(x * ds)), int(round(y * ds)), level, out_w, out_h)
    if resample not in _PIL_FILTERS:
        raise InputError(f"resample must be one of {sorted(_PIL_FILTERS)}; got {resample!r}")
    support = _FILTER_SUPPORT[resample]
    margin_x = int(math.ceil(support * max(scale_x, 1.0))) + 1
    margin_y = int(math.ceil(support * max(scale_y, 1.0))) + 1
    win_x0 = int(math.floor(lvl_x)) - margin_x
    win_y0 = int(math.floor(lvl_y)) - margin_y
    win_x1 = int(math.ceil(lvl_x + lvl_w)) + margin_x
    win_y1 = int(math.ceil(lvl_y + lvl_h)) + margin_y
    # ``round(win * ds)`` lands back on ``win`` at this level in both backends.
    window = reader.read_region(
        int(round(win_x0 * ds)), int(round(win_y0 * ds)), level, win_x1 - win_x0, win_y1 - win_y0
    )
    box = (lvl_x - win_x0, lvl_y - win_y0, lvl_x - win_x0 + lvl_w, lvl_y - win_y0 + lvl_h)
    img = Image.fromarray(window).resize((out_w, out_h), _PIL_FILTERS[resample], box=box)
    return np.asarray(img)


# A thumbnail or tissue image reads its whole source level when that level has at most this
# many pixels (about 0.5-1 s of JPEG decoding on one core); beyond it, strided tile sampling.
OVERVIEW_MAX_SOURCE_PX = 2**26


@dataclass(frozen=True, eq=False)
class Overview:
    """A low-resolution image of the whole slide and how it was made.

    ``level``: the pyramid level it was built from (the best level, :mod:`.levels`).
    ``sampling``: ``"area"`` (area average of every pixel of that level) or ``"strided"``
    (strided tile sampling, see :func:`read_overview`). ``tiles_read``: source blocks read by
    the strided path (0 for ``"area"``). Shapes: ``image`` uint8 ``[h, w, 3]``.
    """

    image: np.ndarray
    level: int
    sampling: str
    tiles_read: int = 0


def read_overview(
    reader: SlideReader,
    out_w: int,
    out_h: int,
    *,
    max_source_px: int = OVERVIEW_MAX_SOURCE_PX,
) -> Overview:
    """The whole slide as ``out_w x out_h`` pixels, in bounded time and memory.

    The source is the best level for the output scale (:func:`~.levels.best_level`). When that
    level has at most ``max_source_px`` pixels, every pixel is area-averaged (box filter),
    block by block. Otherwise (a giant image without a pyramid: a 200k x 200k single-level
    TIFF would mean decoding 120 GB) the image is built by *strided tile sampling*: with
    ``T`` the file's tile and ``n`` its tile count, one tile in every ``s x s``
    (``s = ceil(sqrt(n / (max_source_px / T^2)))``) is read, and every output pixel takes the
    source pixel at its centre moved into the sampled tile of its ``s x s`` group (same offset
    inside the tile). So at most about ``max_source_px`` pixels are decoded, one tile at a
    time, whatever the slide's size.

    Shapes: -> ``Overview.image`` uint8 ``[out_h, out_w, 3]``.
    """
    if out_w < 1 or out_h < 1:
        raise InputError(f"output size must be at least 1x1; got {out_w}x{out_h}")
    w0, h0 = reader.dimensions
    level = reader.best_level_for_downsample(min(w0 / out_w, h0 / out_h))
    lw, lh = reader.level_dimensions[level]
    th, tw = reader.native_tile_size(level)
    n_rows, n_cols = -(-lh // th), -(-lw // tw)
    budget_tiles = max(1, max_source_px // (th * tw))
    stride = max(1, math.ceil(math.sqrt(n_rows * n_cols / budget_tiles)))
    if lw * lh <= max_source_px or stride == 1:
        image = read_resampled(
            reader, 0.0, 0.0, float(w0), float(h0), out_w, out_h, level=level, resample="box"
        )
        return Overview(image, level, "area", 0)
    ds = reader.level_downsamples[level]
    # Output pixel centres in pixels of ``level``.
    ys = np.minimum(((np.arange(out_h) + 0.5) * (h0 / out_h) / ds).astype(np.int64), lh - 1)
    xs = np.minimum(((np.arange(out_w) + 0.5) * (w0 / out_w) / ds).astype(np.int64), lw - 1)

    def snap(pos: np.ndarray, t: int, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        # Tile of each sample -> the sampled tile of its stride group -> same offset there.
        chosen = np.minimum((pos // t) // stride * stride + stride // 2, n - 1)
        return chosen, np.minimum(chosen * t + pos % t, size - 1)

    tile_r, src_y = snap(ys, th, n_rows, lh)
    tile_c, src_x = snap(xs, tw, n_cols, lw)
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    tiles_read = 0
    col_groups = [(c, np.nonzero(tile_c == c)[0]) for c in np.unique(tile_c)]
    for r in np.unique(tile_r):
        rows = np.nonzero(tile_r == r)[0]
        for c, cols in col_groups:
            block = reader.read_region(
                int(round(c * tw * ds)), int(round(r * th * ds)), level, tw, th
            )
            tiles_read += 1
            out[np.ix_(rows, cols)] = block[np.ix_(src_y[rows] - r * th, src_x[cols] - c * tw)]
    return Overview(out, level, "strided", tiles_read)


# ====================================================================================== opening


def open_slide(
    path: str | os.PathLike[str],
    mpp: float | None = None,
    backend: Backend = "auto",
    *,
    validate: bool = True,
) -> SlideReader:
    """Open a whole-slide image.

    Backends (``--reader``):

    - ``"direct"``: tiled TIFF family (SVS, generic TIFF, OME-TIFF) read by ``pread`` and
      decoded in parallel threads (:class:`~fastinsight.slide.direct.DirectTiffReader`);
    - ``"tifffile"``: the same files through tifffile's seek-and-read path (one lock per handle);
    - ``"openslide"``: every OpenSlide format (NDPI, MIRAX, SCN, BIF, ...);
    - ``"auto"`` (default): the backend that sees the pyramid and the mpp. For a TIFF file it
      opens both views and takes the direct reader unless OpenSlide sees more levels (NDPI:
      OpenSlide 7, tifffile 4) or an mpp the direct view lacks; an OME-TIFF whose pyramid is in
      SubIFDs (one level and no mpp for OpenSlide) therefore goes to the direct reader with the
      mpp from the OME-XML. Anything else goes to OpenSlide, then tifffile.

    A DICOM whole-slide image is given as its folder or any of its files; OpenSlide opens the
    largest level's file (:func:`fastinsight.dicom.whole_slide_file`) and finds the others.

    ``mpp`` overrides the file's pixel size (the ``--mpp`` flag). With ``validate`` (the
    default) a truncated or undecodable file fails here.

    Raises SlideError with one line naming the file, what went wrong, and what to do.
    """
    path = Path(path).expanduser()
    _check_mpp_value(mpp)
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {list(BACKENDS)}; got {backend!r}")
    if not path.exists():
        raise SlideError(f"slide file {_slide_name(path)} does not exist; check the path")
    if path.is_dir() or path.suffix.lower() in (".dcm", ".dicom") or has_preamble(path):
        path = dicom_slide_file(path)

    kinds: dict[str, type[SlideReader]] = {
        "openslide": OpenSlideReader,
        "tifffile": TiffFileReader,
        **_EXTRA_BACKENDS,
    }
    if backend not in kinds and backend != "auto":
        raise InputError(f"backend {backend!r} is not available in this installation")
    order = (
        [backend]
        if backend != "auto"
        else (["direct", "openslide", "tifffile"] if _is_tiff(path) else ["openslide", "tifffile"])
    )
    order = [k for k in order if k in kinds]

    attempts: list[str] = []
    diagnosis: str | None = None
    # A TIFF whose own tags contradict each other, or a stack of planes: any reader saw it.
    damaged: str | None = None
    opened: list[SlideReader] = []
    for kind in order:
        if kind == "tifffile" and opened:
            break  # the direct reader already gives tifffile's view of this file
        try:
            reader = kinds[kind](path, mpp=mpp)
        except SlideError as exc:
            attempts.append(str(exc))
            if isinstance(exc, (_DamagedTiff, _MultiPlaneTiff)):
                damaged = damaged or str(exc)
            if isinstance(exc, _UnsupportedLayout):
                diagnosis = diagnosis or str(exc)
            continue
        try:
            if validate:
                _validate(reader)
        except SlideError as exc:
            reader.close()
            attempts.append(str(exc))
            if isinstance(exc, (_DamagedTiff, _MultiPlaneTiff)):
                damaged = damaged or str(exc)
            continue
        opened.append(reader)
        if backend != "auto" or kind == "openslide" or len(opened) == 2:
            break
    if damaged is not None:
        # Another reader may still open it (OpenSlide without validation reads a short tile
        # table as garbage pixels): a file whose tags contradict each other is refused, alone.
        for reader in opened:
            reader.close()
        raise SlideError(damaged)
    if opened:
        chosen = _choose_reader(opened)
        for other in opened:
            if other is not chosen:
                other.close()
        return chosen
    if diagnosis is not None:
        raise SlideError(diagnosis)
    # A reader's finding ("is truncated") beats OpenSlide's generic "may be truncated" guess.
    truncated = [a for a in attempts if "is truncated" in a]
    if truncated:
        raise SlideError(truncated[0])
    what = "; ".join(attempts)
    raise SlideError(
        f"cannot read slide {_slide_name(path)} ({what}); expected a whole-slide image that "
        "OpenSlide or tifffile reads (svs, ndpi, mrxs, scn, bif, DICOM WSI, tiled TIFF, "
        "OME-TIFF); "
        "if it is one, the copy may be truncated or corrupt"
    )


# Backends defined in other modules register here (``fastinsight.slide.direct`` adds
# "direct" when the package is imported), so this module imports none of them: no import cycle.
_EXTRA_BACKENDS: dict[str, type[SlideReader]] = {}


def register_backend(name: str, reader_cls: type[SlideReader]) -> None:
    """Make ``reader_cls`` available to :func:`open_slide` as ``backend=name``."""
    _EXTRA_BACKENDS[name] = reader_cls


def _choose_reader(opened: list[SlideReader]) -> SlideReader:
    """Of a direct (tifffile-view) reader and an OpenSlide one on the same file, the one that
    sees the pyramid and the mpp: OpenSlide only when it sees more levels, or an mpp the direct
    view lacks; otherwise the direct reader (faster, and the same pixels)."""
    if len(opened) == 1:
        return opened[0]
    direct, other = opened[0], opened[1]
    if other.level_count > direct.level_count:
        return other
    if other.file_mpp is not None and direct.file_mpp is None:
        return other
    return direct


def check_tile_fits(data: bytes, seg_h: int, seg_w: int, index: int, path: Path) -> None:
    """Refuse, before decoding, a tile whose codestream declares more pixels than its segment
    (a corrupt or hostile file: a few bytes asking the codec for gigabytes)."""
    from fastinsight.codestreams import check_fits

    declared = check_fits(data, seg_h, seg_w)
    if declared is not None:
        raise SlideError(
            f"tile {index} of slide {_slide_name(path)} declares a {declared[1]} x {declared[0]} "
            f"px image in a {seg_w} x {seg_h} px tile; the file is corrupt (refusing to decode it)"
        )


def dicom_slide_file(path: Path) -> Path:
    """The file OpenSlide opens for a DICOM whole-slide image given as a folder or any of its
    files (OpenSlide finds the other pyramid levels beside it); SlideError when ``path`` holds
    none."""
    from fastinsight.dicom import whole_slide_file

    try:
        found = whole_slide_file(path)
    except InputError as exc:
        raise SlideError(str(exc)) from None
    if found is not None:
        return found
    if path.is_dir():
        raise SlideError(
            f"slide path {_slide_name(path)} is a folder without a DICOM whole-slide image; pass "
            "the slide file itself (or the folder of a DICOM WSI)"
        )
    raise SlideError(
        f"{_slide_name(path)} is a DICOM file but not a whole-slide image (VL Whole Slide "
        "Microscopy); radiographs and CT series take a radiograph or CT model"
    )


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in _TIFF_MAGIC
    except OSError:
        return False


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _validate(reader: SlideReader) -> None:
    """Cheap checks that catch truncated and undecodable files at open time."""
    if reader.level_count == 0:
        raise SlideError(f"slide {_slide_name(reader.path)} has an empty image")
    # Dimensions before any read: a damaged size tag must not reach the decoder.
    _check_level_dimensions(reader.level_dimensions, reader.path)
    if isinstance(reader, TiffFileReader):
        reader.check_complete()
    else:
        _check_tiff_if_tiff(reader.path)
    if reader.level_count == 0 or min(min(d) for d in reader.level_dimensions) < 1:
        raise SlideError(f"slide {_slide_name(reader.path)} has an empty image")
    # Decode a small region at the centre of the lowest level and the last tile of level 0.
    level = reader.level_count - 1
    ds = reader.level_downsamples[level]
    width, height = reader.level_dimensions[level]
    w, h = min(width, 256), min(height, 256)
    reader.read_region(
        int(round((width - w) // 2 * ds)), int(round((height - h) // 2 * ds)), level, w, h
    )
    w0, h0 = reader.dimensions
    reader.read_region(max(0, w0 - 16), max(0, h0 - 16), 0, 16, 16)


def _check_tiff_if_tiff(path: Path) -> None:
    """For TIFF-based vendor files opened by OpenSlide: no tile may lie past the end of file."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic not in _TIFF_MAGIC:
        return
    tif = _open_tifffile(path)
    try:
        main = _main_series(tif)
        if main is not None:
            _check_one_plane(main, path)  # OpenSlide would read plane 0 alone as the slide
        _check_segments_in_file(tif, _tiff_pages(tif), path)
    finally:
        tif.close()
