"""Chest radiographs: reading (PNG/JPEG/DICOM), PYLON/Yao preprocessing, prediction, evaluation.

May import: ``fastinsight.errors``, ``atomic``, ``inputs``, ``text``, ``ops``, ``models``,
``slide`` (TIFF/overlay writers), ``evaluate`` (metrics), ``train.loop`` (``kept_global_rng``,
imported when training runs); never the CLI.
"""

from __future__ import annotations

from fastinsight.radiograph.io import Radiograph, read_radiograph
from fastinsight.radiograph.preprocess import cubic_resize_u8, model_inputs

__all__ = ["Radiograph", "cubic_resize_u8", "model_inputs", "read_radiograph"]
