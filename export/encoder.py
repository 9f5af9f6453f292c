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
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fastinsight.errors import BackendError, InputError

from ._guards import ExportOptionError, check_opset
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


class TorchScriptEncoderOnnx(nn.Module):
    """:class:`EncoderOnnx` for a ``torchscript:PATH`` encoder, itself scriptable.

    ``torch.onnx.export(dynamo=True)`` runs ``torch.export``, which cannot enter a TorchScript
    module, and the TorchScript exporter cannot trace an ``nn.Module`` that calls one loaded with
    ``torch.jit.load``. Scripted as a whole (the user's module a submodule of this script), it
    exports with the TorchScript exporter (``dynamo=False``). Same computation as
    ``TorchScriptEncoder.forward`` after ``Encoder.normalize``: normalisation in float32, the
    module in the export precision, its output brought to ``[B, C, h, w]``.
    """

    # Constants of the scripted graph (string annotations, as this module's ``from __future__
    # import annotations`` makes them, are not understood by TorchScript).
    __constants__ = ["layout", "channels", "grid_h", "grid_w", "fp16"]
    if TYPE_CHECKING:  # for mypy only: TorchScript cannot read string class annotations
        mean: Tensor
        std: Tensor

    def __init__(self, encoder: Any, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.module = copy.deepcopy(encoder.module).cpu().eval().to(dtype)
        self.layout = str(encoder.output_layout)
        self.channels = int(encoder.embed_dim)
        self.grid_h, self.grid_w = (int(v) for v in encoder.grid_size)
        self.fp16 = dtype == torch.float16
        mean = torch.tensor(encoder.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(encoder.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:  # TorchScript resolves torch.Tensor
        x = tiles.permute(0, 3, 1, 2).to(torch.float32)
        x = (x / 255.0 - self.mean) / self.std
        if self.fp16:
            x = x.to(torch.float16)
        out = self.module(x)
        if self.layout == "grid":
            return out
        if self.layout == "cls+tokens":
            out = out[:, 1:]
        return out.transpose(1, 2).reshape(-1, self.channels, self.grid_h, self.grid_w)


def is_torchscript_encoder(encoder: object) -> bool:
    """A ``torchscript:PATH`` encoder (its module is a ``torch.jit.ScriptModule``)."""
    return isinstance(getattr(encoder, "module", None), torch.jit.ScriptModule) and hasattr(
        encoder, "output_layout"
    )


def _torchscript_proto(
    encoder: Any, precision: str, opset: int, example: tuple[Tensor, ...], name: str
) -> Any:
    """The ONNX model of a TorchScript encoder, by the TorchScript exporter (see
    :class:`TorchScriptEncoderOnnx`); loaded back with its weights for ``finalize_and_save``."""
    import tempfile

    import onnx

    with quiet_exporter(), exporter_failure(f"encoder {name!r}"):
        scripted = torch.jit.script(TorchScriptEncoderOnnx(encoder, PRECISIONS[precision]).eval())
        with tempfile.TemporaryDirectory(prefix="fastinsight-ts-") as work, torch.no_grad():
            path = Path(work) / "encoder.onnx"
            torch.onnx.export(
                scripted,
                example,
                str(path),
                dynamo=False,
                input_names=[ENCODER_INPUT],
                output_names=[ENCODER_OUTPUT],
                dynamic_axes={ENCODER_INPUT: {0: "B"}, ENCODER_OUTPUT: {0: "B"}},
                opset_version=opset,
            )
            return onnx.load(str(path))  # external weights (a > 2 GB module) read in


def load_encoder(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    *,
    tile_size_px: int | None = None,
    **options: Any,
) -> nn.Module:
    """``fastinsight.encoders.build_encoder(name, weights, tile_size_px=..., **options)`` on CPU,
    in eval mode. ``tile_size_px`` None: the encoder's own (a ``torchscript:PATH`` module has
    none and needs it: ``--tile-size``); ``options`` as ``build_encoder`` takes them (``mean``,
    ``std``, ``patch_size_px``, ...)."""
    try:
        from fastinsight.encoders import build_encoder  # type: ignore[attr-defined]
    except ImportError as exc:
        raise BackendError(
            "this fastinsight has no encoder registry (fastinsight.encoders.build_encoder); "
            "export the head alone with --model"
        ) from exc
    encoder = build_encoder(name, weights=weights, tile_size_px=tile_size_px, **options)
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

    if precision not in PRECISIONS:
        raise ExportOptionError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    check_opset(opset, "opset (--opset)")
    check_writable(out_path)
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
    t = int(encoder.tile_size_px)  # type: ignore[arg-type]
    example = (torch.randint(0, 256, (2, t, t, 3), dtype=torch.uint8),)
    if is_torchscript_encoder(encoder):
        if precision == "fp16":
            check_finite_weights(
                copy.deepcopy(encoder).half(), f"encoder {name!r}", precision=precision
            )
        proto = _torchscript_proto(encoder, precision, opset, example, name)
    else:
        wrapper = EncoderOnnx(encoder, PRECISIONS[precision])
        check_finite_weights(wrapper.encoder, f"encoder {name!r}", precision=precision)
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
            raise BackendError(
                "torch.onnx.export returned no program; upgrade torch and onnxscript"
            )
        proto = program.model_proto
    return finalize_and_save(
        proto,
        out_path,
        metadata=encoder_metadata(encoder, precision),
        doc=f"patch encoder {name}: uint8 tiles [B, H, W, 3] -> tokens [B, C, h, w]",
        forbidden_ops=FORBIDDEN_OPS,
        check=check,
        before_commit=before_commit,
    )
