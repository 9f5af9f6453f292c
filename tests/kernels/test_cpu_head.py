"""The CPU head (``insight_head_cpu``: channels-last convolutions) equals the reference.

fp32 against the float64 reference within the parity tolerance, on every grid the models use
(14 x 14 UNI, 16 x 16 patch-14 encoders at 224 px, 37 x 37 CT slices; odd and tiny grids),
both norms, ragged chunks and channels-last input; ``InsightModel`` uses it for CPU inference,
and NaN/inf tokens are still refused (found in the heatmap instead of a second pass).
"""

from __future__ import annotations

import pytest
import torch

from fastinsight.errors import InputError
from fastinsight.ops.reference import insight_head_cpu, insight_head_reference, tokens_as_grid

from .helpers import copy_as, make_model, max_err
from .tolerances import FP32_ATOL

GRIDS = [(14, 14), (16, 16), (37, 37), (5, 7), (1, 1)]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("norm", ["tile", "channel"])
def test_cpu_head_matches_float64(grid, norm) -> None:
    n = 2 if grid == (37, 37) else 5
    model = make_model(24, 3, grid, norm)
    x = torch.randn(n, 24, *grid)
    with torch.no_grad():
        ref64 = insight_head_reference(
            x.double(), copy_as(model, torch.float64, "cpu").head_weights()
        )
        out = insight_head_cpu(x, model.head_weights(), chunk=2)  # ragged: 2 + 2 + 1
    assert out.dtype == torch.float32 and out.shape == ref64.shape
    assert max_err(out, ref64) <= FP32_ATOL


def test_cpu_head_reads_channels_last_tokens() -> None:
    model = make_model(32, 1, (14, 14), "tile")
    x = torch.randn(3, 196, 32)  # the encoder's [N, h*w, C]
    with torch.no_grad():
        a = insight_head_cpu(tokens_as_grid(x, (14, 14)), model.head_weights())
        b = insight_head_reference(tokens_as_grid(x, (14, 14)).contiguous(), model.head_weights())
    assert max_err(a, b) <= FP32_ATOL


def test_model_uses_cpu_head_for_inference_only() -> None:
    model = make_model(16, 2, (14, 14), "tile")
    x = torch.randn(3, 16, 14, 14)
    with torch.no_grad():
        want = insight_head_reference(x, model.head_weights())
        assert max_err(model(x), want) <= FP32_ATOL
    # With autograd on, the reference path runs (it has the backward the training needs).
    out = model(x)
    assert out.requires_grad
    assert torch.equal(out.detach(), want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_predict_refuses_non_finite_tokens(bad) -> None:
    model = make_model(16, 1, (14, 14), "tile")
    x = torch.randn(4, 16, 14, 14)
    x[2, 5, 3, 7] = bad
    with pytest.raises(InputError, match="NaN or inf"):
        model.predict(x)
    model.predict(x.nan_to_num(0.0, 0.0, 0.0))  # the same tokens, finite: fine
