"""Device Otsu against scikit-image's threshold_otsu, including adversarial inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

from fastinsight.errors import InputError
from fastinsight.ops.otsu import histogram_bins, histogram_edges, otsu_threshold


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    heavy = rng.standard_cauchy(20_000)
    return {
        "uniform": rng.random(5000),
        "normal": rng.normal(3, 2, 5000),
        "bimodal": np.concatenate([rng.normal(0.1, 0.02, 4000), rng.normal(0.8, 0.05, 300)]),
        "heavy-tail": heavy[np.isfinite(heavy)],
        "two-values": np.array([0.2, 0.7] * 50),
        "three-values": np.array([0.0, 0.5, 1.0, 1.0]),
        "two-cells": np.array([0.3, 0.9]),
        "sparse-heatmap": np.where(
            rng.random(10_000) < 0.95, 1e-4 * rng.random(10_000), rng.random(10_000)
        ),
        "negative": -rng.exponential(1.0, 3000),
        # scikit-image does its sums in float32 and overflows past ~1e15 (inf variance, first
        # bin wins); we sum in float64. Within float32's safe range the two agree.
        "huge": rng.uniform(-1e12, 1e12, 1000),
        "grid-of-edges": np.linspace(0, 1, 257),
        "ties": np.round(rng.random(2000), 2),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_matches_scikit_image(name: str) -> None:
    x = CASES[name].astype(np.float32)
    got = otsu_threshold(torch.from_numpy(x)[None])
    assert got.dtype == torch.float32
    assert got.item() == np.float32(threshold_otsu(x)), name


@pytest.mark.parametrize("seed", range(40))
def test_random_inputs_match_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 4000))
    x = (rng.gamma(rng.uniform(0.2, 5), size=n) * rng.uniform(1e-3, 1e3)).astype(np.float32)
    assert otsu_threshold(torch.from_numpy(x)[None]).item() == np.float32(threshold_otsu(x))


def test_constant_values_return_the_value() -> None:
    x = torch.full((2, 100), 0.25)
    torch.testing.assert_close(otsu_threshold(x), torch.tensor([0.25, 0.25]))
    assert otsu_threshold(torch.tensor([[7.0]])).item() == 7.0


def test_mask_selects_cells_and_rows_are_independent() -> None:
    rng = np.random.default_rng(3)
    vals = rng.random((3, 2000)).astype(np.float32)
    vals[1] **= 3
    mask = rng.random(2000) < 0.4
    got = otsu_threshold(torch.from_numpy(vals), torch.from_numpy(mask))
    want = [np.float32(threshold_otsu(v[mask])) for v in vals]
    assert got.tolist() == pytest.approx(want, abs=0)
    # Values outside the mask can be anything, even huge, without effect.
    vals2 = vals.copy()
    vals2[:, ~mask] = 1e9
    torch.testing.assert_close(otsu_threshold(torch.from_numpy(vals2), torch.from_numpy(mask)), got)


def test_empty_row_gives_nan_not_a_crash() -> None:
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1] = False  # one class without cells: NaN for it, a threshold for the other
    t = otsu_threshold(torch.rand(2, 10), mask)
    assert torch.isfinite(t[0]) and torch.isnan(t[1])
    with pytest.raises(InputError, match="no cell"):
        otsu_threshold(torch.rand(2, 10), torch.zeros(2, 10, dtype=torch.bool))


def test_histogram_matches_numpy_bin_for_bin() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.random(5000), np.linspace(0, 1, 257)]).astype(np.float32)
    counts_np, edges_np = np.histogram(x, bins=256, range=(x.min(), x.max()))
    t = torch.from_numpy(x)[None]
    edges = histogram_edges(t.amin(1), t.amax(1), 256)
    np.testing.assert_array_equal(edges[0].numpy(), edges_np)
    counts = torch.bincount(histogram_bins(t, edges)[0], minlength=256)
    np.testing.assert_array_equal(counts.numpy(), counts_np)


def test_no_host_round_trip() -> None:
    """The whole threshold traces as one graph: no .item(), no data-dependent Python branch."""
    compiled = torch.compile(otsu_threshold, fullgraph=True, backend="eager")
    x = torch.rand(2, 500)
    mask = torch.rand(500) > 0.5
    torch.testing.assert_close(compiled(x, mask), otsu_threshold(x, mask))


def test_half_input_is_thresholded_in_fp32() -> None:
    x = torch.rand(1, 3000)
    torch.testing.assert_close(otsu_threshold(x.half()), otsu_threshold(x.half().float()))
