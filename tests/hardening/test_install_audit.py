"""Defects an install-and-encoders audit found: a FIFO as weights, NaN/inf encoder weights, a
demo into the user's own folder, a cohort without Ray touching its output folder, flag values
as ConfigError, a DINOv2 file given to another encoder, the licence file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastinsight.atomic import DEMO_MARK, claim_demo_folder
from fastinsight.cli import main
from fastinsight.encoders import build_encoder
from fastinsight.encoders.weights import convert_dinov2_hub
from fastinsight.errors import CheckpointError, ConfigError, OutputError

REPO = Path(__file__).resolve().parents[2]


def test_a_fifo_as_encoder_weights_is_refused_without_opening_it(tmp_path: Path) -> None:
    """open() on a FIFO blocks until a writer comes: it hung `encoders check` forever."""
    fifo = tmp_path / "weights.bin"
    os.mkfifo(fifo)
    proc = subprocess.run(
        [sys.executable, "-m", "fastinsight.cli", "encoders", "check", "vit-tiny",
         "--weights", str(fifo)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == CheckpointError.exit_code, proc.stderr
    assert "named pipe" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("key", ["blocks.0.attn.qkv.weight", "norm.bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_encoder_weights_are_refused_at_load(tmp_path: Path, key, value) -> None:
    enc = build_encoder("vit-tiny")
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    state[key].view(-1)[0] = value
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=rf"{key}.*non-finite"):
        build_encoder("vit-tiny", weights=tmp_path / "w.pth")


def test_demo_never_writes_into_a_folder_of_the_users(tmp_path: Path, capsys) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.safetensors").write_bytes(b"my own model")
    (mine / "report.json").write_text("{}")
    rc = main(["demo", str(mine), "--slides", "8", "--held-out", "4", "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == OutputError.exit_code and "did not write" in err and "\n" not in err
    assert (mine / "model.safetensors").read_bytes() == b"my own model"
    assert sorted(p.name for p in mine.iterdir()) == ["model.safetensors", "report.json"]


def test_a_demo_folder_can_be_run_into_again(tmp_path: Path) -> None:
    out = claim_demo_folder(tmp_path / "demo")
    (out / "report.json").write_text("{}")  # a previous demo's output
    assert claim_demo_folder(out) == out and (out / DEMO_MARK).is_file()
    assert claim_demo_folder(tmp_path / "empty-new").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        claim_demo_folder(tmp_path / "file")


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "OUT", "--epochs", "0"],
        ["demo", "OUT", "--slides", "4"],
        ["encoders", "check", "nosuch"],
    ],
    ids=["epochs", "slides", "encoder-name"],
)
def test_flag_values_are_config_errors(tmp_path: Path, capsys, args) -> None:
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    assert main(args) == ConfigError.exit_code
    assert not (tmp_path / "out").exists()


def test_cohort_without_ray_leaves_the_output_folder_alone(tmp_path: Path, monkeypatch) -> None:
    from fastinsight.cohort import predict_cohort
    from fastinsight.errors import BackendError

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    (tmp_path / "slides").mkdir()
    with pytest.raises(BackendError, match="needs Ray"):
        predict_cohort(tmp_path / "slides", tmp_path / "m.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_dinov2_file_given_to_another_encoder_names_what_that_encoder_takes() -> None:
    state = {"register_tokens": torch.zeros(1, 4, 8), "pos_embed": torch.zeros(1, 5, 8),
             "cls_token": torch.zeros(1, 1, 8), "mask_token": torch.zeros(1, 8)}  # fmt: skip
    with pytest.raises(CheckpointError) as err:
        convert_dinov2_hub(state, reg_tokens=0, encoder="uni", what="UNI's pytorch_model.bin")
    assert "DINOv2 torch-hub file with 4 register tokens" in str(err.value)
    assert "encoder 'uni' takes UNI's pytorch_model.bin" in str(err.value)


def test_the_licence_the_metadata_declares_ships() -> None:
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")
    manifest = (REPO / "MANIFEST.in").read_text()
    assert "LICENSE" in manifest and "docs" in manifest and "tests" in manifest
