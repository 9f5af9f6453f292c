"""ONNX export of the radiograph models (PYLON, the multi-resolution LSE-LBA network).

Graph contract (names are part of the deployment contract):

==============  =========================  ==================================================
``image``       ``[B, 1, S, S]`` float32   the model's eval transform already applied:
                                           cubic resize to S = ``image_size``, then
                                           ``(u8 / 255 - mean) / std`` (values in metadata)
``logits``      ``[B, K, S/s, S/s]``       the CAM (PYLON, s = 4) / saliency logits (s = 8)
``scores``      ``[B, K]`` float32         ``sigmoid(max logits)`` (PYLON) or LSE-LBA (multires)
==============  =========================  ==================================================

B is dynamic; S is fixed at the model's ``image_size`` (PYLON's pyramid needs multiples of 256).
Exported with ``torch.onnx.export(dynamo=True)`` like the rest of fastinsight's export; the model
config, class names and the normalisation are stamped into the ONNX metadata
(``fastinsight.*`` keys). LSE-LBA accumulates its mean in float64 (a ``Cast`` in the graph):
onnxruntime runs it; TensorRT would need that accumulation in float32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastinsight.errors import BackendError, InputError

INPUT = "image"
OUTPUTS = ("logits", "scores")


class RadiographOnnx(nn.Module):
    """``image -> (logits, scores)`` around a PYLON or multires model (no input checks)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        m = self.model
        if m.family == "pylon":
            logits = m.net(image).float()
            return logits, torch.sigmoid(logits.amax(dim=(-2, -1)))
        logits = m(image)
        return logits, m.pool(logits)


def radiograph_metadata(model: Any) -> dict[str, str]:
    cfg = model.config
    return {
        "fastinsight.family": model.family,
        "fastinsight.config": cfg.to_json(),
        "fastinsight.class_names": json.dumps(list(cfg.names)),
        "fastinsight.image_size": str(cfg.image_size),
        "fastinsight.normalise": json.dumps({"mean": cfg.mean, "std": cfg.std, "scale": 255}),
        "fastinsight.stride": str(model.stride),
    }


def export_radiograph_onnx(
    model: Any, out_path: str | os.PathLike[str], *, opset: int = 18, check: bool = True
) -> Path:
    """Write ``model`` as ONNX (atomically); returns the path."""
    from fastinsight.export._onnx_io import check_finite_weights, finalize_and_save

    if getattr(model, "modality", None) != "radiograph":
        raise InputError(f"{type(model).__name__} is not a radiograph model (PYLON or multires)")
    try:
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise BackendError(
            "ONNX export needs onnx and onnxscript; pip install 'fastinsight[export]'"
        ) from exc
    check_finite_weights(model, f"{model.family} model")
    model = model.to("cpu").eval()
    s = int(model.config.image_size)
    example = (torch.zeros(2, model.config.in_channels, s, s),)
    batch = torch.export.Dim("B", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(
            RadiographOnnx(model).eval(),
            example,
            dynamo=True,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_shapes={"image": {0: batch}},
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise BackendError("torch.onnx.export returned no program; upgrade torch and onnxscript")
    return finalize_and_save(
        program.model_proto,
        out_path,
        metadata=radiograph_metadata(model),
        doc=f"{model.family}: normalised image [B, 1, {s}, {s}] -> logits map, scores [B, K]",
        check=check,
    )


def verify_radiograph_onnx(
    model: Any, path: str | os.PathLike[str], batch: int = 2, seed: int = 0
) -> dict[str, float]:
    """Run the ONNX file in onnxruntime against the PyTorch model; max abs differences."""
    from fastinsight.export.verify import ort_session

    s = int(model.config.image_size)
    x = torch.randn(
        batch, model.config.in_channels, s, s, generator=torch.Generator().manual_seed(seed)
    )
    ref = model.to("cpu").eval().predict(x)
    got = ort_session(path).run(list(OUTPUTS), {INPUT: x.numpy()})
    return {
        "logits": float(np.abs(got[0] - ref.logits.numpy()).max()),
        "scores": float(np.abs(got[1] - ref.scores.numpy()).max()),
    }


__all__ = [
    "INPUT",
    "OUTPUTS",
    "export_radiograph_onnx",
    "radiograph_metadata",
    "verify_radiograph_onnx",
]
