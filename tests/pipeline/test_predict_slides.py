"""`fastinsight predict` end to end on every real test slide, and every bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
import torch

from fastinsight.cli import main
from fastinsight.slide import decode_scores, read_scores_sidecar
from fastinsight.slide.heatmap_tiff import HeatmapGeometry


def _predict(*argv: str) -> int:
    return main(["predict", *map(str, argv), "--quiet", "--num-workers", "1"])


def _check_heatmap(tif: Path, sidecar: Path, score: float) -> None:
    """Reopen the viewer TIFF with OpenSlide: levels, mpp, extent, and values vs the sidecar."""
    side = read_scores_sidecar(sidecar)
    grid = side.grid
    geo = HeatmapGeometry.from_grid(grid)
    with openslide.OpenSlide(str(tif)) as hm:
        assert hm.level_count >= 1
        assert hm.dimensions == (geo.hm_width, geo.hm_height)
        for k in range(1, hm.level_count):
            w0, h0 = hm.level_dimensions[k - 1]
            assert hm.level_dimensions[k] == (-(-w0 // 2), -(-h0 // 2))
        mpp_x = float(hm.properties["openslide.mpp-x"])
        mpp_y = float(hm.properties["openslide.mpp-y"])
        assert (mpp_x, mpp_y) == pytest.approx(geo.hm_mpp_xy, rel=1e-6)  # each axis its own
        # The heatmap covers the slide's physical extent (to within one heatmap pixel).
        slide_x, slide_y = grid.mpp_xy
        assert abs(hm.dimensions[0] * mpp_x - grid.slide_width * slide_x) <= mpp_x
        assert abs(hm.dimensions[1] * mpp_y - grid.slide_height * slide_y) <= mpp_y
        codes = np.asarray(hm.read_region((0, 0), 0, hm.dimensions))[..., 0]
    decoded = decode_scores(codes)
    cells = geo.cells_to_pixels(side.scores[0])
    tissue = np.isfinite(cells)
    assert np.array_equal(np.isfinite(decoded), tissue)  # 0 = non-tissue, distinct from score 0
    np.testing.assert_allclose(decoded[tissue], cells[tissue], atol=0.5 / 254 + 1e-6)
    # SmoothMax of the decoded cells gives back the slide score (up to the 8-bit quantisation).
    vals = torch.from_numpy(side.scores[0][side.mask].astype(np.float32))[None]
    from fastinsight.ops.pooling import smoothmax

    assert smoothmax(vals, None, 8.0).item() == pytest.approx(score, abs=1e-5)


def _score(report: Path, name: str = "tumour") -> float:
    import json

    return json.loads(report.read_text())["scores"][name]


def test_aperio_jpeg_end_to_end(slides_dir, tiny_model_path, tmp_path) -> None:
    out = tmp_path / "cmu.tif"
    rc = _predict(
        slides_dir / "CMU-1-Small-Region.svs",
        "--model",
        tiny_model_path,
        "--out",
        out,
        "--overlay",
        tmp_path / "o.png",
        "--geojson",
        tmp_path / "g.geojson",
        "--report",
        tmp_path / "r.json",
        "--scores",
        tmp_path / "s.npz",
    )
    assert rc == 0
    _check_heatmap(out, tmp_path / "s.npz", _score(tmp_path / "r.json"))
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["slide"]["mpp"] == pytest.approx(0.499)
    assert report["encoder"]["name"] == "vit-tiny"
    assert report["tiles"]["processed"] > 0 and report["tiles_per_s"] > 0
    assert set(report["timings_s"]) >= {
        "read",
        "encoder",
        "head",
        "threshold_pool",
        "write",
        "total",
    }
    geo = json.loads((tmp_path / "g.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and geo["features"]
    assert "score" in geo["features"][0]["properties"]["measurements"]


def test_jpeg2000_without_mpp_fails_then_works_with_mpp(
    slides_dir, tiny_model_path, tmp_path, capsys
) -> None:
    slide = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    out = tmp_path / "tcga.tif"
    assert _predict(slide, "--model", tiny_model_path, "--out", out) == 5
    assert "has no mpp" in capsys.readouterr().err and "--mpp" in capsys.readouterr().err + "--mpp"
    assert not out.exists()
    rc = _predict(
        slide,
        "--model",
        tiny_model_path,
        "--out",
        out,
        "--mpp",
        "0.5",
        "--scores",
        tmp_path / "s.npz",
        "--report",
        tmp_path / "r.json",
    )
    assert rc == 0
    _check_heatmap(out, tmp_path / "s.npz", _score(tmp_path / "r.json"))


def test_ndpi_fluorescence(slides_dir, tiny_model_path, tmp_path, capsys) -> None:
    slide = slides_dir / "test3-DAPI-2-387.ndpi"
    out = tmp_path / "ndpi.tif"
    assert _predict(slide, "--model", tiny_model_path, "--out", out) == 5
    assert "--tissue fluorescence" in capsys.readouterr().err
    assert not out.exists()
    rc = _predict(
        slide,
        "--model",
        tiny_model_path,
        "--out",
        out,
        "--tissue",
        "fluorescence",
        "--scores",
        tmp_path / "s.npz",
        "--report",
        tmp_path / "r.json",
    )
    assert rc == 0
    _check_heatmap(out, tmp_path / "s.npz", _score(tmp_path / "r.json"))


def test_ome_tiff_through_tifffile(slides_dir, tiny_model_path, tmp_path) -> None:
    out = tmp_path / "ome.tif"
    rc = _predict(
        slides_dir / "OS-1-detail.ome.tif",
        "--model",
        tiny_model_path,
        "--out",
        out,
        "--scores",
        tmp_path / "s.npz",
        "--report",
        tmp_path / "r.json",
        "--all-classes",
    )
    assert rc == 0
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["slide"]["vendor"] == "ome-tiff" and report["slide"]["mpp"] == pytest.approx(
        0.2271, abs=1e-4
    )
    paths = [tmp_path / "ome.tumour.tif", tmp_path / "ome.necrosis.tif"]
    assert all(p.exists() for p in paths)
    _check_heatmap(paths[0], tmp_path / "s.npz", _score(tmp_path / "r.json"))


def test_reader_flag_picks_the_backend_and_the_answer_does_not_change(
    slides_dir, tiny_model_path, tmp_path
) -> None:
    """``--reader`` reaches the slide layer; the direct reader and OpenSlide give the same answer
    on the same pixels, and the report says which reader served the run."""
    import json

    scores = {}
    for reader in ("direct", "openslide"):
        report = tmp_path / f"{reader}.json"
        rc = _predict(
            slides_dir / "CMU-1-Small-Region.svs",
            "--model",
            tiny_model_path,
            "--out",
            tmp_path / f"{reader}.tif",
            "--report",
            report,
            "--reader",
            reader,
        )
        assert rc == 0
        data = json.loads(report.read_text())
        assert reader in json.dumps(data["slide"]["reading"])
        scores[reader] = data["scores"]["tumour"]
    assert scores["direct"] == pytest.approx(scores["openslide"], abs=1e-4)


def test_device_decode_gives_the_cpu_answer(slides_dir, tiny_model_path, tmp_path) -> None:
    """``--decode device`` (the CPU reads JPEG bytes only; decode, assembly and resampling run on
    the device: nvJPEG on CUDA, torchvision's decoder here) gives the CPU tiler's answer, up to
    its bilinear-vs-Lanczos resampling; a slide it cannot serve is one clear error."""
    import json

    scores = {}
    for decode in ("cpu", "device"):
        report = tmp_path / f"{decode}.json"
        rc = _predict(
            slides_dir / "CMU-1-Small-Region.svs",
            "--model",
            tiny_model_path,
            "--out",
            tmp_path / f"{decode}.tif",
            "--report",
            report,
            "--decode",
            decode,
        )
        assert rc == 0
        scores[decode] = json.loads(report.read_text())["scores"]["tumour"]
    assert scores["device"] == pytest.approx(scores["cpu"], abs=2e-3)
    code, line = _bad(
        tmp_path,
        slides_dir / "CMU-1-Small-Region.svs",
        tiny_model_path,
        "--decode",
        "device",
        "--reader",
        "openslide",
    )
    assert code == 4 and "direct reader" in line


# ----------------------------------------------------------------------------------- bad input
def _bad(tmp_path: Path, slide: Path, model: Path, *extra: str) -> tuple[int, str]:
    out = tmp_path / "never.tif"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastinsight.cli",
            "predict",
            str(slide),
            "--model",
            str(model),
            "--out",
            str(out),
            "--quiet",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert not out.exists(), "a failed run left an output file"
    assert not list(tmp_path.glob(".never.tif*")), "a failed run left a temp file"
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("fastinsight: error:")]
    assert len(lines) == 1, proc.stderr
    return proc.returncode, lines[0]


def test_bad_slides(slides_dir, tiny_model_path, tmp_path) -> None:
    rc, msg = _bad(tmp_path, tmp_path / "nope.svs", tiny_model_path)
    assert rc == 5 and "nope.svs" in msg
    text = tmp_path / "notes.svs"
    text.write_text("not a slide at all\n")
    rc, msg = _bad(tmp_path, text, tiny_model_path)
    assert rc == 5 and "notes.svs" in msg
    good = slides_dir / "CMU-1-Small-Region.svs"
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 5])
    rc, msg = _bad(tmp_path, truncated, tiny_model_path)
    assert rc == 5 and "truncated.svs" in msg


def test_no_tissue_and_unwritable_output(slides_dir, tiny_model_path, tmp_path) -> None:
    from PIL import Image

    blank = tmp_path / "blank.tif"
    from fastinsight.slide.pyramid import write_pyramid_tiff

    write_pyramid_tiff(blank, np.full((600, 600, 3), 245, np.uint8), mpp=0.5, compression="jpeg")
    rc, msg = _bad(tmp_path, blank, tiny_model_path)
    assert rc == 5 and "no tissue" in msg
    del Image
    good = slides_dir / "CMU-1-Small-Region.svs"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastinsight.cli",
            "predict",
            str(good),
            "--model",
            str(tiny_model_path),
            "--out",
            str(tmp_path / "missing-dir" / "h.tif"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 6 and "does not exist" in proc.stderr


def test_model_encoder_mismatch_and_foreign_encoder_weights(slides_dir, tmp_path) -> None:
    from fastinsight import InsightConfig, InsightModel

    wrong = tmp_path / "wrong.safetensors"
    InsightModel(InsightConfig(in_dim=1024, encoder="vit-tiny"), backend="reference").save(
        str(wrong)
    )
    rc, msg = _bad(tmp_path, slides_dir / "CMU-1-Small-Region.svs", wrong)
    assert rc == 4 and "1024" in msg and "64" in msg
    uni = tmp_path / "uni.safetensors"
    InsightModel(InsightConfig(in_dim=1024, encoder="uni"), backend="reference").save(str(uni))
    rc, msg = _bad(tmp_path, slides_dir / "CMU-1-Small-Region.svs", uni)
    assert "--encoder-weights" in msg
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, foreign)
    rc, msg = _bad(
        tmp_path, slides_dir / "CMU-1-Small-Region.svs", uni, "--encoder-weights", str(foreign)
    )
    assert rc == 3 and "resnet.pth" in msg


def test_no_model_is_a_clear_error(slides_dir, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("FASTINSIGHT_MODEL", raising=False)
    assert (
        main(
            [
                "predict",
                str(slides_dir / "CMU-1-Small-Region.svs"),
                "--out",
                str(tmp_path / "h.tif"),
            ]
        )
        == 3
    )
    assert "FASTINSIGHT_MODEL" in capsys.readouterr().err


def test_model_from_environment(slides_dir, tiny_model_path, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FASTINSIGHT_MODEL", str(tiny_model_path))
    src = slides_dir / "CMU-1-Small-Region.svs"
    local = tmp_path / "copy.svs"
    shutil.copy(src, local)
    assert main(["predict", str(local), "--out", str(tmp_path / "h.tif"), "--quiet"]) == 0
    assert (tmp_path / "h.tif").exists()


def test_outputs_never_overwrite_inputs_and_flags_are_checked_first(
    slides_dir, tiny_model_path, tmp_path, capsys
) -> None:
    slide = tmp_path / "self.svs"
    shutil.copy(slides_dir / "CMU-1-Small-Region.svs", slide)
    before = slide.read_bytes()
    cases = [
        (["--out", str(tmp_path / "h.tif"), "--overlay", str(slide)], 6, "would destroy"),
        (["--out", str(tmp_path / "h.tif"), "--report", str(tiny_model_path)], 6, "would destroy"),
        (
            ["--out", str(tmp_path / "h.tif"), "--scores", str(tmp_path / "h.tif")],
            6,
            "would destroy",
        ),
        (["--out", "/proc/fastinsight-x.tif"], 6, "cannot create files"),
        (["--out", "/dev/null"], 6, "not a regular file"),
        # A flag's value (docs/exit-codes.md): exit 2, before any work.
        (["--out", str(tmp_path / "h.png")], 2, "must end in .tif"),
        (["--out", str(tmp_path / "h.tif"), "--device", "foo"], 2, "not a device"),
        (["--out", str(tmp_path / "h.tif"), "--min-cell-tissue", "-3"], 2, "fraction"),
        (["--out", str(tmp_path / "h.tif"), "--class", "tumour", "--all-classes"], 2, "exclude"),
        (["--out", str(tmp_path / "h.tif"), "--class", "nosuch"], 2, "is not a class"),
        (["--out", str(tmp_path / "h.tif"), "--class", "-1"], 2, "is not a class"),
        (["--out", str(tmp_path / "h.tif"), "--series", "1.2.3"], 2, "--series: not used"),
        (["--out", str(tmp_path / "h.tif"), "--patch-size-l0", "224"], 2, "not used"),
    ]
    for extra, code, text in cases:
        assert _predict(slide, "--model", tiny_model_path, *extra) == code, extra
        assert text in capsys.readouterr().err, extra
    assert slide.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["self.svs"]


# ---------------------------------------------------------------------------- DICOM whole slides
def _svs_as_dicom_wsi(slides_dir: Path, folder: Path, *, jpeg: bool) -> tuple[list[Path], float]:
    from tests.support.dicom_wsi import write_dicom_wsi

    with openslide.OpenSlide(str(slides_dir / "CMU-1-Small-Region.svs")) as s:
        rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
        mpp = float(s.properties["openslide.mpp-x"])
    return write_dicom_wsi(folder, rgb, mpp=mpp, downsamples=(1,), jpeg=jpeg), mpp


def test_dicom_wsi_folder_or_file_predicts_like_the_slide(
    slides_dir, tiny_model_path, tmp_path
) -> None:
    """The real SVS written as a DICOM WSI (uncompressed, so the same pixels): its folder and its
    file both go to the slide pipeline (not the CT one) and give the SVS's answer and geometry."""
    import json

    files, mpp = _svs_as_dicom_wsi(slides_dir, tmp_path / "wsi", jpeg=False)
    scores = {}
    for name, slide in (
        ("svs", slides_dir / "CMU-1-Small-Region.svs"),
        ("folder", tmp_path / "wsi"),
        ("file", files[0]),
    ):
        report = tmp_path / f"{name}.json"
        rc = _predict(slide, "--model", tiny_model_path, "--out", tmp_path / f"{name}.tif",
                      "--report", report, "--scores", tmp_path / f"{name}.npz")  # fmt: skip
        assert rc == 0, name
        data = json.loads(report.read_text())
        scores[name] = data["scores"]["tumour"]
        _check_heatmap(tmp_path / f"{name}.tif", tmp_path / f"{name}.npz", scores[name])
        assert read_scores_sidecar(tmp_path / f"{name}.npz").grid.slide_mpp == pytest.approx(mpp)
    assert scores["folder"] == pytest.approx(scores["svs"], abs=1e-5)
    assert scores["file"] == scores["folder"]


def test_dicom_wsi_jpeg_pyramid_reads_through_openslide(slides_dir, tmp_path) -> None:
    from fastinsight.slide import open_slide

    files, mpp = _svs_as_dicom_wsi(slides_dir, tmp_path / "wsi", jpeg=True)
    with (
        open_slide(files[0]) as r,
        openslide.OpenSlide(str(slides_dir / "CMU-1-Small-Region.svs")) as s,
    ):
        assert r.backend == "openslide" and r.dimensions == s.dimensions
        assert r.file_mpp == pytest.approx((mpp, mpp))
        got = r.read_region(500, 700, 0, 256, 256).astype(int)
        want = np.asarray(s.read_region((500, 700), 0, (256, 256)).convert("RGB")).astype(int)
        assert np.abs(got - want).mean() < 4  # JPEG re-encoded at quality 95


def test_dicom_folder_problems_are_one_line(slides_dir, tiny_model_path, tmp_path) -> None:
    from tests.support.dicom_wsi import write_dicom_wsi

    rgb = np.full((300, 300, 3), 200, np.uint8)
    write_dicom_wsi(tmp_path / "two" / "a", rgb, downsamples=(1,))
    write_dicom_wsi(tmp_path / "two" / "b", rgb, downsamples=(1,))
    code, line = _bad(tmp_path, tmp_path / "two", tiny_model_path)
    assert code != 0 and "2 DICOM whole-slide images" in line
    (tmp_path / "empty").mkdir()
    code, line = _bad(tmp_path, tmp_path / "empty", tiny_model_path)
    assert code != 0 and "folder" in line


def test_a_name_with_a_newline_keeps_its_summary_on_one_line(
    slides_dir, tiny_model_path, tmp_path, capsys
) -> None:
    local = tmp_path / "a\nb.svs"
    shutil.copy(slides_dir / "CMU-1-Small-Region.svs", local)
    capsys.readouterr()
    assert main(["predict", str(local), "-m", str(tiny_model_path), "--out",
                 str(tmp_path / "h.tif"), "--quiet"]) == 0  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("a\\nb: "), out
