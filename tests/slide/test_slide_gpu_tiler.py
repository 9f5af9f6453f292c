"""DeviceJpegTiler: tiles decoded from the file's JPEG bytes by the batched (GPU) decoder give the
CPU tiler's pixels; run here with device='cpu' (the same code path as on CUDA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fastinsight.errors import InputError
from fastinsight.slide import TileGrid, Tiler, open_slide
from fastinsight.slide.gpu_tiler import DeviceJpegTiler


def _both(reader, target_mpp: float, device: str, n: int = 12):
    grid = TileGrid.for_slide(reader, target_mpp=target_mpp, tile_px=224)
    tiles = list(grid.tiles())[-n:]  # the last tiles stick out of the slide (white padding)
    cpu = np.concatenate(
        [np.asarray(b.images) for b in Tiler(reader, grid, tiles, num_workers=0).batches(5)]
    )
    batches = list(DeviceJpegTiler(reader, grid, tiles, device=device).batches(5))
    assert [b.index for b in batches] == list(range(len(batches)))
    assert [t for b in batches for t in b.tiles] == tiles
    dev = torch.cat([b.images for b in batches])
    assert dev.device.type == torch.device(device).type and dev.dtype == torch.uint8
    return cpu, dev.cpu().numpy()


def test_native_scale_equals_the_cpu_tiler_exactly(cmu: Path) -> None:
    with open_slide(cmu, backend="direct") as reader:
        cpu, dev = _both(reader, reader.mpp, "cpu")  # scale 1, whole pixels
    np.testing.assert_array_equal(dev, cpu)


@pytest.mark.parametrize("target_mpp", [0.5, 0.9])
def test_resampled_tiles_match_the_cpu_lanczos_closely(cmu: Path, target_mpp: float) -> None:
    with open_slide(cmu, backend="direct") as reader:
        cpu, dev = _both(reader, target_mpp, "cpu")
    diff = np.abs(cpu.astype(np.int16) - dev)
    # bilinear vs Lanczos: a grey level on average, a few at the 99th percentile, no shift
    assert diff.mean() < 1.5 and np.percentile(diff, 99) < 16


def test_refuses_a_slide_that_is_not_jpeg_tiled(tcga: Path) -> None:
    with open_slide(tcga, backend="direct", mpp=0.25) as reader:  # JPEG 2000
        grid = TileGrid.for_slide(reader, target_mpp=0.5, tile_px=224)
        with pytest.raises(InputError, match="JPEG-tiled"):
            DeviceJpegTiler(reader, grid, device="cpu")


@pytest.mark.cuda
def test_cuda_decode_matches_the_cpu_tiler(cmu: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none is visible on this machine")
    with open_slide(cmu, backend="direct") as reader:
        cpu, dev = _both(reader, 0.5, "cuda")
    diff = np.abs(cpu.astype(np.int16) - dev)
    assert diff.mean() < 2.5  # nvJPEG's IDCT/upsampling differ slightly from libjpeg-turbo
