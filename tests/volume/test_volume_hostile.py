"""CT inputs that other tools write or damage, and outputs that must never destroy anything.

Each case: the right volume, or one clear error line (InputError / OutputError) with nothing
written and nothing that was there before changed.
"""

from __future__ import annotations

import errno
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from ct_testutil import dcm2niix_layout, write_dicom_series
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset

from fastinsight.cli import main
from fastinsight.errors import InputError
from fastinsight.volume.io import read_dicom_series, read_nifti, read_volume, write_nifti
from fastinsight.volume.synthetic import default_affine, make_chest_ct
from fastinsight.volume.train import find_volume, read_volume_labels

AFFINE = default_affine((0.75, 0.6, 2.5), (-31.0, 57.5, -210.0))


@pytest.fixture(scope="module")
def ct():
    return make_chest_ct((12, 10, 4), seed=3)


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip()


def _one_line(err: str) -> None:
    assert err.startswith("fastinsight: error:") and "\n" not in err, err


# ------------------------------------------------------------------------------------ NIfTI
def test_gzip_stream_damaged_inside_is_refused(tmp_path: Path, ct) -> None:
    """nibabel stops at the last voxel, so a damaged deflate block or CRC would pass unseen."""
    good = tmp_path / "v.nii.gz"
    write_nifti(ct.hu, AFFINE, good, dtype=np.int16)
    raw = bytearray(good.read_bytes())
    bad = tmp_path / "crc.nii.gz"
    raw[-8] ^= 0xFF  # the CRC32 of the gzip trailer
    bad.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="damaged"):
        read_nifti(bad)
    np.testing.assert_array_equal(read_nifti(good).data, ct.hu.astype(np.float32))


def test_gzip_inflating_far_beyond_its_header_is_refused(tmp_path: Path, ct) -> None:
    img = nib.Nifti1Image(ct.hu.astype(np.int16), AFFINE)
    body = img.header.binaryblock + b"\0" * 4 + ct.hu.astype(np.int16).tobytes()
    bomb = tmp_path / "bomb.nii.gz"
    bomb.write_bytes(gzip.compress(body + b"\0" * (3 << 20)))  # 3 MiB of trailing zeros
    with pytest.raises(InputError, match="inflates to more than"):
        read_nifti(bomb)


def test_complex_voxels_are_refused(tmp_path: Path, ct) -> None:
    nib.save(nib.Nifti1Image(ct.hu.astype(np.complex64), AFFINE), str(tmp_path / "c.nii"))
    with pytest.raises(InputError, match="complex voxels"):
        read_nifti(tmp_path / "c.nii")


@pytest.mark.parametrize("codes", [(0, 0), (1, 4), (2, 0), (0, 3)], ids=str)
def test_heatmap_header_places_voxels_as_the_scan_does(
    tmp_path: Path, ct, codes: tuple[int, int]
) -> None:
    """qform/sform and their codes (both 0: pixdim only) are written back as the scan had them,
    so every viewer, whichever of the two it prefers, overlays heatmap and scan."""
    qcode, scode = codes
    img = nib.Nifti1Image(ct.hu.astype(np.int16), None)
    img.header.set_zooms((0.7, 0.8, 2.5))
    img.set_qform(AFFINE if qcode else None, code=qcode)
    shifted = AFFINE.copy()
    shifted[:3, 3] += [5.0, -3.0, 1.0]  # a registered sform that differs from the qform
    img.set_sform(shifted if scode else None, code=scode)
    src = tmp_path / "scan.nii.gz"
    nib.save(img, str(src))
    vol = read_nifti(src)
    out = tmp_path / "heat.nii.gz"
    write_nifti(vol.data, vol.affine, out, header=vol.header)
    a, b = nib.load(str(src)).header, nib.load(str(out)).header
    assert int(b["qform_code"]) == qcode and int(b["sform_code"]) == scode
    np.testing.assert_allclose(b.get_zooms()[:3], a.get_zooms()[:3])
    for get in ("get_qform", "get_sform"):
        ma, mb = getattr(a, get)(coded=True)[0], getattr(b, get)(coded=True)[0]
        assert (ma is None) == (mb is None)
        if ma is not None:
            np.testing.assert_allclose(mb, ma, atol=1e-5)
    np.testing.assert_allclose(nib.load(str(out)).affine, nib.load(str(src)).affine, atol=1e-5)
    if codes == (0, 0):
        assert any("codes are 0" in n for n in vol.facts["notes"])


@pytest.mark.parametrize(("unit", "scale"), [("micron", 1000.0), ("meter", 0.001), ("mm", 1.0)])
def test_length_units_are_read_as_mm_and_written_back(
    tmp_path: Path, ct, unit: str, scale: float
) -> None:
    """A scan whose header counts in microns or metres: the volume's affine is in mm (what the
    model's spacing means) and the heatmap keeps the scan's unit byte, so ITK-based viewers
    (3D Slicer) scale both alike. A DICOM-born heatmap says mm."""
    img = nib.Nifti1Image(ct.hu.astype(np.int16), None)
    in_unit = AFFINE.copy()
    in_unit[:3] *= scale  # the same geometry in the file's unit
    img.set_qform(in_unit, code=1)
    img.set_sform(in_unit, code=1)
    img.header.set_xyzt_units(xyz=unit, t="sec")
    src = tmp_path / "scan.nii"
    nib.save(img, str(src))
    vol = read_nifti(src)
    np.testing.assert_allclose(vol.affine, AFFINE, rtol=1e-6, atol=1e-6)
    out = tmp_path / "heat.nii"
    write_nifti(vol.data, vol.affine, out, header=vol.header)
    back = nib.load(str(out)).header
    assert back.get_xyzt_units() == (unit, "sec")
    np.testing.assert_allclose(back.get_sform(), in_unit, rtol=1e-6)
    plain = tmp_path / "plain.nii"
    write_nifti(vol.data, vol.affine, plain)
    assert nib.load(str(plain)).header.get_xyzt_units()[0] == "mm"


def test_uppercase_gz_suffix_is_compressed(tmp_path: Path, ct) -> None:
    out = tmp_path / "H.NII.GZ"
    write_nifti(ct.hu, AFFINE, out)
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_allclose(read_nifti(out).data, ct.hu)


# ------------------------------------------------------------------------------------ DICOM
@pytest.mark.parametrize("which", ["first", "last"])
def test_series_with_a_damaged_end_slice_is_refused(tmp_path: Path, ct, which: str) -> None:
    """A cut-short end slice used to vanish: one slice fewer and a shifted origin, no word."""
    write_dicom_series(tmp_path / "d", ct.hu, AFFINE, shuffle_seed=None)
    files = sorted((tmp_path / "d").iterdir())
    victim = files[0] if which == "first" else files[-1]
    victim.write_bytes(victim.read_bytes()[:400])
    with pytest.raises(InputError, match=rf"{victim.name}.*damaged"):
        read_dicom_series(tmp_path / "d")


def test_bare_datasets_without_preamble_read_like_part10_files(tmp_path: Path, ct) -> None:
    write_dicom_series(tmp_path / "p10", ct.hu, AFFINE, prefix="a")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in sorted((tmp_path / "p10").iterdir()):
        ds = pydicom.dcmread(f)
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        with open(bare / f.stem, "wb") as fh:  # no suffix, no preamble, no file meta
            fp = DicomFileLike(fh)
            fp.is_little_endian, fp.is_implicit_VR = True, True
            write_dataset(fp, ds)
    (bare / "README.txt").write_text("exported by an old PACS\n")
    ref = read_dicom_series(tmp_path / "p10")
    got = read_dicom_series(bare)
    np.testing.assert_array_equal(got.data, ref.data)
    np.testing.assert_allclose(got.affine, ref.affine)


def test_multi_valued_rescale_is_one_error_line(tmp_path: Path, ct) -> None:
    write_dicom_series(tmp_path / "d", ct.hu, AFFINE)
    f = sorted((tmp_path / "d").iterdir())[1]
    ds = pydicom.dcmread(f)
    ds.RescaleIntercept = ["-1024", "0"]
    ds.save_as(f)
    with pytest.raises(InputError, match="RescaleIntercept"):
        read_dicom_series(tmp_path / "d")


def test_one_file_reads_its_series_and_skips_damaged_strangers(tmp_path: Path, ct) -> None:
    write_dicom_series(tmp_path / "d", ct.hu, AFFINE, prefix="a")
    write_dicom_series(tmp_path / "d", ct.hu[:, :, :2], AFFINE, prefix="zz_other")
    junk = sorted((tmp_path / "d").glob("zz_other*.dcm"))[0]
    junk.write_bytes(junk.read_bytes()[:400])  # another series' slice, cut short
    one = sorted((tmp_path / "d").glob("a*.dcm"))[2]
    vol = read_volume(one)
    assert vol.shape == ct.hu.shape
    np.testing.assert_allclose(vol.data, dcm2niix_layout(ct.hu, AFFINE)[0], atol=0.5)
    assert any(junk.name in n for n in vol.facts["notes"])
    with pytest.raises(InputError, match=junk.name):  # the folder as such: refused
        read_dicom_series(tmp_path / "d")


@pytest.mark.parametrize("cut", ["after-series-uid", "before-rows"])
def test_one_file_refuses_a_damaged_file_of_its_own_series(tmp_path: Path, ct, cut: str) -> None:
    """A cut-short slice of the same series was skipped with a note: one slice fewer, exit 0."""
    write_dicom_series(tmp_path / "d", ct.hu, AFFINE, prefix="a", shuffle_seed=None)
    files = sorted((tmp_path / "d").glob("a*.dcm"))
    victim = files[-1]
    data = victim.read_bytes()
    uid = str(pydicom.dcmread(victim).SeriesInstanceUID).encode()
    after_uid = data.index(uid) + len(uid)
    rows = data.index(b"\x28\x00\x10\x00", after_uid)  # (0028,0010) Rows, little endian
    keep = after_uid + 3 if cut == "after-series-uid" else rows
    victim.write_bytes(data[:keep])
    with pytest.raises(InputError, match=rf"{victim.name}.*same series.*damaged"):
        read_volume(files[1])


# ------------------------------------------------------------------------------- labels CSV
@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("volume_id,label\na,1\n".encode("utf-16"), "not UTF-8"),
        (b"volume_id,label\n\xe9t\xe9,1\n", "not UTF-8"),
        (b"volume_id,label\n", "no data rows"),
        (b"volume_id,label\n,1\n", "empty volume_id"),
    ],
    ids=["utf16", "latin1", "header-only", "empty-id"],
)
def test_labels_csv_refusals(tmp_path: Path, content: bytes, match: str) -> None:
    (tmp_path / "l.csv").write_bytes(content)
    with pytest.raises(InputError, match=match):
        read_volume_labels(tmp_path / "l.csv")


@pytest.mark.parametrize("vid", ["../outside", "/etc/passwd", ".", "a/../../b"])
def test_volume_ids_never_leave_the_folder(tmp_path: Path, vid: str) -> None:
    (tmp_path / "vols").mkdir()
    (tmp_path / "outside.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="does not name a volume inside"):
        find_volume(tmp_path / "vols", vid)


def test_volume_ids_may_name_subfolders(tmp_path: Path) -> None:
    (tmp_path / "site1").mkdir()
    (tmp_path / "site1" / "case7.nii.gz").write_bytes(b"")
    assert find_volume(tmp_path, "site1/case7") == tmp_path / "site1" / "case7.nii.gz"


# ---------------------------------------------------------------------------------- outputs
def _scan(tmp_path: Path, ct) -> Path:
    src = tmp_path / "scan.nii.gz"
    write_nifti(ct.hu, AFFINE, src, dtype=np.int16)
    return src


@pytest.mark.parametrize("clash", ["out-is-scan", "report-is-out", "out-is-model"])
def test_outputs_never_overwrite_inputs_or_each_other(
    tmp_path: Path, ct, model_file: Path, capsys, clash: str
) -> None:
    src = _scan(tmp_path, ct)
    before = {p: p.read_bytes() for p in (src, model_file)}
    out = {"out-is-scan": src, "report-is-out": tmp_path / "h.nii.gz", "out-is-model": None}[clash]
    args = ["predict-volume", src, "--model", model_file, "--device", "cpu"]
    if clash == "out-is-model":
        # A model named like a NIfTI cannot be: the model itself as --report.
        args += ["--out", tmp_path / "h.nii.gz", "--report", model_file]
    elif clash == "report-is-out":
        args += ["--out", out, "--report", out]
    else:
        args += ["--out", out]
    rc, err = _run(args, capsys)
    assert rc != 0
    _one_line(err)
    assert "destroy" in err
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "h.nii.gz").exists()


def test_failed_overlay_keeps_the_previous_heatmap(
    tmp_path: Path, ct, model_file: Path, capsys, monkeypatch
) -> None:
    """All outputs or none: the heatmap is not replaced when a later output fails."""
    src = _scan(tmp_path, ct)
    out = tmp_path / "h.nii.gz"
    out.write_bytes(b"previous heatmap")

    class FullDisk:
        def save(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fastinsight.volume.overlay.render_montage", lambda *a, **k: FullDisk())
    rc, err = _run(
        ["predict-volume", src, "--model", model_file, "--out", out, "--overlay",
         tmp_path / "o.png", "--device", "cpu"],
        capsys,
    )  # fmt: skip
    assert rc != 0
    _one_line(err)
    assert out.read_bytes() == b"previous heatmap"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.nii.gz", "scan.nii.gz"]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--device", "nonsense"], "is not a device"),
        (["--lung-mask", "EMPTY"], "is empty"),
    ],
    ids=["device", "empty-mask"],
)
def test_predict_volume_option_refusals(
    tmp_path: Path, ct, model_file: Path, capsys, extra: list[str], match: str
) -> None:
    src = _scan(tmp_path, ct)
    if "EMPTY" in extra:
        write_nifti(np.zeros(ct.hu.shape), AFFINE, tmp_path / "mask.nii.gz", dtype=np.uint8)
        extra = ["--lung-mask", str(tmp_path / "mask.nii.gz")]
    rc, err = _run(
        ["predict-volume", src, "--model", model_file, "--out", tmp_path / "h.nii.gz", *extra],
        capsys,
    )
    assert rc != 0
    _one_line(err)
    assert match in err
    assert not (tmp_path / "h.nii.gz").exists()


@pytest.mark.parametrize("flag", [["--class", "tumor"], ["--all-classes"], ["--tissue", "all"]])
def test_generic_predict_refuses_slide_flags_for_a_scan(
    tmp_path: Path, ct, model_file: Path, capsys, flag: list[str]
) -> None:
    src = _scan(tmp_path, ct)
    rc, err = _run(
        ["predict", src, "--model", model_file, "--out", tmp_path / "h.nii.gz", *flag], capsys
    )
    assert rc == 2  # a flag's value (ConfigError), as on the slide path
    _one_line(err)
    assert flag[0] in err and "not used for CT volumes" in err


def test_train_volume_out_must_be_safetensors(tmp_path: Path, capsys) -> None:
    (tmp_path / "l.csv").write_text("volume_id,label\na,1\n")
    rc, err = _run(
        ["train-volume", tmp_path, "--labels", tmp_path / "l.csv", "--out", tmp_path / "m.pt"],
        capsys,
    )
    assert rc == 4
    _one_line(err)
    assert ".safetensors" in err and not (tmp_path / "m.pt").exists()
