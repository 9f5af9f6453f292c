"""Shared helpers of the kernel tests (models, devices, error measures)."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET else "cuda"


def make_model(c: int, k: int, grid: tuple[int, int], norm: str) -> InsightModel:
    """A small fp32 INSIGHT model with every parameter perturbed (LN affine included), eval mode.

    Reference backend: the tests call kernels and references explicitly.
    """
    gen = torch.Generator().manual_seed(1234 + c + 7 * k + 31 * grid[0] + (norm == "tile"))
    model = InsightModel(
        InsightConfig(in_dim=c, num_classes=k, grid_size=grid, norm=norm), backend="reference"
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def copy_as(
    model: InsightModel,
    dtype: torch.dtype,
    device: str | torch.device,
    backend: str | None = None,
) -> InsightModel:
    """An independent copy of ``model`` in ``dtype`` on ``device`` (``backend``: the model's own
    unless given; a model's backend is fixed when it is built)."""
    twin = InsightModel(model.config, backend=backend or model.backend)
    twin.load_state_dict(model.state_dict())
    return twin.eval().to(device=device, dtype=dtype)


def max_err(a: Tensor, b: Tensor) -> float:
    return (a.double().cpu() - b.double().cpu()).abs().max().item()
