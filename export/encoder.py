"""ONNX export of a patch encoder: uint8 RGB tiles in, the token grid out.

The graph takes what a slide reader produces, ``tiles`` uint8 ``[B, H, W, 3]`` (channels last),
and does the encoder's own normalisation inside: ``(x / 255 - mean) / std`` in float32, exactly
as ``Encoder.normalize``; then the encoder's ``forward`` in the export precision. Output:
``tokens`` ``[B, C, h, w]`` (the layout the INSIGHT head takes). B is dynamic.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastinsight.errors import BackendError, InputError

from .head import DEFAULT_OPSET, PRECISIONS, exporter_failure, quiet_exporter

ENCODER_INPUT = "tiles"
ENCODER_OUTPUT = "tokens"


class EncoderOnnx(nn.Module):
    """``tiles`` uint8 ``[B, H, W, 3]`` -> ``tokens`` ``[B, C, h, w]`` (normalisation inside)."""

    mean: Tensor
    std: Tensor

    def __init__(self, encoder: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(encoder).cpu().eval().to(dtype)
        self.dtype = dtype
        mean = torch.tensor(encoder.mean, dtype=torch.float32).view(1, 3, 1, 1)  # type: ignore[arg-type]
        std = torch.tensor(encoder.std, dtype=torch.float32).view(1, 3, 1, 1)  # type: ignore[arg-type]
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, tiles: Tensor) -> Tensor:
        x = tiles.permute(0, 3, 1, 2).to(torch.float32)
        x = (x / 255.0 - self.mean) / self.std
        return self.encoder(x.to(self.dtype))


def load_encoder(name: str, weights: str | os.PathLike[str] | None = None) -> nn.Module:
    """``fastinsight.encoders.build_encoder(name, weights)`` on CPU, in eval mode."""
    try:
        from fastinsight.encoders import build_encoder  # type: ignore[attr-defined]
    except ImportError as exc:
        raise BackendError(
            "this fastinsight has no encoder registry (fastinsight.encoders.build_encoder); "
            "export the head alone with --model"
        ) from exc
    encoder = build_encoder(name, weights=weights)
    return encoder.cpu().eval()


def encoder_metadata(encoder: nn.Module, precision: str) -> dict[str, str]:
    import json

    import fastinsight

    ident: Any = getattr(encoder, "identity", None)
    identity = ident() if callable(ident) else {"name": getattr(encoder, "name", "?")}
    return {
        "fastinsight.version": fastinsight.__version__,
        "fastinsight.kind": "encoder",
        "fastinsight.encoder": json.dumps(identity, sort_keys=True, default=str),
        "fastinsight.precision": precision,
        "fastinsight.tile_size_px": str(getattr(encoder, "tile_size_px", "")),
    }


def export_encoder_onnx(
    encoder: nn.Module,
    out_path: str | os.PathLike[str],
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    *,
    check: bool = True,
    before_commit: Callable[[Path], object] | None = None,
) -> Path:
    """Export ``encoder`` (a ``fastinsight.encoders.Encoder``) to ``out_path`` atomically.

    ``before_commit(tmp_path)`` (a parity check) runs on the finished graph before it replaces
    ``out_path``; if it raises, nothing is written.
    """
    from fastinsight.atomic import check_writable

    from ._onnx_io import check_finite_weights, finalize_and_save
    from .head import FORBIDDEN_OPS

    check_writable(out_path)
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    for attr in ("tile_size_px", "mean", "std"):
        if not hasattr(encoder, attr):
            raise InputError(
                f"{type(encoder).__name__} has no {attr!r}: pass a fastinsight encoder "
                "(fastinsight.encoders.build_encoder)"
            )
    try:
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise BackendError(
            "ONNX export needs onnx and onnxscript; pip install 'fastinsight[export]'"
        ) from exc
    name = getattr(encoder, "name", type(encoder).__name__)
    check_finite_weights(encoder, f"encoder {name!r}")
    wrapper = EncoderOnnx(encoder, PRECISIONS[precision])
    check_finite_weights(wrapper.encoder, f"encoder {name!r}", precision=precision)
    t = int(encoder.tile_size_px)  # type: ignore[arg-type]
    example = (torch.randint(0, 256, (2, t, t, 3), dtype=torch.uint8),)
    batch = torch.export.Dim("B", min=1, max=1 << 20)
    with torch.no_grad(), quiet_exporter(), exporter_failure(f"encoder {name!r}"):
        program = torch.onnx.export(
            wrapper,
            example,
            dynamo=True,
            input_names=[ENCODER_INPUT],
            output_names=[ENCODER_OUTPUT],
            dynamic_shapes={"tiles": {0: batch}},
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise BackendError("torch.onnx.export returned no program; upgrade torch and onnxscript")
    return finalize_and_save(
        program.model_proto,
        out_path,
        metadata=encoder_metadata(encoder, precision),
        doc=f"patch encoder {name}: uint8 tiles [B, H, W, 3] -> tokens [B, C, h, w]",
        forbidden_ops=FORBIDDEN_OPS,
        check=check,
        before_commit=before_commit,
    )
