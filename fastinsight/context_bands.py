"""The slide-context INSIGHT head in bands of tile rows: exact, with memory bounded by the band.

With ``context="slide"`` the context chain (3x3 convolutions, GELU, per-cell norm) runs over the
stitched slide grid. Building that grid and its activations at once costs
``H * W * (C + several * reduce_dim) * 4`` bytes: 9.8 GB on a 60k px slide with 64-channel
vectors, ~50 GB projected for UNI's 1024 channels. Here the grid is built and run one band of
tile rows at a time.

Exactness. Output cell ``(y, x)`` of the context chain depends on the inputs within
``halo = sum(k // 2)`` cells of it (one per 3x3 layer: 4 for INSIGHT's chain); the detection
chain and the reduction are 1x1 (no neighbours) and the norm is per cell (``norm="channel"``,
required by ``context="slide"``). A band of core tile rows ``[a, b)`` is therefore computed from
tile rows ``[a - ceil(halo / h), b + ceil(halo / h))``: the band edge's replication padding only
corrupts the outermost ``halo`` cell rows, which are thrown away. At the real slide border (first
and last tile row) the band edge *is* the slide edge and pads as the whole-slide run does.
Columns are cropped the same way: to the core tiles' columns plus ``ceil(halo / w)`` tiles on
each side (clipped at the slide grid's edges), so a crop edge inside the grid is again at least
``halo`` cells from every kept cell. The result equals the whole-slide computation up to float
summation order (tested to 1e-6 in fp32).

Memory: one band's grid and activations, at most about ``max_band_cells * (C + 4 * reduce_dim)
* 4`` bytes, whatever the slide size; the outputs are ``[N, K, h, w]`` (K floats per cell).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastinsight.errors import InputError
from fastinsight.ops.reference import HeadWeights, gate, insight_logits_reference

# Bytes of one band's input grid plus its live activations (about four reduce_dim-channel maps
# at a time), when no cell budget is given.
DEFAULT_BAND_BYTES = 256 << 20


def band_cells_for(weights: HeadWeights, band_bytes: int = DEFAULT_BAND_BYTES) -> int:
    """Cells per band that fit ``band_bytes``: ``band_bytes / (4 * (C + 4 * reduce_dim))``."""
    reduce_dim = int(weights.reduce.weight.shape[0])
    return max(1, band_bytes // (4 * (weights.in_dim + 4 * reduce_dim)))


def context_halo(weights: HeadWeights) -> int:
    """Cells one output cell of the context chain sees on each side: ``sum(k // 2)``."""
    return sum(layer.kernel_size // 2 for layer in weights.context)


def _check(tokens: Tensor, tile_rc: Tensor, cell_mask: Tensor | None, weights: HeadWeights) -> None:
    if tokens.ndim != 4:
        raise InputError(f"tokens must be [N, C, h, w], got {tuple(tokens.shape)}")
    n = tokens.shape[0]
    if n == 0:
        raise InputError("no tiles: the bag of token grids is empty")
    if tuple(tile_rc.shape) != (n, 2):
        raise InputError(f"tile_rc must be [N, 2] = [{n}, 2], got {tuple(tile_rc.shape)}")
    if bool((tile_rc < 0).any()):
        raise InputError("tile_rc holds negative tile rows or columns")
    if cell_mask is not None and tuple(cell_mask.shape) != (n, *tokens.shape[2:]):
        raise InputError(
            f"cell_mask must be [N, h, w] = {(n, *tokens.shape[2:])}, got {tuple(cell_mask.shape)}"
        )
    if weights.norm != "channel":
        raise InputError(
            "the slide-context head needs norm='channel' (a per-tile norm has no grid)"
        )
    if tokens.shape[1] != weights.in_dim:
        raise InputError(
            f"token grids have {tokens.shape[1]} channels but the model expects {weights.in_dim}"
        )


def banded_logits(
    tokens: Tensor,
    tile_rc: Tensor,
    weights: HeadWeights,
    cell_mask: Tensor | None = None,
    max_band_cells: int | None = None,
    grid_tiles: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Detection and slide-context logits of every tile, one band of tile rows at a time.

    Shapes: tokens ``[N, C, h, w]``, tile_rc ``[N, 2]`` int (tile_row, tile_col), cell_mask
    ``[N, h, w]`` bool (None: every cell of every tile is tissue) -> (D ``[N, K, h, w]``,
    Cx ``[N, K, h, w]``) float32, in the order of ``tokens``. ``max_band_cells`` bounds the
    cells of one band (default: ``band_cells_for(weights)``, about 256 MB); a band is at least
    one tile row. ``grid_tiles`` is the ``(rows, cols)`` of the slide's whole tile grid when it
    reaches past the last tile (a slide run's grid covers the slide; its edges are where the
    replication padding acts); default: up to the last tile.

    Equals ``insight_logits_reference`` on the stitched grid (tiles placed at ``tile_rc``, zeros
    and mask False elsewhere), cut back into tiles.
    """
    _check(tokens, tile_rc, cell_mask, weights)
    budget = band_cells_for(weights) if max_band_cells is None else max(1, int(max_band_cells))
    n, c, h, w = tokens.shape
    k = weights.num_classes
    device = tokens.device
    dtype = weights.reduce.weight.dtype
    rc = tile_rc.to(device=device, dtype=torch.int64)
    halo = context_halo(weights)
    halo_r, halo_c = math.ceil(halo / h), math.ceil(halo / w)

    order = torch.argsort(rc[:, 0] * (int(rc[:, 1].max()) + 1) + rc[:, 1], stable=True)
    rows_sorted = rc[order, 0].contiguous()
    n_rows = int(rows_sorted[-1]) + 1
    n_cols = int(rc[:, 1].max()) + 1
    if grid_tiles is not None:
        if grid_tiles[0] < n_rows or grid_tiles[1] < n_cols:
            raise InputError(f"tiles reach ({n_rows}, {n_cols}), past the grid {grid_tiles}")
        n_rows, n_cols = int(grid_tiles[0]), int(grid_tiles[1])
    out_d = torch.empty((n, k, h, w), dtype=torch.float32, device=device)
    out_c = torch.empty((n, k, h, w), dtype=torch.float32, device=device)

    a = int(rows_sorted[0])
    while a < n_rows:
        # Tile rows per band from the cell budget and the width of the rows that start here.
        lo = int(torch.searchsorted(rows_sorted, a))
        if lo == n:
            break
        a = max(a, int(rows_sorted[lo]))  # skip empty tile rows
        first = order[lo : int(torch.searchsorted(rows_sorted, a + 1))]
        width = (int(rc[first, 1].max() - rc[first, 1].min()) + 1) * w + 2 * halo
        band = max(1, (budget // width - 2 * halo) // h)
        b = min(n_rows, a + band)
        core = order[lo : int(torch.searchsorted(rows_sorted, b))]
        ctx_lo = int(torch.searchsorted(rows_sorted, a - halo_r))
        ctx_hi = int(torch.searchsorted(rows_sorted, b + halo_r))
        ctx = order[ctx_lo:ctx_hi]
        r0 = max(0, a - halo_r)
        r1 = min(n_rows, b + halo_r)
        # Columns: the core tiles' extent plus the halo (off-tissue margin, see module doc).
        c0 = max(0, int(rc[core, 1].min()) - halo_c)
        c1 = min(n_cols, int(rc[core, 1].max()) + 1 + halo_c)
        keep = (rc[ctx, 1] >= c0) & (rc[ctx, 1] < c1)
        ctx = ctx[keep]
        grid_r, grid_c = r1 - r0, c1 - c0
        cells = torch.zeros((grid_r, grid_c, c, h, w), dtype=dtype, device=device)
        cells[rc[ctx, 0] - r0, rc[ctx, 1] - c0] = tokens[ctx].to(dtype)
        occupied = torch.zeros((grid_r, grid_c, h, w), dtype=torch.bool, device=device)
        occupied[rc[ctx, 0] - r0, rc[ctx, 1] - c0] = (
            True if cell_mask is None else cell_mask[ctx].to(device=device, dtype=torch.bool)
        )
        grid = cells.permute(2, 0, 3, 1, 4).reshape(1, c, grid_r * h, grid_c * w)
        del cells
        mask = occupied.permute(0, 2, 1, 3).reshape(1, grid_r * h, grid_c * w)
        # Keep only `halo` cells beyond the core on each side (a whole halo tile row of 14 x 14
        # token grids would be 3.5x the 4 cells needed); the grid's edges stay where they are.
        y0 = max(0, (a - r0) * h - halo)
        y1 = min(grid_r * h, (b - r0) * h + halo)
        x0 = max(0, (int(rc[core, 1].min()) - c0) * w - halo)
        x1 = min(grid_c * w, (int(rc[core, 1].max()) + 1 - c0) * w + halo)
        d, cx = insight_logits_reference(grid[:, :, y0:y1, x0:x1], weights, mask[:, y0:y1, x0:x1])
        del grid

        for out, x in ((out_d, d), (out_c, cx)):
            full = x.new_zeros((1, k, grid_r * h, grid_c * w))  # small: K channels
            full[:, :, y0:y1, x0:x1] = x
            t = full[0].reshape(k, grid_r, h, grid_c, w).permute(1, 3, 0, 2, 4)
            out[core] = t[rc[core, 0] - r0, rc[core, 1] - c0].float()
        a = b
    return out_d, out_c


def banded_raw_heatmap(
    tokens: Tensor,
    tile_rc: Tensor,
    weights: HeadWeights,
    cell_mask: Tensor | None = None,
    max_band_cells: int | None = None,
    grid_tiles: tuple[int, int] | None = None,
) -> Tensor:
    """Raw slide-context heatmap ``sigmoid(D) * (1 - sigmoid(Cx))`` of every tile, banded.

    Shapes: tokens ``[N, C, h, w]``, tile_rc ``[N, 2]``, cell_mask ``[N, h, w]`` ->
    ``[N, K, h, w]`` float32.
    """
    return gate(*banded_logits(tokens, tile_rc, weights, cell_mask, max_band_cells, grid_tiles))


__all__ = [
    "DEFAULT_BAND_BYTES",
    "band_cells_for",
    "banded_logits",
    "banded_raw_heatmap",
    "context_halo",
]
