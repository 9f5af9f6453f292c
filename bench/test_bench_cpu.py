"""CPU-side reference benchmarks (pytest-benchmark): the head, Otsu and pooling references.

Not part of the test suite (``testpaths = tests``); run it explicitly:

    pytest bench/test_bench_cpu.py --benchmark-only [--benchmark-json bench/results/cpu.json]

The shapes are the UNI tile (C = 1024, 14 x 14) at a CPU-sized N; GPU timings of the kernels
and the references side by side come from ``bench/bench_kernels.py`` (``do_bench``).
"""

from __future__ import annotations

import pytest
import torch

from fastinsight.config import InsightConfig
from fastinsight.model import InsightModel
from fastinsight.otsu import otsu_threshold
from fastinsight.pooling import lse_lba, smoothmax
from fastinsight.reference import insight_head_reference

pytest.importorskip("pytest_benchmark")

N_TILES = 16
CELLS = 196


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    model = InsightModel(InsightConfig(in_dim=1024, num_classes=3), backend="reference").eval()
    return model.head_weights()


@pytest.fixture(scope="module")
def values() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    m = 4096 * CELLS  # a mid-size slide: 4096 tiles
    return torch.rand(3, m, generator=gen) ** 3, torch.rand(m, generator=gen) > 0.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bench_head_reference(benchmark, weights, dtype) -> None:
    x = torch.randn(N_TILES, 1024, 14, 14, dtype=dtype)
    w = weights if dtype == torch.float32 else _cast(weights, dtype)
    with torch.no_grad():
        out = benchmark(insight_head_reference, x, w)
    assert out.shape == (N_TILES, 3, 14, 14)


def test_bench_otsu_reference(benchmark, values) -> None:
    v, mask = values
    t = benchmark(otsu_threshold, v, mask)
    assert bool(torch.isfinite(t).all())


@pytest.mark.parametrize("method", ["smoothmax", "lse_lba"])
def test_bench_pooling_reference(benchmark, values, method) -> None:
    v, mask = values
    fn = smoothmax if method == "smoothmax" else lse_lba
    p = benchmark(fn, v, mask)
    assert bool(torch.isfinite(p).all())


def _cast(weights, dtype):
    from dataclasses import replace

    def conv(layer):
        return replace(
            layer,
            weight=layer.weight.detach().to(dtype),
            bias=layer.bias.detach().to(dtype),
            norm_weight=None if layer.norm_weight is None else layer.norm_weight.detach().to(dtype),
            norm_bias=None if layer.norm_bias is None else layer.norm_bias.detach().to(dtype),
        )

    return replace(
        weights,
        reduce=conv(weights.reduce),
        detect=tuple(conv(layer) for layer in weights.detect),
        context=tuple(conv(layer) for layer in weights.context),
    )
