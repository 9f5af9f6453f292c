"""Threshold + pooling as one fused op (``kernels.threshold_and_pool``) against the reference
``ThresholdAndPool``: every pooling, both thresholds, both pool inputs, every mask kind, split
independence, the edge cases the fused maximum must get right, and the launch count (3 with
Otsu, 2 without, 2 for a plain pooling)."""

from __future__ import annotations

import pytest
import torch

from fastinsight.ops.pooling import Pooling
from fastinsight.ops.threshold_pool import ThresholdAndPool

from .helpers import DEVICE
from .tolerances import POOL_ATOL, POOL_RTOL, SPLIT_RTOL

METHODS = ["smoothmax", "lse_lba", "max", "mean"]


def make(method: str, threshold: str, pool_input: str, impl: str, k: int = 3) -> ThresholdAndPool:
    pooling = Pooling(method, k, smoothmax_a=8.0)
    if method == "lse_lba":
        with torch.no_grad():
            pooling.beta.copy_(torch.linspace(-1.0, 1.5, k))  # a different r per class
    return ThresholdAndPool(pooling, threshold=threshold, pool_input=pool_input, impl=impl)


def param_of(ref: ThresholdAndPool) -> float | torch.Tensor:
    """The reference module's pooling parameter as the fused op takes it."""
    if ref.pooling.method == "smoothmax":
        return ref.pooling.smoothmax_a
    if ref.pooling.method == "lse_lba":
        return ref.pooling.sharpness.detach()
    return 0.0


def fused(values, mask, method, param, threshold="otsu", pool_input="heatmap", config=None):
    """The fused op on the test device (``config``: through the launcher, to force blocks)."""
    from fastinsight import kernels
    from fastinsight.kernels.reduce import threshold_pool_launch

    values = values.to(DEVICE)
    mask = None if mask is None else mask.to(DEVICE)
    if isinstance(param, torch.Tensor):
        param = param.to(DEVICE)
    with torch.no_grad():
        if config is None:
            out = kernels.threshold_and_pool(
                values, mask, method, param, threshold=threshold, pool_input=pool_input
            )
        else:
            tensor = param if isinstance(param, torch.Tensor) else None
            scalar = 0.0 if tensor is not None else float(param)
            out = threshold_pool_launch(
                values, mask, method, tensor, scalar, threshold == "otsu", 256,
                pool_input == "logit", config,
            )  # fmt: skip
    return tuple(x.cpu() for x in out)


def heatmap(k: int, m: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(k, m, generator=gen) ** 3  # probabilities, mostly small


def masks(kind: str, k: int, m: int) -> torch.Tensor | None:
    gen = torch.Generator().manual_seed(11)
    return {
        "none": None,
        "cells": torch.rand(m, generator=gen) > 0.3,
        "per-class": torch.rand(k, m, generator=gen) > 0.3,
    }[kind]


def assert_matches(got, want) -> None:
    kept, t, scores = got
    want_kept, want_t, want_scores = want
    assert kept.dtype == torch.float32 and kept.shape == want_kept.shape
    torch.testing.assert_close(t, want_t, rtol=0, atol=0)  # the same bins, the same arithmetic
    torch.testing.assert_close(kept, want_kept, rtol=0, atol=0)
    torch.testing.assert_close(scores, want_scores, rtol=POOL_RTOL, atol=POOL_ATOL)


@pytest.mark.parametrize("pool_input", ["heatmap", "logit"])
@pytest.mark.parametrize("threshold", ["otsu", "none"])
@pytest.mark.parametrize("mask_kind", ["none", "cells", "per-class"])
@pytest.mark.parametrize("method", METHODS)
def test_fused_matches_reference(method, mask_kind, threshold, pool_input) -> None:
    from fastinsight.kernels.reduce import ReduceLaunchConfig

    k, m = 3, 5000
    values = heatmap(k, m, seed=2)
    mask = masks(mask_kind, k, m)
    ref = make(method, threshold, pool_input, "reference", k)
    param = param_of(ref)
    with torch.no_grad():
        want = ref(values, mask)
    # Several ragged blocks per class (the last-block finish combines them).
    config = ReduceLaunchConfig(BLOCK_M=256, blocks_per_sm=1, max_blocks=7)
    assert_matches(fused(values, mask, method, param, threshold, pool_input, config), want)


@pytest.mark.parametrize("method", METHODS)
def test_threshold_and_pool_module_uses_the_fused_op(method, monkeypatch) -> None:
    """``ThresholdAndPool(impl="triton")`` runs the fused op once and equals the reference."""
    from fastinsight import kernels

    calls = []
    real = kernels.threshold_and_pool

    def spy(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels.ops, "threshold_and_pool", spy)
    values = heatmap(2, 3000, seed=4).to(DEVICE)
    mask = (torch.rand(3000) > 0.2).to(DEVICE)
    with torch.no_grad():
        got = make(method, "otsu", "heatmap", "triton", 2)(values, mask)
        want = make(method, "otsu", "heatmap", "reference", 2)(values.cpu(), mask.cpu())
    assert calls == [method]
    assert_matches(tuple(x.cpu() for x in got), want)


@pytest.mark.parametrize("method", METHODS)
def test_fused_independent_of_block_size_and_chunking(method) -> None:
    from fastinsight.kernels.reduce import ReduceLaunchConfig

    values = heatmap(2, 9000, seed=6)
    mask = torch.rand(9000) > 0.1
    param = 8.0 if method == "smoothmax" else 3.0
    configs = [
        ReduceLaunchConfig(BLOCK_M=b, max_blocks=nb) for b, nb in ((128, 1), (256, 13), (2048, 4))
    ]
    runs = [fused(values, mask, method, param, config=c) for c in configs]
    for kept, t, scores in runs[1:]:
        assert torch.equal(t, runs[0][1]) and torch.equal(kept, runs[0][0])
        if method == "max":
            assert torch.equal(scores, runs[0][2])
        else:
            torch.testing.assert_close(scores, runs[0][2], rtol=SPLIT_RTOL, atol=0)


@pytest.mark.parametrize("method", ["smoothmax", "lse_lba", "max"])
def test_fused_maximum_of_kept_values(method) -> None:
    """The pooled maximum comes from the statistics and the threshold, not a pass over the kept
    values: values of both signs (t < 0 with threshold 'none' is t = 0; Otsu on signed logits),
    a negative SmoothMax a (a soft minimum), and all-kept / none-kept classes."""
    gen = torch.Generator().manual_seed(8)
    values = torch.randn(4, 3000, generator=gen) * 3.0 - 1.0
    values[2] = values[2].abs() + 5.0  # every value above any threshold: all kept
    values[3] = -values[3].abs() - 0.5  # every value <= 0: nothing kept with threshold "none"
    for threshold in ("otsu", "none"):
        for a in (8.0, -3.0) if method == "smoothmax" else (2.0,):
            ref = ThresholdAndPool(Pooling(method, 4, smoothmax_a=a), threshold=threshold)
            if method == "lse_lba":
                ref.pooling.beta.data.fill_(0.3)
            param = param_of(ref)
            with torch.no_grad():
                want = ref(values, None)
            assert_matches(fused(values, None, method, param, threshold), want)


@pytest.mark.parametrize("method", METHODS)
def test_fused_flat_class_and_empty_class(method) -> None:
    """A class whose values are all equal (Otsu returns the value; nothing is kept) and a class
    without any tissue cell (NaN threshold and score, -inf for max: no host sync to raise)."""
    values = heatmap(3, 600, seed=9)
    values[0] = 0.25
    mask = torch.ones(3, 600, dtype=torch.bool)
    mask[1] = False
    ref = ThresholdAndPool(Pooling(method, 2, smoothmax_a=8.0, lse_r0=1.0))  # LSE r = 2
    param = param_of(ref)
    kept, t, scores = fused(values, mask, method, param[0] if method == "lse_lba" else param)
    keep = [0, 2]
    with torch.no_grad():
        want_t = ref.threshold(values[keep], mask[keep])
    assert t[0].item() == 0.25 and torch.equal(t[keep], want_t)
    assert torch.isnan(t[1])
    assert torch.equal(kept[0], torch.zeros(600))
    if method == "max":
        assert scores[1].item() == float("-inf")
    else:
        assert torch.isnan(scores[1])
    assert torch.isfinite(scores[keep]).all()


@pytest.mark.parametrize(("threshold", "want"), [("otsu", 3), ("none", 2)], ids=["otsu", "none"])
def test_fused_launch_count(threshold, want, monkeypatch) -> None:
    """Three kernel launches with Otsu, two without, two for a plain pooling; nothing else."""
    from fastinsight.kernels import reduce

    launches: list[str] = []

    class Counted:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.fn[grid]

    for name in dir(reduce):
        if name.endswith("_kernel"):
            monkeypatch.setattr(reduce, name, Counted(name, getattr(reduce, name)))
    values, mask = heatmap(2, 3000, seed=1), torch.rand(3000) > 0.4
    fused(values, mask, "smoothmax", 8.0, threshold)
    assert len(launches) == want and launches[-1] == "_threshold_pool_kernel"
    launches.clear()
    with torch.no_grad():
        reduce.pool_launch(values.to(DEVICE), mask.to(DEVICE), "lse_lba", None, 4.0)
    assert launches == ["_masked_stats_kernel", "_threshold_pool_kernel"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fused_takes_16bit_values_as_their_fp32_values(dtype) -> None:
    """16-bit heatmaps are read as the fp32 values they hold (the kept heatmap is fp32)."""
    values = heatmap(2, 2000, seed=12).to(dtype)
    mask = torch.rand(2000) > 0.25
    got = fused(values, mask, "smoothmax", 8.0)
    want = fused(values.float(), mask, "smoothmax", 8.0)
    assert got[0].dtype == torch.float32
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
