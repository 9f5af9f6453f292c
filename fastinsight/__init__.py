"""fastinsight: whole-slide image to explainable diagnosis, fast.

The INSIGHT aggregator (Zhang, Chen, Kanan, MLHC 2025) with fused Triton kernels, a streaming
slide pipeline, and ONNX / TensorRT export.

The package face is lazy (PEP 562): ``import fastinsight`` and ``import fastinsight.errors`` load
no torch; a public name is imported from its home module the first time it is read.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from fastinsight import _moved
from fastinsight._lazy import lazy_face
from fastinsight._version import __version__

_moved.install()  # old import paths (fastinsight.model, ...) keep working, with a warning


def _source_checkout_rooms() -> None:
    """Imported from a source checkout (not installed, or shadowed by the repository on
    ``sys.path``, as pytest's rootdir is): ``kernels/`` and ``export/`` sit beside this folder and
    ship as ``fastinsight.kernels`` / ``fastinsight.export`` (setup.py), so the repository root
    joins the package path for those two. An installed package has them inside already."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if os.path.isfile(os.path.join(here, "kernels", "__init__.py")):
        return  # installed: the rooms are inside
    rooms = ("kernels", "export")
    if all(os.path.isfile(os.path.join(root, r, "__init__.py")) for r in rooms):
        if os.path.isfile(os.path.join(root, "setup.py")) and root not in __path__:
            __path__.append(root)


_source_checkout_rooms()

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from fastinsight.errors import FastInsightError
    from fastinsight.models.checkpoints import load_model, save_model
    from fastinsight.models.config import InsightConfig
    from fastinsight.models.insight import InsightModel, SlidePrediction
    from fastinsight.ops.otsu import otsu_threshold
    from fastinsight.ops.pooling import lse_lba, masked_max, masked_mean, smoothmax

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "FastInsightError": "fastinsight.errors",
    "InsightConfig": "fastinsight.models.config",
    "InsightModel": "fastinsight.models.insight",
    "SlidePrediction": "fastinsight.models.insight",
    "load_model": "fastinsight.models.checkpoints",
    "save_model": "fastinsight.models.checkpoints",
    "otsu_threshold": "fastinsight.ops.otsu",
    "lse_lba": "fastinsight.ops.pooling",
    "masked_max": "fastinsight.ops.pooling",
    "masked_mean": "fastinsight.ops.pooling",
    "smoothmax": "fastinsight.ops.pooling",
}

__all__ = [
    "FastInsightError",
    "InsightConfig",
    "InsightModel",
    "SlidePrediction",
    "__version__",
    "load_model",
    "lse_lba",
    "masked_max",
    "masked_mean",
    "otsu_threshold",
    "save_model",
    "smoothmax",
]


__getattr__, __dir__ = lazy_face("fastinsight", _LAZY, globals())
