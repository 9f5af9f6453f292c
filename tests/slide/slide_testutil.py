"""Helpers for the slide tests: where the shared test slides are, and small synthetic slides.

A separate, uniquely named module (not ``conftest``) so test files can import it whatever other
``conftest.py`` files the suite has.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fastinsight.slide import ArrayReader

SLIDES_DIR = (Path(__file__).parents[2] / ".." / "shared" / "data" / "slides").resolve()

CMU = "CMU-1-Small-Region.svs"
TCGA = "tcga-cr-7395-01a-01-ts1.svs"
NDPI = "test3-DAPI-2-387.ndpi"
OME = "OS-1-detail.ome.tif"
ALL_SLIDES = (CMU, TCGA, NDPI, OME)


def slide_path(name: str) -> Path:
    """Path of a shared test slide; skips the test (with the reason) when it is absent."""
    path = SLIDES_DIR / name
    if not path.is_file():
        pytest.skip(f"test slide {name} not found in {SLIDES_DIR} (the shared slides folder)")
    return path


def synthetic_slide(width: int = 300, height: int = 200, seed: int = 0) -> np.ndarray:
    """A white slide with a pink 'tissue' ellipse and per-pixel noise. Shapes: [h, w, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    inside = ((xx - width * 0.45) / (width * 0.3)) ** 2 + (
        (yy - height * 0.5) / (height * 0.3)
    ) ** 2 < 1
    img = np.full((height, width, 3), 245, dtype=np.int16)
    img[inside] = (200, 90, 160)
    img += rng.integers(-6, 7, size=img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_reader(width: int = 300, height: int = 200, mpp: float | None = 0.5) -> ArrayReader:
    level0 = synthetic_slide(width, height)
    level1 = np.ascontiguousarray(level0[::2, ::2])
    return ArrayReader([level0, level1], mpp=mpp, path="synthetic")
