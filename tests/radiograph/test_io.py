"""Radiograph reading: every format and photometric convention gives the same display picture."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastinsight.errors import InputError
from fastinsight.radiograph import cubic_resize_u8, read_radiograph
from tests.radiograph.images import picture, write_dicom, write_png


def test_png_and_dicom_variants_of_one_picture_read_identically(tmp_path) -> None:
    u8 = picture()
    wide = u8.astype(np.uint16) * 257
    files = {
        "png8": write_png(tmp_path / "a.png", u8),
        "png16": write_png(tmp_path / "b.png", wide),
        "dcm_m2_16bit": write_dicom(tmp_path / "c.dcm", wide),
        "dcm_m1_16bit": write_dicom(tmp_path / "d.dcm", 65535 - wide, photometric="MONOCHROME1"),
        # stored u8, rescaled to 2 u8 - 100, window [c=156, w=511] maps it back to u8 / 255.
        "dcm_window_rescale": write_dicom(
            tmp_path / "e.dcm", u8, bits_stored=8, window=(156, 511), rescale=(2, -100)
        ),
    }
    for name, path in files.items():
        r = read_radiograph(path)
        assert r.image.dtype == np.uint8 and r.image.shape == u8.shape, name
        np.testing.assert_array_equal(r.image, u8, err_msg=name)
    assert read_radiograph(files["dcm_m1_16bit"]).facts["inverted"] is True
    assert read_radiograph(files["png16"]).facts["bits_stored"] == 16


def test_pixel_spacing_missing_zero_or_present(tmp_path) -> None:
    u8 = picture(40, 40)
    assert read_radiograph(write_dicom(tmp_path / "a.dcm", u8)).pixel_spacing_mm is None
    zero = write_dicom(tmp_path / "b.dcm", u8, spacing=(0.0, 0.0))
    assert read_radiograph(zero).pixel_spacing_mm is None
    ok = write_dicom(tmp_path / "c.dcm", u8, spacing=(0.2, 0.25))
    assert read_radiograph(ok).pixel_spacing_mm == (0.2, 0.25)


def test_bad_inputs_get_one_clear_error(tmp_path) -> None:
    u8 = picture(40, 40)
    rgb = np.stack([u8, u8 // 2, u8], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    with pytest.raises(InputError, match="colour image"):
        read_radiograph(tmp_path / "rgb.png")
    Image.fromarray(np.stack([u8] * 3, axis=-1)).save(tmp_path / "grey_rgb.png")
    np.testing.assert_array_equal(read_radiograph(tmp_path / "grey_rgb.png").image, u8)
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(InputError, match="not an image"):
        read_radiograph(tmp_path / "notes.png")
    with pytest.raises(InputError, match="without pixel data"):
        read_radiograph(write_dicom(tmp_path / "empty.dcm", None))
    with pytest.raises(InputError, match="CT slice"):
        read_radiograph(write_dicom(tmp_path / "ct.dcm", u8, modality="CT"))
    with pytest.raises(InputError, match="MR slice"):
        read_radiograph(write_dicom(tmp_path / "mr.dcm", u8, modality="MR"))
    with pytest.raises(InputError, match="does not exist"):
        read_radiograph(tmp_path / "missing.png")


def test_real_chest_cr_and_its_jpeg2000_copy() -> None:
    data = pytest.importorskip("pydicom.data", reason="pydicom-data is not installed")
    try:
        unc = data.get_testdata_file("RG1_UNCI.dcm", download=False)
        j2k = data.get_testdata_file("RG1_J2KI.dcm", download=False)
    except Exception as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"pydicom-data test files unavailable: {exc}")
    if unc is None:
        pytest.skip("pydicom-data (RG1_UNCI.dcm) is not installed")
    r = read_radiograph(unc)
    assert (r.height, r.width) == (1955, 1841)
    assert r.facts["modality"] == "CR" and r.facts["inverted"] is True
    assert r.pixel_spacing_mm is None  # PixelSpacing is [0, 0] in this file
    # MONOCHROME1 inverted: lung fields (upper middle of each side) darker than the spine.
    lung = r.image[600:900, 300:600].mean()
    spine = r.image[600:900, 880:960].mean()
    assert lung < spine
    if j2k is not None:
        other = read_radiograph(j2k)  # JPEG 2000 ("I" = irreversible here: close, not equal)
        assert np.abs(other.image.astype(int) - r.image.astype(int)).mean() < 2.0


def test_jpeg_ls_file_from_another_tool_reads() -> None:
    """A 16-bit near-lossless JPEG-LS file (not one pydicom decodes without extra packages)."""
    data = pytest.importorskip("pydicom.data")
    try:
        path = data.get_testdata_file("JPEGLSNearLossless_16.dcm")
    except Exception as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"pydicom test file unavailable: {exc}")
    if path is None:
        pytest.skip("pydicom's JPEGLSNearLossless_16.dcm is not installed")
    r = read_radiograph(path)
    assert r.facts["transfer_syntax"].startswith("JPEG-LS")
    assert r.image.min() == 0 and r.image.max() == 255  # min-max mapped, not a flat failure


def test_cubic_resize_matches_keys_kernel_on_a_ramp() -> None:
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))  # 8 x 64, linear
    out = cubic_resize_u8(ramp, (8, 128))
    # A cubic kernel reproduces a linear ramp away from the clamped borders.
    x = (np.arange(128) + 0.5) / 2 - 0.5
    np.testing.assert_allclose(out[0, 4:-4], np.rint(4 * x[4:-4]), atol=1)
    assert cubic_resize_u8(ramp, (8, 64)) is not ramp and np.array_equal(
        cubic_resize_u8(ramp, (8, 64)), ramp
    )


@pytest.mark.parametrize("side", [(20000, 20000), (14000, 13000)])
def test_decompression_bomb_pictures_are_refused_before_decoding(tmp_path, side) -> None:
    """A 50 KB PNG declaring 400 MP (Pillow's hard limit) or 182 MP (its warning band): one
    InputError, nothing decoded."""
    path = tmp_path / "bomb.png"
    Image.new("1", side).save(path)
    assert path.stat().st_size < 100_000
    with pytest.raises(InputError, match="decompression bomb"):
        read_radiograph(path)


def test_dicom_declaring_a_giant_image_is_refused(tmp_path) -> None:
    import pydicom

    path = write_dicom(tmp_path / "big.dcm", np.zeros((8, 8), np.uint16))
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 30000
    ds.save_as(str(path))
    with pytest.raises(InputError, match="30000 x 30000 px"):
        read_radiograph(path)
