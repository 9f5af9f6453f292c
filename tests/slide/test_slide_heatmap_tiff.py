"""The viewer heatmap TIFF (spec section 4) reopened with OpenSlide 4 and tifffile, and the
raw-score sidecar."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from fastinsight.errors import InputError, OutputError
from fastinsight.slide import (
    HeatmapGeometry,
    TileGrid,
    decode_scores,
    encode_scores,
    open_slide,
    read_scores_sidecar,
    write_heatmap_tiff,
    write_scores_sidecar,
)
from fastinsight.slide.colormap import colorize

# A large slide (so the pyramid has levels) whose cells are cheap: 60k x 45k px at 0.2501 um/px.
BIG = TileGrid(slide_width=60_001, slide_height=45_003, slide_mpp=0.2501)


def _cells(grid: TileGrid, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cells = rng.random(grid.cell_shape).astype(np.float32)
    cells[:40, :60] = np.nan  # non-tissue
    cells[50, 50] = 0.0  # a score of exactly 0 stays distinct from non-tissue
    cells[51, 51] = 1.0
    return cells


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_geometry_integer_factor_and_extent() -> None:
    geo = HeatmapGeometry.from_grid(BIG)
    assert geo.factor == math.floor(BIG.l0_cell_size) == 31
    assert geo.hm_mpp == pytest.approx(0.2501 * 31)
    assert geo.hm_width == math.ceil(60_001 / 31) and geo.hm_height == math.ceil(45_003 / 31)
    # extent matches the slide's within one heatmap pixel
    assert 0 <= geo.hm_width * geo.hm_mpp - BIG.slide_extent_um[0] < geo.hm_mpp
    # every cell of the slide is sampled at least once (factor <= cell size)
    rows, cols = geo.cell_index()
    assert set(np.unique(cols)) == set(range(math.ceil(60_001 / BIG.l0_cell_size)))
    up = HeatmapGeometry.from_grid(BIG, upsample=4)
    assert up.factor == math.floor(BIG.l0_cell_size / 4) == 7


def test_score_tiff_round_trips_through_openslide(tmp_path: Path) -> None:
    cells = _cells(BIG)
    path = tmp_path / "heat.tif"
    geo = write_heatmap_tiff(
        path,
        cells,
        BIG,
        model="insight-test",
        class_name="tumour",
        slide="big.svs",
        min_level_size=512,
    )
    assert _files(tmp_path) == ["heat.tif"]
    expected_codes = encode_scores(geo.cells_to_pixels(cells))
    with openslide.OpenSlide(str(path)) as osr:
        dims = osr.level_dimensions
        assert dims[0] == (geo.hm_width, geo.hm_height)
        for k in range(1, len(dims)):
            assert dims[k] == (math.ceil(dims[k - 1][0] / 2), math.ceil(dims[k - 1][1] / 2))
        assert max(dims[-1]) <= 512 < max(dims[-2])
        assert osr.level_count == len(dims) == 3
        mpp_x = float(osr.properties["openslide.mpp-x"])
        mpp_y = float(osr.properties["openslide.mpp-y"])
        assert mpp_x == pytest.approx(geo.hm_mpp, rel=1e-9)
        assert mpp_y == pytest.approx(geo.hm_mpp, rel=1e-9)
        extent_um = dims[0][0] * mpp_x, dims[0][1] * mpp_y
        for got, want in zip(extent_um, BIG.slide_extent_um, strict=True):
            assert abs(got - want) < geo.hm_mpp  # within one heatmap pixel
        assert "insight-test" in osr.properties["openslide.comment"]
        region = np.asarray(osr.read_region((0, 0), 0, dims[0]))
        assert (region[..., 3] == 255).all()
        np.testing.assert_array_equal(region[..., 0], expected_codes)
        level1 = np.asarray(osr.read_region((0, 0), 1, dims[1]))[..., 0]
        np.testing.assert_array_equal(level1, expected_codes[::2, ::2])
    decoded = decode_scores(expected_codes)
    truth = geo.cells_to_pixels(cells)
    assert np.array_equal(np.isnan(decoded), np.isnan(truth))
    assert np.nanmax(np.abs(decoded - truth)) <= 0.5 / 254 + 1e-6


def test_tiff_structure_with_tifffile(tmp_path: Path) -> None:
    path = tmp_path / "heat.tif"
    geo = write_heatmap_tiff(path, _cells(BIG), BIG, class_name="tumour", min_level_size=512)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
        assert not tif.is_ome and not tif.is_shaped and not tif.is_imagej
        pages = list(tif.pages)
        assert len(pages) == 3
        description = pages[0].description
        assert description.startswith("fastinsight heatmap")
        assert "class: tumour" in description and "value range: 0 1" in description
        assert "{" not in description and "<" not in description  # no JSON, no XML
        for k, page in enumerate(pages):
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
            assert page.dtype == np.uint8
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            assert int(page.subfiletype) == (1 if k else 0)
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            num, den = page.tags["XResolution"].value
            assert num / den == pytest.approx(10000 / (geo.hm_mpp * 2**k), rel=1e-6)
            assert k == 0 or page.description == ""
        assert not tif.pages[0].is_subifd and all(not p.subifds for p in pages)


def test_rgb_tiff_opens_with_colours(tmp_path: Path) -> None:
    grid = TileGrid(slide_width=4000, slide_height=3000, slide_mpp=0.5)
    cells = np.full(grid.cell_shape, np.nan, dtype=np.float32)
    cells[:, : grid.cell_shape[1] // 2] = 0.8  # big uniform blocks: JPEG keeps their colour
    path = tmp_path / "heat_rgb.tif"
    geo = write_heatmap_tiff(path, cells, grid, encoding="rgb", colormap="turbo")
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.level_count == 1
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(geo.hm_mpp)
        rgb = np.asarray(osr.read_region((0, 0), 0, osr.dimensions))[..., :3].astype(int)
    want = colorize(np.array(0.8)).astype(int)
    assert np.abs(rgb[20:60, 20:60] - want).max() <= 8
    assert (rgb[20:60, -60:-20] >= 247).all()  # non-tissue is white
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.JPEG
        assert "colormap: turbo" in tif.pages[0].description


def test_small_heatmap_on_real_grid(cmu: Path, tmp_path: Path) -> None:
    with open_slide(cmu) as reader:
        grid = TileGrid.for_slide(reader)
    geo = HeatmapGeometry.from_grid(grid)
    assert geo.factor == 16  # cells of 16.03 level-0 px
    assert (geo.hm_width, geo.hm_height) == (math.ceil(2220 / 16), math.ceil(2967 / 16))
    path = tmp_path / "cmu.tif"
    write_heatmap_tiff(path, _cells(grid), grid)
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.level_count == 1 and osr.dimensions == (139, 186)
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.499 * 16)


def test_encode_decode_codes() -> None:
    codes = encode_scores(np.array([np.nan, 0.0, 1.0, 0.5, -3.0, 7.0]))
    assert codes.tolist() == [0, 1, 255, 128, 1, 255]
    codes = encode_scores(np.array([2.0, 4.0]), value_range=(2.0, 4.0))
    assert codes.tolist() == [1, 255]
    np.testing.assert_allclose(decode_scores(codes, (2.0, 4.0)), [2.0, 4.0])
    with pytest.raises(InputError):
        encode_scores(np.zeros(2), value_range=(1.0, 1.0))


@pytest.mark.parametrize(
    ("cells", "kwargs", "match"),
    [
        ("small", {}, "cell shape"),
        (None, {"encoding": "png"}, "encoding"),
        (None, {"encoding": "rgb", "colormap": "viridis"}, "colormap"),
        (None, {"value_range": (1.0, 0.0)}, "value_range"),
        ("nan", {}, "no tissue"),
        ("int", {}, "floats"),
        ("multi", {}, "one file per class"),
    ],
)
def test_bad_heatmap_input_writes_nothing(
    tmp_path: Path, cells: object, kwargs: dict[str, object], match: str
) -> None:
    grid = TileGrid(slide_width=1000, slide_height=800, slide_mpp=0.5)
    good = _cells(grid)
    if cells is None:
        cells = good
    elif cells == "small":
        cells = np.zeros((3, 3), dtype=np.float32)
    elif cells == "nan":
        cells = np.full(grid.cell_shape, np.nan, dtype=np.float32)
    elif cells == "int":
        cells = np.zeros(grid.cell_shape, dtype=np.int32)
    elif cells == "multi":
        cells = np.stack([good, good])
    with pytest.raises(InputError, match=match):
        write_heatmap_tiff(tmp_path / "h.tif", cells, grid, **kwargs)  # type: ignore[arg-type]
    assert _files(tmp_path) == []


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid = TileGrid(slide_width=1000, slide_height=800, slide_mpp=0.5)

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tifffile.TiffWriter, "write", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_heatmap_tiff(tmp_path / "h.tif", _cells(grid), grid)
    assert _files(tmp_path) == []


def test_missing_output_folder(tmp_path: Path) -> None:
    grid = TileGrid(slide_width=1000, slide_height=800, slide_mpp=0.5)
    with pytest.raises(OutputError, match="does not exist"):
        write_heatmap_tiff(tmp_path / "nope" / "h.tif", _cells(grid), grid)
    assert _files(tmp_path) == []


def test_sidecar_round_trip(tmp_path: Path) -> None:
    grid = TileGrid(slide_width=1000, slide_height=800, slide_mpp=0.5, level=0)
    scores = np.stack([_cells(grid, 0), _cells(grid, 1)])
    path = tmp_path / "x.scores"  # no .npz suffix: numpy must not append one
    write_scores_sidecar(path, scores, grid, class_names=["a", "b"], metadata={"model": "m"})
    assert _files(tmp_path) == ["x.scores"]
    back = read_scores_sidecar(path)
    np.testing.assert_array_equal(back.scores, scores)
    assert back.scores.dtype == np.float32
    np.testing.assert_array_equal(back.mask, np.isfinite(scores).all(axis=0))
    assert back.grid == grid
    assert back.class_names == ("a", "b") and back.metadata == {"model": "m"}


def test_sidecar_bad_input(tmp_path: Path) -> None:
    grid = TileGrid(slide_width=1000, slide_height=800, slide_mpp=0.5)
    with pytest.raises(InputError, match="shape"):
        write_scores_sidecar(tmp_path / "s.npz", np.zeros((2, 3, 3)), grid)
    with pytest.raises(InputError, match="class names"):
        write_scores_sidecar(tmp_path / "s.npz", _cells(grid), grid, class_names=["a", "b"])
    assert _files(tmp_path) == []
    junk = tmp_path / "junk.npz"
    junk.write_text("not a zip")
    with pytest.raises(InputError, match="not a fastinsight scores sidecar"):
        read_scores_sidecar(junk)


@pytest.mark.parametrize("encoding", ["score", "rgb"])
def test_non_ascii_names_reach_the_tiff_as_utf8(tmp_path: Path, encoding: str) -> None:
    # tifffile refuses a non-ASCII str ("TIFF strings must be 7-bit ASCII"): the writer must
    # encode slide, model and class names for the format, and viewers must read them back.
    grid = TileGrid(slide_width=3000, slide_height=2000, slide_mpp=0.5)
    cells = np.linspace(0, 1, math.prod(grid.cell_shape)).reshape(grid.cell_shape)
    path = tmp_path / "heat.tif"
    write_heatmap_tiff(
        path,
        cells,
        grid,
        encoding=encoding,  # type: ignore[arg-type]
        slide="Präparat_µ.svs",
        model="modèle-病理",
        class_name="腫瘍",
        extra_description={"note": "Zürich\x00"},
    )
    with tifffile.TiffFile(path) as tif:
        desc = tif.pages[0].description
    with openslide.OpenSlide(str(path)) as osr:
        via_openslide = osr.properties["tiff.ImageDescription"]
    for text in (desc, via_openslide):
        assert "slide: Präparat_µ.svs" in text
        assert "model: modèle-病理" in text and "class: 腫瘍" in text
        assert "note: Zürich" in text and "\x00" not in text
