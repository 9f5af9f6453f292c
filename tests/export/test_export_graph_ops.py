"""The export's threshold and pooling (graph_ops) equal the reference ones, in PyTorch.

These run without any exporter: they pin the arithmetic that the ONNX graph then repeats.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastinsight.ops import graph_ops
from fastinsight.ops.otsu import otsu_threshold as reference_otsu
from fastinsight.ops.pooling import lse_lba, masked_max, masked_mean, smoothmax


def _rows() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(7)
    tiny = np.float32(0.5)
    return {
        "uniform": rng.random((3, 5000)),
        "bimodal": np.concatenate(
            [rng.normal(0.1, 0.02, (2, 4000)), rng.normal(0.8, 0.05, (2, 300))], axis=1
        ),
        "sparse-heatmap": np.where(
            rng.random((2, 8000)) < 0.95, 1e-4 * rng.random((2, 8000)), rng.random((2, 8000))
        ),
        "two-values": np.tile([0.2, 0.7], (2, 50)),
        "constant": np.full((2, 64), 0.25),
        "one-cell": np.array([[0.3]]),
        # A range narrower than a bin's float32 step: edges collapse onto each other.
        "one-ulp-range": np.array([[tiny, np.nextafter(tiny, np.float32(1))] * 20]),
        "grid-of-edges": np.linspace(0, 1, 257)[None],
        "ties": np.round(rng.random((2, 3000)), 2),
        "negative": -rng.exponential(1.0, (2, 3000)),
    }


ROWS = _rows()


@pytest.mark.parametrize("histogram", graph_ops.HISTOGRAMS)
@pytest.mark.parametrize("name", list(ROWS))
def test_otsu_equals_reference_bit_for_bit(name: str, histogram: str) -> None:
    values = torch.from_numpy(np.asarray(ROWS[name], dtype=np.float32))
    got = graph_ops.otsu_threshold(values, None, 256, torch.float64, histogram)
    assert torch.equal(got, reference_otsu(values)), name


@pytest.mark.parametrize("histogram", graph_ops.HISTOGRAMS)
def test_otsu_with_mask_equals_reference(histogram: str) -> None:
    gen = torch.Generator().manual_seed(3)
    values = torch.rand(3, 4000, generator=gen) ** 3
    keep = torch.rand(4000, generator=gen) > 0.4
    keep_f = keep.float().expand(3, -1)
    got = graph_ops.otsu_threshold(values, keep_f, 256, torch.float64, histogram)
    assert torch.equal(got, reference_otsu(values, keep))
    # A row without any kept cell has no threshold.
    none = graph_ops.otsu_threshold(values, torch.zeros_like(keep_f), 256, torch.float64)
    assert bool(torch.isnan(none).all())


@pytest.mark.parametrize("seed", range(12), ids=lambda s: f"seed={s}")
def test_float32_statistics_stay_within_one_bin(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(2, 20_000, generator=gen) ** (1 + seed % 4)
    got = graph_ops.otsu_threshold(values, None, 256, torch.float32)
    want = reference_otsu(values)
    width = (values.amax(1) - values.amin(1)) / 256
    assert bool(((got - want).abs() <= width * 1.0001).all())


def test_histogram_counts_are_exact_with_odd_bin_counts() -> None:
    gen = torch.Generator().manual_seed(0)
    for nbins in (2, 7, 100, 256, 300):
        bins = torch.randint(0, nbins, (2, 5000), generator=gen).float()
        want = torch.stack([torch.bincount(b.long(), minlength=nbins) for b in bins]).float()
        for method in graph_ops.HISTOGRAMS:
            got = graph_ops.histogram_counts(bins, None, nbins, method)
            assert torch.equal(got, want), (nbins, method)


def _masked_cases() -> list[object]:
    gen = torch.Generator().manual_seed(11)
    v = torch.rand(3, 3000, generator=gen)
    keep = torch.rand(3000, generator=gen) > 0.3
    return [
        pytest.param(v, None, id="all-cells"),
        pytest.param(v, keep, id="mask"),
        pytest.param(v, torch.arange(3000) == 17, id="single-cell"),
    ]


@pytest.mark.parametrize("values,mask", _masked_cases())
def test_pooling_equals_reference(values: torch.Tensor, mask: torch.Tensor | None) -> None:
    keep = None if mask is None else mask.float().expand_as(values)
    a = torch.full((3, 1), 8.0)
    torch.testing.assert_close(
        graph_ops.smoothmax(values, keep, a), smoothmax(values, mask, 8.0), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(graph_ops.masked_max(values, keep), masked_max(values, mask))
    torch.testing.assert_close(
        graph_ops.masked_mean(values, keep), masked_mean(values, mask), rtol=0, atol=1e-7
    )
    for r in (1e-4, 0.5, 6.0, 50.0, 1e4):
        r_t = torch.full((3, 1), r)
        torch.testing.assert_close(
            graph_ops.lse_lba(values, keep, r_t), lse_lba(values, mask, r), rtol=0, atol=2e-6
        )


def test_lse_limits_are_the_mean_and_the_max() -> None:
    v = torch.rand(2, 500, generator=torch.Generator().manual_seed(5))
    small = graph_ops.lse_lba(v, None, torch.full((2, 1), 1e-6))
    large = graph_ops.lse_lba(v, None, torch.full((2, 1), 1e6))
    torch.testing.assert_close(small, v.mean(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(large, v.amax(1), rtol=0, atol=1e-4)


def test_expm1_and_log1p_are_accurate_near_zero() -> None:
    x = torch.tensor(
        [-1e-30, -1e-12, -1e-6, -1e-3, -0.5, -30.0, 0.0, 1e-8, 0.3], dtype=torch.float64
    )
    torch.testing.assert_close(graph_ops.expm1(x), torch.expm1(x), rtol=1e-12, atol=0)
    u = torch.tensor([-0.999, -1e-9, -1e-20, 0.0, 1e-7, 2.0], dtype=torch.float64)
    torch.testing.assert_close(graph_ops.log1p(u), torch.log1p(u), rtol=1e-12, atol=0)
    assert graph_ops.expm1(torch.tensor([-math.inf])).item() == -1.0
