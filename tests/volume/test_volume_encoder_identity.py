"""``predict-volume`` (and ``predict`` on a scan): the encoder must be the one the model records.

The small volume model records ``vit-tiny`` (its CT recipe and its config); ``dinov2-tiny`` makes
tokens of the same geometry at its 56 px slices (64 x 4 x 4), so only the name tells them apart.
An official ``.pth`` records no encoder and is accepted, as before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fastinsight.cli import main
from fastinsight.errors import ConfigError
from fastinsight.volume.io import write_nifti
from fastinsight.volume.synthetic import default_affine, make_chest_ct
from tests.support.export_helpers import save_official

AFFINE = default_affine((0.8, 0.8, 2.5))


@pytest.fixture
def scan(tmp_path: Path) -> Path:
    src = tmp_path / "scan.nii.gz"
    write_nifti(make_chest_ct((12, 10, 4), seed=3).hu, AFFINE, src, dtype=np.int16)
    return src


def _run(
    capsys: pytest.CaptureFixture[str], command: str, scan: Path, model: Path, out: Path, *extra
) -> tuple[int, list[str]]:
    argv = [command, scan, "--model", model, "--out", out, "--device", "cpu", *extra]
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("command", ["predict-volume", "predict"])
def test_another_encoder_is_refused_before_anything_is_read_or_written(
    tmp_path: Path, scan: Path, model_file: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    out = tmp_path / "h.nii.gz"
    out.write_bytes(b"old heatmap")
    rc, err = _run(capsys, command, scan, model_file, out, "--encoder", "dinov2-tiny")
    assert rc == ConfigError.exit_code
    assert len(err) == 1 and err[0].startswith("fastinsight: error: "), err
    assert "'dinov2-tiny'" in err[0] and "('vit-tiny'" in err[0]
    assert "--allow-encoder-mismatch" in err[0]
    assert out.read_bytes() == b"old heatmap"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.nii.gz", "scan.nii.gz"]


def test_the_override_runs_with_a_note_and_the_recorded_one_without(
    tmp_path: Path, scan: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "h.nii.gz"
    rc, err = _run(
        capsys, "predict-volume", scan, model_file, out, "--encoder", "dinov2-tiny",
        "--allow-encoder-mismatch",
    )  # fmt: skip
    assert rc == 0, err
    notes = [line for line in err if line.startswith("fastinsight: note: ")]
    assert len(notes) == 1 and "'dinov2-tiny' is not 'vit-tiny'" in notes[0], err
    assert out.is_file()
    rc, err = _run(capsys, "predict-volume", scan, model_file, out, "--encoder", "vit-tiny")
    assert rc == 0 and not any("note" in line for line in err), err


def test_an_official_checkpoint_records_no_encoder_and_is_accepted(
    tmp_path: Path, scan: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    official = save_official(tmp_path / "official.pth", 1, in_dim=64, grid_size=(4, 4))
    out = tmp_path / "h.nii.gz"
    rc, err = _run(capsys, "predict-volume", scan, official, out, "--encoder", "dinov2-tiny")
    assert rc == 0, err
    assert not any("note" in line for line in err), err
    assert out.is_file()


def test_the_override_needs_an_encoder(
    tmp_path: Path, scan: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "h.nii.gz"
    rc, err = _run(capsys, "predict-volume", scan, model_file, out, "--allow-encoder-mismatch")
    assert rc == 2 and len(err) == 1 and "--encoder" in err[0], err
    assert not out.exists()


def _torchscript_volume_model(folder: Path) -> tuple[Path, Path]:
    """A scripted 14 px patch embedding (64 channels: 4 x 4 grids of 56 px slices) and a volume
    model whose recipe names it."""
    import torch

    from fastinsight.models.config import InsightConfig
    from fastinsight.volume.checkpoint import VolumeModelInfo, save_volume_model
    from fastinsight.volume.model import build_volume_model

    torch.manual_seed(0)
    module = torch.jit.script(torch.nn.Conv2d(3, 64, kernel_size=14, stride=14).eval())
    ts = folder / "ct_enc.pt"
    torch.jit.save(module, str(ts))
    cfg = InsightConfig(
        in_dim=64, reduce_dim=16, widths=(16, 8, 8), grid_size=(4, 4), norm="channel",
        encoder=f"torchscript:{ts}", tile_size_px=56, patch_size_px=14, class_names=("lesion",),
    )  # fmt: skip
    model = build_volume_model(cfg, "2d", backend="reference")
    info = VolumeModelInfo(encoder=f"torchscript:{ts}", tile_size=56, slices="all")
    path = folder / "ts_model.safetensors"
    save_volume_model(model, info, path)
    return path, ts


@pytest.mark.parametrize("command", ["predict-volume", "predict"])
def test_torchscript_flags_reach_the_ct_encoder(
    tmp_path: Path, scan: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    import json

    model, ts = _torchscript_volume_model(tmp_path)
    out, report = tmp_path / "h.nii.gz", tmp_path / "r.json"
    flags = ["--patch-size", "14", "--mean", "0.1", "0.2", "0.3", "--std", "2", "2", "2"]
    rc, err = _run(capsys, command, scan, model, out, *flags, "--report", report)
    assert rc == 0, err
    text = json.dumps(json.loads(report.read_text()))
    assert "given_options" in text and "patch_size_px" in text, text
    # The stated normalisation changes the tokens, so the heatmap differs from the defaults'.
    base = tmp_path / "base.nii.gz"
    rc, err = _run(capsys, command, scan, model, base, "--encoder", f"torchscript:{ts}")
    assert rc == 0, err
    import nibabel as nib

    assert not np.allclose(nib.load(out).get_fdata(), nib.load(base).get_fdata())


@pytest.mark.parametrize(
    "flags",
    [["--patch-size", "14"], ["--mean", "0", "0", "0"], ["--std", "1", "0", "1"]],
    ids=["patch-size", "mean", "std-zero"],
)
def test_torchscript_flags_are_refused_for_a_named_encoder_or_a_bad_value(
    tmp_path: Path, scan: Path, model_file: Path, capsys: pytest.CaptureFixture[str], flags
) -> None:
    out = tmp_path / "h.nii.gz"
    rc, err = _run(capsys, "predict-volume", scan, model_file, out, *flags)
    assert rc == ConfigError.exit_code
    assert len(err) == 1 and err[0].startswith("fastinsight: error: "), err
    assert "torchscript" in err[0]
    assert not out.exists()
