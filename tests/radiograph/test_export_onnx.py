"""ONNX export of both radiograph models, checked in onnxruntime against PyTorch."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow  # torch.export of a ResNet takes ~30 s of CPU

from fastinsight.export.radiograph import export_radiograph_onnx, verify_radiograph_onnx  # noqa: E402
from fastinsight.export.verify import onnx_metadata, ort_session  # noqa: E402
from fastinsight.models.multires import MultiResConfig, MultiResModel  # noqa: E402
from fastinsight.models.pylon import PylonConfig, PylonModel  # noqa: E402


def _bn_stats(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)


def test_pylon_onnx_parity_and_dynamic_batch(tmp_path) -> None:
    model = PylonModel(
        PylonConfig(
            num_classes=2,
            stem_width=8,
            layers=(1, 1, 1, 1),
            dec_channels=8,
            up_type="2layer",
            class_names=("Nodule", "Mass"),
        )
    )
    _bn_stats(model)
    path = export_radiograph_onnx(model.eval(), tmp_path / "pylon.onnx")
    diff = verify_radiograph_onnx(model, path, batch=3)
    assert diff["logits"] < 1e-4 and diff["scores"] < 1e-5
    meta = onnx_metadata(path)
    assert meta["fastinsight.family"] == "pylon"
    assert json.loads(meta["fastinsight.class_names"]) == ["Nodule", "Mass"]
    out = ort_session(path).run(None, {"image": torch.zeros(1, 1, 256, 256).numpy()})
    assert out[0].shape == (1, 2, 64, 64) and out[1].shape == (1, 2)


def test_multires_onnx_parity(tmp_path) -> None:
    model = MultiResModel(MultiResConfig(num_classes=3, width=4, growth=4, image_size=128))
    _bn_stats(model)
    with torch.no_grad():
        model.beta.copy_(torch.tensor([-1.0, 0.0, 1.5]))
    path = export_radiograph_onnx(model.eval(), tmp_path / "multires.onnx")
    diff = verify_radiograph_onnx(model, path, batch=2)
    assert diff["logits"] < 1e-4 and diff["scores"] < 1e-5
