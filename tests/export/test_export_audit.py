"""The deployment audit's defects D1-D8 (``fastinsight export onnx | tensorrt | triton-repo``).

- D1: an export never overwrites its own inputs (the model, encoder weights, the ONNX graph, an
  input inside a repository folder that --overwrite replaces): exit 6 before any work.
- D2: the radiograph ONNX graph is checked, with a tolerance, before it is renamed into place:
  a graph that disagrees is exit 7 (ParityError), also from ``write_radiograph_triton_repo``.
- D3: ``export tensorrt`` checks outputs and options before TensorRT is looked for or an engine
  built (a stub TensorRT stands in here), and a plan that fails its check replaces nothing.
- D4: ``triton-repo --plan`` takes only plans with fastinsight's sidecar, that fit the head, and
  never on a CPU-only repository.
- D5: ``--encoder torchscript:PATH`` exports with ``--tile-size``.
- D6: an encoder that does not make the model's tokens (tile, patch, grid, normalisation) is
  refused (ConfigError) before anything is exported.
- D7: a ``triton-repo --out`` that is a symlink is written through.
- D8: bad option values are exit 2 (ConfigError) naming the flag, before any work.
"""

from __future__ import annotations

import hashlib
import os
import sys
import types
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("tritonclient.grpc.model_config_pb2")

from onnx import TensorProto  # noqa: E402

from fastinsight.cli import main  # noqa: E402
from fastinsight.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    InputError,
    OutputError,
    ParityError,
)
from fastinsight.export import radiograph as rg_export  # noqa: E402
from fastinsight.export import tensorrt as trt_export  # noqa: E402
from fastinsight.export import triton as triton_repo  # noqa: E402
from fastinsight.export.encoder import load_encoder  # noqa: E402
from fastinsight.export.head import HeadExportOptions  # noqa: E402
from fastinsight.export.tensorrt import EngineInfo, ProfileShapes, sidecar_path  # noqa: E402
from tests.support.export_helpers import make_model, tiny_graph  # noqa: E402


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.strip()


def _one_error_line(err: str) -> str:
    assert len(err.splitlines()) == 1 and err.startswith("fastinsight: error:"), err
    return err


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    make_model(in_dim=64, num_classes=2).save(str(path))
    return path


def _fake_plan(folder: Path, in_dim: int = 64, k: int = 2, sha: bool = True) -> Path:
    """A plan with the sidecar build_engine writes (no TensorRT here)."""
    plan = folder / "head.plan"
    plan.write_bytes(b"\0stand-in TensorRT plan")
    info = EngineInfo(
        plan=str(plan),
        onnx="head_trt.onnx",
        tensorrt_version="10.x",
        device="test",
        profile=[
            ProfileShapes("tokens", (1, in_dim, 14, 14), (8, in_dim, 14, 14), (64, in_dim, 14, 14))
        ],
        inputs=[{"name": "tokens", "dtype": "FLOAT", "shape": [-1, in_dim, 14, 14]}],
        outputs=[
            {"name": "raw_heatmap", "dtype": "FLOAT", "shape": [-1, k, 14, 14]},
            {"name": "heatmap", "dtype": "FLOAT", "shape": [-1, k, 14, 14]},
            {"name": "thresholds", "dtype": "FLOAT", "shape": [k]},
            {"name": "scores", "dtype": "FLOAT", "shape": [k]},
        ],
        plan_sha256=_sha(plan) if sha else None,
    )
    sidecar_path(plan).write_text(info.to_json())
    return plan


# -- D1: outputs never overwrite inputs ------------------------------------------------------------
def test_onnx_out_may_not_be_the_model(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _sha(ckpt)
    argv = ["export", "onnx", "--model", ckpt, "--out", ckpt, "--no-verify"]
    rc, out, err = _run(argv, capsys)
    assert rc == OutputError.exit_code and "wrote" not in out
    assert "--model" in _one_error_line(err)
    assert _sha(ckpt) == before
    # Through a symlink too (the link's target is what would be replaced).
    link = tmp_path / "link.onnx"
    link.symlink_to(ckpt)
    rc, _, err = _run(["export", "onnx", "--model", ckpt, "--out", link], capsys)
    assert rc == OutputError.exit_code and _sha(ckpt) == before


def test_onnx_out_may_not_be_the_encoder_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"the user's encoder weights")
    argv = ["export", "onnx", "--encoder", "vit-tiny", "--encoder-weights", weights]
    rc, _, err = _run([*argv, "--out", weights], capsys)
    assert rc == OutputError.exit_code and "--encoder-weights" in _one_error_line(err)
    assert weights.read_bytes() == b"the user's encoder weights"


@pytest.mark.parametrize("which", ["--out", "--timing-cache"])
def test_tensorrt_outputs_may_not_be_the_onnx(
    which: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    graph = tiny_graph(tmp_path / "h.onnx", width=14)
    before = _sha(graph)
    argv = ["export", "tensorrt", "--onnx", graph, "--out", tmp_path / "h.plan", which, graph]
    rc, _, err = _run(argv, capsys)
    # Exit 6 before TensorRT is looked for (this machine has none: that would be exit 7).
    assert rc == OutputError.exit_code, err
    assert "--onnx" in _one_error_line(err)
    assert _sha(graph) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.onnx"]


def test_tensorrt_sidecar_may_not_be_the_onnx(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    graph = tiny_graph(tmp_path / "h.plan.json", width=14)
    argv = ["export", "tensorrt", "--onnx", graph, "--out", tmp_path / "h.plan"]
    rc, _, err = _run(argv, capsys)
    assert rc == OutputError.exit_code and "sidecar" in _one_error_line(err)


def test_triton_repo_never_deletes_an_input_inside_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    model = folder / "model.safetensors"
    make_model(in_dim=64, num_classes=2).save(str(model))
    before = _sha(model)
    argv = ["export", "triton-repo", "--model", model, "--out", folder, "--overwrite"]
    rc, out, err = _run([*argv, "--no-verify", "--no-chunked"], capsys)
    assert rc == OutputError.exit_code and "wrote" not in out
    assert "--model" in _one_error_line(err) and "inside" in err
    assert _sha(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_write_triton_repo_refuses_a_plan_inside_out(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    out.mkdir()
    plan = _fake_plan(out)
    with pytest.raises(OutputError, match="--plan"):
        triton_repo.write_triton_repo(
            out, make_model(in_dim=64, num_classes=2), plan=plan, overwrite=True, verify=False
        )
    assert plan.is_file() and sidecar_path(plan).is_file()


# -- D2: radiograph parity, before the rename ------------------------------------------------------
def _tiny_pylon(tmp_path: Path) -> tuple[object, Path]:
    from fastinsight.models.pylon import PylonConfig, PylonModel, save_pylon

    torch.manual_seed(0)
    model = PylonModel(
        PylonConfig(num_classes=1, stem_width=4, layers=(1, 1, 1, 1), dec_channels=4)
    ).eval()
    path = tmp_path / "rg.safetensors"
    save_pylon(model, path)
    return model, path


@pytest.fixture
def disagreeing_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every radiograph graph exported from here on is off PyTorch by 0.5."""
    original = rg_export.RadiographOnnx.forward

    def off(self: object, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, scores = original(self, image)  # type: ignore[arg-type]
        return logits + 0.5, scores * 0 + 0.5

    monkeypatch.setattr(rg_export.RadiographOnnx, "forward", off)


@pytest.mark.slow
def test_radiograph_onnx_that_disagrees_is_exit_7_and_keeps_the_old_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], disagreeing_graph: None
) -> None:
    _, path = _tiny_pylon(tmp_path)
    out = tmp_path / "rg.onnx"
    out.write_bytes(b"the previous, good export")
    rc, stdout, err = _run(["export", "onnx", "--model", path, "--out", out], capsys)
    assert rc == ParityError.exit_code, err
    assert "wrote" not in stdout
    assert "disagree" in _one_error_line(err) and str(out) in err and ".part" not in err
    assert out.read_bytes() == b"the previous, good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rg.onnx", "rg.safetensors"]


@pytest.mark.slow
def test_radiograph_triton_repo_that_disagrees_is_a_parity_error(
    tmp_path: Path, disagreeing_graph: None
) -> None:
    model, _ = _tiny_pylon(tmp_path)
    with pytest.raises(ParityError, match="disagree"):
        triton_repo.write_radiograph_triton_repo(tmp_path / "repo", model)
    assert not (tmp_path / "repo").exists()


# -- D3: export tensorrt, with a stub TensorRT --------------------------------------------------
class _Any:
    """Whatever the build asks of TensorRT: an object that answers everything."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __getattr__(self, name: str) -> _Any:
        return _Any()

    def __call__(self, *args: object, **kwargs: object) -> _Any:
        return _Any()

    def __int__(self) -> int:
        return 0


@pytest.fixture
def stub_tensorrt(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A ``tensorrt`` module and a CUDA device that are not there; returns the build counter."""
    builds: list[int] = []

    class Config(_Any):
        def set_timing_cache(self, cache: object, ignore: bool) -> bool:
            return True

        def get_timing_cache(self) -> object:
            return types.SimpleNamespace(serialize=lambda: b"STUB CACHE")

    class Builder(_Any):
        def build_serialized_network(self, network: object, config: object) -> bytes:
            builds.append(1)
            return b"STUB PLAN"

        def create_builder_config(self) -> Config:
            return Config()

    class Parser(_Any):
        def parse_from_file(self, path: str) -> bool:
            return True

    class Runtime(_Any):
        def deserialize_cuda_engine(self, data: bytes) -> object:
            return types.SimpleNamespace(num_io_tensors=0)

    class Logger(_Any):
        VERBOSE, WARNING = 0, 1

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99-stub"  # type: ignore[attr-defined]
    for name, value in {
        "Logger": Logger,
        "Builder": Builder,
        "OnnxParser": Parser,
        "Runtime": Runtime,
        "NetworkDefinitionCreationFlag": types.SimpleNamespace(STRONGLY_TYPED=1),
        "MemoryPoolType": types.SimpleNamespace(WORKSPACE=0),
        "BuilderFlag": types.SimpleNamespace(TF32=7),
        "TensorIOMode": types.SimpleNamespace(INPUT=0, OUTPUT=1),
        "init_libnvinfer_plugins": lambda *a: True,
    }.items():
        setattr(trt, name, value)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "StubGPU")
    return builds


def _passing_check(*args: object, **kwargs: object) -> trt_export.EngineCheck:
    return trt_export.EngineCheck((1,), {"scores": 0.0}, {"scores": 5e-3})


def test_stub_build_writes_plan_sidecar_and_cache_together(
    tmp_path: Path,
    stub_tensorrt: list[int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(trt_export, "check_engine", _passing_check)
    graph = tiny_graph(tmp_path / "h.onnx", width=14)
    plan, cache = tmp_path / "h.plan", tmp_path / "trt.cache"
    argv = ["export", "tensorrt", "--onnx", graph, "--out", plan, "--timing-cache", cache]
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    assert stub_tensorrt == [1] and f"wrote {plan}" in out and "TensorRT vs onnxruntime" in out
    assert plan.read_bytes() == b"STUB PLAN" and cache.read_bytes() == b"STUB CACHE"
    info = trt_export.read_engine_info(plan)
    assert info is not None and info.plan_sha256 == _sha(plan)
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name]


@pytest.mark.parametrize("where", ["missing-folder", "a-folder", "cache-is-a-folder"])
def test_stub_outputs_are_checked_before_the_build(
    where: str,
    tmp_path: Path,
    stub_tensorrt: list[int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    graph = tiny_graph(tmp_path / "h.onnx", width=14)
    folder = tmp_path / "trt"
    folder.mkdir()
    argv = ["export", "tensorrt", "--onnx", graph]
    if where == "missing-folder":
        argv += ["--out", tmp_path / "nodir" / "h.plan"]
    elif where == "a-folder":
        argv += ["--out", folder]
    else:
        argv += ["--out", tmp_path / "h.plan", "--timing-cache", folder]
    rc, out, err = _run(argv, capsys)
    assert rc == OutputError.exit_code, err
    _one_error_line(err)
    assert stub_tensorrt == [], "the engine was built before the outputs were checked"
    assert "wrote" not in out and not (tmp_path / "h.plan").exists()


def test_stub_failed_engine_check_keeps_the_previous_plan(
    tmp_path: Path,
    stub_tensorrt: list[int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def disagree(*args: object, **kwargs: object) -> None:
        raise ParityError("the TensorRT engine disagrees with onnxruntime on 'scores' (stub)")

    monkeypatch.setattr(trt_export, "check_engine", disagree)
    graph = tiny_graph(tmp_path / "h.onnx", width=14)
    plan, cache = tmp_path / "e.plan", tmp_path / "trt.cache"
    plan.write_bytes(b"OLD PLAN")
    sidecar_path(plan).write_text("OLD SIDECAR")
    cache.write_bytes(b"OLD CACHE")
    argv = ["export", "tensorrt", "--onnx", graph, "--out", plan, "--timing-cache", cache]
    rc, out, err = _run(argv, capsys)
    assert rc == ParityError.exit_code and stub_tensorrt == [1]
    assert "wrote" not in out and "disagrees" in _one_error_line(err)
    assert plan.read_bytes() == b"OLD PLAN"
    assert sidecar_path(plan).read_text() == "OLD SIDECAR"
    assert cache.read_bytes() == b"OLD CACHE"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "e.plan",
        "e.plan.json",
        "h.onnx",
        "trt.cache",
    ]


@pytest.mark.skipif(trt_export.tensorrt_status() is None, reason="TensorRT is installed here")
def test_without_tensorrt_the_users_own_errors_come_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    graph = tiny_graph(tmp_path / "h.onnx", width=14)
    argv = ["export", "tensorrt", "--onnx", graph, "--out", tmp_path / "nodir" / "h.plan"]
    assert _run(argv, capsys)[0] == OutputError.exit_code
    graph64 = tiny_graph(tmp_path / "h64.onnx", cast_to=TensorProto.DOUBLE, width=14)
    rc, _, err = _run(
        ["export", "tensorrt", "--onnx", graph64, "--out", tmp_path / "x.plan"], capsys
    )
    assert rc == InputError.exit_code and "float64" in err


# -- D4: --plan -----------------------------------------------------------------------------------
def test_a_plan_without_its_sidecar_is_refused(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = tmp_path / "bogus.plan"
    bogus.write_text("garbage\n")
    argv = ["export", "triton-repo", "--model", ckpt, "--plan", bogus, "--out", tmp_path / "r"]
    rc, _, err = _run(argv, capsys)
    assert rc == CheckpointError.exit_code and "sidecar" in _one_error_line(err)
    assert not (tmp_path / "r").exists()


def test_a_plan_on_a_cpu_repository_is_refused(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = _fake_plan(tmp_path)
    argv = ["export", "triton-repo", "--model", ckpt, "--plan", plan, "--instance-kind", "cpu"]
    rc, _, err = _run([*argv, "--out", tmp_path / "r"], capsys)
    assert rc == ConfigError.exit_code
    assert "GPU" in _one_error_line(err) and "--instance-kind" in err
    assert not (tmp_path / "r").exists()


def test_a_replaced_or_foreign_plan_is_refused(tmp_path: Path) -> None:
    plan = _fake_plan(tmp_path)
    plan.write_bytes(b"\0another engine")
    with pytest.raises(CheckpointError, match="sha256"):
        triton_repo.read_plan(plan)
    # A plan of another model (C = 64) for a head taking C = 32: refused before any export.
    plan = _fake_plan(tmp_path, in_dim=64)
    with pytest.raises(CheckpointError, match="tokens"):
        triton_repo.write_triton_repo(
            tmp_path / "r", make_model(in_dim=32, num_classes=2), plan=plan
        )
    assert not (tmp_path / "r").exists()


# -- D5: torchscript encoders ---------------------------------------------------------------------
@pytest.mark.slow
def test_a_torchscript_encoder_exports_with_tile_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = torch.jit.script(torch.nn.Conv2d(3, 8, kernel_size=16, stride=16).eval())
    ts = tmp_path / "ts_enc.pt"
    torch.jit.save(module, str(ts))
    out = tmp_path / "ts.onnx"
    argv = ["export", "onnx", "--encoder", f"torchscript:{ts}", "--out", out]
    rc, _, err = _run(argv, capsys)
    assert rc == ConfigError.exit_code and "--tile-size" in err
    rc, stdout, err = _run([*argv, "--tile-size", "32"], capsys)
    assert rc == 0, err
    assert f"wrote {out}" in stdout and "tiles[B,32,32,3]" in stdout
    # The module file is an input: the export may not write over it.
    rc, _, err = _run([*argv[:-1], ts, "--tile-size", "32"], capsys)
    assert rc == OutputError.exit_code
    # triton-repo takes the tile size from the model (trained on 32 px tiles of this module).
    ckpt = tmp_path / "ts_model.safetensors"
    make_model(
        in_dim=8,
        num_classes=1,
        grid_size=(2, 2),
        tile_size_px=32,
        patch_size_px=16,
        encoder="torchscript:ts_enc.pt",
    ).save(str(ckpt))
    argv = ["export", "triton-repo", "--model", ckpt, "--encoder", f"torchscript:{ts}"]
    rc, stdout, err = _run([*argv, "--out", tmp_path / "repo", "--no-chunked"], capsys)
    assert rc == 0, err
    assert "encoder" in stdout and "insight_pipeline" in stdout


# -- D6: the encoder must be the model's ----------------------------------------------------------
def test_an_encoder_of_another_tile_size_is_refused(tmp_path: Path) -> None:
    ct_like = make_model(
        in_dim=64,
        num_classes=1,
        grid_size=(12, 12),
        tile_size_px=96,
        patch_size_px=8,
        norm="channel",
    )
    with pytest.raises(ConfigError, match=r"224 px.*96 px"):
        triton_repo.write_triton_repo(tmp_path / "r", ct_like, load_encoder("vit-tiny"))
    # The same encoder at the model's tile size still has the wrong patch size (16 vs 8).
    with pytest.raises(ConfigError, match=r"16 px.*8 px"):
        triton_repo.check_encoder_fits(ct_like, load_encoder("vit-tiny", tile_size_px=96))
    right = load_encoder("vit-tiny", tile_size_px=96, patch_size_px=8)
    triton_repo.check_encoder_fits(ct_like, right)
    with pytest.raises(ConfigError, match="mean"):
        triton_repo.check_encoder_fits(ct_like, right, ((0.3, 0.3, 0.3), (0.2, 0.2, 0.2)))
    assert not (tmp_path / "r").exists()


def test_a_ct_model_gets_the_encoder_of_its_recipe(tmp_path: Path) -> None:
    import argparse

    from fastinsight.cli import export as cli_export
    from fastinsight.volume.checkpoint import VolumeModelInfo, save_volume_model

    model = make_model(
        in_dim=64,
        num_classes=1,
        grid_size=(12, 12),
        tile_size_px=96,
        patch_size_px=8,
        norm="channel",
    )
    recipe = VolumeModelInfo(
        encoder="vit-tiny",
        encoder_options={"mean": [0.3, 0.3, 0.3], "std": [0.2, 0.2, 0.2], "patch_size_px": 8},
        tile_size=96,
        slices="all",
    )
    path = tmp_path / "ct.safetensors"
    save_volume_model(model, recipe, path)
    args = argparse.Namespace(
        model=str(path), encoder="vit-tiny", encoder_weights=None, tile_size=None
    )
    encoder, norm = cli_export._triton_encoder(args, model)
    assert (encoder.tile_size_px, encoder.patch_size_px, tuple(encoder.grid_size)) == (
        96,
        8,
        (12, 12),
    )
    assert norm == ((0.3, 0.3, 0.3), (0.2, 0.2, 0.2))
    triton_repo.check_encoder_fits(model, encoder, norm)


# -- D7: a symlinked --out ------------------------------------------------------------------------
def test_a_symlinked_out_is_written_through(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "re po 腫瘍"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    link = tmp_path / "linkrepo"
    link.symlink_to(target.name)
    argv = ["export", "triton-repo", "--model", ckpt, "--out", link, "--overwrite"]
    rc, _, err = _run([*argv, "--no-chunked", "--no-verify", "--instance-kind", "cpu"], capsys)
    assert rc == 0, err
    assert link.is_symlink() and os.readlink(link) == target.name
    assert sorted(p.name for p in target.iterdir()) == ["insight_head"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linkrepo", "m.safetensors", target.name]


# -- D8: bad option values are exit 2 -------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,flag",
    [
        (["triton-repo", "--model", "{ckpt}", "--max-batch-size", "0"], "--max-batch-size"),
        (["triton-repo", "--model", "{ckpt}", "--instances", "0"], "--instances"),
        (["triton-repo", "--model", "{ckpt}", "--ensemble-head", "trt"], "--plan"),
        (["triton-repo", "--model", "{ckpt}", "--opset", "12"], "--opset"),
        (["triton-repo", "--model", "{ckpt}", "--tile-size", "224"], "--tile-size"),
        (
            ["triton-repo", "--model", "{ckpt}", "--encoder", "vit-tiny", "--tile-size", "0"],
            "--tile-size",
        ),
        (["onnx", "--model", "{ckpt}", "--opset", "12"], "--opset"),
        (["onnx", "--model", "missing.pth", "--opset", "99"], "--opset"),
        (["onnx", "--encoder", "vit-tiny", "--head-only"], "--head-only"),
        (["onnx", "--encoder", "vit-tiny", "--opset", "12"], "--opset"),
        (["onnx", "--model", "{ckpt}", "--tile-size", "224"], "--tile-size"),
        (["tensorrt", "--onnx", "{graph}", "--min-tiles", "10", "--max-tiles", "5"], "--min-tiles"),
        (["tensorrt", "--onnx", "{graph}", "--workspace", "-1"], "--workspace"),
        (["tensorrt", "--onnx", "{graph}", "--workspace", "nan"], "--workspace"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, list) else v,
)
def test_bad_option_values_are_exit_2(
    argv: list[str],
    flag: str,
    ckpt: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    graph = tiny_graph(tmp_path / "h.onnx", width=14)
    full = ["export", *(a.format(ckpt=ckpt, graph=graph) for a in argv)]
    full += ["--out", str(tmp_path / ("out.plan" if argv[0] == "tensorrt" else "out"))]
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, _, err = _run(full, capsys)
    assert rc == ConfigError.exit_code, err
    assert flag in _one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_fp16_on_a_radiograph_model_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, path = _tiny_pylon(tmp_path)
    argv = ["export", "onnx", "--model", path, "--precision", "fp16", "--out", tmp_path / "x.onnx"]
    rc, _, err = _run(argv, capsys)
    assert rc == ConfigError.exit_code and "--precision fp16" in _one_error_line(err)


def test_option_errors_stay_input_errors_for_the_api() -> None:
    # ExportOptionError is a ConfigError (exit 2) and, as before, an InputError.
    with pytest.raises(ConfigError) as info:
        HeadExportOptions(opset=12)
    assert isinstance(info.value, InputError) and info.value.exit_code == ConfigError.exit_code
    with pytest.raises(ConfigError):
        trt_export.check_tile_range(10, 10, 5)
