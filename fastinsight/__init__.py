"""fastinsight: whole-slide image to explainable diagnosis, fast.

The INSIGHT aggregator (Zhang, Chen, Kanan, MLHC 2025) with fused Triton kernels, a streaming
slide pipeline, and ONNX / TensorRT export.

The package face is lazy (PEP 562): ``import fastinsight`` and ``import fastinsight.errors`` load
no torch; a public name is imported from its home module the first time it is read.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastinsight._version import __version__

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from fastinsight.errors import FastInsightError
    from fastinsight.checkpoint import load_model, save_model
    from fastinsight.config import InsightConfig
    from fastinsight.model import InsightModel, SlidePrediction
    from fastinsight.otsu import otsu_threshold
    from fastinsight.pooling import lse_lba, masked_max, masked_mean, smoothmax

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "FastInsightError": "fastinsight.errors",
    "InsightConfig": "fastinsight.config",
    "InsightModel": "fastinsight.model",
    "SlidePrediction": "fastinsight.model",
    "load_model": "fastinsight.checkpoint",
    "save_model": "fastinsight.checkpoint",
    "otsu_threshold": "fastinsight.otsu",
    "lse_lba": "fastinsight.pooling",
    "masked_max": "fastinsight.pooling",
    "masked_mean": "fastinsight.pooling",
    "smoothmax": "fastinsight.pooling",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    """Import a public name from its home module on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastinsight' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later reads skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
