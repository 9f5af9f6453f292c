"""The radiograph demo reaches its targets on held-out synthetic pictures (image labels only)."""

from __future__ import annotations

import json

import pytest

from fastinsight.models.pylon import load_pylon
from fastinsight.radiograph.demo import run_radiograph_demo


@pytest.mark.slow
def test_radiograph_demo_localises_planted_nodules(tmp_path) -> None:
    metrics = run_radiograph_demo(tmp_path, threads=1, log=None)
    assert metrics["auroc"] >= 0.9
    assert metrics["point_localisation_accuracy"] >= 0.8
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["auroc"] == metrics["auroc"]
    model = load_pylon(tmp_path / "model.safetensors", device="cpu")
    assert model.config.names == ("Nodule",)
    assert (tmp_path / "overlay.png").is_file() and (tmp_path / "BBox_List_2017.csv").is_file()
