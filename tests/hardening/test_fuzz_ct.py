"""Hostile CT files from the fuzz audit (D4, D5, D6, D11): each is one clear error line, or a
correct result, never a silently shorter volume, a traceback after the prediction, or foreign
warnings on stderr.

Every file is built here, small: a 12 x 10 x 4 synthetic chest as a DICOM series or NIfTI.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from fastinsight.cli import main
from fastinsight.dicom import read_header
from fastinsight.errors import InputError
from fastinsight.volume.io import read_dicom_series, read_nifti, read_volume, write_nifti
from fastinsight.volume.synthetic import default_affine, make_chest_ct
from tests.support.quiet_errors import refused_quietly
from tests.volume.ct_testutil import small_model_file, write_dicom_series

AFFINE = default_affine((0.75, 0.6, 2.5), (-31.0, 57.5, -210.0))


@pytest.fixture(scope="module")
def ct():
    return make_chest_ct((12, 10, 4), seed=3)


@pytest.fixture
def series(tmp_path: Path, ct) -> list[Path]:
    """The scan as a DICOM series, files in slice order."""
    write_dicom_series(tmp_path / "d", ct.hu, AFFINE, shuffle_seed=None)
    return sorted((tmp_path / "d").iterdir())


def _meta_end(path: Path) -> int:
    """Where the file meta ends: preamble + DICM + group 0002 (its group length element)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"
    (length,) = struct.unpack("<I", data[140:144])  # (0002,0000) UL, explicit VR LE
    return 144 + length


def _quietly(call: Callable[[], object], capfd) -> object:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    assert not caught, [str(w.message) for w in caught]
    assert capfd.readouterr().err == ""
    return result


# ------------------------------------------------------------------- D4: cut after file meta
@pytest.mark.parametrize("extra", [0, 1, 30], ids=["at-meta-end", "1-byte-more", "30-more"])
@pytest.mark.parametrize("which", [0, -1, 2], ids=["first", "last", "middle"])
def test_slice_cut_short_after_its_file_meta_is_refused_by_name(
    series: list[Path], which: int, extra: int, capfd
) -> None:
    """The dataset is (nearly) empty but the file meta says CT Image Storage: damaged, not "not
    DICOM" (it used to vanish, giving a shorter volume with exit 0)."""
    victim = series[which]
    victim.write_bytes(victim.read_bytes()[: _meta_end(victim) + extra])
    refused_quietly(
        lambda: read_dicom_series(victim.parent), rf"{victim.name}.*damaged DICOM", capfd
    )


def test_image_sop_class_only_in_the_file_meta_without_rows_is_damaged(
    series: list[Path],
) -> None:
    """SOPClassUID gone from the dataset too: the file meta's MediaStorageSOPClassUID counts."""
    ds = pydicom.dcmread(series[1])
    del ds.SOPClassUID
    del ds.Rows
    ds.save_as(series[1])
    with pytest.raises(InputError, match=rf"{series[1].name}.*CT Image Storage.*Rows"):
        read_header(series[1])


def test_non_image_dicom_beside_a_series_is_still_skipped(series: list[Path], ct) -> None:
    """The rule is about image storage classes: a report or DICOMDIR-like object is skipped."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("sr.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.Modality = "SR"
    ds.save_as(series[0].parent / "report.dcm", enforce_file_format=True)
    assert read_dicom_series(series[0].parent).shape == ct.hu.shape


def test_cli_refuses_a_cut_short_last_slice_with_exit_4(
    tmp_path: Path, series: list[Path], capsys
) -> None:
    model = small_model_file(tmp_path)
    victim = series[-1]
    victim.write_bytes(victim.read_bytes()[: _meta_end(victim)])
    out = tmp_path / "h.nii.gz"
    rc = main(["predict-volume", str(victim.parent), "--model", str(model), "--device", "cpu",
               "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 4, err
    assert err.startswith("fastinsight: error:") and "\n" not in err, err
    assert victim.name in err
    assert not out.exists()


# ------------------------------------------------------- D6: required attributes, unusable
def _delete(key: str) -> Callable[[pydicom.Dataset], None]:
    return lambda ds: ds.__delattr__(key)


def _text(tag: int, vr: str, value: str) -> Callable[[pydicom.Dataset], None]:
    """Replace an element by one of another VR holding ``value`` (as a hostile writer does)."""

    def mutate(ds: pydicom.Dataset) -> None:
        del ds[tag]
        ds.add_new(tag, vr, value)

    return mutate


def _set(key: str, value: object) -> Callable[[pydicom.Dataset], None]:
    return lambda ds: setattr(ds, key, value)


BAD_HEADERS = {
    "no-Columns": (_delete("Columns"), "Columns"),
    "no-Rows": (_delete("Rows"), "Rows"),
    "Rows-text": (_text(0x00280010, "LO", "abc"), "Rows"),
    "Columns-text": (_text(0x00280011, "LO", "12x"), "Columns"),
    "Columns-fraction": (_text(0x00280011, "DS", "12.5"), "Columns"),
    "Rows-0": (_set("Rows", 0), "Rows"),
    "no-BitsAllocated": (_delete("BitsAllocated"), "Bits Allocated"),
    "BitsAllocated-text": (_text(0x00280100, "LO", "sixteen"), "pixel data"),
    "no-PixelSpacing": (_delete("PixelSpacing"), "PixelSpacing"),
    "PixelSpacing-inf": (_set("PixelSpacing", ["inf", "inf"]), "PixelSpacing"),
    "PixelSpacing-nan": (_set("PixelSpacing", ["nan", "0.6"]), "PixelSpacing"),
    "PixelSpacing-negative": (_set("PixelSpacing", ["-0.6", "0.75"]), "PixelSpacing"),
    "PixelSpacing-text": (_text(0x00280030, "LO", "abc\\def"), "PixelSpacing"),
    "no-IPP": (_delete("ImagePositionPatient"), "ImagePositionPatient"),
    "IPP-inf": (_set("ImagePositionPatient", ["0", "inf", "1"]), "ImagePositionPatient"),
    "IPP-text": (_text(0x00200032, "LO", "a\\b\\c"), "ImagePositionPatient"),
    "no-IOP": (_delete("ImageOrientationPatient"), "ImageOrientationPatient"),
    "IOP-nan": (
        _set("ImageOrientationPatient", ["nan", "0", "0", "0", "1", "0"]),
        "ImageOrientationPatient",
    ),  # fmt: skip
    "RescaleSlope-1e308": (_set("RescaleSlope", "1e308"), "float32's range"),
    "RescaleIntercept-1e39": (_set("RescaleIntercept", "1e39"), "float32's range"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_unusable_required_attribute_is_one_quiet_line(
    series: list[Path], case: str, capfd
) -> None:
    """Each slice of the series carries the damage (so the first slice read has it too)."""
    mutate, match = BAD_HEADERS[case]
    for path in series:
        ds = pydicom.dcmread(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns as the test writes "nan"
            mutate(ds)
            ds.save_as(path)
    refused_quietly(lambda: read_dicom_series(series[0].parent), match, capfd)


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "0", "-0"])
def test_single_slice_with_an_unusable_thickness_is_refused(
    tmp_path: Path, ct, value: str, capfd
) -> None:
    write_dicom_series(tmp_path / "one", ct.hu[:, :, :1], AFFINE, shuffle_seed=None)
    (path,) = (tmp_path / "one").iterdir()
    ds = pydicom.dcmread(path)
    del ds.SliceThickness
    ds.add_new(0x00180050, "LO", value)
    ds.save_as(path)
    refused_quietly(lambda: read_dicom_series(path.parent), "SliceThickness", capfd)


# --------------------------------------------------------------- D11: quiet successful reads
def test_lenient_dicom_fixes_print_nothing_on_a_good_read(series: list[Path], capfd) -> None:
    """NumberOfFrames 0 (pydicom assumes 1 and warns) and excess pixel data: read, silently."""
    for path in series:
        ds = pydicom.dcmread(path)
        ds.NumberOfFrames = 0
        ds.PixelData = ds.PixelData + b"\0" * 64
        ds.save_as(path)
    vol = _quietly(lambda: read_volume(series[0].parent), capfd)
    assert vol.shape[2] == len(series)  # type: ignore[attr-defined]


# ------------------------------------------------------------------ D5: NIfTI geometry header
def _nifti(path: Path, ct, edits: dict[int, float] | None = None, sform_code: int = 1) -> Path:
    img = nib.Nifti1Image(ct.hu.astype(np.float32), AFFINE)
    img.set_qform(AFFINE, code=1)
    img.set_sform(AFFINE, code=sform_code)
    nib.save(img, str(path))
    data = bytearray(path.read_bytes())
    for offset, value in (edits or {}).items():
        data[offset : offset + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(data))
    return path


PIXDIM1, QUATERN_B, SCL_SLOPE = 80, 256, 112
BAD_QFORMS = {
    "pixdim-nan": {PIXDIM1: float("nan")},
    "pixdim-inf": {PIXDIM1: float("inf")},
    "pixdim-neg-inf": {PIXDIM1 + 4: float("-inf")},
    "quatern-nan": {QUATERN_B: float("nan")},
    "quatern-inf": {QUATERN_B + 4: float("inf")},
    "quatern-beyond-unit": {QUATERN_B: 2.0},
}


@pytest.mark.parametrize("case", sorted(BAD_QFORMS))
def test_non_finite_qform_with_a_valid_sform_writes_a_valid_heatmap(
    tmp_path: Path, ct, case: str, capfd
) -> None:
    """It used to crash in write_nifti (HeaderDataError) after the whole prediction. Now the
    sform places the scan and the heatmap, and the bad qform is not carried over."""
    src = _nifti(tmp_path / "scan.nii", ct, BAD_QFORMS[case])
    vol = _quietly(lambda: read_nifti(src), capfd)
    assert np.allclose(vol.affine, AFFINE)  # type: ignore[attr-defined]
    assert any("qform" in n or "pixdim" in n for n in vol.facts["notes"])  # type: ignore[attr-defined]
    out = tmp_path / "h.nii.gz"
    write_nifti(np.zeros(vol.shape, np.float32), vol.affine, out, header=vol.header)  # type: ignore[attr-defined]
    back = nib.load(str(out))
    assert np.allclose(back.affine, AFFINE, atol=1e-5)
    assert int(back.header["sform_code"]) == 1
    assert np.all(np.isfinite(back.header["pixdim"][1:4]))
    assert np.all(back.header["pixdim"][1:4] > 0)
    qform, qcode = back.header.get_qform(coded=True)
    assert qcode == 0 or np.all(np.isfinite(qform))


def test_non_finite_qform_without_sform_is_refused(tmp_path: Path, ct, capfd) -> None:
    """With sform code 0 the qform places the voxels: a NaN in it is refused at read time."""
    src = _nifti(tmp_path / "scan.nii", ct, {PIXDIM1: float("nan")}, sform_code=0)
    refused_quietly(lambda: read_nifti(src), "affine", capfd)


def test_valid_qform_is_still_written_back_as_it_was(tmp_path: Path, ct) -> None:
    src = _nifti(tmp_path / "scan.nii", ct)
    vol = read_nifti(src)
    assert vol.header is not None and vol.header.qform_code == 1
    assert vol.facts["notes"] == []


@pytest.mark.parametrize("slope", [1e38, -3e38])
def test_scl_slope_overflowing_float32_is_one_quiet_line(
    tmp_path: Path, ct, slope: float, capfd
) -> None:
    src = _nifti(tmp_path / "scan.nii", ct)
    img = nib.load(str(src))
    hdr = img.header.copy()
    hdr.set_data_dtype(np.float32)
    out = nib.Nifti1Image(np.full(ct.hu.shape, 1000.0, np.float32), AFFINE, hdr)
    nib.save(out, str(src))
    data = bytearray(src.read_bytes())
    data[SCL_SLOPE : SCL_SLOPE + 4] = struct.pack("<f", slope)
    src.write_bytes(bytes(data))
    refused_quietly(lambda: read_nifti(src), "scl_slope", capfd)


def test_negative_pixdim_reads_without_nibabel_log_lines(tmp_path: Path, ct, capfd) -> None:
    """nibabel logs "pixdim[1,2,3] should be positive" straight to stderr: silenced."""
    src = _nifti(tmp_path / "scan.nii", ct, {PIXDIM1: -0.75})
    vol = _quietly(lambda: read_nifti(src), capfd)
    assert np.allclose(vol.affine, AFFINE)  # type: ignore[attr-defined]
