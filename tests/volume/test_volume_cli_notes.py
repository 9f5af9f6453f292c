"""``predict-volume`` says on stderr what its reader changed or skipped (not only in the report),
draws a progress bar over the slices on a terminal, and ``-q`` silences both."""

from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fastinsight.cli import main
from fastinsight.volume.io import write_nifti
from fastinsight.volume.synthetic import default_affine, make_chest_ct
from tests.volume.ct_testutil import write_dicom_series

AFFINE = default_affine((0.8, 0.8, 2.5))


def _run(capsys, *argv) -> tuple[int, list[str]]:
    rc = main([str(a) for a in ("predict-volume", *argv, "--device", "cpu")])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def micron_scan(tmp_path: Path) -> Path:
    """A scan whose header gives its lengths in microns (the reader converts them to mm)."""
    hu = make_chest_ct((12, 10, 4), seed=3).hu.astype(np.int16)
    affine = AFFINE.copy()
    affine[:3] *= 1000.0
    img = nib.Nifti1Image(hu, affine)
    img.header.set_xyzt_units(xyz="micron", t="sec")
    path = tmp_path / "scan_um.nii.gz"
    nib.save(img, str(path))
    return path


def test_reader_notes_reach_stderr_and_quiet_silences_them(
    tmp_path: Path, micron_scan: Path, model_file: Path, capsys
) -> None:
    out = tmp_path / "h.nii.gz"
    rc, err = _run(capsys, micron_scan, "--model", model_file, "--out", out)
    assert rc == 0, err
    notes = [line for line in err if line.startswith("fastinsight: note: ")]
    assert len(notes) == 1 and "micron" in notes[0] and "mm" in notes[0], err
    rc, err = _run(capsys, micron_scan, "--model", model_file, "--out", out, "-q")
    assert rc == 0, err
    assert not [line for line in err if line.startswith("fastinsight: note")], err


def test_damaged_files_beside_a_single_dicom_file_are_said(
    tmp_path: Path, model_file: Path, capsys
) -> None:
    folder = tmp_path / "series"
    write_dicom_series(folder, make_chest_ct((12, 10, 4), seed=3).hu, AFFINE)
    (folder / "zz_cut.dcm").write_bytes((folder / "img0000.dcm").read_bytes()[:300])
    rc, err = _run(capsys, folder / "img0001.dcm", "--model", model_file, "--out",
                   tmp_path / "h.nii.gz")  # fmt: skip
    assert rc == 0, err
    notes = [line for line in err if line.startswith("fastinsight: note: ")]
    assert len(notes) == 1 and "zz_cut.dcm" in notes[0] and "damaged" in notes[0], err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_bar_over_the_slices_on_a_terminal_only(
    tmp_path: Path, model_file: Path, monkeypatch, capsys
) -> None:
    scan = tmp_path / "scan.nii.gz"
    write_nifti(make_chest_ct((12, 10, 4), seed=3).hu, AFFINE, scan, dtype=np.int16)
    for quiet, shown in ((False, True), (True, False)):
        term = _Terminal()
        monkeypatch.setattr("sys.stderr", term)
        rc = main([str(a) for a in ("predict-volume", scan, "--model", model_file, "--out",
                   tmp_path / "h.nii.gz", "--device", "cpu", *(["-q"] if quiet else []))])  # fmt: skip
        monkeypatch.undo()
        assert rc == 0, term.getvalue()
        assert ("slice" in term.getvalue() and "encoding" in term.getvalue()) == shown, (
            quiet,
            term.getvalue(),
        )
