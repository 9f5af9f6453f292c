"""`fastinsight demo` really works: the method learns lesions from slide labels alone."""

from __future__ import annotations

import json

import openslide
import pytest

from fastinsight.cli import main


@pytest.mark.slow
def test_demo_learns_to_find_the_lesions(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["auc"] >= 0.9
    assert report["dice_mean"] >= 0.5
    assert "held-out AUC" in capsys.readouterr().out
    held_out = [r["slide_id"] for r in report["slides"]]
    assert len(held_out) == 8 and sum(r["label"] for r in report["slides"]) == 4
    for sid in held_out:
        d = out / "predictions" / sid
        for name in ("heatmap.tif", "overlay.png", "tiles.geojson", "scores.npz", "report.json"):
            assert (d / name).is_file(), f"{sid}/{name} missing"
    with openslide.OpenSlide(str(out / "predictions" / held_out[0] / "heatmap.tif")) as hm:
        assert float(hm.properties["openslide.mpp-x"]) == pytest.approx(8.0)

    # `fastinsight evaluate` on the demo's outputs agrees with the demo's own numbers.
    ev = tmp_path / "eval"
    rc = main(
        [
            "evaluate",
            str(out / "predictions"),
            str(out / "cohort" / "labels.csv"),
            "--ground-truth",
            str(out / "cohort" / "masks"),
            "--threshold",
            "0",
            "--resample",
            "area",
            "--out",
            str(ev),
        ]
    )
    assert rc == 0
    lesion = json.loads(ev.with_suffix(".json").read_text())["classes"][0]
    assert lesion["auc"] == pytest.approx(report["auc"])
    assert lesion["dice_mean"] == pytest.approx(report["dice_mean"], abs=1e-9)
    assert lesion["dice_slides"] == 4


def test_demo_checks_epochs_and_size_before_writing(tmp_path, capsys) -> None:
    assert main(["demo", str(tmp_path / "a"), "--epochs", "0"]) == 2  # a flag value: ConfigError
    assert main(["demo", str(tmp_path / "b"), "--size", "100"]) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_demo_rejects_bad_sizes(tmp_path, capsys) -> None:
    assert main(["demo", str(tmp_path / "d"), "--slides", "4"]) == 2
    assert "at least 8 slides" in capsys.readouterr().err
