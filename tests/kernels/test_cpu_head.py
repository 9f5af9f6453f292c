"""The CPU head (``insight_head_cpu``: channels-last GEMM chain) equals the reference.

fp32 against the float64 reference within the parity tolerance, on every grid the models use
(14 x 14 UNI, 16 x 16 patch-14 encoders at 224 px, 37 x 37 CT slices; odd and tiny grids),
K = 1 and 3, both norms, ragged chunks, NCHW and channels-last input, and the float64 im2col
path; ``InsightModel.predict`` uses it for CPU inference (masks included), and NaN/inf tokens are
still refused (found in the heatmap instead of a second pass).
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
@pytest.mark.parametrize("k", [1, 3], ids=lambda k: f"K={k}")
def test_cpu_head_matches_float64(grid, norm, k) -> None:
    n = 2 if grid == (37, 37) else 5
    model = make_model(24 if grid != (37, 37) else 8, k, grid, norm)
    x = torch.randn(n, model.config.in_dim, *grid)
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


@pytest.mark.parametrize("norm", ["tile", "channel"])
def test_cpu_head_float64_im2col_path(norm) -> None:
    """float64 weights take the addmm-over-im2col path (no oneDNN): equal to the reference."""
    model = copy_as(make_model(16, 3, (14, 14), norm), torch.float64, "cpu")
    x = torch.randn(3, 16, 14, 14, dtype=torch.float64)
    with torch.no_grad():
        out = insight_head_cpu(x, model.head_weights(), chunk=2)
        ref = insight_head_reference(x, model.head_weights())
    assert out.dtype == torch.float64
    assert max_err(out, ref) <= 1e-12


def test_cpu_head_slices_of_a_bigger_batch() -> None:
    """Token chunks that are strided views (a slice of channels-last or NCHW storage) are read
    correctly by both reduce paths."""
    model = make_model(20, 2, (14, 14), "tile")
    base = torch.randn(7, 20, 14, 14)
    with torch.no_grad():
        want = insight_head_reference(base, model.head_weights())
        for x in (base, base.contiguous(memory_format=torch.channels_last)):
            assert max_err(insight_head_cpu(x[2:6], model.head_weights(), chunk=3), want[2:6]) <= (
                FP32_ATOL
            )


def test_predict_runs_the_cpu_head_with_masks(monkeypatch) -> None:
    """``predict`` on the CPU calls ``insight_head_cpu`` (every chunk) and its masked heatmap and
    scores equal the float64 reference pipeline."""
    import fastinsight.models.insight as insight_module

    calls = []
    real = insight_module.insight_head_cpu

    def spy(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(insight_module, "insight_head_cpu", spy)
    model = make_model(32, 3, (14, 14), "tile")
    x = torch.randn(9, 32, 14, 14)
    mask = torch.rand(9, 14, 14, generator=torch.Generator().manual_seed(3)) > 0.3
    pred = model.predict(x, mask, chunk_size=4)
    assert calls == [4, 4, 1]

    model64 = copy_as(model, torch.float64, "cpu")
    with torch.no_grad():
        raw64 = insight_head_reference(x.double(), model64.head_weights())
    heat64, t64, s64 = model64.threshold_and_pool(raw64, mask)
    assert max_err(pred.raw_heatmap, raw64) <= FP32_ATOL
    bin_width = float(raw64.max() - raw64.min()) / model.config.otsu_bins
    assert max_err(pred.thresholds, t64) <= bin_width
    assert max_err(pred.heatmap, heat64) <= FP32_ATOL
    assert max_err(pred.scores, s64) <= FP32_ATOL
    assert bool((pred.heatmap[~mask[:, None].expand_as(pred.heatmap)] == 0).all())


@pytest.mark.parametrize("classes", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpu_head_narrow_layers(layout, classes) -> None:
    """Layers narrower than ``NARROW_COUT`` (every one here): the 3x3 ones and a single-output
    1x1 take the tap-contribution GEMM + gather-sum path, narrow 1x1 layers with several outputs
    stay on oneDNN; equal to the float64 reference, both token layouts."""
    from fastinsight.models.config import InsightConfig
    from fastinsight.models.insight import InsightModel
    from fastinsight.ops.reference import NARROW_COUT

    config = InsightConfig(in_dim=12, num_classes=classes, reduce_dim=8, widths=(8, 4, 8))
    assert max(config.reduce_dim, *config.widths) < NARROW_COUT
    torch.manual_seed(5)
    model = InsightModel(config, backend="reference").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape))
    x = torch.randn(5, 12, 14, 14)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref64 = insight_head_reference(
            x.double(), copy_as(model, torch.float64, "cpu").head_weights()
        )
        out = insight_head_cpu(x, model.head_weights(), chunk=2)
    assert max_err(out, ref64) <= FP32_ATOL
