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

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastinsight.errors import BackendError, InputError

from ._guards import check_opset
from .head import exporter_failure, quiet_exporter
from .verify import ParityReport

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
    model: Any,
    out_path: str | os.PathLike[str],
    *,
    opset: int = 18,
    check: bool = True,
    before_commit: Callable[[Path], object] | None = None,
) -> Path:
    """Write ``model`` as ONNX (atomically); returns the path.

    ``before_commit(tmp_path)`` (a parity check: :func:`export_verified_radiograph`) runs on the
    finished graph before it replaces ``out_path``; if it raises, nothing is written.
    """
    from fastinsight.atomic import check_writable

    from ._onnx_io import check_finite_weights, finalize_and_save

    if getattr(model, "modality", None) != "radiograph":
        raise InputError(f"{type(model).__name__} is not a radiograph model (PYLON or multires)")
    check_opset(opset, "opset (--opset)")
    check_writable(out_path)  # before the export's seconds of work
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
    with torch.no_grad(), quiet_exporter(), exporter_failure(f"the {model.family} model"):
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
        before_commit=before_commit,
    )


def _predict(model: Any, x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = model.predict(x)
    return (
        out.logits.detach().to(torch.float64).numpy(),
        out.scores.detach().to(torch.float64).numpy(),
    )


def check_radiograph_onnx(
    model: Any,
    path: str | os.PathLike[str],
    batch: int = 2,
    seed: int = 0,
    *,
    shown: str | os.PathLike[str] | None = None,
) -> ParityReport:
    """Run the ONNX file in onnxruntime against the PyTorch model; ``ParityError`` on mismatch.

    The suite's rule (see :mod:`fastinsight.export.verify`): the graph is compared with a float64
    run of the model, and may be off it by at most twice PyTorch's own float32 error on the same
    images plus a floor of ``FP32_TOL`` (1e-4), per output (``logits``, ``scores``). A real
    disagreement (a wrong operator, a dropped normalisation) is orders of magnitude above that.
    ``shown`` is the name errors give the graph (the final output path while a temporary file is
    checked).
    """
    from .verify import FP32_TOL, _disagree, ort_session

    shown = path if shown is None else shown
    s = int(model.config.image_size)
    x = torch.randn(
        batch, model.config.in_channels, s, s, generator=torch.Generator().manual_seed(seed)
    )
    ref32 = copy.deepcopy(model).to("cpu").float().eval()
    ref64 = copy.deepcopy(ref32).double()
    want32 = _predict(ref32, x)
    want64 = _predict(ref64, x.double())
    got = ort_session(path).run(list(OUTPUTS), {INPUT: x.numpy()})
    report = ParityReport(f"radiograph {model.family}", (batch,), "fp32")
    for name, ours, ref, own in zip(OUTPUTS, got, want64, want32, strict=True):
        ours64 = np.asarray(ours, dtype=np.float64)
        if ours64.shape != ref.shape:
            raise _disagree(shown, name, f"shape {list(ours64.shape)} != {list(ref.shape)}", "fp32")
        err = float(np.max(np.abs(ours64 - ref))) if ref.size else 0.0
        if not np.isfinite(ours64).all():
            err = float("inf")
        tol = 2 * (float(np.max(np.abs(own - ref))) if ref.size else 0.0) + FP32_TOL
        report.errors[name] = err
        report.tolerances[name] = tol
        if not err <= tol:
            raise _disagree(
                shown, name, f"max |diff| {err:.3g} > {tol:.3g} (B={batch}, fp32)", "fp32"
            )
    return report


def verify_radiograph_onnx(
    model: Any,
    path: str | os.PathLike[str],
    batch: int = 2,
    seed: int = 0,
    *,
    shown: str | os.PathLike[str] | None = None,
) -> dict[str, float]:
    """:func:`check_radiograph_onnx` (``ParityError`` beyond its tolerance); returns the max abs
    differences per output."""
    return dict(check_radiograph_onnx(model, path, batch, seed, shown=shown).errors)


def export_verified_radiograph(
    model: Any,
    out_path: str | os.PathLike[str],
    *,
    opset: int = 18,
    verify: bool = True,
) -> tuple[Path, ParityReport | None]:
    """Export a radiograph model and check its parity *before* it replaces ``out_path``.

    Returns (path, report; None without ``verify``). A graph that fails the check raises
    ``ParityError`` (exit 7) and is never renamed into place: an existing ``out_path`` keeps its
    previous contents.
    """
    reports: list[ParityReport] = []

    def check(tmp: Path) -> None:
        reports.append(check_radiograph_onnx(model, tmp, shown=out_path))

    path = export_radiograph_onnx(
        model, out_path, opset=opset, before_commit=check if verify else None
    )
    return path, (reports[0] if reports else None)


__all__ = [
    "INPUT",
    "OUTPUTS",
    "check_radiograph_onnx",
    "export_radiograph_onnx",
    "export_verified_radiograph",
    "radiograph_metadata",
    "verify_radiograph_onnx",
]
