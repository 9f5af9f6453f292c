"""Read tiles of a :class:`~fastinsight.slide.grid.TileGrid` ahead of the consumer, in threads.

Each tile is read at the grid's pyramid level (the coarsest level not coarser than the target
mpp) over the exact, fractional level-0 box of the tile, and resampled to ``tile_px`` with
PIL's Lanczos filter (``resample="lanczos"``; ``"bilinear"``, ``"bicubic"``, ``"box"`` are
available): the window read around the box includes the filter's support, so a tile's pixels do
not depend on which thread or batch read it.

``Tiler.batches(batch_size)`` yields :class:`TileBatch` objects in tile order. With
``num_workers >= 1`` a thread pool reads and decodes tiles while the consumer works (JPEG and
JPEG 2000 decoders release the GIL); every worker thread opens its own slide handle with
``reader.clone()`` and closes it at the end. With ``num_workers=0`` the consumer reads.
Batches are numpy ``uint8 [B, tile_px, tile_px, 3]`` arrays, or, when CUDA is available (or
``pin_memory=True``), torch uint8 tensors in pinned host memory so ``.to("cuda",
non_blocking=True)`` overlaps the copy. torch is imported only then.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastinsight.errors import InputError
from fastinsight.slide.grid import Tile, TileGrid
from fastinsight.slide.readers import Resample, SlideReader, read_resampled


@dataclass(frozen=True, eq=False)
class TileBatch:
    """A batch of tiles in grid order.

    ``images``: ``uint8 [B, tile_px, tile_px, 3]`` RGB, a numpy array or a pinned torch tensor.
    ``read_seconds``: time spent reading + decoding + resampling these tiles, summed over
    threads. ``wait_seconds``: time the consumer waited for this batch (0 when reading keeps up).
    """

    images: Any
    tiles: tuple[Tile, ...]
    read_seconds: float
    wait_seconds: float
    index: int

    def __len__(self) -> int:
        return len(self.tiles)


class Tiler:
    """Reads ``tiles`` (default: every tile of ``grid``) from ``reader``.

    Iterating twice reads the same tiles in the same order (every call starts afresh).
    """

    def __init__(
        self,
        reader: SlideReader,
        grid: TileGrid,
        tiles: Sequence[Tile] | None = None,
        *,
        num_workers: int = 2,
        prefetch_batches: int = 2,
        resample: Resample = "lanczos",
        pin_memory: bool | None = None,
    ) -> None:
        if num_workers < 0:
            raise InputError(f"num_workers must be >= 0; got {num_workers}")
        if prefetch_batches < 1:
            raise InputError(f"prefetch_batches must be >= 1; got {prefetch_batches}")
        if (reader.dimensions[0], reader.dimensions[1]) != (grid.slide_width, grid.slide_height):
            raise InputError(
                f"grid is for a {grid.slide_width}x{grid.slide_height} slide but the reader's "
                f"slide is {reader.dimensions[0]}x{reader.dimensions[1]}; build the grid with "
                "TileGrid.for_slide(reader)"
            )
        if grid.level >= reader.level_count:
            raise InputError(f"grid reads level {grid.level}; the slide has {reader.level_count}")
        self.reader = reader
        self.grid = grid
        self.tiles: tuple[Tile, ...] = tuple(grid.tiles() if tiles is None else tiles)
        self.num_workers = int(num_workers)
        self.prefetch_batches = int(prefetch_batches)
        self.resample: Resample = resample
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return len(self.tiles)

    def read_tile(self, tile: Tile, reader: SlideReader | None = None) -> np.ndarray:
        """One tile resampled to ``tile_px``. Shapes: -> ``uint8 [tile_px, tile_px, 3]``."""
        px = self.grid.tile_px
        return read_resampled(
            reader or self.reader,
            tile.l0_x,
            tile.l0_y,
            tile.l0_size,
            tile.l0_size,
            px,
            px,
            level=self.grid.level,
            resample=self.resample,
        )

    def __iter__(self) -> Iterator[tuple[Tile, np.ndarray]]:
        """``(tile, image)`` pairs in order (images are numpy, never pinned)."""
        for batch in self.batches(16, pin_memory=False):
            images = np.asarray(batch.images)
            for i, tile in enumerate(batch.tiles):
                yield tile, images[i]

    def batches(
        self, batch_size: int = 64, *, drop_last: bool = False, pin_memory: bool | None = None
    ) -> Iterator[TileBatch]:
        """Yield batches of ``batch_size`` tiles (the last one may be smaller)."""
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1; got {batch_size}")
        pin = _want_pinned(self.pin_memory if pin_memory is None else pin_memory)
        n = len(self.tiles)
        n_batches = n // batch_size if drop_last else -(-n // batch_size)
        if self.num_workers == 0:
            yield from self._batches_sync(batch_size, n_batches, pin)
        else:
            yield from self._batches_threaded(batch_size, n_batches, pin)

    # ---------------------------------------------------------------------------- internals
    def _alloc(self, b: int, pin: bool) -> tuple[Any, np.ndarray]:
        px = self.grid.tile_px
        if pin:
            import torch

            tensor = torch.empty((b, px, px, 3), dtype=torch.uint8, pin_memory=True)
            return tensor, tensor.numpy()
        array = np.empty((b, px, px, 3), dtype=np.uint8)
        return array, array

    def _batches_sync(self, batch_size: int, n_batches: int, pin: bool) -> Iterator[TileBatch]:
        for k in range(n_batches):
            tiles = self.tiles[k * batch_size : (k + 1) * batch_size]
            images, view = self._alloc(len(tiles), pin)
            start = time.perf_counter()
            for i, tile in enumerate(tiles):
                view[i] = self.read_tile(tile)
            seconds = time.perf_counter() - start
            yield TileBatch(images, tuple(tiles), seconds, seconds, k)

    def _batches_threaded(self, batch_size: int, n_batches: int, pin: bool) -> Iterator[TileBatch]:
        local = threading.local()
        handles: list[SlideReader] = []
        handles_lock = threading.Lock()
        source = self.reader

        def work(tile: Tile, out: np.ndarray, i: int) -> float:
            reader = getattr(local, "reader", None)
            if reader is None:
                reader = source.clone()
                local.reader = reader
                with handles_lock:
                    handles.append(reader)
            start = time.perf_counter()
            out[i] = self.read_tile(tile, reader)
            return time.perf_counter() - start

        pending: collections.deque[tuple[int, Any, tuple[Tile, ...], list[Future[float]]]]
        pending = collections.deque()
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="fastinsight-tiler")
        next_batch = 0

        def submit_one() -> None:
            nonlocal next_batch
            k = next_batch
            tiles = self.tiles[k * batch_size : (k + 1) * batch_size]
            images, view = self._alloc(len(tiles), pin)
            futures = [pool.submit(work, tile, view, i) for i, tile in enumerate(tiles)]
            pending.append((k, images, tuple(tiles), futures))
            next_batch += 1

        try:
            while next_batch < min(n_batches, self.prefetch_batches + 1):
                submit_one()
            while pending:
                k, images, tiles, futures = pending.popleft()
                if next_batch < n_batches:
                    submit_one()  # keep the pool busy while the consumer works
                start = time.perf_counter()
                seconds = sum(f.result() for f in futures)
                waited = time.perf_counter() - start
                yield TileBatch(images, tiles, seconds, waited, k)
        finally:
            for _, _, _, futures in pending:
                for f in futures:
                    f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            for handle in handles:
                handle.close()


def _want_pinned(pin_memory: bool | None) -> bool:
    """Pinned batches when asked, or (``None``) when torch is already loaded and sees CUDA."""
    if pin_memory is not None:
        if pin_memory:
            try:
                import torch
            except ImportError:
                raise InputError(
                    "pin_memory=True needs torch; install torch or pass False"
                ) from None
            if not torch.cuda.is_available():
                # Pinning needs a CUDA driver; without one the batches stay numpy arrays.
                return False
        return bool(pin_memory)
    loaded = sys.modules.get("torch")
    if loaded is None:
        return False
    try:
        return bool(loaded.cuda.is_available())
    except Exception:
        return False
