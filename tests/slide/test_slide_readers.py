"""Slide readers: backends, geometry, mpp, pixels, and every bad-input case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from slide_testutil import ALL_SLIDES, CMU, NDPI, OME, TCGA, slide_path, synthetic_reader

from fastinsight.errors import InputError, SlideError
from fastinsight.slide import (
    ArrayReader,
    DirectTiffReader,
    OpenSlideReader,
    TiffFileReader,
    open_slide,
    read_resampled,
)

# name: (auto backend, level-0 size, level count with that backend, mpp or None)
EXPECTED = {
    CMU: (DirectTiffReader, (2220, 2967), 1, 0.499),
    TCGA: (DirectTiffReader, (4443, 3567), 2, None),
    NDPI: (OpenSlideReader, (3968, 4864), 7, 0.2282),
    OME: (DirectTiffReader, (1101, 1101), 1, 0.2271),
}


@pytest.mark.parametrize("name", ALL_SLIDES)
def test_slide_opens_with_expected_backend_size_and_mpp(name: str) -> None:
    backend, dims, levels, mpp = EXPECTED[name]
    with open_slide(slide_path(name)) as reader:
        assert type(reader) is backend
        assert reader.dimensions == dims
        assert reader.level_dimensions[0] == dims
        assert reader.level_count == levels
        assert len(reader.level_downsamples) == levels
        assert reader.level_downsamples[0] == 1.0
        if mpp is None:
            assert not reader.has_mpp
        else:
            assert reader.mpp == pytest.approx(mpp, abs=5e-4)
        assert isinstance(reader.properties, dict)
    assert reader.closed


def test_cmu_mpp_exact_and_vendor(cmu: Path) -> None:
    with open_slide(cmu) as reader:
        assert reader.mpp == 0.499
        assert reader.mpp_xy == (0.499, 0.499)
        assert reader.vendor == "aperio"
    with open_slide(cmu, backend="tifffile") as reader:  # Aperio "MPP = 0.4990" in the text
        assert reader.mpp == pytest.approx(0.499, abs=1e-12)
        assert reader.vendor == "aperio"


def test_tcga_has_no_mpp_until_overridden(tcga: Path) -> None:
    with open_slide(tcga) as reader:
        assert reader.file_mpp is None
        with pytest.raises(SlideError, match=r"has no mpp \(microns per pixel\).*pass --mpp"):
            _ = reader.mpp
        # the non-integer downsample, as OpenSlide computes it
        assert reader.level_downsamples[1] == pytest.approx(2.0005055, abs=1e-6)
    with open_slide(tcga, mpp=0.25) as reader:
        assert reader.mpp == 0.25
        assert reader.clone().mpp == 0.25


def test_tcga_tifffile_decodes_jpeg2000_like_openslide(tcga: Path) -> None:
    with open_slide(tcga, backend="openslide") as a, open_slide(tcga, backend="tifffile") as b:
        assert b.level_downsamples == pytest.approx(a.level_downsamples)
        region = (1000, 1000, 0, 300, 200)
        np.testing.assert_array_equal(a.read_region(*region), b.read_region(*region))
        # level 1 (downsample 2.0005): OpenSlide samples at a fractional offset (l0 / 2.0005),
        # tifffile at the nearest whole pixel, so they agree up to a sub-pixel shift.
        x = a.read_region(2001, 1001, 1, 200, 200).astype(int)
        y = b.read_region(2001, 1001, 1, 200, 200).astype(int)
        assert np.abs(x - y).mean() < 8


def test_ndpi_openslide_and_tifffile_agree(ndpi: Path) -> None:
    with open_slide(ndpi) as a, open_slide(ndpi, backend="tifffile") as b:
        assert a.level_count == 7 and b.level_count == 4  # they disagree on the level count
        assert b.mpp == pytest.approx(a.mpp, rel=1e-9)
        assert a.mpp == pytest.approx(0.228175, abs=1e-6)
        for level in (0, 2):
            np.testing.assert_array_equal(
                a.read_region(800, 1200, level, 160, 120), b.read_region(800, 1200, level, 160, 120)
            )


def test_ome_refused_by_openslide_read_by_tifffile(ome: Path) -> None:
    with pytest.raises(SlideError, match="OpenSlide"):
        open_slide(ome, backend="openslide")
    with open_slide(ome) as reader:
        assert isinstance(reader, TiffFileReader)
        assert reader.vendor == "ome-tiff"
        mpp_x, mpp_y = reader.mpp_xy
        assert mpp_x == pytest.approx(0.2270972, abs=1e-6)
        assert mpp_y == pytest.approx(0.2271024, abs=1e-6)
        region = reader.read_region(0, 0, 0, 600, 600)  # crosses 512 px tile borders
        assert region.shape == (600, 600, 3) and region.dtype == np.uint8
        assert region.std() > 10  # real H&E content, not a blank


def test_cmu_region_same_in_both_backends(cmu: Path) -> None:
    with open_slide(cmu, backend="openslide") as a, open_slide(cmu, backend="tifffile") as b:
        for region in [(100, 200, 0, 500, 400), (2100, 2900, 0, 120, 67)]:
            x, y = a.read_region(*region), b.read_region(*region)
            assert x.shape == (region[4], region[3], 3) and x.dtype == np.uint8
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_outside_the_slide_is_white(cmu: Path, backend: str) -> None:
    with open_slide(cmu, backend=backend) as reader:
        w, h = reader.dimensions
        region = reader.read_region(w - 50, h - 40, 0, 100, 100)
        inside = reader.read_region(w - 50, h - 40, 0, 50, 40)
        np.testing.assert_array_equal(region[:40, :50], inside)
        assert (region[40:] == 255).all() and (region[:, 50:] == 255).all()
        assert (reader.read_region(-500, -500, 0, 20, 20) == 255).all()
        assert reader.read_region(0, 0, 0, 0, 5).shape == (5, 0, 3)


def test_thumbnail_shape_and_content(cmu: Path) -> None:
    with open_slide(cmu) as reader:
        thumb = reader.thumbnail(300)
        assert thumb.shape == (300, round(2220 / (2967 / 300)), 3)
        assert thumb.dtype == np.uint8
        full = reader.read_region(0, 0, 0, 2220, 2967).astype(np.float64)
        assert abs(thumb.mean() - full.mean()) < 1.0  # area average keeps the mean
        assert reader.thumbnail(10_000).shape == (2967, 2220, 3)  # never upsampled


def test_read_resampled_is_independent_of_blocking() -> None:
    reader = synthetic_reader(300, 200)
    whole = read_resampled(reader, 3.3, 7.7, 250.0, 150.0, 100, 60, level=0, max_block_px=10_000)
    blocks = read_resampled(reader, 3.3, 7.7, 250.0, 150.0, 100, 60, level=0, max_block_px=40)
    # the window read includes the filter support; only float rounding of PIL's weights differs
    assert np.abs(whole.astype(int) - blocks.astype(int)).max() <= 1


def test_clone_reads_the_same(cmu: Path) -> None:
    for backend in ("openslide", "tifffile"):
        with open_slide(cmu, backend=backend) as reader:
            clone = reader.clone()
            try:
                np.testing.assert_array_equal(
                    reader.read_region(10, 10, 0, 64, 64), clone.read_region(10, 10, 0, 64, 64)
                )
            finally:
                clone.close()


def test_closed_reader_raises(cmu: Path) -> None:
    reader = open_slide(cmu)
    reader.close()
    with pytest.raises(SlideError, match="closed"):
        reader.read_region(0, 0, 0, 4, 4)


def test_bad_level_and_size_are_input_errors(cmu: Path) -> None:
    with open_slide(cmu) as reader:
        with pytest.raises(InputError, match="level"):
            reader.read_region(0, 0, 3, 4, 4)
        with pytest.raises(InputError, match="non-negative"):
            reader.read_region(0, 0, 0, -1, 4)


# ----------------------------------------------------------------------------- bad inputs


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="does not exist") as exc:
        open_slide(tmp_path / "nope.svs")
    _one_line(exc)


def test_folder_is_not_a_slide(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="folder"):
        open_slide(tmp_path)


def test_text_file_named_svs(tmp_path: Path) -> None:
    path = tmp_path / "x.svs"
    path.write_text("this is not a slide\n")
    with pytest.raises(SlideError, match="cannot read slide") as exc:
        open_slide(path)
    text = _one_line(exc)
    assert "x.svs" in text and "OpenSlide" in text and "tifffile" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.svs"]  # nothing written


@pytest.mark.parametrize("name", ALL_SLIDES)
@pytest.mark.parametrize("backend", ["auto", "tifffile"])
def test_truncated_slide_fails_at_open(name: str, backend: str, tmp_path: Path) -> None:
    data = slide_path(name).read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: int(len(data) * 0.4)])
    with pytest.raises(SlideError, match="truncated|cannot read") as exc:
        open_slide(path, backend=backend)  # type: ignore[arg-type]
    _one_line(exc)


@pytest.mark.parametrize("fraction", [0.9, 0.99])
def test_nearly_complete_slide_is_still_truncated(
    tcga: Path, tmp_path: Path, fraction: float
) -> None:
    # tifffile alone would drop the level whose IFD is cut off and open a one-level slide
    data = tcga.read_bytes()
    path = tmp_path / "cut.svs"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(SlideError, match="truncated"):
        open_slide(path)


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), "abc"])
def test_bad_mpp_override(cmu: Path, bad: object) -> None:
    with pytest.raises(InputError, match="--mpp"):
        open_slide(cmu, mpp=bad)  # type: ignore[arg-type]


def test_unknown_backend(cmu: Path) -> None:
    with pytest.raises(InputError, match="backend"):
        open_slide(cmu, backend="vips")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- synthetic TIFF files


def _write_tiff(path: Path, data: np.ndarray, **kwargs: object) -> None:
    with tifffile.TiffWriter(path) as tw:
        tw.write(data, tile=(64, 64), metadata=None, **kwargs)  # type: ignore[arg-type]


def test_tiff_resolution_gives_mpp(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 255, (100, 130, 3), dtype=np.uint8)
    path = tmp_path / "res.tif"
    _write_tiff(path, data, resolution=(40000, 20000), resolutionunit="CENTIMETER")
    with open_slide(path, backend="tifffile") as reader:
        assert reader.mpp_xy == pytest.approx((0.25, 0.5))
        np.testing.assert_array_equal(reader.read_region(0, 0, 0, 130, 100), data)
    inch = tmp_path / "inch.tif"
    _write_tiff(inch, data, resolution=(50800, 50800), resolutionunit="INCH")
    with open_slide(inch, backend="tifffile") as reader:
        assert reader.mpp == pytest.approx(0.5)


def test_tiff_without_resolution_has_no_mpp(tmp_path: Path) -> None:
    data = np.zeros((64, 64, 3), dtype=np.uint8)
    path = tmp_path / "nores.tif"
    _write_tiff(path, data, resolution=(72, 72), resolutionunit="INCH")  # a default, not a scan
    with open_slide(path, backend="tifffile") as reader:
        assert not reader.has_mpp
        with pytest.raises(SlideError, match="--mpp"):
            _ = reader.mpp
        assert open_slide(path, backend="tifffile", mpp=0.3).mpp == 0.3


def test_tiff_grayscale_and_rgba(tmp_path: Path) -> None:
    gray = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    path = tmp_path / "gray.tif"
    _write_tiff(path, gray, photometric="minisblack")
    with open_slide(path, backend="tifffile") as reader:
        out = reader.read_region(0, 0, 0, 64, 64)
        np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=-1))
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:32, :, 3] = 255  # top half opaque red, bottom half transparent
    path = tmp_path / "rgba.tif"
    _write_tiff(path, rgba, photometric="rgb", extrasamples=["unassalpha"])
    with open_slide(path, backend="tifffile") as reader:
        out = reader.read_region(0, 0, 0, 64, 64)
        assert (out[:32] == (200, 0, 0)).all()
        assert (out[32:] == 255).all()  # transparent -> white


def test_tiff_16bit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "u16.tif"
    _write_tiff(path, np.zeros((64, 64), dtype=np.uint16))
    with pytest.raises(SlideError, match="8-bit"):
        open_slide(path, backend="tifffile")


def test_array_reader_geometry() -> None:
    reader = synthetic_reader(300, 200)
    assert reader.dimensions == (300, 200)
    assert reader.level_dimensions == ((300, 200), (150, 100))
    assert reader.level_downsamples == (1.0, 2.0)
    assert reader.best_level_for_downsample(2.0) == 1
    assert reader.best_level_for_downsample(1.9) == 0
    with pytest.raises(InputError):
        ArrayReader(np.zeros((4, 4), dtype=np.uint8))


def _bomb_tile(tile: np.ndarray, rows: int, cols: int) -> bytes:
    """A valid JPEG of ``tile`` whose frame header (SOF) is patched to claim rows x cols."""
    import imagecodecs

    data = bytearray(imagecodecs.jpeg8_encode(tile, level=90))
    pos = 2
    while data[pos + 1] not in (0xC0, 0xC1, 0xC2):
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    data[pos + 5 : pos + 9] = rows.to_bytes(2, "big") + cols.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("backend", ["direct", "tifffile"])
def test_tile_declaring_a_giant_image_is_refused_before_decoding(tmp_path: Path, backend) -> None:
    """One tile of a JPEG TIFF claims 20000 x 30000 px (1.8 GB of RGB for the codec to allocate):
    reading it is one SlideError naming the tile; the honest tiles still read."""
    import imagecodecs

    rng = np.random.default_rng(0)
    img = rng.integers(100, 200, (512, 512, 3), dtype=np.uint8)
    tiles = [
        imagecodecs.jpeg8_encode(img[y : y + 256, x : x + 256], level=90)
        for y in (0, 256)
        for x in (0, 256)
    ]
    tiles[3] = _bomb_tile(img[256:, 256:], 20000, 30000)
    path = tmp_path / "bomb.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(iter(tiles), shape=(512, 512, 3), dtype=np.uint8, tile=(256, 256),
                  compression="jpeg", photometric="rgb", resolution=(20000, 20000),
                  resolutionunit="CENTIMETER")  # fmt: skip
    reader = open_slide(path, backend=backend, validate=False)
    try:
        first = reader.read_region(0, 0, 0, 256, 256)
        assert first.shape == (256, 256, 3) and abs(float(first.mean()) - 150) < 10
        with pytest.raises(SlideError, match=r"tile 3 .* declares a 30000 x 20000 px image"):
            reader.read_region(256, 256, 0, 256, 256)
        if backend == "direct":  # the bytes handed to nvJPEG / torchvision by --decode device
            assert reader.jpeg_stream(0, 0) is not None
            with pytest.raises(SlideError, match="declares a 30000 x 20000 px image"):
                reader.jpeg_stream(0, 3)
    finally:
        reader.close()
    with pytest.raises(SlideError, match="declares a 30000 x 20000 px image"):
        open_slide(path, backend=backend)  # validation reads the last tile
