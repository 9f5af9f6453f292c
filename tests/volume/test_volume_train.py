"""Training and evaluating on volumes; the CT demo reaches its targets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastinsight.errors import InputError
from fastinsight.models.config import InsightConfig
from fastinsight.train import Bag, TrainConfig
from fastinsight.volume.model import CrossSliceInsight
from fastinsight.volume.train import (
    VolumeEval,
    read_volume_labels,
    summarise,
    train_volume_model,
    volume_dice,
)


def test_labels_csv(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("volume_id,label\na,0\nb,1\n")
    assert read_volume_labels(tmp_path / "l.csv") == {"a": 0, "b": 1}
    (tmp_path / "bad.csv").write_text("volume_id,label\na,2\n")
    with pytest.raises(InputError, match="line 2"):
        read_volume_labels(tmp_path / "bad.csv")
    (tmp_path / "hdr.csv").write_text("slide_id,label\na,1\n")
    with pytest.raises(InputError, match="volume_id,label"):
        read_volume_labels(tmp_path / "hdr.csv")


def test_volume_dice_counts_scored_slices_only() -> None:
    hm = np.zeros((4, 4, 3), np.float32)
    mask = np.zeros((4, 4, 3), np.uint8)
    hm[:2, :2, 0] = 0.7
    mask[:2, :, 0] = 1  # 8 voxels, 4 predicted
    mask[:, :, 2] = 1  # an unscored slice
    assert volume_dice(hm, mask, [0, 1]) == pytest.approx(2 * 4 / (4 + 8))
    with pytest.raises(InputError, match="mask is"):
        volume_dice(hm, mask[:, :, :2], [0])
    s = summarise([VolumeEval("a", 0, 0.1, None), VolumeEval("b", 1, 0.9, 0.5)])
    assert s["auc"] == 1.0 and s["dice_mean"] == 0.5


def _bags(n: int = 8) -> list[Bag]:
    g = torch.Generator().manual_seed(0)
    bags = []
    for i in range(n):
        x = torch.randn(3, 8, 4, 4, generator=g)
        if i % 2:
            x[1, 0, 1:3, 1:3] += 4.0  # a "lesion" in slice 1
        bags.append(Bag(x, None, torch.tensor([float(i % 2)]), f"v{i}"))
    return bags


@pytest.mark.parametrize("ctx", ["2d", "3d"])
def test_train_volume_model_learns(ctx: str) -> None:
    cfg = InsightConfig(in_dim=8, reduce_dim=8, widths=(8, 8, 8), grid_size=(4, 4), norm="channel")
    model, hist = train_volume_model(
        _bags(),
        cfg,
        TrainConfig(epochs=25, lr=3e-3, patience=25, val_fraction=0.25, device="cpu"),
        slice_context=ctx,
    )
    assert isinstance(model, CrossSliceInsight) == (ctx == "3d") and len(hist) == 25
    with torch.no_grad():
        s = [float(model.predict(b.tokens).scores[0]) for b in _bags()]
    assert min(s[1::2]) > max(s[0::2])


@pytest.mark.slow
def test_ct_demo_reaches_targets(tmp_path: Path) -> None:
    from fastinsight.volume.demo import run_ct_demo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI CPU is shared; one thread is fastest there
    try:
        report = run_ct_demo(tmp_path, device="cpu", log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    assert report["auc"] >= 0.9
    assert report["dice_mean"] >= 0.5
    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "cohort" / "labels.csv").is_file()
    assert len(list((tmp_path / "cohort" / "volumes").glob("*.nii.gz"))) == 24
    assert json.loads((tmp_path / "report.json").read_text())["auc"] == report["auc"]
    # The written model predicts through the command line as the demo did.
    from fastinsight.cli import main

    vid = report["volumes"][1]["volume_id"]
    assert (
        main(
            [
                "predict-volume",
                str(tmp_path / "cohort" / "volumes" / f"{vid}.nii.gz"),
                "--model",
                str(tmp_path / "model.safetensors"),
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
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["scores"]["lesion"] == pytest.approx(report["volumes"][1]["score"], abs=1e-5)


def test_train_volume_command(tmp_path: Path) -> None:
    from fastinsight.cli import main
    from fastinsight.volume.checkpoint import load_volume_model
    from fastinsight.volume.synthetic import write_cohort

    write_cohort(tmp_path / "c", 4, shape=(24, 24, 4))
    out = tmp_path / "m.safetensors"
    rc = main(
        [
            "train-volume",
            str(tmp_path / "c" / "volumes"),
            "--labels",
            str(tmp_path / "c" / "labels.csv"),
            "--out",
            str(out),
            "--tile-size",
            "56",
            "--patch-size",
            "14",
            "--epochs",
            "2",
            "--slice-context",
            "3d",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    model, info = load_volume_model(out, device="cpu")
    assert isinstance(model, CrossSliceInsight) and info.tile_size == 56
    assert info.encoder_options == {"patch_size_px": 14} and model.config.grid_size == (4, 4)
    # A labelled volume that is missing is named.
    (tmp_path / "c" / "labels.csv").write_text("volume_id,label\nnope,1\n")
    assert (
        main(
            [
                "train-volume",
                str(tmp_path / "c" / "volumes"),
                "--labels",
                str(tmp_path / "c" / "labels.csv"),
                "--out",
                str(out),
            ]
        )
        == 4
    )
