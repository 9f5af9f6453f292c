"""One-line messages that say what is wrong (audit defect 10): a 'features' entry that is not a
dataset, a TRIDENT overlap that leaves no grid pitch, CLAM's ``case_id,slide_id,label`` CSV, and
``fastinsight info`` on a training-resume state."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fastinsight.cli import main
from fastinsight.errors import InputError
from fastinsight.evaluate import read_labels
from fastinsight.features import geometry_from_attrs, inspect_features


def _with_coords(path: Path) -> h5py.File:
    f = h5py.File(path, "w")
    f["coords"] = np.zeros((2, 2), np.int64)
    return f


def test_features_entry_that_is_not_a_dataset(tmp_path: Path) -> None:
    group = tmp_path / "group.h5"
    with _with_coords(group) as f:
        f.create_group("features").create_dataset("x", data=[1])
    with pytest.raises(InputError, match="'features' is a group .*not a dataset"):
        inspect_features(group)
    link = tmp_path / "link.h5"
    with _with_coords(link) as f:
        f["features"] = h5py.ExternalLink("/nonexistent/file.h5", "features")
    with pytest.raises(InputError, match="external link .*cannot be opened") as exc:
        inspect_features(link)
    assert "no dataset" not in str(exc.value)


@pytest.mark.parametrize("overlap", [256, 300, -8], ids=["equal", "larger", "negative"])
def test_trident_overlap_must_leave_a_pitch(overlap: int) -> None:
    attrs = {"patch_size": 256, "patch_size_level0": 512, "overlap": overlap}
    with pytest.raises(InputError, match="overlap must be >= 0 and below the patch size"):
        geometry_from_attrs(attrs, "t.h5")
    ok = geometry_from_attrs({**attrs, "overlap": 64}, "t.h5")
    assert ok.step_l0 == 512 - 128


def test_clam_dataset_csv_names_slides_by_slide_id(tmp_path: Path) -> None:
    csv = tmp_path / "clam.csv"
    csv.write_text("case_id,slide_id,label\nC0,s0,0\nC0,s1,1\n")
    labels = read_labels(csv)
    assert labels.slide_ids == ("s0", "s1")
    assert labels.class_names == ("label",)
    assert labels.values == {"s0": (0,), "s1": (1,)}


def test_info_on_a_training_state_points_to_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "m.train.pt"
    torch.save({"format": "fastinsight.train/1", "optimizer": {"state": {}}}, state)
    assert main(["info", str(state)]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "training-resume state" in err and "m.safetensors" in err
