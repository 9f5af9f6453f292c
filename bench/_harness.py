"""What every benchmark records beside its numbers: when, which revision, which device, which
versions; and the one way rows are appended to a results CSV.

Used by ``bench_{encoders,read,slide,volume,demo}.py`` (run as scripts, or imported by tests with
``bench/`` on ``sys.path``). Importing it imports neither torch nor fastinsight: ``bench_read``
measures slide readers with numpy only.

    from _harness import append_rows, device_name, git_rev, run_stamp, versions

    row = {**run_stamp(device), **versions("torch", "fastinsight"), "tiles_per_s": 123.4}
    append_rows(csv_path, FIELDS, [row])     # header once, then rows, each on disk at return
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The first columns of every results CSV, in this order (``run_stamp`` fills them).
STAMP_FIELDS = ("timestamp", "git_rev", "device")


def git_rev() -> str:
    """The short hash of the checkout's HEAD, or ``unknown`` outside git."""
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: Any = "cpu") -> str:
    """The GPU's name for a CUDA device; for the CPU its architecture, cores and (when torch is
    loaded) torch's thread count, which bounds what a CPU row can mean.

    ``device``: a ``torch.device`` or a string (``"cpu"``, ``"cuda:1"``).
    """
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    if kind == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    cpu = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    torch = sys.modules.get("torch")
    if torch is not None:
        cpu += f", {torch.get_num_threads()} threads"
    return cpu + ")"


def utc_now() -> str:
    """An ISO 8601 UTC timestamp to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run_stamp(device: Any = "cpu") -> dict[str, str]:
    """``timestamp``, ``git_rev`` and ``device``: the first columns of every results CSV."""
    return {"timestamp": utc_now(), "git_rev": git_rev(), "device": device_name(device)}


# How to read a version where ``module.__version__`` is not it.
_VERSION_OF = {
    "python": lambda: platform.python_version(),
    "openslide": lambda: str(import_module("openslide").__library_version__),
}


def versions(*names: str) -> dict[str, str]:
    """``{name: version}`` of Python packages (``torch``, ``timm``, ``fastinsight``, ...), the
    OpenSlide C library (``openslide``) or the interpreter (``python``); ``unknown`` if absent."""
    out = {}
    for name in names:
        try:
            reader = _VERSION_OF.get(name)
            out[name] = reader() if reader else str(import_module(name).__version__)
        except (ImportError, AttributeError):
            out[name] = "unknown"
    return out


def append_rows(
    path: str | os.PathLike[str], fields: Sequence[str], rows: Iterable[Mapping[str, Any]]
) -> Path:
    """Append ``rows`` to the CSV at ``path`` (the header first when the file is new or empty).

    Each row is flushed and fsynced before the next, so a benchmark that dies later keeps every
    step it finished. Missing columns are written empty; unknown ones are an error (a typo).
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists() or out.stat().st_size == 0
    with out.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields))
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(row)
            fh.flush()
            os.fsync(fh.fileno())
    return out


__all__ = [
    "REPO",
    "STAMP_FIELDS",
    "append_rows",
    "device_name",
    "git_rev",
    "run_stamp",
    "utc_now",
    "versions",
]
