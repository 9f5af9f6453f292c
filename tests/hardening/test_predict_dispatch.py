"""`fastinsight predict` picks the pipeline from the model as well as the input: a DICOM film
with a PYLON model is a radiograph, a DICOM series with a volume model a CT scan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from fastinsight.cli import main
from fastinsight.models.checkpoints import model_family
from fastinsight.models.pylon import PylonConfig, PylonModel, save_pylon
from tests.radiograph.images import picture, write_dicom


@pytest.fixture(scope="module")
def pylon_file(tmp_path_factory):
    torch.manual_seed(0)
    cfg = PylonConfig(
        num_classes=2, stem_width=8, layers=(1, 1, 1, 1), dec_channels=8, class_names=("A", "B")
    )
    path = tmp_path_factory.mktemp("m") / "pylon.safetensors"
    save_pylon(PylonModel(cfg), path)
    return path


@pytest.mark.parametrize("name", ["cxr.dcm", "IM0001"])
def test_dicom_film_with_a_radiograph_model_is_a_radiograph(tmp_path, pylon_file, name) -> None:
    """The README's `fastinsight predict cxr.dcm --model pylon.pth` used to be sent to the CT
    pipeline ("--out must end in .nii") because a DICOM input was taken for a CT series."""
    film = write_dicom(tmp_path / name, picture(120, 100).astype(np.uint16) * 16, bits_stored=12)
    out = tmp_path / "hm.tif"
    rc = main(["predict", str(film), "--model", str(pylon_file), "--out", str(out),
               "--device", "cpu"])  # fmt: skip
    assert rc == 0
    assert tifffile.imread(out).shape == (120, 100)
    assert json.loads((tmp_path / "hm.json").read_text())["heatmap_class"] in ("A", "B")


def test_model_family_names_the_loader(tmp_path, pylon_file) -> None:
    from fastinsight.models.config import InsightConfig
    from fastinsight.models.insight import InsightModel

    insight = tmp_path / "insight.safetensors"
    InsightModel(InsightConfig(in_dim=16, num_classes=1)).save(str(insight))
    assert model_family(pylon_file) == "pylon"
    assert model_family(insight) == "insight-fastinsight"
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert model_family(tmp_path / "junk.pth") is None


@pytest.mark.parametrize("name", ["slide1.h5", "slide1.features"])
def test_feature_file_in_the_slide_place_is_read_as_features(tmp_path, name) -> None:
    """`fastinsight predict FEATURES.h5 --model M` (by suffix or by the HDF5 signature) gives
    what `--features FEATURES.h5` gives; it used to be opened as a slide."""
    from fastinsight.models.config import InsightConfig
    from fastinsight.models.insight import InsightModel
    from tests.support.h5_layouts import grid_coords, write_insight

    torch.manual_seed(0)
    model = tmp_path / "m.safetensors"
    InsightModel(InsightConfig(in_dim=16, num_classes=1)).save(str(model))
    rng = np.random.default_rng(0)
    rc = np.array([[r, c] for r in range(3) for c in range(4)])
    feats = write_insight(
        tmp_path / name, rng.normal(size=(len(rc), 16, 14, 14)), grid_coords(rc, 224)
    )
    reports = []
    for k, how in enumerate(([str(feats)], ["--features", str(feats)])):
        report = tmp_path / f"r{k}.json"
        args = [
            "predict",
            *how,
            "--model",
            str(model),
            "--report",
            str(report),
            "--mpp",
            "0.5",
            "--patch-size-l0",
            "224",
        ]
        assert main([*args, "--quiet"]) == 0
        reports.append(json.loads(report.read_text())["scores"])
    assert reports[0] == reports[1]


def test_negative_feature_coordinates_are_named_as_such(tmp_path, capsys) -> None:
    """No --slide was given: the message must not ask whether --slide is the right one."""
    from fastinsight.models.config import InsightConfig
    from fastinsight.models.insight import InsightModel
    from tests.support.h5_layouts import write_insight

    model = tmp_path / "m.safetensors"
    InsightModel(InsightConfig(in_dim=16, num_classes=1)).save(str(model))
    coords = np.array([[-224, 0], [0, 0], [224, 0]])
    feats = write_insight(tmp_path / "f.h5", np.ones((3, 16, 14, 14)), coords)
    rc = main(["predict", "--features", str(feats), "-m", str(model), "--mpp", "0.5",
               "--patch-size-l0", "224", "--report", str(tmp_path / "r.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 4 and "negative level-0 coordinates" in err and "--slide" not in err


def test_a_pacs_folder_reads_its_films_and_passes_over_non_image_objects(
    tmp_path, pylon_file
) -> None:
    """PACS exports put key-object selections and reports (no pixels) beside the films, with
    extensionless names: they are not inputs, and must not stop the run."""
    import csv

    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = tmp_path / "pacs"
    folder.mkdir()
    for k in (1, 2):
        write_dicom(folder / f"IM000{k}", picture(90, 80, seed=k).astype(np.uint16) * 16,
                    bits_stored=12)  # fmt: skip
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ko = FileDataset(str(folder / "IM0003"), {}, file_meta=meta, preamble=b"\0" * 128)
    ko.SOPClassUID, ko.Modality = meta.MediaStorageSOPClassUID, "KO"
    ko.save_as(str(folder / "IM0003"), enforce_file_format=True)
    out = tmp_path / "scores.csv"
    rc = main(["predict-radiograph", str(folder), "--model", str(pylon_file), "--out", str(out),
               "--device", "cpu"])  # fmt: skip
    assert rc == 0
    rows = list(csv.DictReader(out.open()))
    assert sorted(Path(r["path"]).name for r in rows) == ["IM0001", "IM0002"]
