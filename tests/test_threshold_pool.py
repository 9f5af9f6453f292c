"""One threshold + pooling assembly (fastinsight.ops.threshold_pool), its implementation fixed at
construction: the export implementation gives the reference's results, and nothing switches it."""

from __future__ import annotations

import pytest
import torch

from fastinsight.errors import InputError
from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel
from fastinsight.ops.pooling import Pooling
from fastinsight.ops.threshold_pool import (
    IMPL_EXPORT,
    IMPL_REFERENCE,
    POOL_INPUT_LOGIT,
    POOLINGS,
    THRESHOLD_NONE,
    ThresholdAndPool,
    threshold_and_pool,
)


def _values(k: int = 2, m: int = 301) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    values = torch.rand(k, m, generator=g)
    mask = torch.rand(m, generator=g) > 0.3
    return values, mask


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("pool_input", ["heatmap", POOL_INPUT_LOGIT])
@pytest.mark.parametrize("threshold", ["otsu", THRESHOLD_NONE])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_export_implementation_equals_the_reference(
    pooling: str, pool_input: str, threshold: str, masked: bool
) -> None:
    values, mask = _values()
    m = mask if masked else None
    pool = Pooling(pooling, 2)
    kw = {"threshold": threshold, "pool_input": pool_input}
    kept_r, t_r, s_r = threshold_and_pool(values, m, pool, IMPL_REFERENCE, **kw)
    kept_e, t_e, s_e = threshold_and_pool(values, m, pool, IMPL_EXPORT, **kw)
    torch.testing.assert_close(t_e, t_r, rtol=0, atol=1e-6)
    torch.testing.assert_close(kept_e, kept_r, rtol=0, atol=0)
    torch.testing.assert_close(s_e, s_r, rtol=1e-5, atol=1e-6)
    assert bool((kept_r[:, ~mask if masked else slice(None)] >= 0).all())


def test_the_assembly_is_the_documented_maths() -> None:
    values, mask = _values()
    pool = Pooling("smoothmax", 2, smoothmax_a=4.0)
    kept, t, scores = ThresholdAndPool(pool, pool_input=POOL_INPUT_LOGIT)(values, mask)
    assert torch.equal(kept, values * (values > t[:, None]))
    p = kept.clamp(1e-6, 1 - 1e-6)
    x = (p.log() - (-p).log1p())[:, mask]
    expected = torch.sigmoid((torch.softmax(4.0 * x, dim=1) * x).sum(dim=1))
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


def test_implementation_is_fixed_and_checked() -> None:
    tp = ThresholdAndPool(Pooling("max", 1), impl=IMPL_EXPORT)
    assert tp.impl == IMPL_EXPORT
    with pytest.raises(AttributeError):
        tp.impl = IMPL_REFERENCE  # type: ignore[misc]
    with pytest.raises(InputError, match="impl must be one of"):
        ThresholdAndPool(Pooling("max", 1), impl="cuda")
    with pytest.raises(InputError, match="pool_input must be one of"):
        ThresholdAndPool(Pooling("max", 1), pool_input="prob")


def test_model_uses_the_assembly_with_its_current_pooling() -> None:
    model = InsightModel(InsightConfig(in_dim=8, num_classes=2, pooling="lse_lba"), "reference")
    tp = model._threshold_pool()
    assert tp.impl == IMPL_REFERENCE and tp.pooling is model.pooling
    assert not any("threshold_pool" in k for k in model.state_dict())
    values, mask = _values()
    assert torch.equal(model.threshold_and_pool(values.T[:, :, None, None], None)[2],
                       tp(values, None)[2])  # fmt: skip


def test_the_onnx_wrapper_leaves_the_models_backend_alone() -> None:
    pytest.importorskip("onnx")
    from fastinsight.export.head import HeadExportOptions, InsightOnnxHead

    model = InsightModel(InsightConfig(in_dim=8, num_classes=1), backend="auto")
    wrapper = InsightOnnxHead(model, HeadExportOptions())
    assert model.backend == "auto" and wrapper.model.backend == "reference"
    assert wrapper.threshold_pool.impl == IMPL_EXPORT
    assert wrapper.threshold_pool.pooling is wrapper.model.pooling
