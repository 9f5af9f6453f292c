"""``fastinsight predict`` on slides: the encoder must be the one the model records, and a
``torchscript:PATH`` encoder takes ``--patch-size``, ``--mean`` and ``--std``.

A head trained on one encoder's features takes any encoder with the same token geometry and
gives wrong heatmaps, so another encoder's name is refused (exit 2, one line naming both, before
any encoder weights are read and before anything is written) unless ``--allow-encoder-mismatch``;
``predict_slide`` makes the same check for embedders (``allow_encoder_mismatch=True``). An
official ``.pth`` records no encoder and is accepted on its tokens, as before.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from fastinsight import InsightConfig, InsightModel
from fastinsight.cli import main
from fastinsight.encoders import build_encoder
from fastinsight.errors import ConfigError
from fastinsight.predict.slide import PredictOptions, predict_slide
from fastinsight.synthetic import make_cohort
from tests.support.export_helpers import save_official

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load, torch >= 2.9

C = 8  # the scripted encoder's channels: Conv2d(3, 8, 16, stride 16), 224 px -> 8 x 14 x 14


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic slide of 5 x 5 tiles at 0.5 um/px."""
    return make_cohort(tmp_path_factory.mktemp("cohort"), n_slides=2, size_px=(1120, 1120))[1].path


@pytest.fixture(scope="module")
def module_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ts") / "enc.pt"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in torch >= 2.9
        torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, C, 16, stride=16).eval()), str(path))
    return path


def _model(tmp_path: Path, encoder: str, in_dim: int = 64) -> Path:
    path = tmp_path / "model.safetensors"
    torch.manual_seed(0)
    cfg = InsightConfig(in_dim=in_dim, num_classes=1, encoder=encoder)
    InsightModel(cfg, backend="reference").save(str(path))
    return path


def _run(
    capsys: pytest.CaptureFixture[str], slide: Path, model: Path, out: Path, *extra: object
) -> tuple[int, list[str]]:
    argv = ["predict", slide, "--model", model, "--out", out, "--tissue", "all", "--device", "cpu"]
    rc = main([str(a) for a in [*argv, "--num-workers", "0", *extra]])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def no_encoder_build(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every encoder the run would build (none may be, once a check refused it)."""
    import fastinsight.encoders as encoders

    built: list[str] = []

    def stub(name: str, *args: object, **kwargs: object) -> None:
        built.append(name)
        raise AssertionError(f"encoder {name!r} built after a refusal")

    monkeypatch.setattr(encoders, "build_encoder", stub)
    return built


# -- the encoder's name --------------------------------------------------------------------------
def test_another_encoder_is_refused_before_anything_is_built_or_written(
    tmp_path: Path, slide: Path, capsys: pytest.CaptureFixture[str], no_encoder_build: list[str]
) -> None:
    model = _model(tmp_path, "uni")
    out = tmp_path / "h.tif"
    rc, err = _run(capsys, slide, model, out, "--encoder", "vit-tiny")
    assert rc == ConfigError.exit_code == 2
    assert len(err) == 1 and err[0].startswith("fastinsight: error: "), err
    assert "'vit-tiny'" in err[0] and "('uni'" in err[0] and "--allow-encoder-mismatch" in err[0]
    assert not out.exists() and no_encoder_build == []
    # An earlier heatmap stays as it was.
    out.write_bytes(b"old heatmap")
    rc, err = _run(capsys, slide, model, out, "--encoder", "vit-tiny", "--report", tmp_path / "r")
    assert rc == 2 and len(err) == 1
    assert out.read_bytes() == b"old heatmap"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.tif", "model.safetensors"]


def test_the_override_runs_with_a_one_line_note(
    tmp_path: Path, slide: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _model(tmp_path, "uni")  # vit-tiny's geometry (64 x 14 x 14), another name
    out = tmp_path / "h.tif"
    rc, err = _run(capsys, slide, model, out, "--encoder", "vit-tiny", "--allow-encoder-mismatch")
    assert rc == 0, err
    assert len(err) == 1 and err[0].startswith("fastinsight: note: "), err
    assert "'vit-tiny' is not 'uni'" in err[0] and "--allow-encoder-mismatch" in err[0]
    assert out.is_file()


def test_the_recorded_encoder_under_another_spelling_is_accepted(
    tmp_path: Path, slide: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _model(tmp_path, "VIT_tiny")
    out = tmp_path / "h.tif"
    rc, err = _run(capsys, slide, model, out, "--encoder", "vit-tiny", "--report", tmp_path / "r")
    assert rc == 0 and err == [], err
    assert json.loads((tmp_path / "r").read_text())["encoder"]["name"] == "vit-tiny"


def test_an_official_checkpoint_records_no_encoder_and_is_accepted(
    tmp_path: Path, slide: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    official = save_official(tmp_path / "official.pth", 1, in_dim=64)
    out = tmp_path / "h.tif"
    rc, err = _run(capsys, slide, official, out, "--encoder", "vit-tiny")
    assert rc == 0, err
    # The note it always had (its tokens are assumed to be UNI's), nothing more.
    assert len(err) == 1 and "official INSIGHT checkpoint" in err[0], err
    assert out.is_file()


def test_the_override_needs_an_encoder(
    tmp_path: Path, slide: Path, capsys: pytest.CaptureFixture[str], no_encoder_build: list[str]
) -> None:
    model = _model(tmp_path, "vit-tiny")
    rc, err = _run(capsys, slide, model, tmp_path / "h.tif", "--allow-encoder-mismatch")
    assert rc == 2 and len(err) == 1 and "--encoder" in err[0], err
    assert not (tmp_path / "h.tif").exists()


def test_predict_slide_checks_the_name_before_the_slide_is_opened(slide: Path) -> None:
    encoder = build_encoder("vit-tiny")
    model = InsightModel(InsightConfig(in_dim=64, encoder="uni"), backend="reference")
    opts = PredictOptions(tissue="all", progress=False, num_workers=0, device="cpu")
    # A slide that does not exist: the ConfigError comes first.
    with pytest.raises(ConfigError, match="'vit-tiny' is not the one model 'm.safetensors'"):
        predict_slide(
            slide.with_name("missing.svs"), model, encoder, opts, {"name": "m.safetensors"}
        )
    result = predict_slide(slide, model, encoder, opts, allow_encoder_mismatch=True)
    assert result.encoder_info["name"] == "vit-tiny" and result.n_tiles == 25


# -- the torchscript flags -----------------------------------------------------------------------
TS_FLAGS = ["--patch-size", "16", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]


@pytest.mark.parametrize("named", [True, False], ids=["--encoder", "the-model's"])
def test_torchscript_flags_end_to_end(
    tmp_path: Path,
    slide: Path,
    module_file: Path,
    capsys: pytest.CaptureFixture[str],
    named: bool,
) -> None:
    # Recorded with its path (without --encoder the run builds the model's own encoder).
    model = _model(tmp_path, f"torchscript:{module_file}", in_dim=C)
    out, report = tmp_path / "h.tif", tmp_path / "r.json"
    extra = ["--encoder", f"torchscript:{module_file}"] if named else []
    rc, err = _run(capsys, slide, model, out, *extra, *TS_FLAGS, "--report", report)
    assert rc == 0 and err == [], err
    identity = json.loads(report.read_text())["encoder"]
    assert identity["name"] == "torchscript:enc.pt"
    assert (identity["patch_size_px"], identity["mean"], identity["std"]) == (
        16,
        [0.5] * 3,
        [0.25] * 3,
    )
    assert identity["given_options"] == ["patch_size_px", "mean", "std"]
    assert out.is_file()


@pytest.mark.parametrize(
    ("recorded", "extra", "words"),
    [
        ("vit-tiny", ["--encoder", "vit-tiny", "--patch-size", "16"], "--patch-size applies to"),
        ("vit-tiny", ["--mean", "0", "0", "0"], "this run has encoder 'vit-tiny'"),
        ("torchscript:x.pt", ["--encoder", "torchscript:x.pt", "--patch-size", "5"], "divide"),
        ("torchscript:x.pt", ["--encoder", "torchscript:x.pt", "--std", "1", "0", "1"], "> 0"),
    ],
    ids=["named-encoder", "model-encoder", "patch-5", "std-0"],
)
def test_torchscript_flags_refused_before_any_weights(
    tmp_path: Path,
    slide: Path,
    capsys: pytest.CaptureFixture[str],
    no_encoder_build: list[str],
    recorded: str,
    extra: list[str],
    words: str,
) -> None:
    rc, err = _run(capsys, slide, _model(tmp_path, recorded), tmp_path / "h.tif", *extra)
    assert rc == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "h.tif").exists() and no_encoder_build == []


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--patch-size", "224"], "--patch-size-l0"),  # what --patch-size meant before
        (["--mean", "0", "0", "0"], "--mean: options of the patch encoder"),
        (["--allow-encoder-mismatch"], "--features run encodes nothing"),
    ],
    ids=["patch-size", "mean", "allow-mismatch"],
)
def test_encoder_flags_refused_on_a_features_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], words: str
) -> None:
    model = _model(tmp_path, "vit-tiny")
    h5 = tmp_path / "f.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n")  # never read: the flags are refused first
    argv = ["predict", "--features", h5, "--model", model, "--out", tmp_path / "h.tif", *extra]
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "h.tif").exists()
