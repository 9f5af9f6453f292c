"""ONNX export of the patch encoders: uint8 tiles in (normalisation in the graph), tokens out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
encoders = pytest.importorskip("fastinsight.encoders")
if not hasattr(encoders, "build_encoder"):
    pytest.skip("fastinsight.encoders.build_encoder is not available", allow_module_level=True)

from fastinsight.cli import main  # noqa: E402
from fastinsight.errors import InputError  # noqa: E402
from fastinsight.export._onnx_io import graph_io  # noqa: E402
from fastinsight.export.encoder import export_encoder_onnx, load_encoder  # noqa: E402
from fastinsight.export.verify import ort_session, verify_encoder_onnx  # noqa: E402
from tests.support.export_helpers import assert_clean_graph  # noqa: E402


def test_vit_tiny_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "vit.onnx"
    assert main(["export", "onnx", "--encoder", "vit-tiny", "--out", str(out)]) == 0
    assert "encoder vit-tiny fp32" in capsys.readouterr().out
    assert_clean_graph(out)
    inputs, outputs = graph_io(out)
    assert [(s.name, s.dims, s.type_name) for s in inputs] == [
        ("tiles", ("B", 224, 224, 3), "UINT8")
    ]
    assert [(s.name, s.dims, s.type_name) for s in outputs] == [
        ("tokens", ("B", 64, 14, 14), "FLOAT")
    ]
    encoder = load_encoder("vit-tiny")
    tiles = torch.randint(0, 256, (5, 224, 224, 3), dtype=torch.uint8)
    (tokens,) = ort_session(out).run(None, {"tiles": tiles.numpy()})
    want = encoder.encode(tiles)
    np.testing.assert_allclose(tokens, want.numpy(), rtol=0, atol=1e-4)


def test_resnet_tiny_fp16(tmp_path: Path) -> None:
    encoder = load_encoder("resnet-tiny")
    out = export_encoder_onnx(encoder, tmp_path / "resnet16.onnx", precision="fp16")
    assert_clean_graph(out)
    _, outputs = graph_io(out)
    assert outputs[0].type_name == "FLOAT16" and outputs[0].dims == ("B", 128, 14, 14)
    report = verify_encoder_onnx(out, encoder, sizes=(1, 3))
    assert report.tolerances["tokens"] < 0.1


def test_a_module_without_the_encoder_contract_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="tile_size_px"):
        export_encoder_onnx(torch.nn.Conv2d(3, 8, 16, 16), tmp_path / "x.onnx")
