"""Radiograph prediction pipeline and the predict-radiograph command, end to end on files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
import torch

from fastinsight.cli import main
from fastinsight.models.pylon import PylonConfig, PylonModel, save_pylon
from fastinsight.radiograph.predict import (
    load_radiograph_model,
    predict_radiographs,
    upsample_map,
)
from fastinsight.slide.heatmap_tiff import decode_scores
from tests.radiograph.images import picture, write_dicom, write_png
from tests.support.dicom_codestreams import write_compressed

NAMES = ("Nodule", "Mass", "Effusion")


@pytest.fixture
def model_path(tmp_path):
    torch.manual_seed(0)
    cfg = PylonConfig(
        num_classes=3, stem_width=8, layers=(1, 1, 1, 1), dec_channels=8, class_names=NAMES
    )
    model = PylonModel(cfg)
    # Non-trivial BN statistics so the maps are not flat.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "pylon-small.safetensors"
    save_pylon(model, path)
    return path


def test_same_picture_in_every_format_gives_the_same_heatmap(tmp_path, model_path) -> None:
    u8 = picture(300, 280)
    wide = u8.astype(np.uint16) * 257
    paths = [
        write_png(tmp_path / "a.png", u8),
        write_png(tmp_path / "b.png", wide),
        write_dicom(tmp_path / "c.dcm", 65535 - wide, photometric="MONOCHROME1"),
        write_dicom(tmp_path / "d.dcm", wide, window=(32767.5, 65536)),
        # the same 16-bit samples as PACS archives store them: JPEG lossless, JPEG-LS
        write_compressed(tmp_path / "e.dcm", wide, "1.2.840.10008.1.2.4.70", bits=16, signed=False),
        write_compressed(tmp_path / "f.dcm", wide, "1.2.840.10008.1.2.4.80", bits=16, signed=False),
    ]
    model = load_radiograph_model(model_path, device="cpu")
    results = list(predict_radiographs(paths, model))
    ref = results[0]
    assert ref.heatmap(0).shape == (300, 280)
    for r in results[1:]:
        np.testing.assert_allclose(r.scores, ref.scores, rtol=0, atol=1e-6)
        np.testing.assert_allclose(r.heatmap(1), ref.heatmap(1), rtol=0, atol=1e-6)
    # The scores are sigmoid(max logit) = the max of the probability map.
    np.testing.assert_allclose(ref.scores, ref.prob_maps.amax(dim=(-2, -1)).numpy(), atol=1e-6)
    # Batching does not change anything.
    single = next(iter(predict_radiographs(paths[:1], model)))
    np.testing.assert_allclose(single.scores, ref.scores, atol=1e-6)


def test_upsample_map_argmax_is_at_a_grid_node() -> None:
    prob = torch.zeros(4, 4)
    prob[1, 2] = 1.0
    hm = upsample_map(prob, (31, 61))
    y, x = np.unravel_index(np.argmax(hm), hm.shape)
    assert (x, y) == (40, 10)  # node (2, 1) lies at 2 * 60 / 3, 1 * 30 / 3


def test_cli_single_image_writes_heatmap_overlay_report(tmp_path, model_path, capsys) -> None:
    img = write_png(tmp_path / "cxr.png", picture(300, 280))
    out = tmp_path / "heatmap.tif"
    rc = main(
        [
            "predict-radiograph",
            str(img),
            "--model",
            str(model_path),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--class",
            "Mass",
        ]
    )
    assert rc == 0
    codes = tifffile.imread(out)
    assert codes.shape == (300, 280) and codes.dtype == np.uint8
    report = json.loads((tmp_path / "heatmap.json").read_text())
    assert report["heatmap_class"] == "Mass" and set(report["scores"]) == set(NAMES)
    assert (tmp_path / "heatmap.overlay.png").stat().st_size > 0
    model = load_radiograph_model(model_path, device="cpu")
    r = next(iter(predict_radiographs([img], model)))
    np.testing.assert_allclose(decode_scores(codes), r.heatmap(1), atol=0.5 / 254 + 1e-6)
    pt = report["argmax_points"]["Mass"]
    assert (pt["x"], pt["y"]) == r.argmax_point(1)[:2]
    assert report["model"]["family"] == "pylon" and report["width"] == 280
    rc = main(
        [
            "predict-radiograph",
            str(img),
            "--model",
            str(model_path),
            "--out",
            str(tmp_path / "all.tif"),
            "--device",
            "cpu",
            "--all-classes",
            "--no-overlay",
        ]
    )
    assert rc == 0
    assert sorted(p.name for p in tmp_path.glob("all.*.tif")) == [
        "all.Effusion.tif",
        "all.Mass.tif",
        "all.Nodule.tif",
    ]


def test_cli_folder_and_csv_list_give_one_scores_csv(tmp_path, model_path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        write_png(folder / f"img{i}.png", picture(260, 256, seed=i))
    out = tmp_path / "scores.csv"
    assert (
        main(
            [
                "predict-radiograph",
                str(folder),
                "--model",
                str(model_path),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(out.open()))
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == ["img0.png", "img1.png", "img2.png"]
    listing = tmp_path / "list.csv"
    listing.write_text("path\nimgs/img2.png\nimgs/img0.png\n")
    out2 = tmp_path / "scores2.csv"
    assert (
        main(
            [
                "predict-radiograph",
                str(listing),
                "--model",
                str(model_path),
                "--out",
                str(out2),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    rows2 = list(csv.DictReader(out2.open()))
    assert rows2[0]["Nodule"] == rows[2]["Nodule"] and rows2[1]["Mass"] == rows[0]["Mass"]


def test_cli_bad_input_one_line_error_and_no_output(tmp_path, model_path, capsys) -> None:
    ct = write_dicom(tmp_path / "ct.dcm", picture(64, 64), modality="CT")
    out = tmp_path / "h.tif"
    rc = main(
        [
            "predict-radiograph",
            str(ct),
            "--model",
            str(model_path),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 4 and "CT slice" in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "h.json").exists()
    good = write_png(tmp_path / "ok.png", picture(64, 64))
    rc = main(
        [
            "predict-radiograph",
            str(good),
            str(ct),
            "--model",
            str(model_path),
            "--out",
            str(tmp_path / "s.csv"),
            "--device",
            "cpu",
            "--skip-bad",
        ]
    )
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert rc == 0 and rows[0]["error"] == "" and "CT slice" in rows[1]["error"]


def test_real_chest_radiograph_end_to_end(tmp_path, model_path) -> None:
    data = pytest.importorskip("pydicom.data", reason="pydicom-data is not installed")
    path = data.get_testdata_file("RG1_UNCI.dcm", download=False)
    if path is None:
        pytest.skip("pydicom-data (RG1_UNCI.dcm) is not installed")
    out = tmp_path / "rg1.tif"
    assert (
        main(
            [
                "predict-radiograph",
                path,
                "--model",
                str(model_path),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert tifffile.imread(out).shape == (1955, 1841)
    report = json.loads((tmp_path / "rg1.json").read_text())
    assert report["input"]["modality"] == "CR" and report["pixel_spacing_mm"] is None


def test_fastinsight_load_model_and_predict_dispatch(tmp_path, model_path) -> None:
    import fastinsight
    from fastinsight.models.pylon import PylonModel
    from tests.radiograph.pylon_reference import random_state_dict

    assert isinstance(fastinsight.load_model(model_path, device="cpu"), PylonModel)
    torch.save(random_state_dict("1layer", num_classes=2), tmp_path / "pylon.pth")
    official = fastinsight.load_model(tmp_path / "pylon.pth", device="cpu")
    assert isinstance(official, PylonModel) and official.config.up_type == "1layer"
    img = write_png(tmp_path / "cxr.png", picture(300, 280))
    out = tmp_path / "hm.tif"
    rc = main(
        [
            "predict",
            str(img),
            "--model",
            str(model_path),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--class",
            "Mass",
        ]
    )
    assert rc == 0 and tifffile.imread(out).shape == (300, 280)
    assert json.loads((tmp_path / "hm.json").read_text())["heatmap_class"] == "Mass"
