"""Synthetic chest-radiograph-like pictures with planted nodules and their boxes (no downloads).

Each picture (uint8, bright = dense, as a displayed PA film): a bright body outline, two dark
lung fields (ellipses) either side of a bright mediastinum, curved ribs across the lungs, a
diaphragm dome, smooth low-frequency variation and pixel noise. A positive picture has one to
two round nodules (bright Gaussian discs of radius 7-12 px at 256 px) inside a lung; its box is
the disc's bounding square. The structure (ribs crossing the lungs, a bright mediastinum) gives
the model bright distractors, so the nodule has to be found, not just "the brightest thing".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SyntheticCXR:
    image: np.ndarray  # uint8 [S, S]
    label: int  # 1 = has a nodule
    boxes: tuple[tuple[float, float, float, float], ...]  # (x, y, w, h) in pixels


def synthetic_cxr(
    rng: np.random.Generator,
    size: int = 256,
    nodule: bool | None = None,
    *,
    radius: tuple[float, float] = (7.0, 12.0),
    contrast: float = 0.6,
) -> SyntheticCXR:
    """One picture; ``nodule=None`` draws the label with probability 1/2.

    ``radius``: the nodules' radius range in px at 256 px (scaled with ``size``); ``contrast``:
    the Gaussian disc's peak brightness added to the picture (grey levels / 255).
    """
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / s
    img = np.full((size, size), 0.15, np.float32)
    # Body: a wide ellipse of soft tissue.
    body = ((xx - 0.5) / 0.46) ** 2 + ((yy - 0.55) / 0.55) ** 2 < 1.0
    img[body] = 0.62
    lungs = np.zeros((size, size), bool)
    jitter = rng.normal(0, 0.015, 6)
    for side in (-1, 1):
        cx = 0.5 + side * (0.2 + jitter[0])
        e = ((xx - cx) / (0.15 + jitter[1])) ** 2 + (
            (yy - 0.45 - jitter[2]) / (0.3 + jitter[3])
        ) ** 2
        lungs |= e < 1.0
    img[lungs] = 0.28
    # Mediastinum and heart: bright, central, slightly left (image right).
    heart = ((xx - 0.54) / 0.12) ** 2 + ((yy - 0.62) / 0.14) ** 2 < 1.0
    img[heart | ((np.abs(xx - 0.5) < 0.055) & (yy < 0.75) & body)] = 0.72
    # Ribs: curved bands over the chest.
    phase = rng.uniform(0, 2 * np.pi)
    for side in (-1, 1):
        curve = yy - 0.25 * (xx - 0.5 - side * 0.05) ** 2 * 4
        ribs = (np.sin(curve * 2 * np.pi * 9 + phase) > 0.75) & (np.abs(xx - 0.5) > 0.06)
        ribs &= body & (np.sign(xx - 0.5) == side) & (yy < 0.78)
        img[ribs] += 0.12
    # Diaphragm: below the lungs, bright.
    img[(yy > 0.78 + 0.03 * np.cos((xx - 0.5) * 6)) & body] = 0.7
    # Low-frequency exposure variation and noise.
    img += (
        0.05 * np.sin(xx * rng.uniform(2, 5) + rng.uniform(0, 6)) * np.cos(yy * rng.uniform(2, 5))
    )
    label = int(rng.random() < 0.5) if nodule is None else int(nodule)
    boxes = []
    if label:
        lung_y, lung_x = np.nonzero(lungs)
        for _ in range(int(rng.integers(1, 3))):
            for _try in range(20):
                i = int(rng.integers(0, len(lung_y)))
                r = float(rng.uniform(*radius)) * s / 256
                cy, cx = float(lung_y[i]), float(lung_x[i])
                if r < cx < s - r and r < cy < s - r:
                    break
            d2 = (np.arange(size)[:, None] - cy) ** 2 + (np.arange(size)[None, :] - cx) ** 2
            img += contrast * np.exp(-d2 / (2 * (r / 1.6) ** 2)).astype(np.float32)
            boxes.append((cx - r, cy - r, 2 * r, 2 * r))
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    u8 = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return SyntheticCXR(u8, label, tuple(boxes))


def synthetic_cohort(n: int, seed: int, size: int = 256, **kwargs: Any) -> list[SyntheticCXR]:
    """``n`` pictures, labels balanced (alternating), reproducible from ``seed``.

    ``kwargs`` go to :func:`synthetic_cxr` (``radius``, ``contrast``).
    """
    rng = np.random.default_rng(seed)
    return [synthetic_cxr(rng, size, nodule=bool(i % 2), **kwargs) for i in range(n)]


__all__ = ["SyntheticCXR", "synthetic_cohort", "synthetic_cxr"]
