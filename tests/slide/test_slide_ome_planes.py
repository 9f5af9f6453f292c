"""OME-TIFFs whose main image holds several planes in its IFD chain (channels stored as pages,
a Z stack, a time series): refused with one line by every reader, never a traceback and never
one plane read as the slide (audit D2). And the page walk behind the structure checks sees
real TiffPages after tifffile's OME parser has switched its page list to TiffFrames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from slide_testutil import synthetic_slide

from fastinsight.errors import SlideError
from fastinsight.slide import open_slide

BACKENDS = ("auto", "direct", "tifffile", "openslide")
META = {"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}


def _rgb() -> np.ndarray:
    return synthetic_slide(320, 288, seed=3)  # [288, 320, 3]


def _write(path: Path, data: np.ndarray, axes: str, photometric: str) -> Path:
    tifffile.imwrite(
        path,
        data,
        tile=(128, 128),
        photometric=photometric,
        compression="zlib",
        metadata={"axes": axes, **META},
    )
    return path


# name: (data, axes, photometric, words the refusal must hold)
CASES = {
    "cyx8": (lambda a: np.moveaxis(a, -1, 0), "CYX", "minisblack", "3 channel planes"),
    "cyx16": (
        lambda a: np.moveaxis(a, -1, 0).astype(np.uint16) * 257,
        "CYX",
        "minisblack",
        "3 channel planes",
    ),
    "zyxs": (lambda a: np.stack([a, a[::-1]]), "ZYXS", "rgb", "a Z stack of 2 planes"),
    "tyxs": (lambda a: np.stack([a, a[:, ::-1]]), "TYXS", "rgb", "2 time points"),
    "zcyx": (
        lambda a: np.stack([np.moveaxis(a, -1, 0)] * 2),
        "ZCYX",
        "minisblack",
        "a Z stack of 2 planes and 3 channel planes",
    ),
}


@pytest.fixture(scope="module")
def ome_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ome_planes")
    rgb = _rgb()
    return {
        name: _write(folder / f"{name}.ome.tif", make(rgb), axes, photometric)
        for name, (make, axes, photometric, _) in CASES.items()
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_multi_plane_ome_is_refused_by_every_reader(
    ome_files: dict[str, Path], name: str, backend: str
) -> None:
    words = CASES[name][3]
    with pytest.raises(SlideError) as info:
        open_slide(ome_files[name], backend=backend)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "\n" not in msg
    assert f"{name}.ome.tif" in msg and "OME-TIFF" in msg and words in msg, msg
    assert "one plane" in msg and "RGB" in msg, msg
    assert "TiffFrame" not in msg


@pytest.mark.parametrize("reader", ["auto", "direct", "tifffile", "openslide"])
def test_predict_refuses_channel_planes_with_one_line(
    ome_files: dict[str, Path], reader: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastinsight import InsightConfig, InsightModel
    from fastinsight.cli import main

    model = tmp_path / "m.safetensors"
    InsightModel(
        InsightConfig(in_dim=64, num_classes=1, encoder="vit-tiny"), backend="reference"
    ).save(str(model))
    out = tmp_path / "h.tif"
    argv = ["predict", str(ome_files["cyx8"]), "-m", str(model), "--out", str(out)]
    rc = main([*argv, "--reader", reader, "--device", "cpu", "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 5, err
    assert err.startswith("fastinsight: error:") and "\n" not in err, err
    assert "3 channel planes" in err and "Traceback" not in err
    assert not out.exists()


def test_single_plane_ome_beside_a_multi_plane_image_still_opens(tmp_path: Path) -> None:
    """The slide (one RGB plane, with a SubIFD level) and a small second Image of 3 channel
    planes: the slide opens with every reader (the walk over the main IFD chain meets that
    Image's planes as TiffFrames, which used to crash the structure checks) and reads right."""
    rgb = _rgb()
    path = tmp_path / "two_images.ome.tif"
    half = rgb[::2, ::2].copy()
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(
            rgb,
            subifds=1,
            tile=(128, 128),
            photometric="rgb",
            compression="zlib",
            metadata={"axes": "YXS", **META},
        )
        tw.write(half, subfiletype=1, tile=(128, 128), photometric="rgb", compression="zlib")
        small = np.moveaxis(rgb[:64, :64], -1, 0).copy()
        tw.write(small, photometric="minisblack", metadata={"axes": "CYX"})
    with tifffile.TiffFile(path) as tif:
        _ = tif.series
        # The OME parser leaves the channel planes cached as TiffFrames: the state in which
        # list(tif.pages) used to reach the structure checks.
        assert any(isinstance(p, tifffile.TiffFrame) for p in tif.pages)
        from fastinsight.slide.readers import _tiff_pages

        pages = _tiff_pages(tif)
        assert len(pages) == 4 and all(isinstance(p, tifffile.TiffPage) for p in pages)
    for backend in BACKENDS:
        with open_slide(path, backend=backend) as reader:  # type: ignore[arg-type]
            assert reader.dimensions == (320, 288), backend
            got = reader.read_region(0, 0, 0, 320, 288)
            if reader.backend != "openslide":
                assert reader.file_mpp == pytest.approx((0.5, 0.5))
            np.testing.assert_array_equal(got, rgb, err_msg=backend)


def test_one_channel_ome_is_still_a_grey_slide(tmp_path: Path) -> None:
    """A single-plane grey OME-TIFF (C of 1 is no stack) keeps opening as before."""
    grey = _rgb()[..., 1].copy()
    path = _write(tmp_path / "grey.ome.tif", grey[None], "CYX", "minisblack")
    with open_slide(path, backend="direct") as reader:
        got = reader.read_region(0, 0, 0, 320, 288)
    np.testing.assert_array_equal(got, np.repeat(grey[..., None], 3, axis=-1))
