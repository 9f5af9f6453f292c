"""The pooling family against float64 oracles, at every scale and in every limit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinsight.errors import InputError
from fastinsight.ops.pooling import Pooling, lse_lba, masked_max, masked_mean, smoothmax


def smoothmax_oracle(x: np.ndarray, a: float) -> float:
    x = x.astype(np.float64)
    z = a * x
    w = np.exp(z - z.max())
    return float((w * x).sum() / w.sum())


def lse_oracle(x: np.ndarray, r: float) -> float:
    """(1/r) log(mean(exp(r x))) in float64 via a max shift (math.fsum for the sum)."""
    import math

    x = x.astype(np.float64)
    m = x.max()
    s = math.fsum(np.exp(r * (x - m)))
    return float(m + (math.log(s) - math.log(x.size)) / r)


RANGES = {"unit": (0.0, 1.0), "wide": (-1e4, 1e4), "tiny": (-1e-3, 1e-3)}


@pytest.mark.parametrize("n", [1, 2, 1000, 100_003], ids=lambda n: f"n={n}")
@pytest.mark.parametrize("rng", list(RANGES), ids=lambda r: f"range={r}")
@pytest.mark.parametrize("a", [0.5, 8.0, 200.0], ids=lambda a: f"a={a}")
def test_smoothmax_matches_oracle(n: int, rng: str, a: float) -> None:
    lo, hi = RANGES[rng]
    x = np.random.default_rng(n).uniform(lo, hi, size=(2, n)).astype(np.float32)
    got = smoothmax(torch.from_numpy(x), None, a)
    want = [smoothmax_oracle(row, a) for row in x]
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6 * max(abs(lo), abs(hi), 1))


@pytest.mark.parametrize("n", [1, 3, 1000, 100_003], ids=lambda n: f"n={n}")
@pytest.mark.parametrize("rng", list(RANGES), ids=lambda r: f"range={r}")
@pytest.mark.parametrize("r", [1e-3, 1.0, 6.0, 1e3], ids=lambda r: f"r={r}")
def test_lse_lba_matches_oracle(n: int, rng: str, r: float) -> None:
    lo, hi = RANGES[rng]
    x = np.random.default_rng(n + 1).uniform(lo, hi, size=(2, n)).astype(np.float32)
    got = lse_lba(torch.from_numpy(x), None, r)
    want = [lse_oracle(row, r) for row in x]
    assert torch.isfinite(got).all()
    scale = max(abs(lo), abs(hi), 1e-3)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-6, atol=2e-6 * scale)


def test_ten_million_cells() -> None:
    x = torch.rand(1, 10_000_000)
    x[0, 123_456] = 1.5
    mask = torch.ones(10_000_000, dtype=torch.bool)
    assert torch.isfinite(smoothmax(x, mask, 8.0)).all()
    np.testing.assert_allclose(lse_lba(x, mask, 1e-3).item(), x.double().mean().item(), atol=1e-4)
    np.testing.assert_allclose(lse_lba(x, mask, 1e3).item(), 1.5, atol=0.02)
    assert masked_max(x, mask).item() == 1.5
    np.testing.assert_allclose(masked_mean(x, mask).item(), x.double().mean().item(), rtol=1e-6)


def test_limits_mean_and_max() -> None:
    x = torch.randn(3, 5000) * 10
    mask = torch.rand(5000) > 0.3
    mean, amax = masked_mean(x, mask), masked_max(x, mask)
    torch.testing.assert_close(lse_lba(x, mask, 1e-6), mean, atol=1e-3, rtol=0)
    torch.testing.assert_close(lse_lba(x, mask, 1e7), amax, atol=1e-4, rtol=0)
    torch.testing.assert_close(smoothmax(x, mask, 1e6), amax, atol=1e-4, rtol=0)
    torch.testing.assert_close(smoothmax(x, mask, 1e-9), mean, atol=1e-3, rtol=0)
    # Masked-in only: the masked-out maximum is ignored.
    y = x.clone()
    y[:, ~mask] = 1e4
    torch.testing.assert_close(masked_max(y, mask), amax)


def test_per_class_mask_and_per_class_sharpness() -> None:
    x = torch.rand(2, 50)
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, 40:] = True
    got = lse_lba(x, mask, torch.tensor([2.0, 9.0]))
    want = [lse_oracle(x[0, :10].numpy(), 2.0), lse_oracle(x[1, 40:].numpy(), 9.0)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("fn", [smoothmax, lse_lba, masked_max, masked_mean])
def test_empty_mask_is_an_error_not_nan(fn) -> None:
    with pytest.raises(InputError, match="nothing to pool"):
        fn(torch.rand(2, 10), torch.zeros(10, dtype=torch.bool))
    with pytest.raises(InputError, match="no cells"):
        fn(torch.rand(2, 0), None)


def test_lse_lba_module_learns_beta() -> None:
    pool = Pooling("lse_lba", num_classes=2, lse_r0=5.0)
    torch.testing.assert_close(pool.sharpness, torch.tensor([6.0, 6.0]))
    x = torch.rand(2, 100)
    pool(x).sum().backward()
    assert pool.beta.grad is not None and torch.all(pool.beta.grad != 0)
    with pytest.raises(InputError, match="unknown pooling"):
        Pooling("median", 1)


def test_pooling_is_fp32_for_half_inputs() -> None:
    x = torch.rand(1, 1000).half()
    assert smoothmax(x).dtype == torch.float32
    torch.testing.assert_close(smoothmax(x), smoothmax(x.float()))
