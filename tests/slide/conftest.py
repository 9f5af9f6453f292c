"""Fixtures for the slide tests: the real test slides (each test skips when its slide is
absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
from slide_testutil import CMU, NDPI, OME, TCGA, slide_path


@pytest.fixture
def cmu() -> Path:
    return slide_path(CMU)


@pytest.fixture
def tcga() -> Path:
    return slide_path(TCGA)


@pytest.fixture
def ndpi() -> Path:
    return slide_path(NDPI)


@pytest.fixture
def ome() -> Path:
    return slide_path(OME)
