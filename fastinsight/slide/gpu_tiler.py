"""Tiles decoded on the GPU: the CPU only reads compressed bytes.

:class:`DeviceJpegTiler` serves the tiles of a :class:`~fastinsight.slide.grid.TileGrid` from a
JPEG-tiled TIFF (SVS, generic TIFF, OME-TIFF; :class:`~fastinsight.slide.direct.DirectTiffReader`)
as device batches:

1. I/O threads ``pread`` the compressed bytes of every file tile the batch's windows touch and
   make each a standalone JPEG (:meth:`DirectTiffReader.jpeg_stream`: JPEGTables spliced in,
   Adobe marker for RGB-in-JPEG), one batch ahead of the decoder;
2. all of a batch's streams are decoded in one call (:func:`~fastinsight.slide.direct.
   decode_jpeg_batch`: nvJPEG on CUDA, libjpeg-turbo on CPU -- the same code path);
3. each tile's window is assembled on the device (white outside the image and for sparse tiles)
   and resampled to ``tile_px`` with ``grid_sample`` (bilinear) at the tile's exact fractional
   box: output pixel ``j`` samples window position ``box_x + (j + 0.5) * s / tile_px`` (edge
   coordinates), ``s`` = the tile side in pixels of the read level.

Since the read level is the coarsest not coarser than the target (:mod:`.levels`), ``s /
tile_px`` lies in ``[~1, 2)`` and bilinear sampling is close to the CPU tiler's Lanczos (a
difference of a few grey levels, not a shift); where the box falls on whole pixels at scale 1
the result equals the CPU tiler exactly.

Shapes: batches are ``uint8 [B, tile_px, tile_px, 3]`` on the device, like the CPU tiler's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fastinsight.errors import InputError
from fastinsight.slide.direct import DirectTiffReader, decode_jpeg_batch
from fastinsight.slide.grid import Tile, TileGrid
from fastinsight.slide.prefetch import DeviceBatch
from fastinsight.slide.readers import _segment_shape


class DeviceJpegTiler:
    """Tiles of ``grid`` (default all; or ``tiles``) read from ``reader``'s JPEG tiles and
    decoded on ``device``. Raises InputError when the grid's level is not plain TIFF JPEG."""

    def __init__(
        self,
        reader: DirectTiffReader,
        grid: TileGrid,
        tiles: Sequence[Tile] | None = None,
        *,
        device: Any = "cuda",
        io_threads: int = 2,
    ) -> None:
        import torch

        if not isinstance(reader, DirectTiffReader) or not reader.is_jpeg(grid.level):
            raise InputError(
                "GPU decoding needs a JPEG-tiled TIFF opened with the direct reader "
                "(--reader direct or auto); use the CPU tiler for this slide"
            )
        self.reader = reader
        self.grid = grid
        self.tiles: tuple[Tile, ...] = tuple(grid.tiles() if tiles is None else tiles)
        self.device = torch.device(device)
        self.io_threads = max(1, int(io_threads))
        page = reader._pages[grid.level]
        self._seg_h, self._seg_w = _segment_shape(page)
        self._lvl_w, self._lvl_h = reader.level_dimensions[grid.level]
        self._n_cols = -(-self._lvl_w // self._seg_w)

    def __len__(self) -> int:
        return len(self.tiles)

    # ------------------------------------------------------------------------------- windows
    def _window(self, tile: Tile) -> tuple[int, int, int, int, float, float, float]:
        """Level-pixel window ``[x0, x1) x [y0, y1)`` around the tile's box (one pixel of
        margin for the bilinear taps) and the box ``(bx, by, side)`` in window coordinates."""
        ds = self.grid.level_downsample
        lx, ly, side = tile.l0_x / ds, tile.l0_y / ds, tile.l0_size / ds
        x0, y0 = math.floor(lx) - 1, math.floor(ly) - 1
        x1, y1 = math.ceil(lx + side) + 1, math.ceil(ly + side) + 1
        return x0, y0, x1, y1, lx - x0, ly - y0, side

    def _segments_of(self, win: tuple[float, ...]) -> list[int]:
        """The level's JPEG segments the window ``(x0, y0, x1, y1, ...)`` overlaps."""
        x0, y0, x1, y1 = (
            max(int(win[0]), 0),
            max(int(win[1]), 0),
            min(int(win[2]), self._lvl_w),
            min(int(win[3]), self._lvl_h),
        )
        if x0 >= x1 or y0 >= y1:
            return []
        return [
            r * self._n_cols + c
            for r in range(y0 // self._seg_h, (y1 - 1) // self._seg_h + 1)
            for c in range(x0 // self._seg_w, (x1 - 1) // self._seg_w + 1)
        ]

    def _read_bytes(
        self, chunk: tuple[Tile, ...], pool: ThreadPoolExecutor
    ) -> dict[int, bytes | None]:
        needed = sorted({i for t in chunk for i in self._segments_of(self._window(t))})
        level = self.grid.level
        streams = pool.map(lambda i: self.reader.jpeg_stream(level, i), needed)
        return dict(zip(needed, streams, strict=True))

    # ------------------------------------------------------------------------------- batches
    def batches(self, batch_size: int = 64) -> Iterator[DeviceBatch]:
        """Device batches in tile order; the bytes of batch ``k + 1`` are read while batch
        ``k`` decodes."""
        import time

        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1; got {batch_size}")
        chunks = [self.tiles[i : i + batch_size] for i in range(0, len(self.tiles), batch_size)]
        pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="fastinsight-bytes")
        reader_pool = ThreadPoolExecutor(1, thread_name_prefix="fastinsight-bytes-batch")
        try:
            ahead: Future[dict[int, bytes | None]] | None = None
            if chunks:
                ahead = reader_pool.submit(self._read_bytes, chunks[0], pool)
            for k, chunk in enumerate(chunks):
                t0 = time.perf_counter()
                assert ahead is not None
                streams = ahead.result()
                waited = time.perf_counter() - t0
                if k + 1 < len(chunks):
                    ahead = reader_pool.submit(self._read_bytes, chunks[k + 1], pool)
                t1 = time.perf_counter()
                images = self._assemble(chunk, streams)
                yield DeviceBatch(images, chunk, k, waited, time.perf_counter() - t1)
        finally:
            reader_pool.shutdown(wait=True, cancel_futures=True)
            pool.shutdown(wait=True, cancel_futures=True)

    def _assemble(self, chunk: tuple[Tile, ...], streams: dict[int, bytes | None]) -> Any:
        import torch
        import torch.nn.functional as F

        present = {i: s for i, s in streams.items() if s is not None}
        decoded = dict(
            zip(present, decode_jpeg_batch(list(present.values()), self.device), strict=True)
        )
        wins = [self._window(t) for t in chunk]
        hmax = max(w[3] - w[1] for w in wins)
        wmax = max(w[2] - w[0] for w in wins)
        batch = torch.full((len(chunk), 3, hmax, wmax), 255, dtype=torch.uint8, device=self.device)
        for b, win in enumerate(wins):
            x0, y0, x1, y1 = win[:4]
            for i in self._segments_of(win):
                seg = decoded.get(i)
                if seg is None:
                    continue  # sparse: stays white
                ty, tx = (i // self._n_cols) * self._seg_h, (i % self._n_cols) * self._seg_w
                sy0, sy1 = max(y0, ty, 0), min(y1, ty + seg.shape[1], self._lvl_h)
                sx0, sx1 = max(x0, tx, 0), min(x1, tx + seg.shape[2], self._lvl_w)
                if sy0 < sy1 and sx0 < sx1:
                    batch[b, :, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = seg[
                        :, sy0 - ty : sy1 - ty, sx0 - tx : sx1 - tx
                    ]
        px = self.grid.tile_px
        j = (torch.arange(px, device=self.device, dtype=torch.float32) + 0.5) / px
        bx = torch.tensor([w[4] for w in wins], device=self.device, dtype=torch.float32)
        by = torch.tensor([w[5] for w in wins], device=self.device, dtype=torch.float32)
        side = torch.tensor([w[6] for w in wins], device=self.device, dtype=torch.float32)
        # Edge coordinate c -> grid_sample's normalised u = 2c / W - 1 (align_corners=False).
        gx = 2.0 * (bx[:, None] + j[None, :] * side[:, None]) / wmax - 1.0  # [B, px]
        gy = 2.0 * (by[:, None] + j[None, :] * side[:, None]) / hmax - 1.0
        grid = torch.stack(
            (gx[:, None, :].expand(-1, px, -1), gy[:, :, None].expand(-1, -1, px)), dim=-1
        )
        out = F.grid_sample(
            batch.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
