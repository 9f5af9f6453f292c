"""``fastinsight evaluate-radiographs`` in a subprocess: NIH CSVs in, JSON + CSV metrics out."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastinsight.cli.main import main
from fastinsight.models.pylon import PylonConfig, PylonModel, save_pylon
from fastinsight.radiograph.predict import load_radiograph_model, predict_radiographs
from tests.radiograph.images import picture, write_png

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastinsight.cli", "evaluate-radiographs", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


@pytest.fixture
def cohort(tmp_path: Path) -> dict[str, object]:
    """Two images, a small random PYLON, and CSVs built from the model's own arg-max points:
    image a's box holds its arg-max, image b's box is away from it -> point accuracy 1/2."""
    torch.manual_seed(0)
    cfg = PylonConfig(
        num_classes=1, stem_width=4, layers=(1, 1, 1, 1), dec_channels=8, class_names=("Nodule",)
    )
    model = PylonModel(cfg)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-flat maps
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    save_pylon(model, tmp_path / "m.safetensors")
    images = tmp_path / "images"
    images.mkdir()
    names = ["a.png", "b.png", "c.png"]
    for k, n in enumerate(names):
        write_png(images / n, picture(200, 240, seed=k))
    loaded = load_radiograph_model(tmp_path / "m.safetensors", device="cpu")
    results = list(predict_radiographs([images / n for n in names], loaded))
    xa, ya, _ = results[0].argmax_point(0)  # type: ignore[union-attr]
    xb, yb, _ = results[1].argmax_point(0)  # type: ignore[union-attr]
    far_x = 10.0 if xb > 120 else 200.0
    with open(tmp_path / "BBox_List_2017.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"])
        w.writerow(["a.png", "Nodule", xa - 5, ya - 5, 10, 10])
        w.writerow(["b.png", "Nodule", far_x, 5, 20, 20])
    scores = [float(r.scores[0]) for r in results]  # type: ignore[union-attr]
    top = max(range(3), key=lambda i: scores[i])
    with open(tmp_path / "Data_Entry_2017.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #"])
        for i, n in enumerate(names):
            w.writerow([n, "Nodule|Mass" if i == top else "No Finding", 0])
    return {"dir": tmp_path, "images": images}


def test_evaluate_radiographs_writes_json_and_csv(cohort: dict[str, Path]) -> None:
    d = cohort["dir"]
    out = d / "ev"
    proc = _cli(
        str(cohort["images"]), "--model", str(d / "m.safetensors"),
        "--boxes", str(d / "BBox_List_2017.csv"), "--labels", str(d / "Data_Entry_2017.csv"),
        "--out", str(out), "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((d / "ev.json").read_text())
    assert metrics["images"] == 3
    loc = metrics["localisation"]
    assert loc["pairs"] == {"Nodule": 2}
    assert loc["point_accuracy"]["micro"] == 0.5 and loc["point_accuracy"]["macro"] == 0.5
    assert set(loc["iou"]) == {"0.1", "0.25", "0.5"} and set(loc["iobb"]) == {"0.1", "0.25", "0.5"}
    assert metrics["auroc"] == {"Nodule": 1.0}
    assert metrics["model"]["family"] == "pylon"
    rows = list(csv.DictReader(open(d / "ev.csv", newline="")))
    point = {r["class"]: float(r["value"]) for r in rows if r["metric"] == "point_accuracy"}
    assert point == {"Nodule": 0.5, "micro": 0.5, "macro": 0.5}
    assert {r["threshold"] for r in rows if r["metric"] == "iou_hit_rate"} == {"0.1", "0.25", "0.5"}
    assert [float(r["value"]) for r in rows if r["metric"] == "auroc"] == [1.0]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("Image,Label\na.png,Nodule\n", "BBox_List_2017.csv header"),
        ("Image Index,Finding Label,Bbox [x,y,w,h]\na.png,Nodule,1,2,x,4\n", "not four numbers"),
        (b"\xff\xfe\x00bad", "not a readable CSV"),
        (None, "does not exist"),
    ],
)
def test_bad_boxes_csv_is_one_line_and_writes_nothing(
    cohort: dict[str, Path], content: str | bytes | None, needle: str, capsys
) -> None:
    """In process (the same ``main`` the console script runs); the subprocess case is below."""
    d = cohort["dir"]
    bad = d / "bad.csv"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    elif content is not None:
        bad.write_text(content)
    rc = main(
        ["evaluate-radiographs", str(cohort["images"]), "--model", str(d / "m.safetensors"),
         "--boxes", str(bad), "--out", str(d / "ev")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 4, err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (d / "ev.json").exists() and not (d / "ev.csv").exists()


def test_bad_labels_csv_is_one_line_in_a_subprocess(cohort: dict[str, Path]) -> None:
    d = cohort["dir"]
    (d / "labels.csv").write_text("Image Index,Labels\na.png,Nodule\n")
    proc = _cli(
        str(cohort["images"]), "--model", str(d / "m.safetensors"),
        "--boxes", str(d / "BBox_List_2017.csv"), "--labels", str(d / "labels.csv"),
        "--out", str(d / "ev"),
    )  # fmt: skip
    assert proc.returncode == 4 and "Finding Labels" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (d / "ev.json").exists() and not (d / "ev.csv").exists()
