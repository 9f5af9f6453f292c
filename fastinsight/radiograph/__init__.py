"""Chest radiographs: reading (PNG/JPEG/DICOM), PYLON/Yao preprocessing, prediction, evaluation."""

from __future__ import annotations

from fastinsight.radiograph.io import Radiograph, read_radiograph
from fastinsight.radiograph.preprocess import cubic_resize_u8, model_inputs

__all__ = ["Radiograph", "cubic_resize_u8", "model_inputs", "read_radiograph"]
