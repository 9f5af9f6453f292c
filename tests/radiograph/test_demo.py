"""The radiograph demo reaches its targets on held-out synthetic pictures (image labels only)."""

from __future__ import annotations

import json

import pytest

from fastinsight.models.pylon import load_pylon
from fastinsight.radiograph.demo import run_radiograph_demo


@pytest.mark.slow
def test_radiograph_demo_localises_planted_nodules(tmp_path) -> None:
    metrics = run_radiograph_demo(tmp_path, threads=1, log=None)
    # The targets, on the 20 held-out pictures with planted nodules (image labels only).
    assert metrics["auroc"] >= 0.9
    assert metrics["point_localisation_accuracy"] >= 0.8
    loc = metrics["localisation"]
    assert loc["pairs"]["Nodule"] == 20
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["auroc"] == metrics["auroc"]
    model = load_pylon(tmp_path / "model.safetensors", device="cpu")
    assert model.config.names == ("Nodule",)
    assert (tmp_path / "overlay.png").is_file() and (tmp_path / "BBox_List_2017.csv").is_file()


def test_demo_cli_modality_radiograph(tmp_path, capsys) -> None:
    """``fastinsight demo --modality radiograph`` runs the demo (tiny counts) and leaves the model;
    ``-q`` drops the per-epoch lines but, as for the other modalities, not the result."""
    from fastinsight.cli.main import main

    out = tmp_path / "d"
    rc = main(
        [
            "demo",
            "--modality",
            "radiograph",
            str(out),
            "--slides",
            "8",
            "--held-out",
            "4",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "-q",
        ]
    )
    assert rc == 0
    model = load_pylon(out / "model.safetensors", device="cpu")
    assert model.config.names == ("Nodule",)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and metrics["localisation"]["pairs"]["Nodule"] == 2
    assert len(list((out / "images").glob("*.png"))) == 4
    printed = capsys.readouterr().out
    assert "held-out AUROC" in printed and "epoch" not in printed.lower()


def test_demo_rejects_empty_counts(tmp_path) -> None:
    from fastinsight.errors import ConfigError

    with pytest.raises(ConfigError, match="needs >= 2"):
        run_radiograph_demo(tmp_path / "d", n_train=1, log=None)
    assert not (tmp_path / "d").exists()
