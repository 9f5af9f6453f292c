"""Hostile TIFF slides (fuzz audit D3, D12, D14): size tags that disagree with the tile table, a
zero or absurd tile size, dimensions beyond the documented 1..1,000,000 px, and an Aperio
``MPP =`` value that only starts like a number. Each is one ``SlideError`` (exit 5) naming the
file and what is inconsistent, raised when the slide is opened, before any region is read (an
IndexError traceback or a 12 GiB allocation before), and an unparseable mpp is no mpp."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile

from fastinsight.cli import main
from fastinsight.errors import SlideError
from fastinsight.slide.readers import open_slide

BACKENDS = ["auto", "direct", "tifffile", "openslide"]
# TIFF tag codes
IMAGE_WIDTH, IMAGE_LENGTH, ROWS_PER_STRIP = 256, 257, 278
TILE_WIDTH, TILE_LENGTH = 322, 323


def _image(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), 240, np.uint8)
    img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = rng.integers(80, 180, (h // 2, w // 2, 3))
    return img


def _write(path: Path, h: int = 512, w: int = 768, **kw) -> Path:
    kw.setdefault("tile", (256, 256))
    tifffile.imwrite(
        path, _image(h, w), photometric="rgb", compression="deflate",
        resolution=(20000, 20000), resolutionunit="CENTIMETER", **kw,
    )  # fmt: skip
    return path


def _patch(path: Path, code: int, value: int, page: int = 0) -> None:
    """Overwrite an inline (count 1) tag value of ``page`` in place, in the tag's own type."""
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[page].tags[code]
        offset, dtype, byteorder = tag.valueoffset, int(tag.dtype), tif.byteorder
    fmt = {3: "H", 4: "I", 16: "Q"}[dtype]
    assert value < 2 ** (8 * struct.calcsize(fmt)), "the test's value does not fit the tag"
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(byteorder + fmt, value))


def _long_sizes(path: Path) -> Path:
    """A tiled TIFF whose ImageWidth/ImageLength are LONG (so 2^31 fits)."""
    _write(path)
    with tifffile.TiffFile(path) as tif:
        assert int(tif.pages[0].tags[IMAGE_WIDTH].dtype) == 4
    return path


def _open_each(path: Path, match: str) -> None:
    """Every backend refuses ``path`` with one line; the TIFF readers say what is wrong (OpenSlide
    may refuse the file itself first, in its own words)."""
    for backend in BACKENDS:
        with pytest.raises(SlideError) as err:
            open_slide(path, backend=backend).close()  # type: ignore[arg-type]
        text = str(err.value)
        assert "\n" not in text and repr(str(path)) in text, text
        if backend != "openslide" or "OpenSlide cannot open" not in text:
            assert "damaged" in text and match in text, (backend, text)


SIZE_CASES = [
    pytest.param(IMAGE_WIDTH, 65535, "tile table holds 6", id="width-65535"),
    pytest.param(IMAGE_WIDTH, 2**31, "outside 1..1000000", id="width-2^31"),
    pytest.param(IMAGE_LENGTH, 2**32 - 1, "outside 1..1000000", id="length-2^32-1"),
    pytest.param(IMAGE_WIDTH, 1_000_001, "outside 1..1000000", id="width-1e6+1"),
    pytest.param(IMAGE_WIDTH, 1, "tile table holds 6", id="width-1"),
    pytest.param(IMAGE_WIDTH, 0, "0 x 512 px", id="width-0"),
    pytest.param(IMAGE_LENGTH, 0, "768 x 0 px", id="length-0"),
]


@pytest.mark.parametrize("code,value,match", SIZE_CASES)
def test_size_tags_that_disagree_with_the_tile_table(
    tmp_path: Path, code: int, value: int, match: str
) -> None:
    path = _long_sizes(tmp_path / "sizes.tif")
    _patch(path, code, value)
    _open_each(path, match)


@pytest.mark.parametrize(
    "tile,match",
    [
        ((1, 1), "needs 393216 tiles, but its tile table holds 6"),
        ((8, 8), "needs 6144 tiles"),
        ((0, 0), "declares 0 x 0 px tiles"),
        ((0, 256), "declares 0 x 256 px tiles"),
        ((65535, 65535), "declares 65535 x 65535 px tiles"),
        ((255, 256), "needs 8 tiles, but its tile table holds 6"),
    ],
    ids=["1", "8", "0", "width-0", "65535", "off-by-one"],
)
def test_tile_sizes_that_disagree_with_the_tile_table(
    tmp_path: Path, tile: tuple[int, int], match: str
) -> None:
    path = _write(tmp_path / "tiles.tif")
    _patch(path, TILE_WIDTH, tile[0])
    _patch(path, TILE_LENGTH, tile[1])
    _open_each(path, match)


def test_a_consistent_but_absurd_tile_size_is_refused_before_allocating(tmp_path: Path) -> None:
    """One 256 px tile declared as 32768 x 32768: the count agrees (1 tile), and decoding it
    would allocate 3 GiB for a 256 x 256 image."""
    path = _write(tmp_path / "one_tile.tif", h=256, w=256)
    _patch(path, TILE_WIDTH, 32768)
    _patch(path, TILE_LENGTH, 32768)
    _open_each(path, "declares 32768 x 32768 px tiles")


@pytest.mark.parametrize(
    "rows,match", [(1, "needs 512 tiles, but its tile table holds 32"), (0, "RowsPerStrip 0")]
)
def test_strip_counts_that_disagree_with_the_strip_table(
    tmp_path: Path, rows: int, match: str
) -> None:
    path = _write(tmp_path / "strips.tif", tile=None, rowsperstrip=16)
    _patch(path, ROWS_PER_STRIP, rows)
    for backend in ("auto", "direct", "tifffile"):
        with pytest.raises(SlideError, match=match):
            open_slide(path, backend=backend).close()  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["auto", "direct", "tifffile"])
def test_the_checks_hold_without_validation(tmp_path: Path, backend: str) -> None:
    """``validate=False`` skips decoding at open time, not the structure checks: a read after it
    must never index past the tile table (an explicit ``backend="openslide"`` leaves the file
    to OpenSlide when validation is off)."""
    path = _write(tmp_path / "tiles.tif")
    _patch(path, TILE_WIDTH, 8)
    _patch(path, TILE_LENGTH, 8)
    with pytest.raises(SlideError):
        reader = open_slide(path, backend=backend, validate=False)  # type: ignore[arg-type]
        try:
            reader.read_region(760, 504, 0, 8, 8)  # tile 6143 of a table of 6
        finally:
            reader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sound_files_still_open(tmp_path: Path, backend: str) -> None:
    for kw in ({"tile": (256, 256)}, {"tile": None, "rowsperstrip": 16}, {"tile": (128, 64)}):
        path = _write(tmp_path / "ok.tif", h=300, w=700, **kw)
        try:
            reader = open_slide(path, backend=backend)  # type: ignore[arg-type]
        except SlideError as exc:
            assert backend == "openslide" and "OpenSlide cannot open" in str(exc)
            continue
        with reader:
            assert reader.dimensions == (700, 300)
            assert math.isclose(reader.mpp, 0.5)
            np.testing.assert_array_equal(reader.read_region(0, 0, 0, 700, 300), _image(300, 700))


def test_cli_exit_5_one_line_and_nothing_written(tmp_path: Path, capsys) -> None:
    from fastinsight.models.config import InsightConfig
    from fastinsight.models.insight import InsightModel

    model = tmp_path / "m.safetensors"
    config = InsightConfig(
        in_dim=64, reduce_dim=16, widths=(32, 16, 16), norm="channel", encoder="vit-tiny"
    )  # an encoder without pretrained weights: the run gets as far as the slide
    InsightModel(config).save(str(model))
    path = _long_sizes(tmp_path / "slide.tif")
    _patch(path, IMAGE_WIDTH, 65535)
    out = tmp_path / "h.tif"
    out.write_text("PRECIOUS")
    rc = main(["predict", str(path), "-m", str(model), "--device", "cpu", "-q", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 5, err
    assert err.startswith("fastinsight: error:") and "\n" not in err, err
    assert "damaged" in err and "tile table" in err
    assert out.read_text() == "PRECIOUS"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.tif", "m.safetensors", "slide.tif"]


# ------------------------------------------------------------------------------------------ mpp
def _aperio(path: Path, mpp_text: str) -> Path:
    description = (
        "Aperio Image Library v12.0.15\r\n768x512 [0,0 768x512] (256x256) JPEG/RGB Q=70"
        f"|AppMag = 20|MPP = {mpp_text}|Filename = x"
    )
    tifffile.imwrite(
        path, _image(512, 768), tile=(256, 256), photometric="rgb", compression="deflate",
        description=description,
    )  # fmt: skip
    return path


@pytest.mark.parametrize(
    "text", ["0.4x90", "0.4990um", "0.4_990", "0.49.90", "0x1", "1e", ".", "nan", "0.4990 0.5"]
)
@pytest.mark.parametrize("backend", ["auto", "direct", "tifffile"])
def test_an_aperio_mpp_that_is_not_a_number_is_no_mpp(
    tmp_path: Path, text: str, backend: str
) -> None:
    path = _aperio(tmp_path / "a.svs", text)
    with open_slide(path, backend=backend) as reader:  # type: ignore[arg-type]
        assert reader.file_mpp is None
        with pytest.raises(SlideError, match="mpp"):
            _ = reader.mpp


@pytest.mark.parametrize("text,value", [("0.4990", 0.499), (" 0.25 ", 0.25), ("2.5e-1", 0.25)])
def test_an_aperio_mpp_that_is_a_number_is_read(tmp_path: Path, text: str, value: float) -> None:
    path = _aperio(tmp_path / "a.svs", text)
    for backend in ("direct", "tifffile"):
        with open_slide(path, backend=backend) as reader:  # type: ignore[arg-type]
            assert reader.file_mpp == (value, value)


@pytest.mark.parametrize("size", ["0.5x", "0.5_0", "inf"])
def test_an_ome_physical_size_that_is_not_a_number_is_no_mpp(tmp_path: Path, size: str) -> None:
    path = tmp_path / "x.ome.tif"
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/'
        'Schemas/OME/2016-06"><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" '
        f'Type="uint8" SizeX="768" SizeY="512" SizeC="3" SizeZ="1" SizeT="1" '
        f'PhysicalSizeX="{size}" PhysicalSizeY="{size}"><Channel ID="Channel:0" '
        'SamplesPerPixel="3"/><TiffData/></Pixels></Image></OME>'
    )
    tifffile.imwrite(
        path, _image(512, 768), tile=(256, 256), photometric="rgb", description=xml,
        metadata=None,
    )  # fmt: skip
    with open_slide(path, backend="tifffile") as reader:
        assert reader.file_mpp is None
