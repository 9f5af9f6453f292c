"""Deployment: ONNX export (head and encoders), TensorRT engines, Triton Inference Server repos.

Shipped as ``fastinsight.export``. Nothing heavy is imported here: ``onnx``, ``onnxruntime``,
``tensorrt`` and ``tritonclient`` are imported by the functions that need them.

- :func:`export_head_onnx`, :class:`HeadExportOptions` (``fastinsight.export.head``)
- :func:`export_encoder_onnx` (``fastinsight.export.encoder``)
- :func:`verify_head_onnx`, :func:`verify_encoder_onnx`, and :func:`export_verified_head`,
  :func:`export_verified_encoder` (export, check, then rename into place)
  (``fastinsight.export.verify``)
- :func:`build_engine`, :func:`check_engine` (``fastinsight.export.tensorrt``)
- :func:`write_triton_repo`, :func:`check_repo` (``fastinsight.export.triton``)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "HeadExportOptions": "head",
    "InsightOnnxHead": "head",
    "export_head_onnx": "head",
    "export_encoder_onnx": "encoder",
    "verify_head_onnx": "verify",
    "verify_encoder_onnx": "verify",
    "export_verified_head": "verify",
    "export_verified_encoder": "verify",
    "build_engine": "tensorrt",
    "check_engine": "tensorrt",
    "write_triton_repo": "triton",
    "check_repo": "triton",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastinsight.export' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
