"""TensorRT engines. The build and the engine-vs-onnxruntime check need TensorRT and a CUDA GPU
(marked ``tensorrt``, skipped with the reason otherwise); the rest runs anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto  # noqa: E402

from fastinsight.errors import BackendError, InputError  # noqa: E402
from fastinsight.export import tensorrt as trt_export  # noqa: E402
from tests.support.export_helpers import tiny_graph  # noqa: E402

REASON = trt_export.tensorrt_status()
needs_tensorrt = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def test_profile_covers_the_tile_dimension(tmp_path: Path) -> None:
    graph = tiny_graph(tmp_path / "g.onnx")
    (shape,) = trt_export.profile_shapes(graph, 1, 512, 8192, grid_range=(2, 14, 40))
    assert shape.name == "tokens"
    assert shape.min == (1, 4, 14, 2)
    assert shape.opt == (512, 4, 14, 14)
    assert shape.max == (8192, 4, 14, 40)


@pytest.mark.parametrize("tiles", [(0, 1, 2), (4, 2, 8), (1, 9, 8)], ids=str)
def test_bad_tile_ranges_are_refused(tiles: tuple[int, int, int]) -> None:
    with pytest.raises(InputError, match="min <= opt <= max"):
        trt_export.check_tile_range(*tiles)


def test_float64_graphs_are_refused_before_tensorrt_sees_them(tmp_path: Path) -> None:
    graph = tiny_graph(tmp_path / "g64.onnx", cast_to=TensorProto.DOUBLE)
    with pytest.raises(InputError, match="--accum-dtype float32"):
        trt_export._refuse_float64(graph)
    trt_export._refuse_float64(tiny_graph(tmp_path / "g32.onnx"))


def test_engine_info_round_trips(tmp_path: Path) -> None:
    info = trt_export.EngineInfo(
        plan="p.plan",
        onnx="h.onnx",
        tensorrt_version="10.9",
        device="H100",
        profile=[trt_export.ProfileShapes("tokens", (1, 8), (4, 8), (9, 8))],
        inputs=[{"name": "tokens", "dtype": "FLOAT", "shape": [-1, 8]}],
    )
    assert trt_export.EngineInfo.from_json(info.to_json()) == info


@pytest.mark.skipif(REASON is None, reason="TensorRT and a GPU are present here")
def test_without_tensorrt_the_command_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastinsight.cli import main

    graph = tiny_graph(tmp_path / "g.onnx")
    argv = ["export", "tensorrt", "--onnx", str(graph), "--out", str(tmp_path / "g.plan")]
    assert main(argv) == BackendError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fastinsight: error:"), err
    assert "TensorRT" in err or "GPU" in err
    assert not (tmp_path / "g.plan").exists()
    with pytest.raises(BackendError):
        trt_export.build_engine(graph, tmp_path / "g.plan")


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_onnxruntime(tmp_path: Path, precision: str) -> None:
    from fastinsight.export.head import HeadExportOptions, export_head_onnx
    from tests.support.export_helpers import make_model

    model = make_model(num_classes=3)
    options = HeadExportOptions(precision=precision, accum_dtype="float32")
    graph = export_head_onnx(model, tmp_path / "head.onnx", options)
    cache = tmp_path / "timing.cache"
    info = trt_export.build_engine(
        graph, tmp_path / "head.plan", 1, 64, 256, timing_cache=cache, workspace=1 << 30
    )
    assert Path(info.plan).is_file() and cache.is_file()
    assert trt_export.read_engine_info(info.plan) == info
    assert [p.name for p in info.profile] == ["tokens"]
    report = trt_export.check_engine(info.plan, graph, sizes=(1, 7, 64))
    assert set(report.errors) == {"raw_heatmap", "heatmap", "thresholds", "scores"}
    # A second build reuses the timing cache.
    trt_export.build_engine(graph, tmp_path / "again.plan", 1, 64, 256, timing_cache=cache)
