"""Issue #16, class 1 for CSV outputs: names from file names that are not UTF-8.

On Linux a file name is bytes; Python shows the bytes that are not UTF-8 as lone surrogates
(``os.fsdecode(b"slide\\xff.svs") == "slide\\udcff.svs"``), which no UTF-8 file can hold. Every
CSV fastinsight writes (training metrics, radiograph scores, cohort summary, evaluation) writes
such a byte as the four characters ``\\xff`` (``fastinsight.text.clean_text``: backslashreplace)
and stays strict UTF-8; commas, quotes and newlines in names are quoted so that ``csv.reader``
reads each field back as written. The tests use real files with such names.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastinsight.cohort import SlideOutcome, read_summary, write_summary
from fastinsight.errors import CheckpointError
from fastinsight.evaluate.result import ClassEval, EvalResult, SlideEval
from fastinsight.models.config import InsightConfig
from fastinsight.text import clean_text
from fastinsight.train import state_path_for
from tests.hardening.conftest import run_main
from tests.support.h5_layouts import grid_coords, write_trident

# A Latin-1 byte, a comma, quotes and a newline: everything a CSV field can get wrong.
HOSTILE = b'slide\xff, "7"\nB'
HOSTILE_ID = 'slide\\xff, "7"\nB'  # as every output writes it


def _strict_csv(path: Path) -> list[dict[str, str]]:
    """The rows of ``path``, which must be strict UTF-8 (a lone surrogate cannot be decoded)."""
    text = path.read_bytes().decode("utf-8")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _real_file(folder: Path, name: bytes, data: bytes = b"") -> str:
    """Create ``folder/name`` with the raw bytes of ``name``; return the name as Python lists it."""
    with open(os.path.join(os.fsencode(folder), name), "wb") as fh:
        fh.write(data)
    (listed,) = [n for n in os.listdir(folder) if os.fsencode(n) == name]
    return listed


def test_clean_text_is_the_documented_escape(tmp_path: Path) -> None:
    listed = _real_file(tmp_path, HOSTILE + b".svs")
    assert listed == 'slide\udcff, "7"\nB.svs'  # what os.listdir gives: a lone surrogate
    assert clean_text(listed) == HOSTILE_ID + ".svs"


# -- training: slide ids of undecodable file names, metrics CSV with hostile class names ---------
def test_training_with_an_undecodable_feature_file_name(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    rc = np.array([(r, c) for r in range(3) for c in range(3)])
    feats_dir = tmp_path / "feats"
    feats_dir.mkdir()
    ids = []
    for i in range(6):
        name = (HOSTILE if i == 0 else f"s{i}".encode()) + b".h5"
        # TRIDENT records the slide name inside the file too: write it under a plain name and
        # give it the raw bytes name afterwards, as a copy from an old share would.
        plain = write_trident(
            feats_dir / f"tmp{i}.h5",
            rng.standard_normal((len(rc), 8)).astype(np.float32) + (i % 2),
            grid_coords(rc, 512),
        )
        os.rename(os.fsencode(plain), os.fsencode(feats_dir) + b"/" + name)
        ids.append(clean_text(os.fsdecode(name)[:-3]))
    assert ids[0] == HOSTILE_ID
    classes = ("tumour, grade 2", "腫瘍")
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", *classes, "split"])
        for i, sid in enumerate(ids):  # the labels CSV names the slide as outputs write it
            w.writerow([sid, i % 2, (i + 1) % 2, "val" if i >= 4 else "train"])
    out = tmp_path / "model.safetensors"
    proc = run_main(
        capsys, "train", feats_dir, labels, "--out", out, "--epochs", "1", "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr
    assert "have no label" not in proc.stdout  # the escaped id matched the file
    rows = _strict_csv(out.with_suffix(".metrics.csv"))
    assert len(rows) == 1 and {f"val_auc_{c}" for c in classes} <= set(rows[0])
    json.loads(out.with_suffix(".metrics.json").read_bytes().decode("utf-8"))
    state = torch.load(state_path_for(out), weights_only=True)
    assert state["train_ids"][0] == HOSTILE_ID


def test_two_files_that_escape_to_one_id_are_refused(tmp_path: Path) -> None:
    from fastinsight.errors import InputError
    from fastinsight.features import find_feature_files

    _real_file(tmp_path, b"slide\xff.h5")
    _real_file(tmp_path, b"slide\\xff.h5")  # literally backslash, x, f, f
    with pytest.raises(InputError, match="two feature files for slide"):
        find_feature_files(tmp_path)


def test_class_names_with_undecodable_bytes_are_refused() -> None:
    with pytest.raises(CheckpointError, match="bytes that are not UTF-8"):
        InsightConfig(in_dim=8, num_classes=1, class_names=(os.fsdecode(b"tum\xffour"),))


# -- radiograph scores CSV and report ------------------------------------------------------------
@pytest.fixture
def pylon_path(tmp_path: Path) -> Path:
    from fastinsight.models.pylon import PylonConfig, PylonModel, save_pylon

    torch.manual_seed(0)
    cfg = PylonConfig(num_classes=1, stem_width=8, layers=(1, 1, 1, 1), dec_channels=8)
    path = tmp_path / "pylon.safetensors"
    save_pylon(PylonModel(cfg), path)
    return path


def test_radiograph_scores_csv_with_undecodable_names(tmp_path: Path, pylon_path, capsys) -> None:
    from tests.radiograph.images import picture, write_png

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    good = _real_file(imgs, HOSTILE + b".png")
    write_png(imgs / good, picture(64, 64))
    broken = _real_file(imgs, b"broken\xe4.png", b"not a png")
    out = tmp_path / "scores.csv"
    argv = ["predict-radiograph", imgs, "--model", pylon_path, "--out", out, "--device", "cpu"]
    proc = run_main(capsys, *argv, "--skip-bad")
    assert proc.returncode == 0, proc.stderr
    rows = _strict_csv(out)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) == {HOSTILE_ID + ".png", clean_text(broken)}
    assert float(by_name[HOSTILE_ID + ".png"]["class_0"]) >= 0.0
    assert by_name["broken\\xe4.png"]["error"] and not by_name["broken\\xe4.png"]["class_0"]
    # one image: the JSON report is strict JSON with the escaped name
    proc = run_main(
        capsys, "predict-radiograph", imgs / good, "--model", pylon_path,
        "--out", tmp_path / "h.tif", "--device", "cpu", "--no-overlay",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "h.json").read_bytes().decode("utf-8")
    assert json.loads(text)["image"].endswith(HOSTILE_ID + ".png")
    import tifffile  # the heatmap's description tag: 7-bit ASCII, the name escaped

    with tifffile.TiffFile(tmp_path / "h.tif") as tif:
        assert "image: " in tif.pages[0].description
        assert "slide\\xff" in tif.pages[0].description


# -- cohort summary and evaluation CSV -----------------------------------------------------------
def test_cohort_summary_round_trips_hostile_names(tmp_path: Path) -> None:
    listed = _real_file(tmp_path, HOSTILE + b".svs")
    path = tmp_path / listed
    outcomes = [
        SlideOutcome(listed[:-4], "ok", str(path), scores=(0.25,), n_tiles=3),
        SlideOutcome("b,c", "failed", str(tmp_path / "b,c.svs"), error='bad "tile"\nat 3'),
    ]
    summary = tmp_path / "summary.csv"
    write_summary(summary, outcomes, ["tumour, grade 2"])
    rows = _strict_csv(summary)
    assert rows == read_summary(summary)
    assert rows[0]["slide_id"] == HOSTILE_ID and rows[0]["slide_path"] == clean_text(str(path))
    assert rows[0]["score_tumour, grade 2"] == "0.25"
    assert rows[1]["slide_id"] == "b,c" and rows[1]["error"] == 'bad "tile" at 3'


def test_evaluation_csv_round_trips_hostile_names(tmp_path: Path) -> None:
    listed = _real_file(tmp_path, HOSTILE + b".h5")
    slide = SlideEval(listed[:-3], (1,), (0.5,), (None,), (None,), (None,), (None,), 1.0)
    other = SlideEval("a,b", (0,), (0.25,), (0.75,), (4,), (3,), (2,), 1.0)
    result = EvalResult(
        classes=(ClassEval("tumour, grade 2", 1.0, 1, 1, None, None, None, 0),),
        slides=(slide, other),
        threshold=0.5,
        resample="nearest",
        dice_on="cells",
        cell_size_l0=(1.0,),
    )
    out = tmp_path / "eval.csv"
    result.write_csv(out)
    rows = _strict_csv(out)
    assert [r["slide_id"] for r in rows] == [HOSTILE_ID, "a,b"]
    assert rows[1]["dice_tumour, grade 2"] == "0.75"
    result.write_json(tmp_path / "eval.json")
    doc = json.loads((tmp_path / "eval.json").read_bytes().decode("utf-8"))
    assert doc["slides"][0]["slide_id"] == HOSTILE_ID
