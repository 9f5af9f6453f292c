"""``predict-radiograph -q/--quiet`` means what it means for ``predict``, ``predict-volume``,
``demo`` and ``cohort``: no progress bar and no notes on stderr; the result line stays on stdout.
``predict`` passes its ``--quiet`` on when the model is a radiograph model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastinsight.cli import main
from fastinsight.models.pylon import PylonConfig, PylonModel, save_pylon
from tests.radiograph.images import picture, write_png

SKIP_NOTE = "fastinsight: note: skipped 1 file(s)"


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    cfg = PylonConfig(
        num_classes=2, stem_width=8, layers=(1, 1, 1, 1), dec_channels=8, class_names=("A", "B")
    )
    path = tmp_path / "pylon.safetensors"
    save_pylon(PylonModel(cfg), path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two radiographs and a BMP picture, which the folder scan skips with a note."""
    images = tmp_path / "images"
    images.mkdir()
    write_png(images / "a.png", picture(64, 60, seed=0))
    write_png(images / "b.png", picture(64, 60, seed=1))
    Image.new("L", (8, 8)).save(images / "c.bmp")
    return images


def _run(
    capsys: pytest.CaptureFixture[str], *argv: object, tty: pytest.MonkeyPatch | None = None
) -> tuple[int, str, str]:
    # ``tty``: stderr looks like a terminal, so a progress bar is drawn unless --quiet turns it
    # off (patched here, when the command runs: capsys swaps sys.stderr after set-up).
    if tty is not None:
        tty.setattr(sys.stderr, "isatty", lambda: True, raising=False)
        assert sys.stderr.isatty()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_quiet_flag_exists_with_its_short_form(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["predict-radiograph", "--help"])
    help_text = capsys.readouterr().out
    assert "--quiet, -q" in help_text  # as `predict --help` shows it


@pytest.mark.parametrize("flag", ["-q", "--quiet"])
def test_quiet_csv_run_leaves_stderr_empty(
    tmp_path: Path, model_path: Path, folder: Path, capsys, monkeypatch, flag: str
) -> None:
    out = tmp_path / "scores.csv"
    code, stdout, stderr = _run(
        capsys, "predict-radiograph", folder, "--model", model_path, "--out", out,
        "--device", "cpu", flag, tty=monkeypatch,
    )  # fmt: skip
    assert code == 0, stderr
    assert stderr == ""
    assert stdout.startswith(f"wrote {out} (2 images")
    assert out.is_file()


def test_without_quiet_notes_and_progress_appear(
    tmp_path: Path, model_path: Path, folder: Path, capsys, monkeypatch
) -> None:
    out = tmp_path / "scores.csv"
    code, stdout, stderr = _run(
        capsys, "predict-radiograph", folder, "--model", model_path, "--out", out,
        "--device", "cpu", tty=monkeypatch,
    )  # fmt: skip
    assert code == 0, stderr
    assert SKIP_NOTE in stderr and "c.bmp" in stderr
    assert "radiographs" in stderr and "image" in stderr  # tqdm's bar: "radiographs: ... image/s"
    assert stdout.startswith(f"wrote {out} (2 images")


def test_without_a_terminal_there_is_no_bar_but_the_note_stays(
    tmp_path: Path, model_path: Path, folder: Path, capsys
) -> None:
    code, _, stderr = _run(
        capsys, "predict-radiograph", folder, "--model", model_path,
        "--out", tmp_path / "scores.csv", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, stderr
    assert stderr.splitlines() == [line for line in stderr.splitlines() if SKIP_NOTE in line]
    assert len(stderr.splitlines()) == 1


def test_quiet_single_image(tmp_path: Path, model_path: Path, capsys, monkeypatch) -> None:
    image = write_png(tmp_path / "cxr.png", picture(64, 60))
    out = tmp_path / "hm.tif"
    code, stdout, stderr = _run(
        capsys, "predict-radiograph", image, "--model", model_path, "--out", out,
        "--device", "cpu", "-q", tty=monkeypatch,
    )  # fmt: skip
    assert code == 0, stderr
    assert stderr == ""
    assert out.is_file() and "wrote" in stdout


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "default"])
def test_predict_passes_quiet_to_the_radiograph_route(
    tmp_path: Path, model_path: Path, folder: Path, capsys, monkeypatch, quiet: bool
) -> None:
    out = tmp_path / "scores.csv"
    argv = ["predict", folder, "--model", model_path, "--out", out, "--device", "cpu"]
    code, stdout, stderr = _run(capsys, *argv, *(["-q"] if quiet else []), tty=monkeypatch)
    assert code == 0, stderr
    assert stdout.startswith(f"wrote {out} (2 images")
    if quiet:
        assert stderr == ""
    else:
        assert SKIP_NOTE in stderr
