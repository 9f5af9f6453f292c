"""Tiler: pixels, determinism, threads, batches, edge padding, errors."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from slide_testutil import synthetic_reader

from fastinsight.errors import InputError, SlideError
from fastinsight.slide import ArrayReader, TileGrid, Tiler, open_slide


def _all_images(tiler: Tiler, batch_size: int = 5) -> np.ndarray:
    return np.concatenate([np.asarray(b.images) for b in tiler.batches(batch_size)])


def test_tile_equals_region_when_no_resampling() -> None:
    reader = synthetic_reader(300, 200, mpp=0.5)
    grid = TileGrid.for_slide(reader, target_mpp=0.5, tile_px=64, cells_per_side=4)
    assert grid.l0_tile_size == 64.0 and grid.level == 0
    tiler = Tiler(reader, grid, num_workers=0)
    for tile, image in tiler:
        x, y = tile.l0_xy_int
        np.testing.assert_array_equal(image, reader.read_region(x, y, 0, 64, 64))


def test_edge_tiles_are_padded_white() -> None:
    reader = synthetic_reader(300, 200, mpp=0.5)
    grid = TileGrid.for_slide(reader, target_mpp=0.5, tile_px=64, cells_per_side=4)
    tiler = Tiler(reader, grid, [grid.tile(grid.rows - 1, grid.cols - 1)], num_workers=0)
    ((_, image),) = list(tiler)
    inside_w, inside_h = 300 - 4 * 64, 200 - 3 * 64  # 44 x 8 px of slide, the rest outside
    assert (image[inside_h:] == 255).all() and (image[:, inside_w:] == 255).all()
    assert (image[:inside_h, :inside_w] != 255).any()


def test_reads_from_reduced_level_and_resamples() -> None:
    reader = synthetic_reader(300, 200, mpp=0.25)
    grid = TileGrid.for_slide(reader, target_mpp=0.5, tile_px=32, cells_per_side=4)
    assert grid.level == 1 and grid.l0_tile_size == 64.0
    level1 = Tiler(reader, grid, num_workers=0)
    grid0 = TileGrid(300, 200, 0.25, 0.5, 32, 4, level=0, level_downsample=1.0)
    level0 = Tiler(reader, grid0, num_workers=0)
    a, b = _all_images(level1).astype(int), _all_images(level0).astype(int)
    assert a.shape == b.shape == (grid.n_tiles, 32, 32, 3)
    assert np.abs(a.mean(axis=(1, 2, 3)) - b.mean(axis=(1, 2, 3))).max() < 3


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_workers_give_same_pixels_and_order(cmu: Path, backend: str) -> None:
    with open_slide(cmu, backend=backend) as reader:  # type: ignore[arg-type]
        grid = TileGrid.for_slide(reader, target_mpp=2.0, tile_px=64, cells_per_side=4)
        tiles = list(grid)[:: max(1, grid.n_tiles // 12)]
        results = {}
        for workers in (0, 1, 2):
            tiler = Tiler(reader, grid, tiles, num_workers=workers, prefetch_batches=1)
            batches = list(tiler.batches(5))
            assert [t for b in batches for t in b.tiles] == tiles
            assert all(b.read_seconds >= 0 and b.wait_seconds >= 0 for b in batches)
            results[workers] = np.concatenate([np.asarray(b.images) for b in batches])
            again = _all_images(tiler)  # iterating twice gives the same tiles
            np.testing.assert_array_equal(again, results[workers])
        np.testing.assert_array_equal(results[0], results[1])
        np.testing.assert_array_equal(results[0], results[2])
        assert results[0].shape == (len(tiles), 64, 64, 3) and results[0].dtype == np.uint8


def test_tcga_tiles_from_level_1(tcga: Path) -> None:
    with open_slide(tcga, mpp=0.25) as reader:
        grid = TileGrid.for_slide(reader, target_mpp=0.5, tile_px=112, cells_per_side=7)
        assert grid.level == 1
        tiles = [grid.tile(3, 4), grid.tile(grid.rows - 1, grid.cols - 1)]
        images = _all_images(Tiler(reader, grid, tiles, num_workers=2))
        ref = reader.read_region(int(tiles[0].l0_x), int(tiles[0].l0_y), 0, 224, 224)
        # the level-1 tile is the level-0 region at half resolution
        assert abs(images[0].astype(float).mean() - ref.astype(float).mean()) < 3


def test_batches_sizes_and_drop_last() -> None:
    reader = synthetic_reader(300, 200)
    grid = TileGrid.for_slide(reader, target_mpp=0.5, tile_px=32, cells_per_side=4)
    n = grid.n_tiles
    tiler = Tiler(reader, grid, num_workers=2)
    sizes = [len(b) for b in tiler.batches(8)]
    assert sum(sizes) == n and sizes[:-1] == [8] * (len(sizes) - 1)
    assert [b.index for b in tiler.batches(8)] == list(range(len(sizes)))
    dropped = [len(b) for b in tiler.batches(8, drop_last=True)]
    assert dropped == [8] * (n // 8)
    batch = next(iter(tiler.batches(4)))
    assert isinstance(batch.images, np.ndarray)
    assert batch.images.shape == (4, 32, 32, 3) and batch.images.dtype == np.uint8


def test_pinned_request_without_cuda_gives_numpy() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: pinned tensors are tested on the GPU")
    reader = synthetic_reader(300, 200)
    grid = TileGrid.for_slide(reader, target_mpp=0.5, tile_px=32, cells_per_side=4)
    batch = next(iter(Tiler(reader, grid, pin_memory=True).batches(4)))
    assert isinstance(batch.images, np.ndarray)


@pytest.mark.cuda
def test_pinned_batches_on_cuda() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    reader = synthetic_reader(300, 200)
    grid = TileGrid.for_slide(reader, target_mpp=0.5, tile_px=32, cells_per_side=4)
    batch = next(iter(Tiler(reader, grid).batches(4)))
    assert isinstance(batch.images, torch.Tensor) and batch.images.is_pinned()
    assert batch.images.dtype == torch.uint8 and tuple(batch.images.shape) == (4, 32, 32, 3)


class _CountingReader(ArrayReader):
    """Records which threads read and which handles were closed."""

    opened: list[_CountingReader] = []

    def __init__(self, *args: object, fail_at: int | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.fail_at = fail_at
        self.threads: set[int] = set()
        _CountingReader.opened.append(self)

    def _read_level(self, l0_x: int, l0_y: int, level: int, lvl_w: int, lvl_h: int) -> np.ndarray:
        self.threads.add(threading.get_ident())
        if self.fail_at is not None and l0_x >= self.fail_at:
            raise SlideError("synthetic read failure")
        return super()._read_level(l0_x, l0_y, level, lvl_w, lvl_h)

    def clone(self) -> _CountingReader:
        mpp = self.file_mpp[0] if self.file_mpp else None
        return _CountingReader(self._arrays, mpp, fail_at=self.fail_at)


def test_each_worker_thread_has_its_own_handle_and_closes_it() -> None:
    _CountingReader.opened = []
    base = synthetic_reader(300, 200)
    reader = _CountingReader(base._arrays, 0.5)
    grid = TileGrid.for_slide(reader, target_mpp=0.5, tile_px=32, cells_per_side=4)
    list(Tiler(reader, grid, num_workers=2).batches(4))
    clones = _CountingReader.opened[1:]
    assert 1 <= len(clones) <= 2
    assert not reader.threads  # the consumer's handle is never used by the workers
    assert all(len(c.threads) == 1 for c in clones)  # one thread per handle
    assert all(c.closed for c in clones) and not reader.closed


def test_read_error_propagates_and_stops_workers() -> None:
    _CountingReader.opened = []
    base = synthetic_reader(300, 200)
    reader = _CountingReader(base._arrays, 0.5, fail_at=200)
    grid = TileGrid.for_slide(reader, target_mpp=0.5, tile_px=32, cells_per_side=4)
    with pytest.raises(SlideError, match="synthetic"):
        list(Tiler(reader, grid, num_workers=2).batches(4))
    assert all(c.closed for c in _CountingReader.opened[1:])


def test_early_break_closes_handles() -> None:
    _CountingReader.opened = []
    base = synthetic_reader(300, 200)
    reader = _CountingReader(base._arrays, 0.5)
    grid = TileGrid.for_slide(reader, target_mpp=0.5, tile_px=32, cells_per_side=4)
    gen = Tiler(reader, grid, num_workers=2).batches(2)
    next(gen)
    gen.close()
    assert all(c.closed for c in _CountingReader.opened[1:])


def test_tiler_argument_errors() -> None:
    reader = synthetic_reader(300, 200)
    grid = TileGrid.for_slide(reader, target_mpp=0.5, tile_px=32, cells_per_side=4)
    with pytest.raises(InputError):
        Tiler(reader, grid, num_workers=-1)
    with pytest.raises(InputError, match="batch_size"):
        next(iter(Tiler(reader, grid).batches(0)))
    other = TileGrid(slide_width=10, slide_height=10, slide_mpp=0.5, tile_px=32, cells_per_side=4)
    with pytest.raises(InputError, match="grid is for"):
        Tiler(reader, other)
