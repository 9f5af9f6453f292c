"""Fixtures of the export tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.export_helpers import save_official


@pytest.fixture
def official_checkpoint(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """An official-layout checkpoint (plain state_dict, torch.save) with K = request.param."""
    k = getattr(request, "param", 1)
    # The full official shape (UNI: C = 1024) so the file is exactly the official key layout.
    return save_official(tmp_path / f"insight_k{k}.pth", k, in_dim=1024)
