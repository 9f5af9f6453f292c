"""Class 7 of issue #16: the slide-context head in bands equals the whole-slide run, in bounded
memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastinsight.context_bands import banded_logits, banded_raw_heatmap, context_halo
from fastinsight.features import unstitch
from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel


def _model(in_dim: int = 12, k: int = 2) -> InsightModel:
    cfg = InsightConfig(
        in_dim=in_dim,
        num_classes=k,
        reduce_dim=16,
        widths=(8, 8, 8),
        norm="channel",
        context="slide",
        grid_size=(1, 1),
    )
    model = InsightModel(cfg, backend="reference").eval()
    # Random init has near-zero LN biases: perturb every parameter so bands would show errors.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _whole_slide(model: InsightModel, tokens, rc, cell_mask):
    """The reference: every tile stitched into one grid, the head run once, cut back."""
    n, c, h, w = tokens.shape
    rows, cols = int(rc[:, 0].max()) + 1, int(rc[:, 1].max()) + 1
    cells = tokens.new_zeros(rows, cols, c, h, w)
    cells[rc[:, 0], rc[:, 1]] = tokens
    grid = cells.permute(2, 0, 3, 1, 4).reshape(1, c, rows * h, cols * w)
    occ = torch.zeros(rows, cols, h, w, dtype=torch.bool)
    occ[rc[:, 0], rc[:, 1]] = cell_mask
    mask = occ.permute(0, 2, 1, 3).reshape(1, rows * h, cols * w)
    d, cx = model.logits(grid, mask)
    return unstitch(d, rc, (h, w)), unstitch(cx, rc, (h, w))


def _random_tiles(rows: int, cols: int, h: int, in_dim: int, keep: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    occupied = torch.rand(rows, cols, generator=g) < keep
    occupied[0, 0] = occupied[-1, -1] = True  # the grid spans rows x cols
    rc = occupied.nonzero()
    rc = rc[torch.randperm(len(rc), generator=g)]  # file order is not row order
    tokens = torch.randn(len(rc), in_dim, h, h, generator=g) * 2
    cell_mask = torch.rand(len(rc), h, h, generator=g) < 0.8
    return tokens, rc, cell_mask


@pytest.mark.parametrize(
    ("h", "budget"),
    [(1, 60), (3, 1), (4, 1 << 20)],
)
def test_banded_equals_whole_slide(h: int, budget: int) -> None:
    """Exact in float64 (1e-6 after the float32 output); float32 differs by rounding only."""
    model = _model().double()
    tokens, rc, cell_mask = _random_tiles(13, 9, h, 12, keep=0.6, seed=h * 1000 + budget)
    tokens = tokens.double()
    if h == 1:
        cell_mask = torch.ones_like(cell_mask)  # per-tile vectors: one tissue cell per tile
    ref_d, ref_c = _whole_slide(model, tokens, rc, cell_mask)
    weights = model.head_weights()
    d, cx = banded_logits(tokens, rc, weights, cell_mask, max_band_cells=budget)
    torch.testing.assert_close(d, ref_d.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(cx, ref_c.float(), atol=1e-6, rtol=0)
    raw = banded_raw_heatmap(tokens, rc, weights, cell_mask, max_band_cells=budget)
    ref_raw = (torch.sigmoid(ref_d) * torch.sigmoid(-ref_c)).float()
    torch.testing.assert_close(raw, ref_raw, atol=1e-6, rtol=0)
    # float32 end to end: the same up to the convolutions' summation order.
    model32 = model.float()
    ref_d32, ref_c32 = _whole_slide(model32, tokens.float(), rc, cell_mask)
    d32, cx32 = banded_logits(tokens.float(), rc, model32.head_weights(), cell_mask, budget)
    torch.testing.assert_close(d32, ref_d32, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cx32, ref_c32, atol=1e-4, rtol=1e-4)


def test_halo_is_the_context_receptive_field() -> None:
    model = _model()
    weights = model.head_weights()
    assert context_halo(weights) == 4  # four 3x3 convolutions
    # A band without halo would differ: the check above is sensitive to the halo.
    tokens, rc, cell_mask = _random_tiles(12, 9, 1, 12, keep=1.0, seed=3)
    cell_mask = torch.ones_like(cell_mask)
    ref_d, ref_c = _whole_slide(model, tokens, rc, cell_mask)
    _, cx_ok = banded_logits(tokens, rc, weights, cell_mask, max_band_cells=9)
    torch.testing.assert_close(cx_ok, ref_c, atol=1e-4, rtol=1e-4)
    import fastinsight.context_bands as cb

    orig = cb.context_halo
    try:
        cb.context_halo = lambda w: 0  # type: ignore[assignment]
        _, cx = cb.banded_logits(tokens, rc, weights, cell_mask, max_band_cells=9)
    finally:
        cb.context_halo = orig  # type: ignore[assignment]
    assert not torch.allclose(cx, ref_c, atol=1e-4)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, torch
    torch.set_num_threads(1)
    from fastinsight.models.config import InsightConfig
    from fastinsight.models.insight import InsightModel
    from fastinsight.context_bands import banded_raw_heatmap

    cfg = InsightConfig(in_dim=16, reduce_dim=32, widths=(16, 16, 16), norm="channel",
                        context="slide", grid_size=(1, 1))
    model = InsightModel(cfg, backend="reference").eval()

    def status_kb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])

    def peak_mb(rows, cols, mode):
        rc = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
        rc = rc.reshape(-1, 2)
        tokens = torch.randn(len(rc), 16, 1, 1)
        mask = torch.ones(1, rows, cols, dtype=torch.bool)
        with open("/proc/self/clear_refs", "w") as fh:  # reset the peak to the current RSS
            fh.write("5")
        base = status_kb("VmRSS:")
        with torch.no_grad():
            if mode == "banded":
                banded_raw_heatmap(tokens, rc, model.head_weights(), max_band_cells=1 << 13)
            else:
                grid = tokens.reshape(rows, cols, 16).permute(2, 0, 1)[None].contiguous()
                model(grid, mask)
        return (status_kb("VmHWM:") - base) / 1024

    print(json.dumps({
        "small": peak_mb(200, 300, "banded"),
        "large": peak_mb(800, 300, "banded"),
        "whole_large": peak_mb(800, 300, "whole"),
    }))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_banded_peak_memory_does_not_grow_with_the_slide() -> None:
    # A fixed mmap threshold: every large tensor is mmapped and returned to the OS when freed,
    # so each measurement's peak (VmHWM, reset through clear_refs) is its own.
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    assert proc.returncode == 0, proc.stderr
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    # 4x the tiles: the banded peak stays the band's (plus the [N, K] output, 1 MB) ...
    assert peaks["large"] < peaks["small"] + 6, peaks
    # ... while the whole-slide run's peak grows with the slide (the measurement sees it):
    # 32-channel maps of 240k cells are 29 MB each.
    assert peaks["whole_large"] > peaks["large"] + 50, peaks
