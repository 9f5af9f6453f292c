"""Direct tile reading: pread + imagecodecs in threads, the same pixels as the other backends,
the auto backend choice, and the GPU-decode code path (run on the CPU here)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from slide_containers import CONTAINERS, box_pyramid, write_container
from slide_testutil import CMU, NDPI, OME, TCGA, slide_path, synthetic_slide

from fastinsight.errors import SlideError
from fastinsight.slide import (
    DirectTiffReader,
    OpenSlideReader,
    decode_jpeg_batch,
    open_slide,
)
from fastinsight.slide.readers import _segment_shape


@pytest.mark.parametrize("name", [CMU, TCGA, OME])
def test_direct_reads_the_same_pixels_as_tifffile(name: str) -> None:
    path = slide_path(name)
    with open_slide(path, backend="direct") as d, open_slide(path, backend="tifffile") as t:
        assert isinstance(d, DirectTiffReader)
        assert d.level_dimensions == t.level_dimensions and d.file_mpp == t.file_mpp
        for level in range(d.level_count):
            ds = d.level_downsamples[level]
            box = (int(37 * ds), int(51 * ds), level, 613, 517)  # crosses tile edges
            np.testing.assert_array_equal(d.read_region(*box), t.read_region(*box))
        # past the right/bottom edge: white, like the other backends
        w, h = d.dimensions
        np.testing.assert_array_equal(
            d.read_region(w - 5, h - 5, 0, 20, 20), t.read_region(w - 5, h - 5, 0, 20, 20)
        )


@pytest.mark.parametrize("name", [CMU, TCGA])
def test_direct_matches_openslide_on_aperio(name: str) -> None:
    # Same libjpeg-turbo / OpenJPEG underneath: the decoded pixels agree exactly on these files.
    path = slide_path(name)
    with open_slide(path, backend="direct") as d, open_slide(path, backend="openslide") as o:
        a, b = d.read_region(100, 200, 0, 700, 600), o.read_region(100, 200, 0, 700, 600)
        assert int(np.abs(a.astype(np.int16) - b).max()) <= 1


def test_clones_read_in_parallel_threads_with_identical_results(tmp_path: Path) -> None:
    levels = box_pyramid(synthetic_slide(1200, 900), 2)
    path = write_container(tmp_path / "s.tif", levels, 0.5, "tiff", compression="jpeg")
    with open_slide(path, backend="direct") as reader:
        boxes = [(x, y) for x in range(0, 1100, 170) for y in range(0, 800, 190)]
        expected = {b: reader.read_region(b[0], b[1], 0, 300, 250) for b in boxes}
        reader._cache = type(reader._cache)(0)  # no cache: every thread decodes for itself
        got: dict[tuple[int, int], np.ndarray] = {}
        errors: list[BaseException] = []

        def work(part: list[tuple[int, int]]) -> None:
            handle = reader.clone()
            try:
                for b in part:
                    got[b] = handle.read_region(b[0], b[1], 0, 300, 250)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
            finally:
                handle.close()

        threads = [threading.Thread(target=work, args=(boxes[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for b in boxes:
            np.testing.assert_array_equal(got[b], expected[b])
        # the clones are closed; the original still reads
        assert reader.read_region(0, 0, 0, 8, 8).shape == (8, 8, 3)


def test_sparse_tiles_are_white_and_closed_reader_refuses(tmp_path: Path) -> None:
    img = np.full((512, 512, 3), 255, dtype=np.uint8)
    img[:256, :256] = (180, 60, 140)
    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="zlib")
    # Zero the offsets/bytecounts of the last three tiles: a sparse TIFF (allowed by TIFF 6).
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        page.tags["TileOffsets"].overwrite([page.dataoffsets[0], 0, 0, 0])
        page.tags["TileByteCounts"].overwrite([page.databytecounts[0], 0, 0, 0])
    reader = open_slide(path, backend="direct", mpp=0.5)
    region = reader.read_region(0, 0, 0, 512, 512)
    np.testing.assert_array_equal(region[:256, :256], img[:256, :256])
    assert (region[256:] == 255).all() and (region[:, 256:] == 255).all()
    reader.close()
    with pytest.raises(SlideError, match="closed"):
        reader.read_region(0, 0, 0, 4, 4)


def test_auto_picks_the_backend_that_sees_the_pyramid_and_the_mpp(tmp_path: Path) -> None:
    levels = box_pyramid(synthetic_slide(1500, 1000), 3)
    for kind in CONTAINERS:
        path = write_container(tmp_path / f"s.{kind}.tif", levels, 0.5, kind)
        with open_slide(path) as reader:
            assert reader.backend == "direct", kind
            assert reader.level_count == 3 and reader.mpp == pytest.approx(0.5)
    # The OME-TIFF with SubIFDs: OpenSlide sees one level and no mpp, which auto must not take.
    with open_slide(tmp_path / "s.ome.tif", backend="openslide") as osr:
        assert osr.level_count == 1 and osr.file_mpp is None
    # NDPI: OpenSlide sees more levels than tifffile, so auto keeps OpenSlide.
    with open_slide(slide_path(NDPI)) as reader:
        assert isinstance(reader, OpenSlideReader) and reader.level_count == 7


@pytest.mark.parametrize("name", [CMU, OME])
def test_gpu_decode_path_on_cpu_gives_the_cpu_pixels(name: str) -> None:
    """The batched torchvision decode of :meth:`jpeg_stream` equals imagecodecs' decode of the
    tile -- with Aperio's RGB-in-JPEG (CMU) and YCbCr JPEG (OME)."""
    path = slide_path(name)
    with open_slide(path, backend="direct") as reader:
        assert reader.is_jpeg(0)
        indices = [0, 1, len(reader._pages[0].dataoffsets) - 1]  # includes an edge tile
        streams = [reader.jpeg_stream(0, i) for i in indices]
        decoded = decode_jpeg_batch(streams, device="cpu")
        seg = _segment_shape(reader._pages[0])
        for i, tensor in zip(indices, decoded, strict=True):
            ref = reader._decode_one(0, i, *seg)
            got = tensor.permute(1, 2, 0).numpy()
            assert got.shape == ref.shape
            assert int(np.abs(got.astype(np.int16) - ref).max()) <= 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29's codec notice
def test_aperio_rgb_jpeg_needs_the_adobe_marker() -> None:
    """Without the APP14 marker a decoder treats Aperio's RGB components as YCbCr: the colours
    go wrong. This is what the marker in jpeg_stream prevents."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    with open_slide(slide_path(CMU), backend="direct") as reader:
        stream = reader.jpeg_stream(0, 5)
        assert stream[2:4] == b"\xff\xee" and stream[6:11] == b"Adobe"
        bare = stream.replace(stream[2 : 2 + 16], b"", 1)  # drop the 16-byte APP14 segment
        wrong = decode_jpeg(
            torch.frombuffer(bytearray(bare), dtype=torch.uint8), mode=ImageReadMode.RGB
        )
        right = decode_jpeg_batch([stream])[0]
        assert int((wrong.int() - right.int()).abs().max()) > 20


@pytest.mark.cuda
def test_gpu_batch_decode_matches_cpu() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none is visible on this machine")
    with open_slide(slide_path(CMU), backend="direct") as reader:
        streams = [reader.jpeg_stream(0, i) for i in range(16)]
        gpu = decode_jpeg_batch(streams, device="cuda")
        cpu = decode_jpeg_batch(streams, device="cpu")
        for g, c in zip(gpu, cpu, strict=True):
            assert g.device.type == "cuda"
            # nvJPEG and libjpeg-turbo use different IDCT / upsampling: allow a few levels.
            assert int((g.cpu().int() - c.int()).abs().max()) <= 4


def test_decode_pool_is_recreated_in_a_forked_child(cmu: Path) -> None:
    import multiprocessing as mp

    from fastinsight.slide import direct

    with open_slide(cmu, backend="direct") as reader:
        reader.read_region(0, 0, 0, 1200, 1200)  # >= 4 tiles: the shared pool exists now
        assert direct._POOL is not None
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        ok = pool.apply_async(_read_big_region, (str(cmu),)).get(timeout=60)
    assert ok


def _read_big_region(path: str) -> bool:
    from fastinsight.slide import direct

    assert direct._POOL is None  # forgotten at fork
    with open_slide(path, backend="direct") as reader:
        return reader.read_region(0, 0, 0, 1200, 1200).shape == (1200, 1200, 3)
