"""DevicePrefetcher: device batches in order with the tiler's pixels; the staging ring is reused
without corrupting batches already handed out; early stop closes the tiler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from slide_testutil import synthetic_reader

from fastinsight.errors import InputError
from fastinsight.slide import TileGrid, Tiler
from fastinsight.slide.prefetch import DevicePrefetcher


def _tiler(workers: int = 2) -> Tiler:
    reader = synthetic_reader(600, 400, mpp=0.5)
    grid = TileGrid.for_slide(reader, target_mpp=0.5, tile_px=32, cells_per_side=2)
    return Tiler(reader, grid, num_workers=workers)


@pytest.mark.parametrize("depth", [1, 3])
def test_cpu_prefetcher_gives_the_tiler_batches_in_order(depth: int) -> None:
    tiler = _tiler()
    expected = [np.asarray(b.images).copy() for b in tiler.batches(7, pin_memory=False)]
    got = list(DevicePrefetcher(tiler.batches(7, pin_memory=False), "cpu", depth=depth))
    assert len(got) == len(expected) > depth + 2  # more batches than ring slots
    for k, (batch, want) in enumerate(zip(got, expected, strict=True)):
        # held until the end: a reused staging slot must not have overwritten them
        assert batch.index == k and batch.images.device.type == "cpu"
        np.testing.assert_array_equal(batch.images.numpy(), want)
        assert batch.read_wait_s >= 0 and batch.stage_s >= 0 and batch.copy_ms is None
    assert sum(len(b) for b in got) == len(tiler)


def test_early_stop_closes_the_source_and_bad_depth() -> None:
    tiler = _tiler()
    source = tiler.batches(4, pin_memory=False)
    for _ in DevicePrefetcher(source, "cpu"):
        break
    with pytest.raises(StopIteration):
        next(source)  # the generator was closed (its threads shut down)
    with pytest.raises(InputError, match="depth"):
        DevicePrefetcher([], "cpu", depth=0)


@pytest.mark.cuda
def test_cuda_prefetcher_overlaps_and_keeps_pixels() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none is visible on this machine")
    tiler = _tiler()
    expected = [np.asarray(b.images).copy() for b in tiler.batches(5, pin_memory=False)]
    batches = []
    for batch in DevicePrefetcher(tiler.batches(5, pin_memory=True), "cuda", depth=2, timing=True):
        # some compute on the current stream while the next copies run on the side stream
        batches.append((batch.images.float() * 1.0).to(torch.uint8))
        assert batch.copy_ms is not None and batch.copy_ms >= 0
    torch.cuda.synchronize()
    for got, want in zip(batches, expected, strict=True):
        np.testing.assert_array_equal(got.cpu().numpy(), want)
