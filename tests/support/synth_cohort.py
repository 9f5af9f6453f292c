"""A small synthetic cohort: noise token grids, with a signal planted in a few cells of a few
tiles of every positive slide (the lesion). Test helper."""

from __future__ import annotations

import torch

from fastinsight.models.config import InsightConfig
from fastinsight.train import Bag

# A head narrow enough to train in seconds on two CPU cores.
SMALL = {"reduce_dim": 16, "widths": (16, 8, 8)}


def small_config(in_dim: int = 32, grid: tuple[int, int] = (8, 8), **kw: object) -> InsightConfig:
    return InsightConfig(in_dim=in_dim, grid_size=grid, **{**SMALL, **kw})  # type: ignore[arg-type]


def cohort(
    n: int = 24,
    tiles: int = 12,
    c: int = 32,
    g: int = 8,
    lesion_tiles: int = 3,
    lesion: int = 4,
    amplitude: float = 1.5,
    seed: int = 0,
) -> tuple[list[Bag], list[torch.Tensor]]:
    """Bags ``[tiles, c, g, g]`` (every other slide positive) and their lesion masks.

    All slides of one seed share the planted direction: hold out slides of the same call.
    The defaults (3 lesions of 4 x 4 cells in 12 tiles of 8 x 8: ~6% of the cells) train
    reliably in a few epochs; lesions of ~2% of the cells train only from some initialisations.
    """
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(c, generator=gen)
    direction = direction / direction.norm() * c**0.5
    bags, truths = [], []
    for i in range(n):
        positive = i % 2 == 1
        x = torch.randn(tiles, c, g, g, generator=gen)
        truth = torch.zeros(tiles, g, g, dtype=torch.bool)
        if positive:
            for t in torch.randperm(tiles, generator=gen)[:lesion_tiles].tolist():
                r, q = torch.randint(0, g - lesion + 1, (2,), generator=gen).tolist()
                truth[t, r : r + lesion, q : q + lesion] = True
            x = x + amplitude * direction[None, :, None, None] * truth[:, None]
        bags.append(Bag(x, None, torch.tensor([float(positive)]), f"s{i:03d}"))
        truths.append(truth)
    return bags, truths
