"""ONNX export of the INSIGHT head: checkpoints in both formats, K = 1 and 3, fp32 and fp16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fastinsight.cli import main  # noqa: E402
from fastinsight.errors import InputError  # noqa: E402
from fastinsight.export._onnx_io import graph_io  # noqa: E402
from fastinsight.export.head import HeadExportOptions, export_head_onnx  # noqa: E402
from fastinsight.export.verify import ort_session, verify_head_onnx  # noqa: E402
from fastinsight.models.checkpoints import load_model  # noqa: E402
from tests.support.export_helpers import assert_clean_graph, make_model  # noqa: E402


def _run(
    path: Path, tokens: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, np.ndarray]:
    session = ort_session(path)
    feeds = {"tokens": tokens.numpy()}
    if mask is not None:
        feeds["mask"] = mask.numpy()
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def _assert_matches_predict(
    outs: dict[str, np.ndarray],
    model: torch.nn.Module,
    tokens: torch.Tensor,
    mask: torch.Tensor | None,
) -> None:
    """Against the public PyTorch API, end to end (fp32: 1e-4; same Otsu bin)."""
    pred = model.predict(tokens, mask)
    np.testing.assert_allclose(outs["raw_heatmap"], pred.raw_heatmap.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(outs["scores"], pred.scores.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(outs["thresholds"], pred.thresholds.numpy(), rtol=0, atol=1e-5)
    # Fed the graph's own raw heatmap, the reference threshold is the graph's, bit for bit.
    _, t_same, _ = model.threshold_and_pool(torch.from_numpy(outs["raw_heatmap"]), mask)
    assert np.array_equal(outs["thresholds"], t_same.numpy())


@pytest.mark.parametrize("official_checkpoint", [1, 3], indirect=True, ids=["K=1", "K=3"])
def test_official_checkpoint_through_the_cli(
    official_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "head.onnx"
    assert main(["export", "onnx", "--model", str(official_checkpoint), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Otsu exact: yes" in printed and "N=1,7,64" in printed, printed
    assert_clean_graph(out)
    model = load_model(official_checkpoint, backend="reference", device="cpu")
    k = model.config.num_classes
    inputs, outputs = graph_io(out)
    assert [(s.name, s.dims, s.type_name) for s in inputs] == [
        ("tokens", ("N", 1024, 14, 14), "FLOAT")
    ]
    assert [(s.name, s.dims) for s in outputs] == [
        ("raw_heatmap", ("N", k, 14, 14)),
        ("heatmap", ("N", k, 14, 14)),
        ("thresholds", (k,)),
        ("scores", (k,)),
    ]
    tokens = torch.randn(5, 1024, 14, 14, generator=torch.Generator().manual_seed(9))
    _assert_matches_predict(_run(out, tokens), model, tokens, None)
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_fastinsight_checkpoint_with_a_tissue_mask(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.safetensors"
    make_model(num_classes=3, class_names=("a", "b", "c")).save(str(ckpt))
    model = load_model(ckpt, backend="reference", device="cpu")
    options = HeadExportOptions(with_mask=True)
    out = export_head_onnx(model, tmp_path / "head.onnx", options)
    assert_clean_graph(out)
    report = verify_head_onnx(out, model, sizes=(1, 7, 64))
    assert report.thresholds_exact
    inputs, _ = graph_io(out)
    assert [(s.name, s.dims, s.type_name) for s in inputs][1] == ("mask", ("N", 14, 14), "BOOL")
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randn(6, 32, 14, 14, generator=gen)
    mask = torch.rand(6, 14, 14, generator=gen) > 0.5
    outs = _run(out, tokens, mask)
    _assert_matches_predict(outs, model, tokens, mask)
    assert not outs["heatmap"][~mask.numpy()[:, None].repeat(3, 1)].any()


def test_fp16_weights_and_io(tmp_path: Path) -> None:
    ckpt = tmp_path / "k1.safetensors"
    make_model(num_classes=1).save(str(ckpt))
    model = load_model(ckpt, backend="reference", device="cpu")
    out = export_head_onnx(model, tmp_path / "head16.onnx", HeadExportOptions(precision="fp16"))
    assert_clean_graph(out)
    inputs, outputs = graph_io(out)
    assert {s.name: s.type_name for s in [*inputs, *outputs]} == {
        "tokens": "FLOAT16",
        "raw_heatmap": "FLOAT16",
        "heatmap": "FLOAT16",
        "thresholds": "FLOAT",
        "scores": "FLOAT",
    }
    import onnx

    weights = {i.name: i.data_type for i in onnx.load(str(out)).graph.initializer}
    conv_w = [t for n, t in weights.items() if n.endswith(".weight")]
    assert conv_w and all(t == onnx.TensorProto.FLOAT16 for t in conv_w)
    # PyTorch's fp16 on CPU (the error yardstick) is slow: N = 16 instead of 64.
    report = verify_head_onnx(out, model, sizes=(1, 7, 16))
    assert report.precision == "fp16"
    # Twice PyTorch's own fp16 error plus a floor, never a guessed tolerance.
    assert report.tolerances["raw_heatmap"] < 1e-2


def test_slide_context_needs_the_mask_input() -> None:
    model = make_model(norm="channel", context="slide")
    with pytest.raises(InputError, match="--with-mask"):
        export_head_onnx(model, "unused.onnx", HeadExportOptions())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"precision": "bf16"},
        {"accum_dtype": "float16"},
        {"histogram": "sort"},
        {"opset": 11},
        {"head_only": True, "postprocess_only": True},
    ],
    ids=["precision", "accum", "histogram", "opset", "two-stages"],
)
def test_bad_options_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(InputError):
        HeadExportOptions(**kwargs)  # type: ignore[arg-type]
