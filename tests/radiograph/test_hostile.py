"""Hostile inputs to the radiograph commands: each gives one error line and destroys nothing.

Outputs that would overwrite an input or each other, a failing last output, colliding class
names, damaged DICOM headers, CMYK / EXIF-rotated JPEGs, DICOM without preamble and PACS-style
folders, tampered checkpoints, short CSV rows, NaN pixels, non-radiograph modalities and the NIH
box file's quirks (Infiltrate, boxes of missing images, NaN / out-of-image boxes).
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image, ImageOps

from fastinsight.cli import main
from fastinsight.errors import CheckpointError, InputError
from fastinsight.models.multires import MultiResConfig, MultiResModel, save_multires
from fastinsight.models.pylon import PylonConfig, PylonModel, save_pylon
from fastinsight.radiograph.evaluate import read_bbox_list, read_data_entry
from fastinsight.radiograph.io import read_radiograph
from fastinsight.radiograph.predict import expand_inputs, load_radiograph_model
from tests.radiograph.images import picture, write_dicom, write_png

NAMES = ("Nodule", "Mass", "Effusion")


def _pylon(names: tuple[str, ...] = NAMES, in_channels: int = 1) -> PylonModel:
    torch.manual_seed(0)
    cfg = PylonConfig(
        num_classes=len(names),
        stem_width=4,
        layers=(1, 1, 1, 1),
        dec_channels=8,
        class_names=names,
        in_channels=in_channels,
    )
    return PylonModel(cfg)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "pylon.safetensors"
    save_pylon(_pylon(), path)
    return path


def _run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    """``fastinsight predict-radiograph ARGS --device cpu``: exit code and stderr."""
    rc = main(["predict-radiograph", *(str(a) for a in args), "--device", "cpu"])
    return rc, capsys.readouterr().err.strip()


def _one_line(err: str) -> str:
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ================================================================== outputs (defects 2, 3, 9)


def test_outputs_never_overwrite_an_input_or_each_other(tmp_path, model_path, capsys) -> None:
    img = write_png(tmp_path / "cxr.png", picture(64, 64))
    before = img.read_bytes()
    model_before = model_path.read_bytes()
    cases = [
        ("--report", img),  # the input image
        ("--overlay", tmp_path / "h.tif"),  # the heatmap itself
        ("--report", model_path),  # the model
    ]
    for flag, target in cases:
        rc, err = _run(
            capsys, img, "--model", model_path, "--out", tmp_path / "h.tif", flag, target
        )
        assert rc == 6 and "would destroy" in _one_line(err)
    rc, err = _run(capsys, img, "--model", model_path, "--out", img.with_suffix(".tif"))
    assert rc == 0
    tif = img.with_suffix(".tif")
    tif_before = tif.read_bytes()
    rc, err = _run(capsys, tif, "--model", model_path, "--out", tif, "--no-overlay")
    assert rc == 6 and "input image" in _one_line(err)
    listing = tmp_path / "list.csv"
    listing.write_text("path\ncxr.png\n")
    rc, err = _run(capsys, listing, "--model", model_path, "--out", listing)
    assert rc == 6 and "CSV list" in _one_line(err)
    assert img.read_bytes() == before and tif.read_bytes() == tif_before
    assert model_path.read_bytes() == model_before and listing.read_text() == "path\ncxr.png\n"
    assert not (tmp_path / "h.tif").exists()


def test_a_failing_last_output_keeps_every_previous_output(
    tmp_path, model_path, capsys, monkeypatch
) -> None:
    import fastinsight.radiograph.predict as rp
    from fastinsight.errors import OutputError

    img = write_png(tmp_path / "cxr.png", picture(64, 64))
    old = {tmp_path / n: f"previous {n}" for n in ("h.tif", "h.overlay.png", "h.json")}
    for path, text in old.items():
        path.write_text(text)
    rc, err = _run(
        capsys, img, "--model", model_path, "--out", tmp_path / "h.tif", "--overlay", "no/o.png"
    )
    assert rc == 6 and "does not exist" in _one_line(err)

    def fail(path: object, obj: object) -> None:
        raise OutputError("disk full (simulated)")

    monkeypatch.setattr(rp, "write_json", fail)  # the report is written last
    rc, err = _run(capsys, img, "--model", model_path, "--out", tmp_path / "h.tif")
    assert rc == 6 and "simulated" in _one_line(err)
    assert {p: p.read_text() for p in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cxr.png",
        "h.json",
        "h.overlay.png",
        "h.tif",
    ]


def test_class_names_that_collide_in_file_names_or_csv_columns(tmp_path, capsys) -> None:
    path = tmp_path / "collide.safetensors"
    save_pylon(_pylon(("Pleural thickening", "Pleural_thickening", "Mass")), path)
    img = write_png(tmp_path / "cxr.png", picture(64, 64))
    rc, err = _run(capsys, img, "--model", path, "--out", tmp_path / "h.tif", "--all-classes")
    assert rc == 3 and "Pleural_thickening" in _one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["collide.safetensors", "cxr.png"]
    # One class chosen: no collision.
    rc, _ = _run(capsys, img, "--model", path, "--out", tmp_path / "h.tif", "--class", "Mass")
    assert rc == 0
    reserved = tmp_path / "reserved.safetensors"
    save_pylon(_pylon(("Mass", "error", "path")), reserved)
    rc, err = _run(capsys, img, img, "--model", reserved, "--out", tmp_path / "s.csv")
    assert rc == 3 and "fixed column" in _one_line(err) and not (tmp_path / "s.csv").exists()


def test_skip_bad_exits_non_zero_when_every_image_failed(tmp_path, model_path, capsys) -> None:
    ct = write_dicom(tmp_path / "ct.dcm", picture(64, 64), modality="CT")
    colour = tmp_path / "colour.png"
    Image.fromarray(np.dstack([picture(64, 64), picture(64, 64, seed=1), picture(64, 64)])).save(
        colour
    )
    out = tmp_path / "s.csv"
    rc, err = _run(capsys, ct, colour, "--model", model_path, "--out", out, "--skip-bad")
    assert rc == 4 and "none of the 2 images" in _one_line(err)
    rows = list(csv.DictReader(out.open()))
    assert [bool(r["error"]) for r in rows] == [True, True]


def test_short_or_empty_row_of_a_csv_list_is_one_error(tmp_path, model_path, capsys) -> None:
    write_png(tmp_path / "a.png", picture(64, 64))
    for body, what in (("label,path\n1,a.png\n2\n", "no cell"), ('path\na.png\n""\n', "empty")):
        listing = tmp_path / "list.csv"
        listing.write_text(body)
        rc, err = _run(capsys, listing, "--model", model_path, "--out", tmp_path / "s.csv")
        assert rc == 4 and what in _one_line(err) and "line 3" in err
    listing.write_text("\ufeffpath\na.png\n")  # Excel's BOM
    assert expand_inputs([str(listing)]) == [str(tmp_path / "a.png")]


# ======================================================================== images (5, 6, 7, 11, 12)


def _bare_dataset(path: Path, u16: np.ndarray) -> Path:
    """A DICOM dataset without preamble or file meta (implicit VR little endian), as old
    exports and some PACS dumps write them."""
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset

    full = pydicom.dcmread(write_dicom(path.with_suffix(".tmp"), u16))
    bare = pydicom.Dataset()
    for elem in full:
        bare.add(elem)
    with open(path, "wb") as fh:
        fp = DicomFileLike(fh)
        fp.is_little_endian, fp.is_implicit_VR = True, True
        write_dataset(fp, bare)
    path.with_suffix(".tmp").unlink()
    return path


def test_damaged_dicom_header_values_are_one_error(tmp_path, model_path, capsys) -> None:
    u16 = picture(64, 64).astype(np.uint16) * 257
    window0 = write_dicom(tmp_path / "window0.dcm", u16, window=(32768, 0))
    with pytest.raises(InputError, match="Window"):
        read_radiograph(window0)
    frames = write_dicom(tmp_path / "frames.dcm", u16)
    ds = pydicom.dcmread(frames)
    ds.NumberOfFrames = 1
    ds.save_as(frames, enforce_file_format=True)
    tag = b"\x28\x00\x08\x00IS\x02\x001 "
    frames.write_bytes(frames.read_bytes().replace(tag, tag[:-2] + b"1A"))
    with pytest.raises(InputError, match="NumberOfFrames '1A'"):
        read_radiograph(frames)
    good = write_png(tmp_path / "ok.png", picture(64, 64))
    out = tmp_path / "s.csv"
    rc, err = _run(capsys, good, window0, frames, "--model", model_path, "--out", out, "--skip-bad")
    assert rc == 0 and err == ""
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["error"] == "" and "Window" in rows[1]["error"] and "1A" in rows[2]["error"]


def test_nan_pixels_are_refused_not_read_black(tmp_path) -> None:
    u16 = picture(64, 64).astype(np.uint16) * 257
    ds = pydicom.dcmread(write_dicom(tmp_path / "f.dcm", u16))
    values = u16.astype(np.float32) / 65535
    values[3, 5] = np.nan
    del ds.PixelData
    for key in ("BitsStored", "HighBit", "PixelRepresentation"):
        delattr(ds, key)
    ds.BitsAllocated = 32
    ds.FloatPixelData = values.tobytes()
    ds.save_as(tmp_path / "f.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match="1 of its 4096 pixels are NaN"):
        read_radiograph(tmp_path / "f.dcm")


def test_voi_lut_on_float_values_does_not_warn(tmp_path) -> None:
    from pydicom.sequence import Sequence

    path = write_dicom(tmp_path / "lut.dcm", picture(64, 64).astype(np.uint16) * 16, bits_stored=12)
    ds = pydicom.dcmread(path)
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = (np.arange(4096)[::-1] * 16).astype(np.uint16).tobytes()
    item["LUTData"].VR = "OW"
    ds.VOILUTSequence = Sequence([item])
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.save_as(path, enforce_file_format=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = read_radiograph(path).image
    assert image.std() > 0


@pytest.mark.parametrize("modality", ["SEG", "RTDOSE", "US", "SR", "SM", "XC"])
def test_non_radiograph_modalities_are_refused(tmp_path, modality) -> None:
    path = write_dicom(tmp_path / "x.dcm", picture(64, 64), modality=modality)
    with pytest.raises(InputError, match=f"Modality {modality}"):
        read_radiograph(path)


@pytest.mark.parametrize("modality", ["CR", "DX", "RG", "OT", "", "ZZ"])
def test_radiograph_other_and_unknown_modalities_are_read(tmp_path, modality) -> None:
    path = write_dicom(tmp_path / "x.dcm", picture(64, 64), modality=modality)
    assert read_radiograph(path).image.shape == (64, 64)


def test_cmyk_jpeg_reads_as_displayed_not_as_its_negative(tmp_path) -> None:
    u8 = picture(64, 64)
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(np.dstack([u8] * 3)).convert("CMYK").save(path, quality=95)
    shown = np.asarray(Image.open(path).convert("L")).astype(float)
    got = read_radiograph(path).image.astype(float)
    assert np.corrcoef(got.ravel(), shown.ravel())[0, 1] > 0.99


def test_exif_orientation_is_applied(tmp_path, model_path, capsys) -> None:
    wide = picture(40, 80)
    im = Image.fromarray(wide)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "exif6.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    r = read_radiograph(path)
    assert r.image.shape == shown.shape == (80, 40) and r.facts["exif_orientation"] == 6
    np.testing.assert_array_equal(r.image, shown)
    rc, _ = _run(capsys, path, "--model", model_path, "--out", tmp_path / "h.tif")
    report = json.loads((tmp_path / "h.json").read_text())
    assert rc == 0 and (report["width"], report["height"]) == (40, 80)


def test_dicom_without_preamble_and_extensionless_dicoms_in_folders(tmp_path) -> None:
    u16 = picture(64, 64).astype(np.uint16) * 257
    ref = read_radiograph(write_dicom(tmp_path / "ref.dcm", u16)).image
    for name in ("bare.dcm", "bare"):
        r = read_radiograph(_bare_dataset(tmp_path / name, u16))
        np.testing.assert_array_equal(r.image, ref)
    pacs = tmp_path / "pacs"
    pacs.mkdir()
    (pacs / "IM0001").write_bytes((tmp_path / "ref.dcm").read_bytes())
    (pacs / "IM0002").write_bytes((tmp_path / "bare").read_bytes())
    (pacs / "IM0003.dcm").write_bytes((tmp_path / "ref.dcm").read_bytes())
    (pacs / "README").write_text("not an image\n")
    Image.fromarray(picture(8, 8)).save(pacs / "scout.bmp")
    notes: list[str] = []
    found = [Path(p).name for p in expand_inputs([str(pacs)], notes)]
    assert found == ["IM0001", "IM0002", "IM0003.dcm"]
    assert len(notes) == 1 and "scout.bmp" in notes[0]


# =========================================================================== checkpoints (8)


def _tamper(src: Path, dst: Path, **changes: object) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as fh:
        meta = dict(fh.metadata())
        state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    cfg = json.loads(meta["fastinsight.config"])
    cfg.update(changes)
    meta["fastinsight.config"] = json.dumps(cfg)
    save_file(state, str(dst), metadata=meta)
    return dst


def test_invalid_config_values_are_refused_at_load(tmp_path, model_path) -> None:
    yao = tmp_path / "yao.safetensors"
    save_multires(
        MultiResModel(MultiResConfig(num_classes=2, width=4, growth=4, image_size=64)), yao
    )
    bad = [
        (model_path, {"std": 0.0}, "std must be"),
        (model_path, {"mean": float("nan")}, "mean must be"),
        (model_path, {"std": float("inf")}, "std must be"),
        (model_path, {"std": "wide"}, "wrong type"),
        (yao, {"std": -1.0}, "std must be"),
        (yao, {"r0": float("inf")}, "r0 must be finite"),
        (yao, {"prob_eps": 0.7}, "prob_eps"),
    ]
    for k, (src, change, match) in enumerate(bad):
        with pytest.raises(CheckpointError, match=match):
            load_radiograph_model(_tamper(src, tmp_path / f"bad{k}.safetensors", **change), "cpu")


def test_wrapped_and_unprefixed_pylon_state_dicts_load(tmp_path) -> None:
    model = _pylon()
    state = model.state_dict()
    torch.save({"model": state, "epoch": 3}, tmp_path / "wrapped.pth")
    torch.save(model.net.state_dict(), tmp_path / "inner.pth")
    x = torch.rand(1, 1, 256, 256)
    ref = model.eval()(x)
    for name in ("wrapped.pth", "inner.pth"):
        loaded = load_radiograph_model(tmp_path / name, device="cpu")
        torch.testing.assert_close(loaded(x), ref)


def test_radiograph_checkpoint_errors_speak_of_radiograph_models(
    tmp_path, model_path, capsys
) -> None:
    img = write_png(tmp_path / "cxr.png", picture(64, 64))
    rgb = tmp_path / "rgb.pth"
    torch.save(_pylon(in_channels=3).state_dict(), rgb)
    rc, err = _run(capsys, img, "--model", rgb, "--out", tmp_path / "h.tif")
    assert rc == 3 and "rgb.pth" in _one_line(err) and "3 channels" in err
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    for name in ("empty.pth", "other.pth"):
        rc, err = _run(capsys, img, "--model", tmp_path / name, "--out", tmp_path / "h.tif")
        assert rc == 3 and "PYLON" in _one_line(err) and "INSIGHT" not in err
    assert not (tmp_path / "h.tif").exists()


# ================================================================================ evaluate (4)


def _evaluate(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    rc = main(["evaluate-radiographs", *(str(a) for a in args), "--device", "cpu"])
    return rc, capsys.readouterr().err.strip()


def _boxes(path: Path, *rows: tuple[object, ...]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"])
        w.writerows(rows)
    return path


def test_nih_box_labels_missing_images_and_notes(tmp_path, capsys) -> None:
    model = tmp_path / "m.safetensors"
    save_pylon(_pylon(("Infiltration", "Mass")), model)
    images = tmp_path / "images"
    images.mkdir()
    write_png(images / "a.png", picture(64, 64))
    boxes = _boxes(
        tmp_path / "b.csv",
        ("a.png", "Infiltrate", 1, 2, 30, 30),
        ("a.png", "Pneumothorax", 1, 2, 30, 30),
        ("gone.png", "Mass", 1, 2, 3, 4),
    )
    out = tmp_path / "ev"
    rc, err = _evaluate(capsys, images, "--model", model, "--boxes", boxes, "--out", out)
    metrics = json.loads(out.with_suffix(".json").read_text())
    assert rc == 0 and metrics["localisation"]["pairs"] == {"Infiltration": 1}
    skipped = metrics["skipped"]
    assert skipped["missing_images"] == 1 and skipped["unknown_box_labels"] == {"Pneumothorax": 1}
    assert skipped["renamed_labels"] == {"Infiltrate": "Infiltration"}
    assert "gone.png" in err and "'Pneumothorax' (1)" in err and "Traceback" not in err
    # A box beyond the image: the boxes of resized copies of the 1024 px NIH images.
    far = _boxes(tmp_path / "far.csv", ("a.png", "Mass", 50, 50, 30, 30))
    rc, err = _evaluate(capsys, images, "--model", model, "--boxes", far, "--out", tmp_path / "x")
    assert rc == 4 and "line 2" in _one_line(err) and "a.png" in err and "1024" in err
    # --out as a prefix must not overwrite the boxes it reads.
    rc, err = _evaluate(capsys, images, "--model", model, "--boxes", far, "--out", tmp_path / "far")
    assert rc == 6 and "would destroy" in _one_line(err)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (("a.png", "Mass", "nan", 1, 2, 3), "finite"),
        (("a.png", "Mass", 1, 1, "inf", 3), "finite"),
        (("a.png", "Mass", 1, 1, -4, 3), "<= 0"),
        (("a.png", "Mass", 1, 1, 0, 3), "<= 0"),
        (("a.png", "Mass", -1, 1, 4, 3), "negative"),
        (("/etc/a.png", "Mass", 1, 1, 4, 3), "absolute"),
        (("../a.png", "Mass", 1, 1, 4, 3), "'..'"),
    ],
)
def test_bad_boxes_are_refused_naming_the_line(tmp_path, row, match) -> None:
    path = _boxes(tmp_path / "b.csv", ("ok.png", "Mass", 1, 1, 4, 3), row)
    with pytest.raises(InputError, match=match) as info:
        read_bbox_list(path)
    assert "line 3" in str(info.value)


def test_data_entry_short_duplicate_and_bom(tmp_path) -> None:
    path = tmp_path / "de.csv"
    path.write_text("Image Index,Finding Labels,Follow-up #\na.png\nb.png,No Finding,0\n")
    with pytest.raises(InputError, match="line 2"):
        read_data_entry(path)
    path.write_text("Image Index,Finding Labels\na.png,Mass\na.png,No Finding\n")
    with pytest.raises(InputError, match="listed twice"):
        read_data_entry(path)
    path.write_text("\ufeffImage Index,Finding Labels\na.png,Mass|Nodule\nb.png,No Finding\n")
    assert read_data_entry(path) == {"a.png": {"Mass", "Nodule"}, "b.png": set()}
    boxes = _boxes(tmp_path / "b.csv", ("a.png", "Mass", 1, 1, 4, 3))
    boxes.write_bytes(b"\xef\xbb\xbf" + boxes.read_bytes())
    assert list(read_bbox_list(boxes)) == ["a.png"]
