"""A cohort that cannot run fails before Ray starts."""

from __future__ import annotations

import pytest
import torch

from fastinsight.cohort import predict_cohort
from fastinsight.errors import CheckpointError
from fastinsight.synthetic import make_cohort
from tests.support.official import random_official_state_dict


def test_official_model_without_uni_weights_fails_before_ray(tmp_path) -> None:
    ray = pytest.importorskip("ray")
    slides = make_cohort(tmp_path / "c", n_slides=2, size_px=(448, 448))
    model = tmp_path / "insight.pth"
    torch.save(random_official_state_dict(1024, 1), model)
    with pytest.raises(CheckpointError, match="--encoder-weights"):
        predict_cohort(str(slides[0].path.parent), model, tmp_path / "out")
    assert not ray.is_initialized()
    assert not (tmp_path / "out" / "summary.csv").exists()
