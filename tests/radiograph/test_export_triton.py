"""``fastinsight export onnx | triton-repo`` with radiograph checkpoints: routed to the radiograph
graph (FP32 ``image`` -> ``logits``, ``scores``); configs parsed with Triton's official schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")
pytestmark = pytest.mark.slow  # torch.export of a ResNet takes ~30 s of CPU

from google.protobuf import text_format  # noqa: E402

from fastinsight.cli.main import main  # noqa: E402
from fastinsight.export.triton import check_repo  # noqa: E402
from fastinsight.export.verify import onnx_metadata, ort_session  # noqa: E402
from fastinsight.models.multires import MultiResConfig, MultiResModel, save_multires  # noqa: E402
from fastinsight.models.pylon import PylonConfig, PylonModel, save_pylon  # noqa: E402


def _bn_stats(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)


@pytest.fixture
def pylon_path(tmp_path: Path) -> tuple[Path, PylonModel]:
    torch.manual_seed(0)
    model = PylonModel(
        PylonConfig(
            num_classes=2, stem_width=4, layers=(1, 1, 1, 1), dec_channels=8,
            class_names=("Nodule", "Mass"),
        )
    )  # fmt: skip
    _bn_stats(model)
    save_pylon(model.eval(), tmp_path / "pylon.safetensors")
    return tmp_path / "pylon.safetensors", model


def test_triton_repo_holds_the_pylon_entry(pylon_path, tmp_path: Path) -> None:
    path, model = pylon_path
    repo = tmp_path / "repo"
    rc = main(
        ["export", "triton-repo", "--model", str(path), "--out", str(repo),
         "--max-batch-size", "8", "--instance-kind", "cpu"]
    )  # fmt: skip
    assert rc == 0
    assert sorted(p.name for p in repo.iterdir()) == ["radiograph_pylon"]
    cfg = text_format.Parse(
        (repo / "radiograph_pylon" / "config.pbtxt").read_text(), mc.ModelConfig()
    )
    assert cfg.name == "radiograph_pylon" and cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 8 and cfg.HasField("dynamic_batching")
    (image,) = cfg.input
    assert image.name == "image" and mc.DataType.Name(image.data_type) == "TYPE_FP32"
    assert list(image.dims) == [1, 256, 256]  # full shape [-1, 1, 256, 256]
    outs = {o.name: (mc.DataType.Name(o.data_type), list(o.dims)) for o in cfg.output}
    assert outs == {"logits": ("TYPE_FP32", [2, 64, 64]), "scores": ("TYPE_FP32", [2])}
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.Kind.Value("KIND_CPU")
    assert check_repo(repo) == []
    graph = repo / "radiograph_pylon" / "1" / "model.onnx"
    assert json.loads(onnx_metadata(graph)["fastinsight.class_names"]) == ["Nodule", "Mass"]
    x = torch.randn(3, 1, 256, 256, generator=torch.Generator().manual_seed(1))
    logits, scores = ort_session(graph).run(["logits", "scores"], {"image": x.numpy()})
    ref = model.predict(x)
    np.testing.assert_allclose(logits, ref.logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(scores, ref.scores.numpy(), atol=1e-5)


def test_slide_flags_are_refused_for_a_radiograph_model(pylon_path, tmp_path: Path, capsys) -> None:
    path, _ = pylon_path
    rc = main(
        ["export", "triton-repo", "--model", str(path), "--out", str(tmp_path / "r"),
         "--encoder", "vit-tiny"]
    )  # fmt: skip
    assert rc == 2 and "--encoder" in capsys.readouterr().err  # a flag's misuse: exit 2
    assert not (tmp_path / "r").exists()
    rc = main(
        ["export", "onnx", "--model", str(path), "--out", str(tmp_path / "p.onnx"), "--head-only"]
    )
    assert rc == 2 and "--head-only" in capsys.readouterr().err
    assert not (tmp_path / "p.onnx").exists()


def test_export_onnx_routes_a_multires_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MultiResModel(MultiResConfig(num_classes=3, width=4, growth=4, image_size=128))
    _bn_stats(model)
    save_multires(model.eval(), tmp_path / "mr.safetensors")
    rc = main(
        ["export", "onnx", "--model", str(tmp_path / "mr.safetensors"), "--out",
         str(tmp_path / "mr.onnx")]
    )  # fmt: skip
    assert rc == 0
    meta = onnx_metadata(tmp_path / "mr.onnx")
    assert meta["fastinsight.family"] == "multires"
    out = ort_session(tmp_path / "mr.onnx").run(
        None, {"image": np.zeros((2, 1, 128, 128), np.float32)}
    )
    assert out[1].shape == (2, 3)
