"""INSIGHT on CT volumes: NIfTI / DICOM series in, a heatmap NIfTI on the scan's grid out.

- ``io``: :class:`Volume` (HU ``[X, Y, Z]`` + RAS affine), ``read_volume`` (NIfTI or DICOM folder);
- ``preprocess``: the official INSIGHT-CT slice recipe (mask, zoom to 518, HU window, middle 32);
- ``model``: per-slice INSIGHT (official) or :class:`CrossSliceInsight` (3x3x3 context);
- ``predict``: ``predict_volume`` -> :class:`VolumeResult` (NIfTI heatmap, report, overlay);
- ``train``: volume labels / mask Dice on top of the slide trainer; ``demo``: ``run_ct_demo``.

May import: ``fastinsight.errors``, ``atomic``, ``ops``, ``models``, ``encoders``, ``slide``,
``train`` (the slide-level loss and loop), ``evaluate``; never the CLI.
"""

from __future__ import annotations

from fastinsight.volume.io import Volume, read_dicom_series, read_nifti, read_volume
from fastinsight.volume.predict import VolumeOptions, VolumeResult, predict_volume
from fastinsight.volume.preprocess import PreprocessOptions

__all__ = [
    "PreprocessOptions",
    "Volume",
    "VolumeOptions",
    "VolumeResult",
    "predict_volume",
    "read_dicom_series",
    "read_nifti",
    "read_volume",
]
