"""ONNX export of the head's options: head only, grid-free norm, every pooling, slide context."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fastinsight.export._onnx_io import graph_io  # noqa: E402
from fastinsight.export.head import HeadExportOptions, export_head_onnx  # noqa: E402
from fastinsight.export.verify import ort_session, verify_head_onnx  # noqa: E402
from tests.support.export_helpers import assert_clean_graph, make_model  # noqa: E402


def test_head_only_with_a_channel_norm_takes_any_grid(tmp_path: Path) -> None:
    model = make_model(norm="channel", num_classes=2)
    out = export_head_onnx(model, tmp_path / "raw.onnx", HeadExportOptions(head_only=True))
    assert_clean_graph(out)
    inputs, outputs = graph_io(out)
    assert inputs[0].dims == ("N", 32, "H", "W")
    assert [s.name for s in outputs] == ["raw_heatmap"]
    verify_head_onnx(out, model, sizes=(1, 7, 64))
    tokens = torch.randn(3, 32, 10, 17, generator=torch.Generator().manual_seed(2))
    (raw,) = ort_session(out).run(None, {"tokens": tokens.numpy()})
    with torch.no_grad():
        want = model(tokens)
    np.testing.assert_allclose(raw, want.numpy(), rtol=0, atol=1e-4)


VARIANTS = [
    pytest.param(
        {"pooling": "lse_lba", "pool_input": "logit"},
        HeadExportOptions(with_mask=True, accum_dtype="float32", histogram="scatter"),
        id="lse_lba-logit-mask-f32stats-scatter",
    ),
    pytest.param({"pooling": "max"}, HeadExportOptions(accum_dtype="float32"), id="max-f32stats"),
    pytest.param(
        {"pooling": "mean", "threshold": "none", "norm": "channel", "context": "slide"},
        HeadExportOptions(with_mask=True),
        id="mean-nothreshold-slidecontext",
    ),
]


@pytest.mark.parametrize("config,options", VARIANTS)
def test_pooling_and_context_variants(
    config: dict[str, object], options: HeadExportOptions, tmp_path: Path
) -> None:
    model = make_model(**config)
    if model.config.pooling == "lse_lba":
        with torch.no_grad():
            model.pooling.beta.copy_(torch.tensor([0.3, -1.0, 2.0]))
    out = export_head_onnx(model, tmp_path / "head.onnx", options)
    ops = assert_clean_graph(out, allow_double=options.accum_dtype == "float64")
    assert ("ScatterElements" in ops) == (options.histogram == "scatter")
    if options.histogram == "matmul":
        # What TensorRT builds without a plugin (float32 stats: no DOUBLE, checked above).
        assert not ops & {"ScatterElements", "ScatterND", "Loop", "If"}, sorted(ops)
    report = verify_head_onnx(out, model, sizes=(1, 7, 64))
    assert report.errors["scores"] <= 1e-4
