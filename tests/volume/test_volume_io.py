"""Reading CT volumes: NIfTI and DICOM series give the same HU and geometry; bad input refused."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from ct_testutil import dcm2niix_layout, write_dicom_series, write_enhanced_ct

from fastinsight.errors import InputError
from fastinsight.volume.io import read_dicom_series, read_nifti, read_volume, write_nifti
from fastinsight.volume.synthetic import default_affine, make_chest_ct


@pytest.fixture
def ct():
    return make_chest_ct(
        (20, 14, 6),
        lesions=1,
        seed=3,
        affine=default_affine((0.7, 0.9, 3.0), (-40.5, 12.25, 101.0)),
    )


def test_nifti_round_trip_keeps_hu_and_affine(tmp_path: Path, ct) -> None:
    write_nifti(ct.hu, ct.affine, tmp_path / "a.nii.gz", dtype=np.int16)
    vol = read_nifti(tmp_path / "a.nii.gz")
    assert vol.data.dtype == np.float32 and vol.shape == (20, 14, 6)
    np.testing.assert_array_equal(vol.data, ct.hu.astype(np.float32))
    np.testing.assert_allclose(vol.affine, ct.affine)
    assert vol.spacing == pytest.approx((0.7, 0.9, 3.0))
    assert vol.orientation == "RAS"


def test_nifti_scaling_is_applied(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.full((4, 4, 3), 10, np.int16), np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "s.nii"))
    assert float(read_nifti(tmp_path / "s.nii").data[0, 0, 0]) == -1004.0


def test_dicom_series_shuffled_equals_nifti(tmp_path: Path, ct) -> None:
    """The series reads as dcm2niix writes it (slices ascending along the normal: this RAS
    affine's slice axis comes back reversed, every voxel in its world place)."""
    uid = write_dicom_series(tmp_path / "dcm", ct.hu, ct.affine, shuffle_seed=7)
    vol = read_volume(tmp_path / "dcm")
    data, affine = dcm2niix_layout(ct.hu, ct.affine)
    np.testing.assert_array_equal(vol.data, data.astype(np.float32))
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    assert vol.facts["series_uid"] == uid and vol.facts["files"] == 6
    assert vol.orientation == "RAI"


@pytest.mark.parametrize("jpeg_lossless", [False, True])
def test_enhanced_multiframe_ct_equals_the_classic_series(
    tmp_path: Path, ct, jpeg_lossless
) -> None:
    """One enhanced CT file (frames shuffled, placed by their functional groups; optionally JPEG
    lossless frames) reads like the one-file-per-slice series: same HU, same affine."""
    path = write_enhanced_ct(tmp_path / "e" / "ct.dcm", *(ct.hu, ct.affine),
                             shuffle_seed=5, jpeg_lossless=jpeg_lossless)  # fmt: skip
    write_dicom_series(tmp_path / "c", ct.hu, ct.affine)
    classic = read_volume(tmp_path / "c")
    for vol in (read_volume(tmp_path / "e"), read_volume(path)):
        np.testing.assert_array_equal(vol.data, classic.data)
        np.testing.assert_allclose(vol.affine, classic.affine, atol=1e-5)
        assert vol.facts["files"] == 1 and vol.facts["slices"] == 6
    data, affine = dcm2niix_layout(ct.hu, ct.affine)
    np.testing.assert_array_equal(classic.data, data.astype(np.float32))
    np.testing.assert_allclose(classic.affine, affine, atol=1e-5)


def test_one_frame_enhanced_ct_file(tmp_path: Path, ct) -> None:
    """An enhanced CT of a single frame: geometry only in its functional groups."""
    path = write_enhanced_ct(tmp_path / "one.dcm", ct.hu[:, :, :1], ct.affine)
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.data, ct.hu[:, :, :1].astype(np.float32))
    np.testing.assert_allclose(vol.affine[:3, 3], ct.affine[:3, 3], atol=1e-5)


def test_enhanced_ct_with_a_repeated_frame_position_is_refused(tmp_path: Path, ct) -> None:
    import pydicom

    path = write_enhanced_ct(tmp_path / "ct.dcm", ct.hu, ct.affine, shuffle_seed=None)
    ds = pydicom.dcmread(path)
    groups = ds.PerFrameFunctionalGroupsSequence
    groups[3].PlanePositionSequence[0].ImagePositionPatient = (
        groups[2].PlanePositionSequence[0].ImagePositionPatient
    )
    ds.save_as(str(path))
    with pytest.raises(InputError, match=r"share one position \(e.g. ct.dcm frame \d\)"):
        read_volume(path)


def test_dicom_rescale_slope_intercept(tmp_path: Path, ct) -> None:
    hu = (ct.hu // 2) * 2  # representable with slope 2
    write_dicom_series(tmp_path / "d", hu, ct.affine, slope=2.0, intercept=-2048.0)
    expected = dcm2niix_layout(hu, ct.affine)[0]
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "d").data, expected)


def test_dicom_reversed_normal_same_world(tmp_path: Path, ct) -> None:
    # The same scan with its slices stored in either order along the normal: the reader sorts
    # them along the normal (as dcm2niix), so both read alike, every voxel in its world place.
    flip = ct.affine.copy()
    flip[:3, 2] *= -1
    flip[:3, 3] = ct.affine[:3, 3] + (ct.hu.shape[2] - 1) * ct.affine[:3, 2]
    write_dicom_series(tmp_path / "up", ct.hu, ct.affine)
    write_dicom_series(tmp_path / "down", ct.hu[:, :, ::-1], flip)
    for vol in (read_volume(tmp_path / "up"), read_volume(tmp_path / "down")):
        np.testing.assert_array_equal(vol.data, ct.hu[:, :, ::-1].astype(np.float32))
        np.testing.assert_allclose(vol.affine, flip, atol=1e-5)


def test_mixed_series_refused_then_picked(tmp_path: Path, ct) -> None:
    a = write_dicom_series(tmp_path / "d", ct.hu, ct.affine, prefix="a")
    b = write_dicom_series(tmp_path / "d", ct.hu[:, :, :3], ct.affine, prefix="b")
    with pytest.raises(InputError, match="mixes 2 DICOM series") as err:
        read_volume(tmp_path / "d")
    assert a in str(err.value) and b in str(err.value) and "--series" in str(err.value)
    assert read_volume(tmp_path / "d", series_uid=b).shape == (20, 14, 3)
    with pytest.raises(InputError, match="not in"):
        read_volume(tmp_path / "d", series_uid="1.2.3")


def test_gantry_tilt_refused(tmp_path: Path, ct) -> None:
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ct.affine
    pos = np.stack([lps[:3, 3] + k * np.array([0.0, 0.5, 3.0]) for k in range(6)])
    write_dicom_series(tmp_path / "d", ct.hu, ct.affine, positions=pos)
    with pytest.raises(InputError, match="gantry tilt"):
        read_volume(tmp_path / "d")


def test_uneven_spacing_refused(tmp_path: Path, ct) -> None:
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ct.affine
    z = [0, 3, 6, 12, 15, 18]
    pos = np.stack([lps[:3, 3] + np.array([0.0, 0.0, float(d)]) for d in z])
    write_dicom_series(tmp_path / "d", ct.hu, ct.affine, positions=pos)
    with pytest.raises(InputError, match="spacing varies"):
        read_volume(tmp_path / "d")


def test_non_ct_refused(tmp_path: Path, ct) -> None:
    write_dicom_series(tmp_path / "d", ct.hu, ct.affine, modality="MR")
    with pytest.raises(InputError, match="Modality 'MR'"):
        read_volume(tmp_path / "d")


@pytest.mark.parametrize(
    "data,affine,match",
    [
        (np.zeros((8, 8), np.float32), np.eye(4), "2-D image"),
        (np.zeros((8, 8, 4, 2), np.float32), np.eye(4), "3-D volume"),
        (np.zeros((8, 8, 4), np.float32), np.diag([1.0, 0.0, 1.0, 1.0]), "singular"),
        (np.full((8, 8, 4), np.nan, np.float32), np.eye(4), "NaN"),
    ],
)
def test_bad_nifti_refused(tmp_path: Path, data, affine, match) -> None:
    img = nib.Nifti1Image(data, None)
    img.header.set_sform(affine, code=1)  # a singular sform is written as it is
    nib.save(img, str(tmp_path / "bad.nii"))
    with pytest.raises(InputError, match=match):
        read_volume(tmp_path / "bad.nii")


def test_ct_small_real_dicom_hu() -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    if path is None:
        pytest.skip("pydicom's CT_small.dcm test file is not installed")
    ds = pydicom.dcmread(path)
    assert float(ds.RescaleIntercept) == -1024.0
    vol = read_volume(path)
    assert vol.shape == (128, 128, 1)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) - 1024.0
    # dcm2niix's layout: voxel row j is pixel row Rows - 1 - j.
    np.testing.assert_array_equal(vol.data[:, :, 0], expected[::-1].T.astype(np.float32))
    # The first pixel (row 0, column 0) is voxel (0, Rows - 1, 0), at ImagePositionPatient
    # (LPS -> RAS flips x and y).
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    corner = vol.affine @ [0, vol.shape[1] - 1, 0, 1]
    np.testing.assert_allclose(corner[:3], ipp * [-1, -1, 1], atol=1e-6)
    assert vol.spacing[:2] == pytest.approx([float(v) for v in ds.PixelSpacing[::-1]])
    assert -1024 <= vol.data.min() and vol.data.max() > 500  # bone in a real CT


def test_single_dicom_file_and_input_kind(tmp_path: Path, ct) -> None:
    from fastinsight.volume.run import is_volume_input

    write_dicom_series(tmp_path / "d", ct.hu, ct.affine, prefix="a")
    write_dicom_series(tmp_path / "d", ct.hu[:, :, :2], ct.affine, prefix="b")
    one = sorted((tmp_path / "d").glob("b*.dcm"))[0]
    vol = read_volume(one)  # that file's series (both its slices), though the folder mixes two
    assert vol.shape == (20, 14, 2) and vol.facts["path"] == str(one)
    np.testing.assert_array_equal(
        vol.data, read_dicom_series(tmp_path / "d", vol.facts["series_uid"]).data
    )
    with pytest.raises(InputError, match="belongs to series"):
        read_volume(one, series_uid="1.2.3")
    write_nifti(ct.hu, ct.affine, tmp_path / "v.nii.gz")
    assert is_volume_input(tmp_path / "v.nii.gz") and is_volume_input(tmp_path / "d")
    assert is_volume_input(one)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "slide.svs").write_bytes(b"II*\0")
    assert not is_volume_input(tmp_path / "e" / "slide.svs") and not is_volume_input(tmp_path / "e")


@pytest.mark.parametrize("name", ["bomb.nii", "bomb.nii.gz"])
def test_nifti_declaring_a_giant_volume_is_refused_from_the_header(
    tmp_path: Path, monkeypatch, name
) -> None:
    """A 1 KB file whose header claims 3000^3 voxels (54 GB of int16): one line, nothing read
    (on a machine of 8 GiB, whatever this one has)."""
    import gzip

    import fastinsight.inputs

    monkeypatch.setattr(fastinsight.inputs, "memory_bytes", lambda: 8 << 30)
    hdr = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)).header.copy()
    hdr.set_data_shape((3000, 3000, 3000))
    payload = hdr.binaryblock + b"\0" * 4 + b"\0" * 1024
    path = tmp_path / name
    path.write_bytes(gzip.compress(payload) if name.endswith(".gz") else payload)
    with pytest.raises(InputError, match="3000 x 3000 x 3000 voxels"):
        read_volume(path)


def test_truncated_nifti_is_refused_before_reading(tmp_path: Path) -> None:
    write_nifti(np.zeros((20, 20, 10)), np.eye(4), tmp_path / "a.nii", dtype=np.int16)
    full = (tmp_path / "a.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(full[: len(full) - 1000])
    with pytest.raises(InputError, match="truncated"):
        read_volume(tmp_path / "cut.nii")


def test_series_declaring_more_voxels_than_memory_is_refused(tmp_path: Path, monkeypatch) -> None:
    """Headers that claim 40000 x 40000 px slices (tiny files): refused before allocating."""
    import pydicom

    import fastinsight.inputs

    write_dicom_series(tmp_path / "s", np.zeros((8, 8, 3)), np.eye(4))
    for f in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(f)
        ds.Rows = ds.Columns = 40000
        ds.save_as(str(f))
    monkeypatch.setattr(fastinsight.inputs, "memory_bytes", lambda: 8 << 30)
    with pytest.raises(InputError, match="GiB of memory"):
        read_volume(tmp_path / "s")
