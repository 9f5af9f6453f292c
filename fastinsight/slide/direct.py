"""Direct tile reading for tiled TIFF-family slides: compressed bytes by ``pread``, decoded in
threads that release the GIL.

OpenSlide's ``read_region`` costs about 2.8 ms of CPU per 224 px tile, most of it outside the
JPEG decoder (cache bookkeeping, ARGB premultiplication, a copy into a PIL image), and it holds
per-slide locks. For the TIFF family (Aperio SVS, generic tiled TIFF, OME-TIFF with SubIFD or
main-chain pyramids) the pixels are simply tiles of compressed bytes at known offsets, so
:class:`DirectTiffReader`:

1. parses the TIFF structure once with tifffile (``page.dataoffsets``, ``page.databytecounts``,
   ``page.jpegtables``) and shares it, read-only, with every clone;
2. reads a tile's bytes with ``os.pread`` on one shared file descriptor: a positioned read has
   no file position to race on, so any number of threads read at once without a lock;
3. decodes with imagecodecs (``jpeg8_decode`` with the TIFF's JPEGTables, JPEG 2000, deflate,
   LZW, ...), which releases the GIL, so worker threads decode in parallel; a region that
   touches several uncached tiles decodes them on a small shared pool;
4. assembles the region with white outside the image and for sparse (empty) tiles, and leaves
   resampling to the caller (:func:`~fastinsight.slide.readers.read_resampled`).

JPEG colour: a TIFF with Photometric = YCbCr holds YCbCr JPEG (converted to RGB); with
Photometric = RGB and no JFIF marker (Aperio's "JPEG with RGB colorspace" quirk) the JPEG
components *are* R, G, B and must not be colour-converted -- decoding them as YCbCr gives
green-magenta garbage. :func:`jpeg_colorspace` encodes that rule once for the CPU decoder and
:meth:`DirectTiffReader.jpeg_stream` for the GPU one (it adds an Adobe APP14 marker with
``transform = 0``, which libjpeg and nvJPEG read as "no colour transform").

GPU decode (:func:`decode_jpeg_batch`): ``torchvision.io.decode_jpeg(list_of_tensors,
device="cuda")`` decodes a whole batch of tile streams with nvJPEG, so the CPU only reads bytes;
``device="cpu"`` runs the very same code path on libjpeg-turbo (the CPU fallback, and what the
tests check).
"""

from __future__ import annotations

import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from fastinsight.errors import SlideError
from fastinsight.slide.readers import (
    TiffFileReader,
    _one_line,
    _slide_name,
    _TileCache,
    _to_rgb,
    check_tile_fits,
    register_backend,
)

# TIFF Compression values whose segments are (abbreviated) JPEG streams.
_JPEG = 7
_PHOTOMETRIC_RGB = 2
_PHOTOMETRIC_YCBCR = 6

_POOL_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None


def _decode_pool() -> ThreadPoolExecutor:
    """A small process-wide pool for decoding the uncached tiles of one large region."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            workers = max(1, min(4, os.cpu_count() or 1))
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="fastinsight-decode")
        return _POOL


def _forget_pool_after_fork() -> None:
    # A forked child inherits the pool object but not its threads: submitting to it would
    # hang. The child makes its own pool on first use.
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def jpeg_colorspace(page: Any) -> tuple[int | None, int | None]:
    """``(colorspace, outcolorspace)`` for ``imagecodecs.jpeg8_decode`` of a TIFF JPEG page.

    Photometric YCbCr: default (YCbCr) in, RGB out. Photometric RGB without a JFIF marker
    (Aperio SVS): the components are RGB already, so declare RGB in and out (no transform).
    """
    photometric = int(page.photometric)
    if photometric == _PHOTOMETRIC_YCBCR:
        return None, _PHOTOMETRIC_RGB
    if photometric == _PHOTOMETRIC_RGB:
        return (None if page.is_jfif else _PHOTOMETRIC_RGB), _PHOTOMETRIC_RGB
    return None, None


class _Shared:
    """What a reader and its clones share: the parsed TIFF, one file descriptor, a lock for the
    (rare) segments that go through tifffile's seek-and-read path, and a reference count."""

    def __init__(self, tif: Any, path: Path) -> None:
        self.tif = tif
        self.fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self.size = os.fstat(self.fd).st_size
        self.lock = threading.Lock()
        self.refs = 1
        self.refs_lock = threading.Lock()

    def acquire(self) -> None:
        with self.refs_lock:
            if self.refs <= 0:
                raise SlideError("the slide is closed; open it again with open_slide()")
            self.refs += 1

    def release(self) -> None:
        with self.refs_lock:
            self.refs -= 1
            last = self.refs == 0
        if last:
            os.close(self.fd)
            self.tif.close()


class DirectTiffReader(TiffFileReader):
    """A tiled TIFF-family slide read by ``pread`` + imagecodecs in parallel threads.

    Same levels, mpp and properties as :class:`~fastinsight.slide.readers.TiffFileReader`
    (tifffile's view of the pyramid: SubIFD and main-chain levels, OME PhysicalSize, Aperio
    ``MPP``, resolution tags); only reading differs. Clones share the parsed structure, the
    file descriptor and the decoded-tile cache, so a clone costs nothing and any number of
    threads read at once.
    """

    backend = "direct"

    def __init__(
        self,
        path: str | os.PathLike[str],
        mpp: float | None = None,
        *,
        cache_bytes: int = 64 * 2**20,
        _cache: _TileCache | None = None,
        _from: DirectTiffReader | None = None,
        parallel_decode: bool = True,
    ) -> None:
        self.parallel_decode = bool(parallel_decode)
        if _from is None:
            super().__init__(path, mpp, cache_bytes=cache_bytes, _cache=_cache)
            try:
                self._shared = _Shared(self._tif, self._path)
            except OSError as exc:
                self._tif.close()
                raise SlideError(
                    f"cannot open {_slide_name(self._path)} for reading: {_one_line(exc)}"
                ) from None
            self._colorspaces = [jpeg_colorspace(p) for p in self._pages]
            return
        # A clone: copy the parsed state, share the file and the cache.
        from fastinsight.slide.readers import SlideReader

        SlideReader.__init__(self, _from._path, _from._mpp_override)
        _from._shared.acquire()
        self._shared = _from._shared
        self._tif = _from._tif
        self._pages = _from._pages
        self._level_dimensions = _from._level_dimensions
        self._file_mpp = _from._file_mpp
        self._properties = dict(_from._properties)
        self._vendor = _from._vendor
        self._cache = _from._cache
        self._lock = self._shared.lock
        self._colorspaces = _from._colorspaces

    # ------------------------------------------------------------------------------- bytes
    def segment_bytes(self, level: int, index: int) -> bytes | None:
        """The compressed bytes of segment ``index`` (row-major tile or strip) of ``level``,
        or None for a sparse (empty) segment. Thread-safe (``os.pread``)."""
        page = self._pages[level]
        if not 0 <= index < min(len(page.dataoffsets), len(page.databytecounts)):
            # Unreachable for a file that passed the structure checks at open time.
            raise SlideError(
                f"slide {_slide_name(self._path)} is damaged: tile {index} of its "
                f"{page.imagewidth}x{page.imagelength} level is not in its tile table "
                f"({len(page.dataoffsets)} tiles); re-copy or re-export it"
            )
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if offset == 0 or count == 0:
            return None
        data = os.pread(self._shared.fd, count, offset)
        if len(data) != count:
            raise SlideError(
                f"slide {_slide_name(self._path)} is truncated: tile {index} of its "
                f"{page.imagewidth}x{page.imagelength} level ends past the end of the file; "
                "re-copy the file"
            )
        return data

    def is_jpeg(self, level: int) -> bool:
        """Whether ``level`` holds plain TIFF JPEG tiles (what :meth:`jpeg_stream` serves)."""
        page = self._pages[level]
        return (
            int(page.compression) == _JPEG
            and page.is_tiled
            and int(page.planarconfig) == 1
            and page.jpegheader is None
            and int(page.samplesperpixel) in (1, 3)
        )

    def jpeg_stream(self, level: int, index: int) -> bytes | None:
        """A complete, standalone JPEG file for one tile: the level's JPEGTables spliced in
        front of the tile's abbreviated stream, plus an Adobe APP14 marker with ``transform =
        0`` when the components are RGB (Aperio), so any JPEG decoder (nvJPEG, libjpeg-turbo
        in torchvision, PIL) gets the colours right. None for a sparse tile.
        """
        if not self.is_jpeg(level):
            raise SlideError(
                f"level {level} of slide {_slide_name(self._path)} is not plain TIFF JPEG; "
                "decode it on the CPU"
            )
        data = self.segment_bytes(level, index)
        if data is None:
            return None
        page = self._pages[level]
        tile_h = int(page.tilelength) if page.is_tiled else int(page.rowsperstrip)
        check_tile_fits(data, tile_h, int(page.tilewidth or page.imagewidth), index, self._path)
        tables = page.jpegtables or b""
        body = data[2:] if data[:2] == b"\xff\xd8" else data  # drop the tile's own SOI
        head = b"\xff\xd8"
        colorspace, _ = self._colorspaces[level]
        if colorspace == _PHOTOMETRIC_RGB:
            # APP14 "Adobe": version 100, flags0 0, flags1 0, transform 0 (no YCbCr transform).
            payload = b"Adobe" + struct.pack(">HHHB", 100, 0, 0, 0)
            head += b"\xff\xee" + struct.pack(">H", len(payload) + 2) + payload
        if tables:
            # JPEGTables is itself SOI <tables> EOI: keep only the tables.
            inner = tables[2:] if tables[:2] == b"\xff\xd8" else tables
            inner = inner[:-2] if inner[-2:] == b"\xff\xd9" else inner
            head += inner
        return head + body

    # ------------------------------------------------------------------------------ pixels
    def _segments(self, level: int, indices: list[int], seg_h: int, seg_w: int) -> list[np.ndarray]:
        """Decoded segments (through the shared cache); several misses decode in parallel.

        ``TiffFileReader._read_level`` pastes them; this override reads the bytes with ``pread``
        and decodes without tifffile's seek lock.
        """
        found: list[np.ndarray | None] = [self._cache.get((level, i)) for i in indices]
        missing = [k for k, t in enumerate(found) if t is None]

        def one(k: int) -> np.ndarray:
            tile = self._decode_one(level, indices[k], seg_h, seg_w)
            tile.setflags(write=False)
            self._cache.put((level, indices[k]), tile)
            return tile

        if len(missing) >= 4 and self.parallel_decode:
            for k, tile in zip(missing, _decode_pool().map(one, missing), strict=True):
                found[k] = tile
        else:
            for k in missing:
                found[k] = one(k)
        return [t for t in found if t is not None]

    def _decode_one(self, level: int, index: int, seg_h: int, seg_w: int) -> np.ndarray:
        page = self._pages[level]
        if int(page.planarconfig) != 1 or page.jpegheader is not None:
            # Planar or NDPI-style segments: tifffile's general path (seek + read: locked).
            with self._shared.lock:
                return self._decode_segment(page, index, seg_h, seg_w)
        data = self.segment_bytes(level, index)
        if data is None:  # sparse tile: background
            return np.full((seg_h, seg_w, 3), 255, dtype=np.uint8)
        check_tile_fits(data, seg_h, seg_w, index, self._path)
        try:
            if int(page.compression) == _JPEG:
                import imagecodecs

                colorspace, outcolorspace = self._colorspaces[level]
                arr = imagecodecs.jpeg8_decode(
                    data,
                    tables=page.jpegtables,
                    colorspace=colorspace,
                    outcolorspace=outcolorspace,
                )
            else:
                seg, _, _ = page.decode(data, index, _fullsize=True)
                arr = np.asarray(seg)
        except Exception as exc:
            raise SlideError(
                f"cannot decode tile {index} of slide {_slide_name(self._path)} "
                f"(compression {int(page.compression)}): {_one_line(exc)}; the file may be "
                "corrupt, or imagecodecs lacks this codec"
            ) from None
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arr = arr[..., None]
        arr = arr.reshape(arr.shape[-3], arr.shape[-2], arr.shape[-1])
        if arr.shape[0] != seg_h or arr.shape[1] != seg_w:
            # A short last strip (or a decoder that crops): pad with white to the segment.
            full = np.full((seg_h, seg_w, arr.shape[-1]), 255, dtype=arr.dtype)
            full[: min(seg_h, arr.shape[0]), : min(seg_w, arr.shape[1])] = arr[:seg_h, :seg_w]
            arr = full
        return _to_rgb(arr, page)

    # ----------------------------------------------------------------------------- handles
    def clone(self) -> DirectTiffReader:
        self._check_open()
        return DirectTiffReader(
            self._path, self._mpp_override, _from=self, parallel_decode=self.parallel_decode
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._shared.release()


register_backend("direct", DirectTiffReader)


def decode_jpeg_batch(streams: list[bytes], device: Any = "cpu") -> list[Any]:
    """Decode complete JPEG streams (from :meth:`DirectTiffReader.jpeg_stream`) in one batch.

    On ``device="cuda"`` torchvision hands the whole list to nvJPEG (batched GPU decode; the
    CPU only read the bytes); on ``"cpu"`` the same call decodes with libjpeg-turbo.

    Shapes: -> list of ``uint8 [3, h, w]`` RGB tensors on ``device``.
    """
    import torch

    from fastinsight.quiet import quiet

    with quiet(DeprecationWarning):
        # torchvision 0.29 flags its image codecs as deprecated in favour of TorchCodec; they
        # remain the batched nvJPEG entry point of the pinned torchvision (this thread only).
        from torchvision.io import ImageReadMode, decode_jpeg

        if not streams:
            return []
        tensors = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
        dev = torch.device(device)
        if dev.type == "cuda":
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=dev))
        return [decode_jpeg(t, mode=ImageReadMode.RGB) for t in tensors]
