"""Hostile radiographs from the fuzz audit (D2, D4, D10, D11, D13): one clear error line, never
a black picture scored, a multi-gigabyte read, a traceback or foreign warnings on stderr.

Every file is built here and is small (a 13000 x 13000 1-bit PNG is a few kilobytes).
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from fastinsight.errors import InputError
from fastinsight.radiograph import io as rio
from fastinsight.radiograph import preprocess
from fastinsight.radiograph.io import MAX_PIXELS, read_radiograph
from tests.radiograph.images import picture, write_dicom, write_png
from tests.support.quiet_errors import refused_quietly


def _dicom(path: Path, **kw: object) -> Path:
    stored = (picture(64, 48).astype(np.uint16) * 16).astype(np.uint16)
    return write_dicom(path, stored, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ D10: non-finite windows
@pytest.mark.parametrize(
    ("center", "width"),
    [
        ("100", "nan"),
        ("100", "inf"),
        ("nan", "400"),
        ("inf", "400"),
        ("-inf", "400"),
        (["100", "200"], ["nan", "1"]),
    ],  # fmt: skip
    ids=["width-nan", "width-inf", "center-nan", "center-inf", "center-neg-inf", "first-of-two"],
)
def test_non_finite_window_is_refused_like_width_0(
    tmp_path: Path, center: object, width: object, capfd
) -> None:
    """A NaN window made every pixel NaN, and the picture black: scored with exit 0."""
    path = _dicom(tmp_path / "w.dcm")
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns as the test writes "nan"
        ds.WindowCenter, ds.WindowWidth = center, width
        ds.save_as(path)
    refused_quietly(lambda: read_radiograph(path), "window", capfd)


def test_width_0_is_stillrefused_quietly(tmp_path: Path, capfd) -> None:
    path = _dicom(tmp_path / "w0.dcm", window=(100.0, 0.0))
    refused_quietly(lambda: read_radiograph(path), "window", capfd)


def test_a_good_window_still_reads(tmp_path: Path) -> None:
    image = read_radiograph(_dicom(tmp_path / "ok.dcm", window=(2000.0, 3000.0))).image
    assert image.min() < image.max()


@pytest.mark.parametrize(("lo", "hi"), [(np.nan, 1.0), (0.0, np.nan), (0.0, np.inf), (-np.inf, 0)])
def test_to_u8_never_maps_non_finite_bounds_to_a_constant_image(lo: float, hi: float) -> None:
    with pytest.raises(ValueError, match="not finite"):
        rio._to_u8(np.arange(12.0).reshape(3, 4), lo, hi)


def test_to_u8_in_blocks_matches_the_direct_formula(monkeypatch) -> None:
    """Blocks bound the float64 temporaries; the result is the full-size formula's."""
    values = np.random.default_rng(0).uniform(-50, 5000, (37, 41))
    want = np.clip(np.rint((values - 3.0) * (255.0 / 4000.0)), 0, 255).astype(np.uint8)
    monkeypatch.setattr(rio, "_U8_BLOCK", 7)
    assert np.array_equal(rio._to_u8(values, 3.0, 4003.0), want)
    u16 = np.random.default_rng(1).integers(0, 65536, (33, 29)).astype(np.uint16)
    want16 = np.clip(np.rint(u16 * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    assert np.array_equal(rio._to_u8(u16, 0.0, 65535.0), want16)


# ----------------------------------------------------------------- D2: size limit and memory
def test_pixel_limit_is_a_radiographs(tmp_path: Path) -> None:
    assert 4300 * 4300 < 8192 * 8192 == MAX_PIXELS <= 100_000_000


@pytest.mark.parametrize("mode", ["1", "L", "I;16"])
def test_tiny_png_of_13000_squared_is_refused_before_decoding(
    tmp_path: Path, mode: str, capfd
) -> None:
    """Under the old 179 MP limit this 169 MP picture decoded to gigabytes (6.9 GB RSS)."""
    path = tmp_path / f"bomb{mode.replace(';', '')}.png"
    Image.new(mode, (13000, 13000)).save(path)
    assert path.stat().st_size < 1_000_000
    refused_quietly(lambda: read_radiograph(path), "at most 64 MP", capfd)


def test_just_over_the_limit_is_refused_and_the_limit_itself_is_named(tmp_path: Path) -> None:
    path = tmp_path / "over.png"
    Image.new("1", (8193, 8192)).save(path)
    with pytest.raises(InputError, match=r"8193 x 8192 px"):
        read_radiograph(path)


def test_dicom_path_has_the_same_limit(tmp_path: Path, capfd) -> None:
    path = _dicom(tmp_path / "big.dcm")
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 9000, 9000  # the pixel data stays small: refused before decoding
    ds.save_as(path)
    refused_quietly(lambda: read_radiograph(path), "at most 64 MP", capfd)


@pytest.mark.parametrize("kind", ["png", "dcm"])
def test_memory_error_while_reading_is_one_line(tmp_path: Path, kind: str, monkeypatch) -> None:
    path = (
        write_png(tmp_path / "a.png", picture(32, 32))
        if kind == "png"
        else _dicom(tmp_path / "a.dcm")
    )

    def boom(*args: object, **kw: object) -> np.ndarray:
        raise MemoryError

    monkeypatch.setattr(rio, "_to_u8", boom)
    if kind == "png":  # 8-bit pictures skip _to_u8: fail the decode instead
        monkeypatch.setattr(rio.np, "asarray", boom)
    with pytest.raises(InputError, match="not enough memory"):
        read_radiograph(path)


@pytest.mark.parametrize(
    "error", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory")]
)
def test_memory_error_while_preprocessing_is_one_line(monkeypatch, error: Exception) -> None:
    def boom(*args: object, **kw: object) -> None:
        raise error

    monkeypatch.setattr(preprocess.F, "interpolate", boom)
    with pytest.raises(InputError, match="not enough memory to resize"):
        preprocess.cubic_resize_u8(picture(40, 30), 16)


def test_other_runtime_errors_in_preprocessing_are_not_renamed(monkeypatch) -> None:
    def boom(*args: object, **kw: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(preprocess.F, "interpolate", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        preprocess.cubic_resize_u8(picture(40, 30), 16)


def test_normalise_is_unchanged() -> None:
    image = picture(20, 24)
    want = ((image.astype(np.float32) / 255.0 - 0.4984) / 0.2483)[None, None]
    assert np.array_equal(preprocess.normalise(image, 0.4984, 0.2483).numpy(), want)


# ------------------------------------------------------------------ D13: multi-frame pictures
def _frames(path: Path, fmt: str, n: int) -> Path:
    frames = [Image.fromarray(picture(32, 24, seed=i)) for i in range(n)]
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:])
    return path


@pytest.mark.parametrize(
    ("name", "fmt", "n"),
    [
        ("anim.gif", "GIF", 2),
        ("anim.png", "PNG", 3),
        ("pages.tif", "TIFF", 2),
        ("stack.tif", "TIFF", 5),
        ("anim.webp", "WEBP", 2),
    ],  # fmt: skip
)
def test_multi_frame_pictures_are_refused_like_multi_frame_dicom(
    tmp_path: Path, name: str, fmt: str, n: int, capfd
) -> None:
    if fmt == "WEBP" and not Image.registered_extensions().get(".webp"):
        pytest.skip("Pillow without WebP")
    path = _frames(tmp_path / name, fmt, n)
    refused_quietly(lambda: read_radiograph(path), rf"holds {n} frames.*one frame", capfd)


@pytest.mark.parametrize(("name", "fmt"), [("one.gif", "GIF"), ("one.tif", "TIFF")])
def test_single_frame_gif_and_tiff_still_read(tmp_path: Path, name: str, fmt: str) -> None:
    path = _frames(tmp_path / name, fmt, 1)
    assert read_radiograph(path).image.shape == (32, 24)


# ------------------------------------------------------ D4: a DICOM radiograph cut short
def _meta_end(path: Path) -> int:
    data = path.read_bytes()
    (length,) = struct.unpack("<I", data[140:144])
    return 144 + length


@pytest.mark.parametrize("extra", [0, 20, 200], ids=["at-meta-end", "in-SOP-class", "in-header"])
def test_radiograph_cut_short_is_named_damaged(tmp_path: Path, extra: int, capfd) -> None:
    path = _dicom(tmp_path / "cut.dcm")
    end = _meta_end(path) + extra
    path.write_bytes(path.read_bytes()[:end])
    refused_quietly(lambda: read_radiograph(path), r"cut\.dcm.*(damaged|not a readable)", capfd)


# ---------------------------------------------------------------------- D11: quiet readers
def test_rescale_overflow_is_one_quiet_line(tmp_path: Path, capfd) -> None:
    """RescaleSlope 1e308 overflows to inf (pydicom and numpy warned on stderr before)."""
    path = _dicom(tmp_path / "slope.dcm", rescale=(1e308, 0.0))
    refused_quietly(lambda: read_radiograph(path), "NaN or infinite", capfd)


def test_lenient_fixes_on_a_good_dicom_print_nothing(tmp_path: Path, capfd) -> None:
    path = _dicom(tmp_path / "ok.dcm")
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData + b"\0" * 10  # excess pixel data: pydicom warns, reads fine
    ds.save_as(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_radiograph(path).image
    assert not caught, [str(w.message) for w in caught]
    assert capfd.readouterr().err == ""
    assert image.shape == (64, 48)
