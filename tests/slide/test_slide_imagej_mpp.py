"""ImageJ/Fiji TIFFs keep their pixel size as X/YResolution per the description's ``unit=``
(ResolutionUnit NONE): read as mpp like any other slide's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from fastinsight.errors import SlideError
from fastinsight.slide import open_slide


def _imagej_slide(path: Path, mpp: float, unit: str) -> Path:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)
    tifffile.imwrite(
        path, rgb, imagej=True, photometric="rgb", resolution=(1 / mpp, 1 / mpp),
        metadata={"unit": unit},
    )  # fmt: skip
    return path


@pytest.mark.parametrize(
    ("unit", "per_unit_um"),
    [("micron", 1.0), ("um", 1.0), ("\\u00B5m", 1.0), ("nm", 1e-3), ("mm", 1e3)],
    ids=["micron", "um", "escaped-mu", "nm", "mm"],
)
def test_imagej_resolution_is_read_in_its_unit(tmp_path: Path, unit: str, per_unit_um) -> None:
    value = 0.499 / per_unit_um  # 0.499 um per pixel, written in the file's unit
    path = _imagej_slide(tmp_path / "fiji.tif", value, unit)
    assert tifffile.TiffFile(path).pages[0].description.startswith("ImageJ=")
    with open_slide(path) as slide:
        assert slide.mpp_xy == pytest.approx((0.499, 0.499), rel=1e-6)


def test_an_imagej_file_in_pixels_has_no_mpp(tmp_path: Path) -> None:
    path = _imagej_slide(tmp_path / "fiji.tif", 1.0, "pixel")
    with pytest.raises(SlideError, match="mpp"):
        with open_slide(path) as slide:
            slide.mpp_xy  # noqa: B018 - the property raises for a slide without one
