"""What every export checks before any work: option values, and outputs against inputs.

- :class:`ExportOptionError`: a bad option value (an opset, a batch size, a tile range) is exit 2
  (``ConfigError``, docs/exit-codes.md), named before a model is loaded or a graph traced.
- :func:`check_opset`: the ONNX opsets the exporters support.
- :func:`refuse_inputs_inside`: an output *folder* (a Triton repository) is replaced as a whole,
  so an input lying in it (the model, a plan, encoder weights) would be deleted with it.
  (Output *files* against inputs: :func:`fastinsight.atomic.prepare_outputs`.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from fastinsight.atomic import resolve_output
from fastinsight.errors import ConfigError, InputError, OutputError

OPSETS = (18, 23)  # torch.onnx's dynamo exporter writes 18 and up; 23 is the newest we test


class ExportOptionError(ConfigError, InputError):
    """A bad value of an export option: exit 2, like every ``ConfigError`` (a flag's value).

    Also an ``InputError``, which the export API raised for these before, so code that catches
    that keeps working.
    """


def check_opset(opset: int, flag: str = "--opset") -> None:
    """``opset`` within :data:`OPSETS`, else an ``ExportOptionError`` naming ``flag``."""
    lo, hi = OPSETS
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        raise ExportOptionError(
            f"{flag} must be an ONNX opset in {lo}..{hi}, got {opset!r}; the exporter writes "
            f"opset {lo} and up (default 20)"
        )


def check_positive_int(value: object, what: str, maximum: int | None = None) -> int:
    """``value`` as an int >= 1 (and <= ``maximum``), else an ``ExportOptionError`` naming
    ``what`` (a flag, or a parameter and its flag)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExportOptionError(f"{what} must be a whole number >= 1, got {value!r}")
    if maximum is not None and value > maximum:
        raise ExportOptionError(f"{what} must be at most {maximum}, got {value!r}")
    return value


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().resolve()


def refuse_inputs_inside(
    out_dir: str | os.PathLike[str],
    inputs: Mapping[str, str | os.PathLike[str] | None],
    flag: str = "--out",
) -> None:
    """Refuse (``OutputError``) an input that is the output folder or lies inside it.

    The folder is replaced as a whole (``--overwrite``), which would delete the input before it
    was read in full, or after: the trained model would be lost. Symlinks are followed on both
    sides (an output that is a link is written through, so its target is what gets replaced).
    """
    root = resolve_output(out_dir)
    for name, path in inputs.items():
        if path is None or str(path) == "":
            continue
        where = _resolved(path)
        if where == root or root in where.parents:
            raise OutputError(
                f"{name} {str(path)!r} lies inside {flag} {str(out_dir)!r}, which the export "
                "replaces as a whole: writing it would delete that input; choose another "
                f"{flag} (or move the input out of it)"
            )


__all__ = [
    "OPSETS",
    "ExportOptionError",
    "check_opset",
    "check_positive_int",
    "refuse_inputs_inside",
]
