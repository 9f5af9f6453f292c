"""Fixtures: a small volume model (random head, vit-tiny slice encoder at 56 px -> 4 x 4 grid)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ct_testutil import small_model_file


@pytest.fixture(scope="session")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_model_file(tmp_path_factory.mktemp("model"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors on a shared CPU: one torch thread is much faster than contended several."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
