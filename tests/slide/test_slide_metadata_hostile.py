"""Pixel sizes other tools write (or get wrong), and slides no glass slide could be.

A wrong mpp silently rescales the whole heatmap, so every case here is either the right mpp or
one clear SlideError: a 72-dpi default tag, an OME label image listed before the main image,
non-square pixels, a grid larger than any slide, a float TIFF.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from slide_testutil import synthetic_reader, synthetic_slide

from fastinsight.atomic import check_writable
from fastinsight.cli import main
from fastinsight.errors import OutputError, SlideError
from fastinsight.slide.grid import TileGrid, check_slide_extent
from fastinsight.slide.readers import open_slide


def _tiled(path: Path, rgb: np.ndarray, **kw) -> Path:
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", **kw)
    return path


@pytest.mark.parametrize("backend", ["auto", "openslide", "tifffile"])
def test_a_72_dpi_default_tag_is_no_mpp(tmp_path: Path, backend: str) -> None:
    """72 dpi is 352.8 um/px: OpenSlide reported it as the mpp, the grid at 0.5 um/px then had
    millions of tiles (out of memory). Every reader now treats it as absent."""
    path = _tiled(
        tmp_path / "dpi72.tif", synthetic_slide(700, 672), resolution=(72, 72), resolutionunit=2
    )
    with open_slide(path, backend=backend) as reader:
        assert not reader.has_mpp
        with pytest.raises(SlideError, match="pass --mpp"):
            TileGrid.for_slide(reader)
    with open_slide(path, backend=backend, mpp=0.5) as reader:
        assert TileGrid.for_slide(reader).shape == (3, 4)


def test_ome_mpp_comes_from_the_image_that_is_read(tmp_path: Path) -> None:
    """An OME-TIFF whose first Image is a 20 um/px label: the main (largest) image's 0.5 um/px
    applies, not the first <Pixels> element's."""
    path = tmp_path / "label_first.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(
            synthetic_slide(64, 48, seed=1),
            photometric="rgb",
            metadata={"axes": "YXS", "PhysicalSizeX": 20.0, "PhysicalSizeY": 20.0},
        )
        tif.write(
            synthetic_slide(600, 500),
            photometric="rgb",
            tile=(256, 256),
            metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
        )
    with open_slide(path, backend="tifffile") as reader:
        assert reader.dimensions == (600, 500)
        assert reader.mpp == pytest.approx(0.5)


def test_non_square_pixels_are_refused_unless_mpp_is_given(tmp_path: Path) -> None:
    # 0.5 um in x, 1.0 um in y (ResolutionUnit = cm): averaging would misplace y by 25 %.
    path = _tiled(
        tmp_path / "aniso.tif",
        synthetic_slide(512, 512),
        resolution=(20000, 10000),
        resolutionunit=3,
    )
    with open_slide(path) as reader:
        assert reader.mpp_xy == pytest.approx((0.5, 1.0))
        with pytest.raises(SlideError, match="non-square pixels"):
            _ = reader.mpp
        assert "mpp=0.5x1" in repr(reader)  # a repr never raises
    with open_slide(path, mpp=0.5) as reader:
        assert reader.mpp == 0.5


def test_slightly_non_square_pixels_keep_each_axis_in_the_heatmap(tmp_path: Path) -> None:
    """0.25 x 0.26 um (within the 5 % accepted): the heatmap TIFF's X and Y resolution are each
    axis's own mpp times the factor, so a viewer aligning by physical size lands every heatmap
    pixel on the same slide pixels (one averaged value put y 2 % off over the slide)."""
    pytest.importorskip("openslide")
    import openslide

    from fastinsight.slide.heatmap_tiff import write_heatmap_tiff

    path = _tiled(
        tmp_path / "aniso.tif",
        synthetic_slide(900, 800),
        resolution=(40000, 10000 / 0.26),
        resolutionunit=3,
    )
    with open_slide(path) as reader:
        grid = TileGrid.for_slide(reader)
    assert grid.mpp_xy == pytest.approx((0.25, 0.26))
    assert TileGrid.from_dict(grid.to_dict()) == grid
    out = tmp_path / "heat.tif"
    geometry = write_heatmap_tiff(out, np.full(grid.cell_shape, 0.5), grid)
    x, y = (v * geometry.factor for v in (0.25, 0.26))
    with openslide.OpenSlide(str(out)) as hm:
        assert float(hm.properties["openslide.mpp-x"]) == pytest.approx(x, rel=1e-6)
        assert float(hm.properties["openslide.mpp-y"]) == pytest.approx(y, rel=1e-6)
    with tifffile.TiffFile(out) as tif:
        assert f"mpp: {x!r} x {y!r}" in tif.pages[0].description


def test_a_slide_wider_than_any_glass_slide_is_refused() -> None:
    """--mpp 1000 on a 700 px image: 700 mm. Its grid at 0.5 um/px would not fit in memory."""
    with pytest.raises(SlideError, match="700 mm wide"):
        TileGrid.for_slide(synthetic_reader(700, 672, mpp=1000.0))
    with pytest.raises(SlideError, match="250 mm wide"):
        check_slide_extent(250_000, 80_000, 1.0)
    check_slide_extent(150_000, 50_000, 0.5)  # 75 x 25 mm: a glass slide
    # A grid built with a placeholder mpp (a saved prediction without one) is not a slide's
    # physical claim: never refused.
    grid = TileGrid(slide_width=250_000, slide_height=80_000, slide_mpp=1.0)
    assert grid.n_tiles > 0


def test_float_tiff_names_its_sample_format(tmp_path: Path) -> None:
    """OpenSlide's generic "may be truncated or corrupt" no longer hides the diagnosis."""
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, np.zeros((512, 512, 3), np.float32), tile=(256, 256), photometric="rgb")
    with pytest.raises(SlideError) as err:
        open_slide(path)
    assert "float32 samples" in str(err.value) and "truncated" not in str(err.value)


def test_names_longer_than_the_file_system_allows(tmp_path: Path, capsys) -> None:
    long = "a" * 300
    with pytest.raises(OutputError, match="too long"):
        check_writable(tmp_path / f"{long}.tif")
    from fastinsight.models.config import InsightConfig
    from fastinsight.models.insight import InsightModel

    model = tmp_path / "m.safetensors"
    InsightModel(InsightConfig(in_dim=16, num_classes=1)).save(str(model))
    rc = main(
        [
            "predict",
            str(tmp_path / f"{long}.svs"),
            "-m",
            str(model),
            "--out",
            str(tmp_path / "h.tif"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == SlideError.exit_code
    assert err.startswith("fastinsight: error:") and "\n" not in err and "too long" in err


def test_ome_mpp_follows_the_image_size_when_tifffile_drops_an_image(tmp_path: Path) -> None:
    """A label Image whose data lives in a missing companion file: tifffile lists only the main
    series (index 0), while the XML's Image 0 is the 40 um/px label."""
    import uuid

    main_id, other = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"

    def image(i: int, name: str, side: int, mpp: float, file: str, uid: str) -> str:
        return (
            f'<Image ID="Image:{i}" Name="{name}"><Pixels ID="Pixels:{i}" DimensionOrder="XYCZT" '
            f'Type="uint8" SizeX="{side}" SizeY="{side}" SizeC="3" SizeZ="1" SizeT="1" '
            f'PhysicalSizeX="{mpp}" PhysicalSizeY="{mpp}"><Channel ID="Channel:{i}:0" '
            f'SamplesPerPixel="3"/><TiffData IFD="0" PlaneCount="1"><UUID FileName="{file}">'
            f"{uid}</UUID></TiffData></Pixels></Image>"
        )

    xml = (
        '<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/'
        f'OME/2016-06" UUID="{main_id}">'
        + image(0, "label", 64, 40.0, "label.ome.tif", other)
        + image(1, "main", 512, 0.25, "main.ome.tif", main_id)
        + "</OME>"
    )
    path = tmp_path / "main.ome.tif"
    tifffile.imwrite(
        path, synthetic_slide(512, 512), tile=(256, 256), photometric="rgb",
        description=xml.encode(), metadata=None,
    )  # fmt: skip
    with open_slide(path, backend="tifffile") as reader:
        assert reader.mpp == pytest.approx(0.25)
