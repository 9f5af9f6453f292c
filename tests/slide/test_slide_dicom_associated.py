"""A DICOM whole-slide image given as its LABEL, OVERVIEW or THUMBNAIL file (VL Whole Slide
Microscopy images of the same series beside the pyramid) is the slide: it resolves to the
largest VOLUME level like any other file of the slide, goes to the slide pipeline (not the CT
one), and without the pyramid beside it is refused with one line (audit D3)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from slide_testutil import synthetic_slide

from fastinsight import dicom
from fastinsight.errors import InputError, SlideError
from fastinsight.slide import open_slide
from tests.support.dicom_wsi import write_dicom_wsi

ASSOCIATED = ("LABEL", "OVERVIEW", "THUMBNAIL")


@pytest.fixture(scope="module")
def wsi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dicom_assoc") / "slide"
    files = write_dicom_wsi(
        folder,
        synthetic_slide(600, 520, seed=5),
        mpp=0.5,
        downsamples=(1, 2),
        jpeg=False,
        associated=ASSOCIATED,
    )
    assert [f.name for f in files] == ["level0.dcm", "level1.dcm"]
    return folder


@pytest.mark.parametrize("kind", ASSOCIATED)
def test_associated_file_resolves_to_the_largest_level(wsi: Path, kind: str) -> None:
    from fastinsight.volume.run import is_volume_input

    f = wsi / f"{kind.lower()}.dcm"
    assert dicom._wsi_image(f)[1] == kind  # type: ignore[index]
    assert dicom.whole_slide_file(f) == wsi / "level0.dcm"
    assert dicom.is_whole_slide_image(f)
    assert not is_volume_input(f)  # the slide pipeline reads it, not the CT one
    assert dicom.whole_slide_file(wsi) == wsi / "level0.dcm"  # the folder: label not a level


@pytest.mark.parametrize("kind", ASSOCIATED)
def test_open_slide_of_associated_file_is_the_folder(wsi: Path, kind: str) -> None:
    with open_slide(wsi) as whole, open_slide(wsi / f"{kind.lower()}.dcm") as got:
        assert got.backend == whole.backend
        assert got.level_dimensions == whole.level_dimensions == ((600, 520), (300, 260))
        assert got.file_mpp == whole.file_mpp == pytest.approx((0.5, 0.5))
        np.testing.assert_array_equal(
            got.read_region(100, 80, 0, 200, 160), whole.read_region(100, 80, 0, 200, 160)
        )


@pytest.mark.parametrize("kind", ["LABEL", "OVERVIEW"])
def test_associated_file_without_its_pyramid_is_refused(
    wsi: Path, kind: str, tmp_path: Path
) -> None:
    alone = tmp_path / "alone"
    alone.mkdir()
    f = shutil.copy(wsi / f"{kind.lower()}.dcm", alone / "img.dcm")
    word = "label image" if kind == "LABEL" else "overview (macro) image"
    with pytest.raises(InputError, match=re.escape(f"is the {word} of a DICOM whole-slide image")):
        dicom.whole_slide_file(f)
    with pytest.raises(SlideError) as info:
        open_slide(f)
    msg = str(info.value)
    assert "\n" not in msg and "pass the slide's folder" in msg and "not beside it" in msg
    # The folder holding only it: the same answer for the folder.
    with pytest.raises(InputError, match=re.escape(f"holds only the {word}")):
        dicom.whole_slide_file(alone)
    assert dicom.is_whole_slide_image(alone)  # a slide's image: never sent to the CT pipeline


def test_label_of_another_slide_is_not_read_as_this_one(wsi: Path, tmp_path: Path) -> None:
    """A label beside the levels of a different slide (another series) is refused, never
    resolved to the other slide."""
    other = tmp_path / "other"
    write_dicom_wsi(other, synthetic_slide(300, 260, seed=6), downsamples=(1,), jpeg=False)
    f = shutil.copy(wsi / "label.dcm", other / "label.dcm")
    with pytest.raises(InputError, match="not beside it"):
        dicom.whole_slide_file(f)
    assert dicom.whole_slide_file(other) == other / "level0.dcm"  # the folder: its one slide


def test_predict_on_the_label_file_is_the_slides_heatmap(
    wsi: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``fastinsight predict <label file>`` end to end: the same heatmap and scores as the
    slide's folder; without the pyramid, exit 5 with one line (never the CT pipeline's
    '--out must end in .nii')."""
    import json

    import tifffile
    import torch

    from fastinsight import InsightConfig, InsightModel
    from fastinsight.cli import main

    model = tmp_path / "m.safetensors"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        InsightModel(
            InsightConfig(in_dim=64, num_classes=1, class_names=("tumour",), encoder="vit-tiny"),
            backend="reference",
        ).save(str(model))
    scores = {}
    for name, slide in (("folder", wsi), ("label", wsi / "label.dcm")):
        out, report = tmp_path / f"{name}.tif", tmp_path / f"{name}.json"
        argv = ["predict", str(slide), "-m", str(model), "--out", str(out)]
        rc = main([*argv, "--report", str(report), "--device", "cpu", "-q", "--num-workers", "1"])
        assert rc == 0, capsys.readouterr().err
        scores[name] = json.loads(report.read_text())["scores"]
    assert scores["label"] == scores["folder"]
    heatmaps = [tifffile.imread(tmp_path / f"{name}.tif") for name in ("folder", "label")]
    np.testing.assert_array_equal(heatmaps[0], heatmaps[1])  # (the slide name differs)

    alone = tmp_path / "alone"
    alone.mkdir()
    f = shutil.copy(wsi / "label.dcm", alone / "label.dcm")
    capsys.readouterr()
    rc = main(["predict", str(f), "-m", str(model), "--out", str(tmp_path / "x.tif"), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 5, err
    assert err.startswith("fastinsight: error:") and "\n" not in err, err
    assert "label image" in err and "pass the slide's folder" in err and ".nii" not in err
