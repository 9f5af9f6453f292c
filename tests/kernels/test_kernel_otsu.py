"""The Otsu kernel against the reference (and scikit-image): identical up to one histogram bin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinsight.ops.otsu import otsu_threshold as otsu_reference

from .helpers import DEVICE

skimage_filters = pytest.importorskip("skimage.filters")


def bimodal(k: int, m: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    low = 0.15 + 0.05 * torch.randn(k, m, generator=gen)
    high = 0.75 + 0.1 * torch.randn(k, m, generator=gen)
    pick = torch.rand(k, m, generator=gen) < 0.3
    return torch.where(pick, high, low).clamp(0, 1)


def bin_width(values: torch.Tensor, mask: torch.Tensor | None, nbins: int) -> torch.Tensor:
    keep = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.expand_as(values)
    hi = torch.where(keep, values, -torch.inf).amax(1)
    lo = torch.where(keep, values, torch.inf).amin(1)
    return (hi - lo) / nbins


def check(values: torch.Tensor, mask: torch.Tensor | None, nbins: int = 256, **kw) -> torch.Tensor:
    from fastinsight.kernels import otsu_threshold

    got = otsu_threshold(values.to(DEVICE), None if mask is None else mask.to(DEVICE), nbins)
    want = otsu_reference(values, mask, nbins)
    assert got.dtype == torch.float32 and got.shape == want.shape
    diff = (got.cpu() - want).abs()
    assert bool((diff <= bin_width(values.float(), mask, nbins) * 1.0001).all()), (got, want)
    return got.cpu()


MASKS = ["none", "cells", "per-class"]


@pytest.mark.parametrize("mask_kind", MASKS)
def test_otsu_matches_reference_and_skimage(mask_kind: str) -> None:
    k, m = 3, 3000
    values = bimodal(k, m, seed=1)
    mask = {
        "none": None,
        "cells": torch.rand(m) > 0.4,
        "per-class": torch.rand(k, m) > 0.4,
    }[mask_kind]
    got = check(values, mask)
    for c in range(k):
        keep = np.ones(m, bool) if mask is None else mask.expand(k, m)[c].numpy()
        sk = skimage_filters.threshold_otsu(values[c].numpy()[keep])
        assert abs(got[c].item() - sk) <= bin_width(values[c : c + 1], None, 256).item()


@pytest.mark.parametrize("nbins", [2, 64, 100, 256])
def test_otsu_bins(nbins: int) -> None:
    check(bimodal(2, 1000, seed=nbins), None, nbins)


def test_otsu_values_on_bin_edges_and_ties() -> None:
    """Values exactly on numpy's edges (the nudge rule) and few distinct values (ties)."""
    edges = torch.linspace(0, 1, 257)
    values = torch.stack(
        [edges[torch.randint(0, 257, (2000,))], torch.tensor([0.0, 0.25, 0.5, 1.0]).repeat(500)]
    )
    got = check(values, None)
    assert torch.equal(got, otsu_reference(values, None))


def test_otsu_degenerate_inputs() -> None:
    from fastinsight.kernels import otsu_threshold

    values = torch.rand(4, 500)
    values[0] = 0.375  # constant: the threshold is the value
    mask = torch.ones(4, 500, dtype=torch.bool)
    mask[1] = False  # no tissue: NaN, as the reference (no host sync to raise)
    mask[2] = False
    mask[2, 17] = True  # a single valid cell
    got = otsu_threshold(values.to(DEVICE), mask.to(DEVICE)).cpu()
    want = otsu_reference(values, mask)
    assert got[0].item() == 0.375
    assert torch.isnan(got[1]) and torch.isnan(want[1])
    assert got[2].item() == values[2, 17].item()
    assert torch.equal(got[[0, 2, 3]], want[[0, 2, 3]])


def test_otsu_low_precision_and_strided_values() -> None:
    values = bimodal(3, 2000, seed=5)
    check(values.half(), torch.rand(2000) > 0.5)
    check(values.t().contiguous().t(), None)  # column-major [K, M]


def test_otsu_does_not_depend_on_blocking() -> None:
    from fastinsight.kernels.reduce import ReduceLaunchConfig, otsu_threshold_launch

    values = bimodal(2, 5000, seed=9).to(DEVICE)
    mask = (torch.rand(5000) > 0.2).to(DEVICE)
    runs = [
        otsu_threshold_launch(values, mask, 256, ReduceLaunchConfig(BLOCK_M=b, max_blocks=nb))
        for b, nb in ((128, 1), (256, 7), (1024, 3))
    ]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
