"""fastinsight: whole-slide image to explainable diagnosis, fast.

The INSIGHT aggregator (Zhang, Chen, Kanan, MLHC 2025) with fused Triton kernels, a streaming
slide pipeline, and ONNX / TensorRT export.
"""

from __future__ import annotations

from fastinsight.checkpoint import load_model, save_model
from fastinsight.config import InsightConfig
from fastinsight.errors import FastInsightError
from fastinsight.model import InsightModel, SlidePrediction
from fastinsight.otsu import otsu_threshold
from fastinsight.pooling import lse_lba, masked_max, masked_mean, smoothmax

__version__ = "0.1.0"

__all__ = [
    "FastInsightError",
    "InsightConfig",
    "InsightModel",
    "SlidePrediction",
    "load_model",
    "lse_lba",
    "masked_max",
    "masked_mean",
    "otsu_threshold",
    "save_model",
    "smoothmax",
]
