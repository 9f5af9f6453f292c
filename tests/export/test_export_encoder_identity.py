"""``triton-repo`` checks the encoder's identity, not only its geometry.

A head trained on one encoder's features (UNI: 1024 x 14 x 14) takes any encoder of the same
geometry and serves wrong outputs. A fastinsight model records its encoder: another one is
refused (exit 2, one line naming both, nothing written) unless ``--allow-encoder-mismatch``;
an official ``.pth`` records none and is accepted on geometry with a one-line note.

The encoder here is a TorchScript patchify convolution (8 x 14 x 14 on 224 px tiles), the case
the geometry check alone cannot tell from UNI. Accepted runs are stopped at the first graph
export (a stub raising an ``OutputError``) so that only the checks are timed; one run goes end
to end.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("tritonclient.grpc.model_config_pb2")

from fastinsight.cli import main  # noqa: E402
from fastinsight.errors import ConfigError, OutputError  # noqa: E402
from fastinsight.export import triton as triton_repo  # noqa: E402
from fastinsight.export.encoder import load_encoder  # noqa: E402
from tests.support.export_helpers import make_model, save_official  # noqa: E402

# torch.jit is deprecated in torch >= 2.9 (and says so on every load).
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

C = 8  # the module's channels; the model's in_dim
REACHED = "stub: the checks passed and the export began"


@pytest.fixture(scope="module")
def module_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``enc.pt``: Conv2d(3, 8, 16, stride 16), [B, 3, 224, 224] -> [B, 8, 14, 14]."""
    path = tmp_path_factory.mktemp("ts") / "enc.pt"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in torch >= 2.9
        torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, C, 16, stride=16).eval()), str(path))
    return path


def _model(tmp_path: Path, encoder: str) -> Path:
    path = tmp_path / "model.safetensors"
    make_model(in_dim=C, num_classes=1, encoder=encoder).save(str(path))
    return path


def _run(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.strip().splitlines()


def _argv(model: Path, module: Path, out: Path, *extra: object) -> list[object]:
    return [
        "export",
        "triton-repo",
        "--model",
        model,
        "--encoder",
        f"torchscript:{module}",
        "--out",
        out,
        "--instance-kind",
        "cpu",
        *extra,
    ]


@pytest.fixture
def stop_at_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """The head's export raises: a run that gets there passed every check before it."""
    import fastinsight.export.head as head_mod

    def stub(*args: object, **kwargs: object) -> Path:
        raise OutputError(REACHED)

    monkeypatch.setattr(head_mod, "export_head_onnx", stub)


# -- the names ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("uni", "UNI"),
        ("uni_v1", "uni"),  # TRIDENT's name
        ("resnet50", "resnet50-trunc"),
        ("timm:Vit_Large_Patch16_224", "timm:vit_large_patch16_224"),
        ("torchscript:/data/models/enc.pt", "torchscript:enc.pt"),
    ],
    ids=["case", "trident-uni", "trident-resnet", "timm-case", "torchscript-folder"],
)
def test_two_spellings_of_one_encoder_match(a: str, b: str) -> None:
    assert triton_repo.encoder_key(a) == triton_repo.encoder_key(b)
    assert triton_repo.check_encoder_identity(a, b) is None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("uni", "vit-tiny"),
        ("uni", "timm:vit_large_patch16_224"),  # same geometry, another network
        ("uni", "torchscript:enc.pt"),
        ("torchscript:a.pt", "torchscript:b.pt"),
    ],
    ids=["registry", "timm", "torchscript", "two-modules"],
)
def test_another_encoder_is_refused_unless_allowed(a: str, b: str) -> None:
    with pytest.raises(ConfigError) as err:
        triton_repo.check_encoder_identity(a, b, model="model 'm'")
    message = str(err.value)
    assert repr(a) in message and repr(b) in message and "--allow-encoder-mismatch" in message
    note = triton_repo.check_encoder_identity(a, b, allow_mismatch=True)
    assert note is not None and "--allow-encoder-mismatch" in note and "\n" not in note


def test_what_a_model_file_records(tmp_path: Path) -> None:
    assert triton_repo.recorded_encoder(_model(tmp_path, "vit-tiny")) == "vit-tiny"
    official = save_official(tmp_path / "official.pth", 1, in_dim=C)
    assert triton_repo.recorded_encoder(official) is None
    note = triton_repo.check_encoder_identity(None, "vit-tiny")
    assert note is not None and "records no encoder" in note and "\n" not in note


# -- the command ----------------------------------------------------------------------------------
def test_a_mismatch_is_refused_before_anything_is_written(
    tmp_path: Path, module_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _model(tmp_path, "uni")  # trained on UNI's features, by its file
    out = tmp_path / "repo"
    rc, stdout, err = _run(_argv(model, module_file, out), capsys)
    assert rc == ConfigError.exit_code
    assert len(err) == 1 and err[0].startswith("fastinsight: error: "), err
    assert "'torchscript:" in err[0] and "('uni'" in err[0]
    assert "--allow-encoder-mismatch" in err[0] and "--encoder uni" in err[0]
    assert stdout == "" and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [model.name]
    # An existing repository stays as it was, also with --overwrite.
    out.mkdir()
    (out / "keep.txt").write_text("old")
    rc, _, err = _run(_argv(model, module_file, out, "--overwrite"), capsys)
    assert rc == ConfigError.exit_code and len(err) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([model.name, "repo"])


def test_the_recorded_encoder_is_accepted(
    tmp_path: Path, module_file: Path, capsys: pytest.CaptureFixture[str], stop_at_export: None
) -> None:
    # Recorded with another folder (trained elsewhere): the same module by its file name.
    model = _model(tmp_path, "torchscript:/elsewhere/enc.pt")
    rc, _, err = _run(_argv(model, module_file, tmp_path / "repo"), capsys)
    assert rc == OutputError.exit_code and err == [f"fastinsight: error: {REACHED}"]
    assert not (tmp_path / "repo").exists()


def test_the_override_accepts_a_mismatch_with_a_note(
    tmp_path: Path, module_file: Path, capsys: pytest.CaptureFixture[str], stop_at_export: None
) -> None:
    model = _model(tmp_path, "uni")
    argv = _argv(model, module_file, tmp_path / "repo", "--allow-encoder-mismatch")
    rc, _, err = _run(argv, capsys)
    assert rc == OutputError.exit_code and len(err) == 2, err
    assert err[0].startswith("fastinsight: note: ") and "--allow-encoder-mismatch" in err[0]
    assert "'uni'" in err[0] and err[1] == f"fastinsight: error: {REACHED}"


def test_an_official_checkpoint_is_accepted_on_geometry_with_a_note(
    tmp_path: Path, module_file: Path, capsys: pytest.CaptureFixture[str], stop_at_export: None
) -> None:
    official = save_official(tmp_path / "official.pth", 1, in_dim=C)
    rc, _, err = _run(_argv(official, module_file, tmp_path / "repo"), capsys)
    assert rc == OutputError.exit_code and len(err) == 2, err
    assert err[0].startswith("fastinsight: note: ") and "records no encoder" in err[0]
    assert err[1] == f"fastinsight: error: {REACHED}"


def test_the_override_needs_an_encoder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _model(tmp_path, "uni")
    argv = ["export", "triton-repo", "--model", model, "--out", tmp_path / "r"]
    rc, _, err = _run([*argv, "--allow-encoder-mismatch"], capsys)
    assert rc == ConfigError.exit_code and len(err) == 1 and "--encoder" in err[0]
    assert not (tmp_path / "r").exists()


def test_the_api_checks_the_recorded_name(tmp_path: Path, stop_at_export: None) -> None:
    model = make_model(in_dim=64, num_classes=1)  # vit-tiny's geometry: 64 x 14 x 14
    encoder = load_encoder("vit-tiny")
    with pytest.raises(ConfigError, match="'vit-tiny' is not the one"):
        triton_repo.write_triton_repo(
            tmp_path / "r", model, encoder, instance_kind="cpu", model_encoder="uni"
        )
    with pytest.raises(OutputError, match=REACHED):
        triton_repo.write_triton_repo(
            tmp_path / "r",
            model,
            encoder,
            instance_kind="cpu",
            model_encoder="uni",
            allow_encoder_mismatch=True,
        )
    with pytest.raises(OutputError, match=REACHED):  # None: not compared (geometry only)
        triton_repo.write_triton_repo(tmp_path / "r", model, encoder, instance_kind="cpu")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_end_to_end_with_the_recorded_torchscript_encoder(
    tmp_path: Path, module_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import onnx

    model = _model(tmp_path, "torchscript:enc.pt")
    out = tmp_path / "repo"
    argv = _argv(model, module_file, out, "--no-chunked", "--no-verify")
    argv += ["--patch-size", "16", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]
    rc, stdout, err = _run(argv, capsys)
    assert rc == 0, err
    assert err == [] and "insight_pipeline" in stdout
    assert triton_repo.check_repo(out) == []
    graph = onnx.load(str(out / "encoder" / "1" / "model.onnx"), load_external_data=False)
    identity = json.loads({p.key: p.value for p in graph.metadata_props}["fastinsight.encoder"])
    assert identity["name"] == "torchscript:enc.pt"
    assert (identity["patch_size_px"], identity["mean"], identity["std"]) == (
        16,
        [0.5] * 3,
        [0.25] * 3,
    )
    assert identity["given_options"] == ["patch_size_px", "mean", "std"]
