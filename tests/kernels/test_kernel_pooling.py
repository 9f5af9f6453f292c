"""The pooling kernels against ``fastinsight.ops.pooling``: masks, limits, split independence."""

from __future__ import annotations

import pytest
import torch

from fastinsight import pooling
from fastinsight.errors import InputError

from .helpers import DEVICE
from .tolerances import POOL_ATOL, POOL_RTOL, SPLIT_RTOL

METHODS = ["smoothmax", "lse_lba", "max", "mean"]
PARAMS = {"smoothmax": 8.0, "lse_lba": 6.0}


def kernel_pool(method: str, values, mask=None, param=None, config=None):
    from fastinsight import kernels
    from fastinsight.kernels.reduce import pool_launch

    values = values.to(DEVICE)
    mask = None if mask is None else mask.to(DEVICE)
    if isinstance(param, torch.Tensor):
        param = param.to(DEVICE)
    if config is not None:
        tensor = param if isinstance(param, torch.Tensor) else None
        scalar = 0.0 if param is None or tensor is not None else float(param)
        return pool_launch(values, mask, method, tensor, scalar, config).cpu()
    fn = {
        "smoothmax": kernels.smoothmax,
        "lse_lba": kernels.lse_lba,
        "max": kernels.masked_max,
        "mean": kernels.masked_mean,
    }[method]
    return (fn(values, mask) if param is None else fn(values, mask, param)).cpu()


def reference_pool(method: str, values, mask=None, param=None):
    fn = {
        "smoothmax": pooling.smoothmax,
        "lse_lba": pooling.lse_lba,
        "max": pooling.masked_max,
        "mean": pooling.masked_mean,
    }[method]
    return fn(values, mask) if param is None else fn(values, mask, param)


def heatmap_values(k: int, m: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    v = torch.rand(k, m, generator=gen) ** 4  # mostly small, a few hot cells
    return v * (v > 0.2)  # thresholded: zeros stay in (official smoothmax)


@pytest.mark.parametrize("mask_kind", ["none", "cells", "per-class"])
@pytest.mark.parametrize("method", METHODS)
def test_pool_matches_reference(method: str, mask_kind: str) -> None:
    k, m = 3, 4000
    values = heatmap_values(k, m, seed=3)
    mask = {"none": None, "cells": torch.rand(m) > 0.3, "per-class": torch.rand(k, m) > 0.3}[
        mask_kind
    ]
    param = PARAMS.get(method)
    got = kernel_pool(method, values, mask, param)
    want = reference_pool(method, values, mask, param)
    torch.testing.assert_close(got, want, rtol=POOL_RTOL, atol=POOL_ATOL)


@pytest.mark.parametrize("method", ["smoothmax", "lse_lba"])
def test_pool_per_class_parameter(method: str) -> None:
    values = heatmap_values(3, 2000, seed=4) * 6 - 3  # logits-like range
    param = torch.tensor([0.5, 5.0, 40.0])
    got = kernel_pool(method, values, None, param)
    want = reference_pool(method, values, None, param)
    torch.testing.assert_close(got, want, rtol=POOL_RTOL, atol=POOL_ATOL)


@pytest.mark.parametrize("method", ["smoothmax", "lse_lba"])
def test_pool_sharpness_limits(method: str) -> None:
    """r (or a) -> 0 is the mean, r -> large is the max; the kernels hit both limits."""
    values = heatmap_values(2, 3000, seed=5)
    mask = torch.rand(3000) > 0.5
    mean = pooling.masked_mean(values, mask)
    mx = pooling.masked_max(values, mask)
    soft = kernel_pool(method, values, mask, 1e-6)
    sharp = kernel_pool(method, values, mask, 1e4)
    torch.testing.assert_close(soft, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sharp, mx, rtol=0, atol=1e-3)
    assert bool((sharp <= mx + 1e-7).all())


@pytest.mark.parametrize("method", METHODS)
def test_pool_single_cell_and_empty_class(method: str) -> None:
    values = torch.rand(3, 500)
    mask = torch.zeros(3, 500, dtype=torch.bool)
    mask[0, 123] = True  # one tissue cell: every pooling returns it
    mask[2] = True
    param = PARAMS.get(method)
    got = kernel_pool(method, values, mask, param)
    assert got[0].item() == pytest.approx(values[0, 123].item(), rel=1e-6)
    keep = [0, 2]
    want = reference_pool(method, values[keep], mask[keep], param)
    torch.testing.assert_close(got[keep], want, rtol=POOL_RTOL, atol=POOL_ATOL)
    # A class without tissue: the reference raises (a host sync); the kernels cannot without one
    # and return NaN (-inf for max), as the float maths gives. The model rejects an empty mask
    # before pooling.
    with pytest.raises(InputError):
        reference_pool(method, values, mask, param)
    if method == "max":
        assert got[1].item() == float("-inf")
    else:
        assert torch.isnan(got[1])


@pytest.mark.parametrize("method", METHODS)
def test_pool_independent_of_block_size_and_chunking(method: str) -> None:
    from fastinsight.kernels.reduce import ReduceLaunchConfig

    values = heatmap_values(2, 9000, seed=6)
    mask = torch.rand(9000) > 0.1
    param = PARAMS.get(method)
    configs = [
        ReduceLaunchConfig(BLOCK_M=b, max_blocks=nb) for b, nb in ((128, 1), (256, 13), (2048, 4))
    ]
    runs = [kernel_pool(method, values, mask, param, config=c) for c in configs]
    # The slide chunked in another order: only the grouping of the fp64 sums changes.
    perm = torch.randperm(9000)
    runs.append(kernel_pool(method, values[:, perm], mask[perm], param, config=configs[1]))
    for r in runs[1:]:
        if method == "max":
            assert torch.equal(r, runs[0])
        else:
            torch.testing.assert_close(r, runs[0], rtol=SPLIT_RTOL, atol=0)


def test_pool_logit_inputs_do_not_overflow() -> None:
    """Pooling logits (pool_input='logit') with a large sharpness stays finite."""
    values = (torch.rand(2, 3000) - 0.5) * 28  # logit(1e-6) ~ -13.8
    for method, param in (("smoothmax", 8.0), ("lse_lba", 50.0)):
        got = kernel_pool(method, values, None, param)
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(
            got, reference_pool(method, values, None, param), rtol=POOL_RTOL, atol=POOL_ATOL
        )
