"""Issue #16, class 3 for the export paths: NaN/inf weights are never exported.

ONNX, TensorRT and Triton-repository export refuse a model (or an ONNX graph) whose weights hold
NaN or inf, and an fp16 export of weights beyond float16's range, with one ``CheckpointError``
line naming the tensor, before any file or folder is made; a previous output is kept. Export
takes no user-supplied calibration or example inputs (its examples are generated, finite).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from fastinsight.errors import CheckpointError  # noqa: E402
from fastinsight.export._onnx_io import check_onnx_initializers_finite  # noqa: E402
from fastinsight.export.encoder import export_encoder_onnx, load_encoder  # noqa: E402
from fastinsight.export.head import HeadExportOptions, export_head_onnx  # noqa: E402
from fastinsight.export.radiograph import export_radiograph_onnx  # noqa: E402
from fastinsight.export.triton import write_radiograph_triton_repo, write_triton_repo  # noqa: E402
from fastinsight.models.pylon import PylonConfig, PylonModel  # noqa: E402
from tests.hardening.conftest import assert_one_error_line, run_main  # noqa: E402
from tests.support.export_helpers import make_model  # noqa: E402

SMALL = {"in_dim": 8, "num_classes": 1, "reduce_dim": 8, "widths": (8, 4, 4)}


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _poisoned(value: float, key: str = "reduce.weight") -> tuple[torch.nn.Module, str]:
    model = make_model(**SMALL)
    state = model.state_dict()
    name = key if key in state else next(k for k in state if k.endswith("weight"))
    with torch.no_grad():
        state[name].view(-1)[0] = value  # state_dict tensors share the parameters' storage
    return model, name


def _official(path: Path, value: float) -> tuple[Path, str]:
    """An official-layout .pth (plain state_dict) with one weight set to ``value``."""
    model, name = _poisoned(value)
    torch.save(model.state_dict(), path)
    return path, name


# -- ONNX --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_head_export_refuses_non_finite_weights(tmp_path: Path, value: float) -> None:
    model, name = _poisoned(value)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match=rf"weight '{name}' holds 1 non-finite") as info:
        export_head_onnx(model, out / "head.onnx")
    assert "\n" not in str(info.value) and "nothing was exported" in str(info.value)
    assert _listing(out) == []


def test_fp16_export_refuses_weights_beyond_float16(tmp_path: Path) -> None:
    model, name = _poisoned(1.0e6)  # finite in float32, inf in float16
    out = tmp_path / "head.onnx"
    out.write_bytes(b"previous export")
    with pytest.raises(CheckpointError, match=rf"'{name}' holds 1 values beyond float16's range"):
        export_head_onnx(model, out, HeadExportOptions(precision="fp16"))
    assert out.read_bytes() == b"previous export" and _listing(tmp_path) == ["head.onnx"]


def test_cli_export_onnx_of_a_nan_checkpoint_is_one_line(tmp_path: Path, capsys) -> None:
    ckpt, name = _official(tmp_path / "nan.pth", float("nan"))
    proc = run_main(capsys, "export", "onnx", "--model", ckpt, "--out", tmp_path / "h.onnx")
    line = assert_one_error_line(proc, CheckpointError.exit_code)
    assert name in line and "NaN" in line
    assert _listing(tmp_path) == ["nan.pth"]


def test_cli_fp16_overflow_is_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    ckpt, name = _official(tmp_path / "big.pth", 1.0e6)
    argv = ["export", "onnx", "--model", ckpt, "--out", tmp_path / "h.onnx", "--precision", "fp16"]
    line = assert_one_error_line(run_main(capsys, *argv), CheckpointError.exit_code)
    assert name in line and "--precision fp32" in line
    assert _listing(tmp_path) == ["big.pth"]


def test_encoder_export_refuses_non_finite_weights(tmp_path: Path) -> None:
    encoder = load_encoder("resnet-tiny")
    name, param = next(iter(encoder.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match=rf"encoder 'resnet-tiny'.*'{name}' holds 1 non"):
        export_encoder_onnx(encoder, tmp_path / "enc.onnx")
    assert _listing(tmp_path) == []


def test_cli_encoder_weights_with_nan_are_refused(tmp_path: Path, capsys) -> None:
    from fastinsight.encoders import build_encoder

    state = build_encoder("vit-tiny", seed=0).state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim > 1)
    state[key].view(-1)[:2] = float("nan")
    weights = tmp_path / "vit.bin"
    torch.save(state, weights)
    argv = ["export", "onnx", "--encoder", "vit-tiny", "--encoder-weights", weights]
    proc = run_main(capsys, *argv, "--out", tmp_path / "enc.onnx")
    line = assert_one_error_line(proc, CheckpointError.exit_code)
    assert "NaN" in line or "non-finite" in line
    assert _listing(tmp_path) == ["vit.bin"]


def _tiny_pylon() -> PylonModel:
    cfg = PylonConfig(num_classes=1, stem_width=8, layers=(1, 1, 1, 1), dec_channels=8)
    return PylonModel(cfg).eval()


def test_radiograph_export_refuses_a_nan_buffer(tmp_path: Path) -> None:
    model = _tiny_pylon()
    name, buf = next((n, b) for n, b in model.named_buffers() if n.endswith("running_var"))
    buf[0] = float("inf")
    with pytest.raises(CheckpointError, match=rf"pylon model: weight '{name}' holds 1 non"):
        export_radiograph_onnx(model, tmp_path / "p.onnx")
    assert _listing(tmp_path) == []


# -- Triton repositories -----------------------------------------------------------------------
def test_triton_repo_of_a_nan_model_makes_no_folder(tmp_path: Path) -> None:
    model, name = _poisoned(float("nan"))
    with pytest.raises(CheckpointError, match=name):
        write_triton_repo(tmp_path / "repo", model, instance_kind="cpu")
    assert _listing(tmp_path) == []
    with pytest.raises(CheckpointError, match="running_var|weight"):
        pylon = _tiny_pylon()
        next(iter(pylon.parameters())).data.view(-1)[0] = float("nan")
        write_radiograph_triton_repo(tmp_path / "repo", pylon, instance_kind="cpu")
    assert _listing(tmp_path) == []


def test_cli_triton_repo_fp16_overflow_keeps_the_previous_repository(
    tmp_path: Path, capsys
) -> None:
    ckpt, name = _official(tmp_path / "big.pth", 1.0e6)
    repo = tmp_path / "repo"
    (repo / "insight_head").mkdir(parents=True)
    (repo / "insight_head" / "config.pbtxt").write_text("previous")
    argv = ["export", "triton-repo", "--model", ckpt, "--out", repo, "--overwrite"]
    proc = run_main(capsys, *argv, "--precision", "fp16", "--instance-kind", "cpu")
    line = assert_one_error_line(proc, CheckpointError.exit_code)
    assert name in line and "float16" in line
    assert _listing(tmp_path) == ["big.pth", "repo"]
    assert (repo / "insight_head" / "config.pbtxt").read_text() == "previous"


# -- TensorRT: its input is an ONNX graph ------------------------------------------------------
def _graph_with_weight(path: Path, weight: np.ndarray) -> Path:
    """A real one-MatMul ONNX file: x [N, 4] @ W [4, 2]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(weight.astype(np.float32), "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_an_onnx_graph_with_nan_weights_is_refused_before_tensorrt(tmp_path: Path, capsys) -> None:
    w = np.ones((4, 2))
    good = _graph_with_weight(tmp_path / "good.onnx", w)
    check_onnx_initializers_finite(good)  # finite: accepted
    w[1, 1] = np.nan
    bad = _graph_with_weight(tmp_path / "bad.onnx", w)
    with pytest.raises(CheckpointError, match="weight 'W' holds 1 non-finite"):
        check_onnx_initializers_finite(bad)
    # the CLI checks its input before it looks for TensorRT (absent here or not)
    proc = run_main(capsys, "export", "tensorrt", "--onnx", bad, "--out", tmp_path / "b.plan")
    assert "'W' holds 1 non-finite" in assert_one_error_line(proc, CheckpointError.exit_code)
    assert _listing(tmp_path) == ["bad.onnx", "good.onnx"]


def test_a_real_head_graph_passes_the_initializer_check(tmp_path: Path) -> None:
    """The check reads only weights: the graph's +-inf Constants (masked min/max) are fine."""
    path = export_head_onnx(make_model(**SMALL), tmp_path / "head.onnx")
    check_onnx_initializers_finite(path)
