"""Shared test set-up: seeds, the shared slides folder, device markers."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The switch must be set before
# triton itself is first imported (its language functions are built for one mode at import), and
# any test module may import triton indirectly (timm, torch.compile), so it is set here, in the
# root conftest, which pytest imports first. With a GPU it is never set in the test process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_SLIDES = Path(
    os.environ.get("FASTINSIGHT_TEST_SLIDES", REPO.parent / "shared" / "data" / "slides")
)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def slides_dir() -> Path:
    if not SHARED_SLIDES.is_dir():
        pytest.skip(f"shared test slides not found at {SHARED_SLIDES}")
    return SHARED_SLIDES


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
