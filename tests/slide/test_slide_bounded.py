"""Bounded time and memory on any slide: a giant single-level TIFF gives its thumbnail and tissue
mask by strided tile sampling, reading a bounded number of tiles, with memory that does not
grow with the slide."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from slide_containers import ellipse_choice, sample_tile_payloads, write_tiled_tiff_from_payloads
from slide_testutil import CMU, slide_path

from fastinsight.slide import DirectTiffReader, detect_tissue, open_slide, read_overview
from fastinsight.slide.readers import OVERVIEW_MAX_SOURCE_PX

TILE = 256


@pytest.fixture(scope="module")
def payloads() -> tuple[list[bytes], dict]:
    white = np.full((TILE, TILE, 3), 250, dtype=np.uint8)
    pink = np.full((TILE, TILE, 3), (200, 90, 160), dtype=np.uint8)
    pink[::7] = (150, 50, 120)  # some texture
    return sample_tile_payloads([white, pink], "jpeg")


def _giant(folder: Path, side: int, payloads: tuple[list[bytes], dict]) -> Path:
    n = -(-side // TILE)
    return write_tiled_tiff_from_payloads(
        folder / f"giant{side}.tif",
        [(side, side, ellipse_choice(n, n, inside=1, outside=0))],
        payloads[0],
        payloads[1],
        mpp=0.25,
        tile=TILE,
    )


class _CountingDecodes:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        original = DirectTiffReader._decode_one

        def counted(reader: DirectTiffReader, *args: int) -> np.ndarray:
            self.n += 1
            return original(reader, *args)

        monkeypatch.setattr(DirectTiffReader, "_decode_one", counted)


def test_giant_single_level_thumbnail_reads_a_bounded_number_of_tiles(
    tmp_path: Path, payloads: tuple[list[bytes], dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _giant(tmp_path, 200_000, payloads)  # 782 x 782 = 611k tiles, 120 GB decoded
    with open_slide(path) as reader:
        assert reader.backend == "direct" and reader.level_count == 1
        counter = _CountingDecodes(monkeypatch)
        overview = read_overview(reader, 1024, 1024)
        budget = OVERVIEW_MAX_SOURCE_PX // (TILE * TILE)
        assert overview.sampling == "strided"
        assert overview.tiles_read <= 1.1 * budget + 2 * 782 // 25 + 1
        assert counter.n <= overview.tiles_read  # each sampled tile decoded at most once
        thumb = overview.image
        assert thumb.shape == (1024, 1024, 3)
        # the ellipse of pink tiles is there, the corners are white glass
        assert abs(int(thumb[512, 512, 0]) - 190) < 25 and thumb[512, 512, 1] < 110
        assert (thumb[:40, :40] >= 245).all()
        tissue = detect_tissue(reader, "brightfield", max_size=1024)
        assert tissue.sampling == "strided" and tissue.level == 0
        assert tissue.tissue_fraction == pytest.approx(np.pi * 0.3 * 0.3, abs=0.03)


def test_memory_does_not_grow_with_the_slide(
    tmp_path: Path, payloads: tuple[list[bytes], dict]
) -> None:
    peaks = {}
    for side in (50_000, 200_000):  # 16x the area
        path = _giant(tmp_path, side, payloads)
        with open_slide(path) as reader:
            reader._cache = type(reader._cache)(8 * 2**20)  # same small cache for both
            tracemalloc.start()
            try:
                tissue = detect_tissue(reader, "brightfield", max_size=1024)
                _, peaks[side] = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert tissue.shape == (1024, 1024) and tissue.sampling == "strided"
    # Same mask size, about the same number of sampled tiles: the peak is set by them, not by
    # the slide (whose level-0 pixels are 16x more).
    assert peaks[200_000] <= 1.2 * peaks[50_000] + 4 * 2**20, peaks


def test_strided_overview_on_a_real_slide_keeps_its_colours(cmu: Path) -> None:
    path = slide_path(CMU)
    with open_slide(path, backend="direct") as reader:
        area = read_overview(reader, 222, 297)
        strided = read_overview(reader, 222, 297, max_source_px=40 * 240 * 240)
    assert area.sampling == "area" and strided.sampling == "strided"
    assert 0 < strided.tiles_read <= 40 * 1.3
    # Point samples of a subset of tiles: not the same pixels, but the same slide.
    diff = np.abs(area.image.mean(axis=(0, 1)) - strided.image.mean(axis=(0, 1)))
    assert diff.max() < 12
