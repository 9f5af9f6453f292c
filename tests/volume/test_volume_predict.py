"""predict_volume and `fastinsight predict-volume`: heatmap on the input grid, NIfTI == DICOM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from ct_testutil import TILE, dcm2niix_layout, small_model_file, write_dicom_series

from fastinsight.cli import main
from fastinsight.volume.io import write_nifti
from fastinsight.volume.predict import cell_index, cells_to_voxels
from fastinsight.volume.synthetic import default_affine, make_chest_ct

AFFINE = default_affine((0.75, 0.6, 2.5), (-31.0, 57.5, -210.0))  # anisotropic, off-centre


def _world_lookup(src: nib.Nifti1Image, dst: nib.Nifti1Image) -> np.ndarray:
    """``dst``'s values at the world positions of ``src``'s voxels (exact voxel matches)."""
    ijk = np.indices(src.shape[:3]).reshape(3, -1)
    world = src.affine @ np.vstack([ijk, np.ones(ijk.shape[1])])
    back = np.linalg.inv(dst.affine) @ world
    idx = np.rint(back[:3]).astype(int)
    np.testing.assert_allclose(back[:3], idx, atol=1e-4)  # voxel centres coincide
    return np.asarray(dst.dataobj)[idx[0], idx[1], idx[2]].reshape(src.shape[:3])


def test_nifti_and_dicom_give_the_same_heatmap_in_world_space(
    tmp_path: Path, model_file: Path
) -> None:
    ct = make_chest_ct((30, 26, 7), lesions=2, seed=5, affine=AFFINE)
    # NIfTI with the slice axis reversed (another voxel order, same world; each slice as it is,
    # so the 2-D model sees the same slices); DICOM shuffled, read as dcm2niix lays it out.
    flip = AFFINE.copy()
    flip[:3, 2] *= -1
    flip[:3, 3] = AFFINE[:3, 3] + 6 * AFFINE[:3, 2]
    write_nifti(ct.hu[:, :, ::-1], flip, tmp_path / "scan.nii.gz", dtype=np.int16)
    write_dicom_series(tmp_path / "dcm", ct.hu, AFFINE, shuffle_seed=3)
    for src, out in (
        (tmp_path / "scan.nii.gz", "h_nii.nii.gz"),
        (tmp_path / "dcm", "h_dcm.nii.gz"),
    ):
        rc = main(
            [
                "predict-volume",
                str(src),
                "--model",
                str(model_file),
                "--out",
                str(tmp_path / out),
                "--device",
                "cpu",
            ]
        )
        assert rc == 0
    a = nib.load(str(tmp_path / "h_nii.nii.gz"))
    b = nib.load(str(tmp_path / "h_dcm.nii.gz"))
    assert a.shape == (30, 26, 7) and a.get_data_dtype() == np.float32
    np.testing.assert_allclose(a.affine, flip, atol=1e-5)
    np.testing.assert_allclose(b.affine, dcm2niix_layout(ct.hu, AFFINE)[1], atol=1e-5)
    va = np.asarray(a.dataobj)
    np.testing.assert_allclose(_world_lookup(a, b), va, atol=1e-6)
    assert (va > 0).any()


def test_report_and_overlay(tmp_path: Path, model_file: Path) -> None:
    ct = make_chest_ct((24, 24, 6), lesions=1, seed=6, affine=AFFINE)
    write_nifti(ct.hu, AFFINE, tmp_path / "s.nii", dtype=np.int16)
    args = [
        "predict-volume",
        str(tmp_path / "s.nii"),
        "--model",
        str(model_file),
        "--out",
        str(tmp_path / "h.nii"),
        "--report",
        str(tmp_path / "r.json"),
        "--overlay",
        str(tmp_path / "o.png"),
        "--device",
        "cpu",
        "--lung-mask",
        "auto",
    ]
    assert main(args) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    hm = np.asarray(nib.load(str(tmp_path / "h.nii")).dataobj)
    mx = rep["maximum"]["lesion"]
    assert mx["value"] == pytest.approx(float(hm.max()))
    assert hm[tuple(mx["voxel"])] == pytest.approx(hm.max()) and mx["slice"] == mx["voxel"][2]
    np.testing.assert_allclose(mx["world_ras_mm"], (AFFINE @ [*mx["voxel"], 1])[:3], atol=1e-3)
    assert rep["geometry"]["shape"] == [24, 24, 6] and rep["preprocess"]["lung_mask"] == "auto"
    assert 0 <= rep["scores"]["lesion"] <= 1 and "encode" in rep["timings_s"]
    from PIL import Image

    assert Image.open(tmp_path / "o.png").size[0] > 200


def test_middle32_scores_only_the_middle(tmp_path: Path) -> None:
    model = small_model_file(tmp_path, slices="middle32")
    ct = make_chest_ct((16, 16, 40), seed=1)
    write_nifti(ct.hu, default_affine(), tmp_path / "s.nii", dtype=np.int16)
    assert (
        main(
            [
                "predict-volume",
                str(tmp_path / "s.nii"),
                "--model",
                str(model),
                "--out",
                str(tmp_path / "h.nii"),
                "--report",
                str(tmp_path / "r.json"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["slices_scored"] == list(range(4, 36)) and rep["zero_slices_padded"] == 0
    hm = np.asarray(nib.load(str(tmp_path / "h.nii")).dataobj)
    assert not hm[:, :, :4].any() and not hm[:, :, 36:].any()


def test_cell_index_is_the_zoom_geometry() -> None:
    # Without resizing, voxel i lies in cell i // patch.
    np.testing.assert_array_equal(cell_index(56, 56, 4), np.arange(56) // 14)
    # Corners map to corners whatever the size.
    idx = cell_index(300, TILE, 4)
    assert idx[0] == 0 and idx[-1] == 3 and np.all(np.diff(idx) >= 0)
    cells = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
    vox = cells_to_voxels(cells, [0, 2], (56, 56, 3), 56)
    assert vox.shape == (56, 56, 3, 1) and not vox[:, :, 1].any()
    assert vox[13, 14, 2, 0] == cells[1, 0, 0, 1] and vox[55, 0, 0, 0] == cells[0, 0, 3, 0]


@pytest.mark.parametrize(
    "make,match",
    [
        ("two_d", "2-D image"),
        ("four_d", "3-D volume"),
        ("singular", "singular"),
        ("nan", "NaN"),
        ("mixed", "mixes 2 DICOM series"),
        ("mr", "Modality 'MR'"),
    ],
)
def test_bad_input_one_line_nonzero_nothing_written(
    tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture[str], make: str, match: str
) -> None:
    ct = make_chest_ct((12, 12, 3), seed=0)
    src = tmp_path / "in.nii"
    if make in ("two_d", "four_d", "singular", "nan"):
        data = {
            "two_d": ct.hu[:, :, 0].astype(np.float32),
            "four_d": np.stack([ct.hu, ct.hu], -1).astype(np.float32),
            "singular": ct.hu.astype(np.float32),
            "nan": np.where(ct.hu > 0, np.nan, ct.hu).astype(np.float32),
        }[make]
        img = nib.Nifti1Image(data, None)
        img.header.set_sform(
            np.diag([1.0, 1.0, 0.0, 1.0]) if make == "singular" else np.eye(4), code=1
        )
        nib.save(img, str(src))
    else:
        src = tmp_path / "dcm"
        write_dicom_series(src, ct.hu, AFFINE, modality="MR" if make == "mr" else "CT", prefix="a")
        if make == "mixed":
            write_dicom_series(src, ct.hu, AFFINE, prefix="b")
    out = tmp_path / "out" / "h.nii.gz"
    out.parent.mkdir()
    rc = main(
        [
            "predict-volume",
            str(src),
            "--model",
            str(model_file),
            "--out",
            str(out),
            "--report",
            str(out.parent / "r.json"),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 4
    assert err.count("\n") == 0 and err.startswith("fastinsight: error:") and match in err
    assert list(out.parent.iterdir()) == []


def test_bad_input_subprocess_exit_code(tmp_path: Path, model_file: Path) -> None:
    ct = make_chest_ct((12, 12, 3), seed=0)
    write_dicom_series(tmp_path / "dcm", ct.hu, AFFINE, prefix="a")
    write_dicom_series(tmp_path / "dcm", ct.hu, AFFINE, prefix="b")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastinsight.cli",
            "predict-volume",
            str(tmp_path / "dcm"),
            "--model",
            str(model_file),
            "--out",
            str(tmp_path / "h.nii.gz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 4, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--series" in proc.stderr
    assert not (tmp_path / "h.nii.gz").exists()


def test_ct_small_end_to_end(tmp_path: Path, model_file: Path) -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    if path is None:
        pytest.skip("pydicom's CT_small.dcm test file is not installed")
    assert (
        main(
            [
                "predict-volume",
                str(path),
                "--model",
                str(model_file),
                "--out",
                str(tmp_path / "h.nii.gz"),
                "--report",
                str(tmp_path / "r.json"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    img = nib.load(str(tmp_path / "h.nii.gz"))
    assert img.shape == (128, 128, 1)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["source"]["format"] == "dicom" and rep["source"]["modality"] == "CT"


@pytest.mark.cuda
def test_cuda_matches_cpu(tmp_path: Path, model_file: Path) -> None:
    """bf16-autocast encoder + CUDA head give the CPU heatmap's hot cells and score."""
    from fastinsight.volume.checkpoint import load_volume_model
    from fastinsight.volume.io import Volume
    from fastinsight.volume.predict import VolumeOptions, build_volume_encoder, predict_volume

    ct = make_chest_ct((40, 40, 6), lesions=2, seed=9, affine=AFFINE)
    vol = Volume(ct.hu.astype(np.float32), AFFINE, {})
    out = {}
    for dev in ("cpu", "cuda"):
        model, info = load_volume_model(model_file, device=dev)
        enc = build_volume_encoder(
            info.encoder, info.tile_size, device=dev, options=info.encoder_options
        )
        out[dev] = predict_volume(vol, model, enc, VolumeOptions(info.preprocess()))
    assert out["cuda"].scores[0] == pytest.approx(out["cpu"].scores[0], abs=2e-2)
    a, b = out["cpu"].heatmap(), out["cuda"].heatmap()
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9


def test_generic_predict_dispatches_ct(tmp_path: Path, model_file: Path) -> None:
    """`fastinsight predict` hands NIfTI / DICOM inputs to the CT pipeline: same heatmap
    (the NIfTI as dcm2niix writes the DICOM series)."""
    ct = make_chest_ct((20, 20, 4), lesions=1, seed=2, affine=AFFINE)
    write_nifti(*dcm2niix_layout(ct.hu, AFFINE), tmp_path / "s.nii.gz", dtype=np.int16)
    write_dicom_series(tmp_path / "dcm", ct.hu, AFFINE)
    base = ["--model", str(model_file), "--device", "cpu"]
    assert (
        main(
            [
                "predict-volume",
                str(tmp_path / "s.nii.gz"),
                "--out",
                str(tmp_path / "a.nii.gz"),
                *base,
            ]
        )
        == 0
    )
    assert (
        main(["predict", str(tmp_path / "s.nii.gz"), "--out", str(tmp_path / "b.nii.gz"), *base])
        == 0
    )
    assert (
        main(
            [
                "predict",
                str(tmp_path / "dcm"),
                "--out",
                str(tmp_path / "c.nii.gz"),
                "--slices",
                "all",
                *base,
            ]
        )
        == 0
    )
    a, b, c = (np.asarray(nib.load(str(tmp_path / f"{n}.nii.gz")).dataobj) for n in "abc")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, atol=1e-6)
    # Slide-only flags are refused for a CT input, before anything is written.
    assert (
        main(
            [
                "predict",
                str(tmp_path / "s.nii.gz"),
                "--out",
                str(tmp_path / "d.nii.gz"),
                "--geojson",
                str(tmp_path / "g.json"),
                *base,
            ]
        )
        == 2  # a slide option on a scan: ConfigError
    )
    assert not (tmp_path / "d.nii.gz").exists()


def test_demo_modality_ct_runs(tmp_path: Path) -> None:
    rc = main(
        [
            "demo",
            "--modality",
            "ct",
            str(tmp_path / "d"),
            "--slides",
            "8",
            "--held-out",
            "4",
            "--epochs",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    assert (tmp_path / "d" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "d" / "report.json").read_text())["train_volumes"] == 4
