"""DICOM is read as dcm2niix writes it: the same voxels and affine as the real dcm2niix NIfTI of
the series, so a DICOM series and its dcm2niix NIfTI give the encoder the same slices and the
same heatmap (the official INSIGHT-CT weights were trained on NIfTI slices)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from ct_testutil import (
    ENCODER_OPTIONS,
    TILE,
    dcm2niix_layout,
    write_dicom_series,
    write_enhanced_ct,
)

from fastinsight.volume.checkpoint import load_volume_model
from fastinsight.volume.io import read_volume
from fastinsight.volume.predict import VolumeOptions, build_volume_encoder, predict_volume
from fastinsight.volume.synthetic import make_chest_ct

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _dcm2niix() -> str:
    """The dcm2niix binary: on PATH, else the one pip's ``dcm2niix`` package ships."""
    found = shutil.which("dcm2niix")
    if found:
        return found
    try:
        import dcm2niix  # type: ignore[import-not-found]
    except ImportError:
        pytest.skip("dcm2niix is not installed (pip install dcm2niix; in the `test` extra)")
    path = Path(str(getattr(dcm2niix, "bin", "")))
    if not path.is_file():
        pytest.skip(f"the dcm2niix package has no binary ({path})")
    return str(path)


def _convert(dicom: Path, out: Path) -> nib.Nifti1Image:
    """The one NIfTI dcm2niix writes for the series in ``dicom`` (uncompressed, no sidecar)."""
    out.mkdir(parents=True)
    run = subprocess.run(
        [_dcm2niix(), "-z", "n", "-b", "n", "-f", "conv", "-o", str(out), str(dicom)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    written = sorted(out.glob("*.nii"))
    assert run.returncode == 0 and len(written) == 1, run.stdout + run.stderr
    return nib.load(str(written[0]))


def _ras(r_lps, c_lps, step_lps, spacing=(0.7, 0.9, 2.5), origin=(10.0, -20.0, 30.0)):
    """The RAS affine of a series whose pixel row / column cosines are ``r`` / ``c`` (LPS) and
    whose slices step by ``step``: in dcm2niix's layout voxel axis 1 runs along ``-c``."""
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(r_lps, float) * spacing[0]
    lps[:3, 1] = -np.asarray(c_lps, float) * spacing[1]
    lps[:3, 2] = np.asarray(step_lps, float) * spacing[2]
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def _oblique() -> np.ndarray:
    a, b = np.radians(20.0), np.radians(-25.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rot = ry @ rx
    return _ras(rot[:, 0], rot[:, 1], np.cross(rot[:, 0], rot[:, 1]))


# IOP (r, c) and the slice step. "desc": slices written descending along the normal r x c.
ORIENTATIONS = {
    "axial": _ras((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "axial-desc": _ras((1, 0, 0), (0, 1, 0), (0, 0, -1)),
    "axial-rows-reversed": _ras((1, 0, 0), (0, -1, 0), (0, 0, -1)),
    "oblique": _oblique(),
    "sagittal": _ras((0, 1, 0), (0, 0, -1), (-1, 0, 0)),
    "sagittal-desc": _ras((0, 1, 0), (0, 0, -1), (1, 0, 0)),
    "coronal": _ras((1, 0, 0), (0, 0, -1), (0, 1, 0)),
}


def _hu(shape=(7, 5, 4), seed=0) -> np.ndarray:
    # Distinct values everywhere, X != Y: any flip or transpose shows.
    return np.random.default_rng(seed).integers(-1000, 1000, size=shape).astype(np.float32)


@pytest.mark.parametrize("kind", ["series", "enhanced"])
@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_dicom_reads_as_dcm2niix_writes_it(tmp_path: Path, name: str, kind: str) -> None:
    affine, hu = ORIENTATIONS[name], _hu()
    if kind == "series":
        write_dicom_series(tmp_path / "dcm", hu, affine, shuffle_seed=1)
    else:
        write_enhanced_ct(tmp_path / "dcm" / "ct.dcm", hu, affine, shuffle_seed=1)
    img = _convert(tmp_path / "dcm", tmp_path / "nii")
    vol = read_volume(tmp_path / "dcm")
    np.testing.assert_array_equal(vol.data, np.asarray(img.dataobj, dtype=np.float32))
    np.testing.assert_allclose(vol.affine, img.affine, atol=1e-4)
    # and both are what ct_testutil says they are (its tests rely on it)
    data, expected = dcm2niix_layout(hu, affine)
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, expected, atol=1e-4)


@pytest.mark.parametrize("shape", [(6, 5, 1), (6, 5, 2)])
def test_one_and_two_slices_read_as_dcm2niix(tmp_path: Path, shape) -> None:
    affine = ORIENTATIONS["axial"]
    write_dicom_series(tmp_path / "dcm", _hu(shape, seed=2), affine)
    img = _convert(tmp_path / "dcm", tmp_path / "nii")
    vol = read_volume(tmp_path / "dcm")
    np.testing.assert_array_equal(vol.data, np.asarray(img.dataobj, np.float32).reshape(shape))
    np.testing.assert_allclose(vol.affine, img.affine, atol=1e-4)


def test_standard_axial_series_is_las_with_rows_reversed(tmp_path: Path) -> None:
    """Without dcm2niix: an axial series with IOP (1,0,0,0,1,0) reads as an LAS volume whose
    voxel row j is pixel row Rows - 1 - j of each file, slices ascending along the normal."""
    affine = ORIENTATIONS["axial"]
    write_dicom_series(tmp_path / "dcm", _hu(), affine)
    files = [pydicom.dcmread(p) for p in sorted((tmp_path / "dcm").iterdir())]
    for ds in files:
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    files.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))  # normal (0, 0, 1)
    vol = read_volume(tmp_path / "dcm")
    assert vol.orientation == "LAS"
    for k, ds in enumerate(files):
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(vol.data[:, :, k], hu[::-1, :].T)
        # the voxel of pixel (row 0, column 0) sits at the file's ImagePositionPatient
        corner = vol.affine @ [0, vol.shape[1] - 1, k, 1]
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose(LPS_TO_RAS[:3, :3] @ ipp, corner[:3], atol=1e-4)


@pytest.mark.parametrize("kind", ["series", "enhanced"])
def test_dicom_and_its_dcm2niix_nifti_give_the_same_heatmap(
    tmp_path: Path, model_file: Path, kind: str
) -> None:
    affine = _ras((1, 0, 0), (0, 1, 0), (0, 0, 1), spacing=(0.75, 0.6, 2.5))
    ct = make_chest_ct((30, 26, 6), lesions=2, seed=5, affine=affine)
    if kind == "series":
        write_dicom_series(tmp_path / "dcm", ct.hu, affine, shuffle_seed=3)
    else:
        write_enhanced_ct(tmp_path / "dcm" / "ct.dcm", ct.hu, affine, shuffle_seed=3)
    _convert(tmp_path / "dcm", tmp_path / "nii")
    model, info = load_volume_model(model_file)
    encoder = build_volume_encoder(info.encoder, TILE, weights=None, options=ENCODER_OPTIONS)
    options = VolumeOptions(info.preprocess())
    dcm = read_volume(tmp_path / "dcm")
    nii = read_volume(tmp_path / "nii" / "conv.nii")
    a = predict_volume(dcm, model, encoder, options)
    b = predict_volume(nii, model, encoder, options)
    np.testing.assert_array_equal(dcm.data, nii.data)
    np.testing.assert_allclose(dcm.affine, nii.affine, atol=1e-4)
    np.testing.assert_allclose(a.heatmap(), b.heatmap(), atol=1e-6)
    assert a.heatmap().max() > 0
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    assert a.max_location() == b.max_location()
