"""Compressed DICOM pixel data: JPEG lossless, 12-bit JPEG, JPEG-LS, JPEG 2000 and HTJ2K decode.

The files are written here the way PACS and converters write them (an encapsulated codestream
per frame, made by imagecodecs' encoders), and pydicom's own test files from other tools are read
when installed. Lossless syntaxes must give back exactly the stored samples, signed and unsigned,
at the bit depths radiographs and CT use; both readers (radiograph, CT series) must read them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fastinsight import dicom
from fastinsight.errors import InputError
from fastinsight.radiograph.io import read_radiograph
from fastinsight.volume.io import read_volume
from tests.radiograph.images import picture, write_dicom
from tests.support.dicom_codestreams import encode as _encode
from tests.support.dicom_codestreams import write_compressed
from tests.volume.ct_testutil import dcm2niix_layout, write_dicom_series

imagecodecs = pytest.importorskip("imagecodecs")
pydicom = pytest.importorskip("pydicom")


def _samples(shape: tuple[int, int], bits: int, signed: bool, seed: int = 0) -> np.ndarray:
    """Smooth content with noise over the whole range of ``bits`` (signed or not)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    wave = 0.5 + 0.45 * np.sin(xx / 7.0) * np.cos(yy / 5.0) + rng.normal(0, 0.02, shape)
    values = np.rint(lo + np.clip(wave, 0, 1) * (hi - lo)).astype(np.int64)
    values[0, 0], values[-1, -1] = lo, hi  # both ends of the range
    return values


LOSSLESS = [
    ("1.2.840.10008.1.2.4.70", 8, False),
    ("1.2.840.10008.1.2.4.70", 12, False),
    ("1.2.840.10008.1.2.4.70", 16, False),
    ("1.2.840.10008.1.2.4.70", 12, True),
    ("1.2.840.10008.1.2.4.70", 16, True),
    ("1.2.840.10008.1.2.4.57", 12, False),
    ("1.2.840.10008.1.2.4.80", 12, False),
    ("1.2.840.10008.1.2.4.80", 16, True),
    # (imagecodecs' JPEG-LS encoder writes 16-bit precision, so no signed 12-bit JPEG-LS here;
    # pydicom's own MR_small_jpeg_ls_lossless.dcm covers signed JPEG-LS from another tool)
    ("1.2.840.10008.1.2.4.201", 12, False),
    ("1.2.840.10008.1.2.4.90", 16, True),
]


@pytest.mark.parametrize(("syntax", "bits", "signed"), LOSSLESS)
def test_lossless_syntaxes_give_back_the_stored_samples(tmp_path, syntax, bits, signed) -> None:
    values = _samples((37, 53), bits, signed)
    path = write_compressed(tmp_path / "x.dcm", values, syntax, bits=bits, signed=signed)
    dicom.install()
    decoded = pydicom.dcmread(path).pixel_array
    assert decoded.dtype.kind == ("i" if signed else "u")
    np.testing.assert_array_equal(decoded.astype(np.int64), values)


@pytest.mark.parametrize(
    ("syntax", "bits", "tol"),
    [("1.2.840.10008.1.2.4.51", 12, 64), ("1.2.840.10008.1.2.4.81", 12, 2)],
)
def test_lossy_syntaxes_decode_close_to_the_samples(tmp_path, syntax, bits, tol) -> None:
    values = _samples((40, 48), bits, False)
    path = write_compressed(tmp_path / "x.dcm", values, syntax, bits=bits, signed=False)
    dicom.install()
    decoded = pydicom.dcmread(path).pixel_array.astype(np.int64)
    assert decoded.shape == values.shape
    assert np.abs(decoded - values).max() <= tol
    assert np.corrcoef(decoded.ravel(), values.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80"])
def test_radiograph_reader_reads_compressed_files_like_uncompressed(tmp_path, syntax) -> None:
    stored = picture().astype(np.int64) * 16 + 7  # 12-bit CR values
    plain = read_radiograph(write_dicom(tmp_path / "plain.dcm", stored, bits_stored=12))
    packed = read_radiograph(
        write_compressed(tmp_path / "packed.dcm", stored, syntax, bits=12, signed=False)
    )
    np.testing.assert_array_equal(packed.image, plain.image)
    assert packed.facts["transfer_syntax"] != plain.facts["transfer_syntax"]


def test_ct_series_in_jpeg_lossless_reads_like_uncompressed(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(3)
    hu = rng.integers(-1024, 2000, (24, 20, 5)).astype(np.float32)
    affine = np.diag([0.8, 0.7, 2.5, 1.0])
    write_dicom_series(tmp_path / "plain", hu, affine, prefix="a")
    # The same series with every slice's pixels as JPEG lossless SV1 (signed 16-bit samples).
    packed = tmp_path / "packed"
    packed.mkdir()
    for f in sorted((tmp_path / "plain").iterdir()):
        ds = pydicom.dcmread(f)
        values = ds.pixel_array.astype(np.int64)
        frame = _encode("1.2.840.10008.1.2.4.70", values, 16)
        from pydicom.encaps import encapsulate

        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.save_as(str(packed / f.name), enforce_file_format=True)
    a, b = read_volume(tmp_path / "plain"), read_volume(packed)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.affine, b.affine)
    # Read back as dcm2niix writes it (rows reversed, slices ascending along the normal).
    np.testing.assert_array_equal(b.data, dcm2niix_layout(hu, affine)[0])


def _testdata(name: str) -> str | None:
    """One of pydicom's test files (other tools wrote them), or None where it is not installed."""
    from pydicom.data import get_testdata_file

    try:
        return get_testdata_file(name)
    except Exception:  # pydicom-data not installed and no network
        return None


def test_other_tools_files_decode_where_installed() -> None:
    """pydicom's test files, written by other tools (dcmtk, GDCM, ...): compressed copies of an
    uncompressed file decode to exactly its samples."""
    pairs = [
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
    ]
    dicom.install()
    checked = 0
    for packed, plain in pairs:
        a, b = _testdata(packed), _testdata(plain)
        if a is None or b is None:
            continue
        np.testing.assert_array_equal(
            pydicom.dcmread(a).pixel_array, pydicom.dcmread(b).pixel_array, err_msg=packed
        )
        checked += 1
    for name in ("JPGLosslessP14SV1_1s_1f_8b.dcm", "JPEG-LL.dcm", "JPEG-lossy.dcm"):
        path = _testdata(name)
        if path is None:
            continue
        arr = pydicom.dcmread(path).pixel_array
        assert arr.ndim == 2 and arr.size > 1000 and arr.max() > arr.min(), name
        checked += 1
    if not checked:
        pytest.skip("pydicom's compressed test files are not installed")


def test_corrupt_codestream_is_one_clear_line(tmp_path) -> None:
    values = _samples((32, 32), 12, False)
    good = _encode("1.2.840.10008.1.2.4.70", values, 12)
    bad = good[: len(good) // 3]  # a truncated frame
    path = write_compressed(
        tmp_path / "bad.dcm", values, "1.2.840.10008.1.2.4.70", bits=12, signed=False,
        codestream=bad,
    )  # fmt: skip
    with pytest.raises(InputError) as info:
        read_radiograph(path)
    assert "\n" not in str(info.value) and "bad.dcm" in str(info.value)


@pytest.mark.parametrize(
    "syntax", ["1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.201"]
)
def test_codestream_larger_than_the_header_says_is_refused_before_decoding(
    tmp_path, syntax
) -> None:
    """A decompression bomb's shape: a 32 x 32 dataset carrying a 3000 x 2000 codestream."""
    big = _encode(syntax, np.zeros((3000, 2000), np.int64), 12)
    assert dicom.codestream_size(big) == (3000, 2000)
    path = write_compressed(tmp_path / "bomb.dcm", np.zeros((32, 32), np.int64), syntax,
                            bits=12, signed=False, codestream=big)  # fmt: skip
    with pytest.raises(InputError, match="3000 x 2000 px but the dataset says 32 x 32"):
        read_radiograph(path)


def test_codestream_size_reads_other_tools_headers() -> None:
    from pydicom.encaps import generate_frames

    names = ["JPGLosslessP14SV1_1s_1f_8b.dcm", "MR_small_jpeg_ls_lossless.dcm", "US1_J2KR.dcm"]
    checked = 0
    for name in names:
        path = _testdata(name)
        if path is None:
            continue
        ds = pydicom.dcmread(path)
        frame = next(
            generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1)))
        )
        assert dicom.codestream_size(frame) == (ds.Rows, ds.Columns), name
        checked += 1
    if not checked:
        pytest.skip("pydicom's compressed test files are not installed")
    assert dicom.codestream_size(b"\xff\xd8\xff") is None and dicom.codestream_size(b"") is None


def test_syntax_nobody_decodes_names_it(tmp_path) -> None:
    values = _samples((16, 16), 8, False)
    mpeg2 = "1.2.840.10008.1.2.4.100"  # MPEG2 video: no still-image decoder
    path = write_compressed(
        tmp_path / "video.dcm", values, mpeg2, bits=8, signed=False, codestream=b"\0\0\1\xb3" * 8
    )
    with pytest.raises(InputError, match="MPEG2") as info:
        read_radiograph(path)
    assert "\n" not in str(info.value)


def test_install_is_idempotent_and_goes_after_pydicoms_own_plugins() -> None:
    from pydicom.pixels.decoders.base import get_decoder

    dicom.install()
    dicom.install()
    for syntax in dicom.SYNTAXES:
        plugins = list(get_decoder(syntax)._available)  # in the order pydicom tries them
        assert plugins.count(dicom.PLUGIN) == 1, syntax
        assert plugins[-1] == dicom.PLUGIN, syntax


# ------------------------------------------------------------------- DICOM whole-slide images
def _wsi(folder: Path, **kw) -> list[Path]:
    from tests.support.dicom_wsi import write_dicom_wsi

    rgb = np.full((520, 600, 3), 210, np.uint8)
    rgb[100:300, 150:400] = (150, 60, 140)
    return write_dicom_wsi(folder, rgb, **kw)


def test_whole_slide_file_finds_the_largest_level(tmp_path) -> None:
    files = _wsi(tmp_path / "study" / "series", downsamples=(4, 1, 2), extra_series_file=True)
    level0 = files[1]
    assert dicom.whole_slide_file(files[0]) == level0  # any level's file -> the largest
    assert dicom.whole_slide_file(tmp_path / "study" / "series") == level0
    assert dicom.whole_slide_file(tmp_path) == level0  # two folders up (a PACS export tree)
    assert dicom.whole_slide_file(tmp_path / "study" / "series" / "note.dcm") is None
    assert dicom.is_whole_slide_image(tmp_path / "study")
    assert not dicom.is_whole_slide_image(tmp_path / "study" / "series" / "note.dcm")


def test_whole_slide_file_refuses_two_slides_and_ignores_other_dicoms(tmp_path) -> None:
    _wsi(tmp_path / "a", downsamples=(1,))
    _wsi(tmp_path / "b", downsamples=(1,))
    with pytest.raises(InputError, match="2 DICOM whole-slide images"):
        dicom.whole_slide_file(tmp_path)
    rng = np.random.default_rng(0)
    write_dicom_series(tmp_path / "ct", rng.normal(0, 50, (8, 8, 3)), np.eye(4))
    assert dicom.whole_slide_file(tmp_path / "ct") is None
    assert not dicom.is_whole_slide_image(tmp_path / "ct")
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)  # broken header
    assert dicom.whole_slide_file(tmp_path / "junk.dcm") is None


def test_dispatch_sends_dicom_slides_to_slides_and_ct_to_ct(tmp_path) -> None:
    from fastinsight.cohort import discover_slides
    from fastinsight.volume.run import is_volume_input

    files = _wsi(tmp_path / "cohort" / "slideA")
    _wsi(tmp_path / "cohort" / "slideB", downsamples=(1,))
    write_dicom_series(tmp_path / "ct", np.zeros((8, 8, 3)), np.eye(4))
    assert not is_volume_input(tmp_path / "cohort" / "slideA")
    assert not is_volume_input(files[0])
    assert is_volume_input(tmp_path / "ct")
    slides = discover_slides(tmp_path / "cohort")
    assert [s.slide_id for s in slides] == ["slideA", "slideB"]
    assert [s.path for s in discover_slides(tmp_path / "cohort" / "slideA")] == [
        (tmp_path / "cohort" / "slideA").absolute()
    ]


def test_cohort_fingerprints_a_dicom_slide_by_its_largest_level(tmp_path) -> None:
    """Resuming a cohort must recognise a finished DICOM WSI folder (a folder has no bytes of
    its own: the largest level's file stands for the slide) and notice when it is replaced."""
    from fastinsight.cohort.state import file_fingerprint, slide_fingerprint

    files = _wsi(tmp_path / "slide", downsamples=(4, 1))
    assert slide_fingerprint(tmp_path / "slide") == file_fingerprint(files[1])
    assert slide_fingerprint(files[1]) == file_fingerprint(files[1])
    before = slide_fingerprint(tmp_path / "slide")
    _wsi(tmp_path / "slide", downsamples=(4, 1), jpeg=False)  # re-exported in place
    assert slide_fingerprint(tmp_path / "slide") != before
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError):
        slide_fingerprint(tmp_path / "empty")


def test_probing_a_non_dicom_slide_does_not_import_pydicom(tmp_path: Path) -> None:
    """The DICOM-WSI probe runs on every slide path: a TIFF/SVS is told apart by its missing
    'DICM' preamble before pydicom is imported (an install without it still reads SVS files)."""
    import subprocess
    import sys

    tif = tmp_path / "s.tif"
    tif.write_bytes(b"II*\x00" + b"\x00" * 200)
    code = (
        "import sys\n"
        "from fastinsight.dicom import _wsi_level\n"
        f"assert _wsi_level({str(tif)!r}) is None\n"
        "assert 'pydicom' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
