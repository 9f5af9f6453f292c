"""What makes a rerun safe: completion markers, ``.partial`` folders and the output-folder lock.

A slide's outputs are written into ``DIR/.<id>.partial``; ``complete.json`` is written last (the
model's sha256, the hash of every setting that changes the outputs, the slide file's fingerprint,
and the size and sha256 of every file); the folder is then renamed to ``DIR/<id>``. A rerun skips
a slide only when :func:`check_complete` finds all of that unchanged, and removes the
``.partial`` and ``.old-*`` folders an interrupted run left (:func:`_clean_stale`). Torch-free.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastinsight._version import __version__
from fastinsight.atomic import atomic_path
from fastinsight.cohort.layout import LOCK_NAME, MARKER_NAME, OLD_INFIX, PARTIAL_SUFFIX, partial_dir
from fastinsight.cohort.slides import CohortSlide
from fastinsight.errors import FastInsightError, OutputError
from fastinsight.fileformat import file_sha256
from fastinsight.text import dumps_json, loads_json

if TYPE_CHECKING:
    from fastinsight.cohort.options import CohortOptions

MARKER_FORMAT = 1
_MIB = 1 << 20


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """Size plus the sha256 of the first and last MiB: cheap on terabytes of slides, and it
    tells a replaced or re-scanned file from the one the outputs were made from."""
    p = Path(path)
    with open(p, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        h = hashlib.sha256(str(size).encode())
        h.update(fh.read(_MIB))
        if size > _MIB:
            fh.seek(max(_MIB, size - _MIB))
            h.update(fh.read(_MIB))
    return f"{size}:{h.hexdigest()[:32]}"


def slide_fingerprint(path: str | os.PathLike[str]) -> str:
    """:func:`file_fingerprint` of a slide: of its file, or for a DICOM whole-slide image given as
    a folder, of its largest level's file (the others are its downsamples)."""
    p = Path(path)
    if p.is_dir():
        from fastinsight.dicom import whole_slide_file

        found = whole_slide_file(p)
        if found is None:
            raise OSError(f"{str(p)!r} holds no DICOM whole-slide image")
        p = found
    return file_fingerprint(p)


def options_hash(options: CohortOptions, mpp: float | None, encoder_weights_id: str | None) -> str:
    """Hash of every setting that changes a slide's outputs (not device, batch size, threads)."""
    p = options.predict
    settings = {
        "marker_format": MARKER_FORMAT,
        "tissue": p.tissue,
        "min_tissue_fraction": p.min_tissue_fraction,
        "min_cell_fraction": p.min_cell_fraction,
        "mpp": mpp,
        "reader_backend": p.reader_backend,
        "encoder_weights": encoder_weights_id,
        "thumbnail_size": p.thumbnail_size,
        "class": options.class_,
        "encoding": options.encoding,
        "all_classes": options.all_classes,
    }
    blob = json.dumps(settings, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class SlideJob:
    """What a task needs about its slide: where it is, where its outputs go, what they must match."""

    slide: CohortSlide
    out_dir: Path
    options_hash: str


def check_complete(
    slide_dir: Path, job: SlideJob, model_sha256: str
) -> tuple[dict[str, Any] | None, str]:
    """``(marker, "")`` when ``slide_dir`` holds complete outputs of this model, settings and
    slide file; otherwise ``(None, reason)``. Reads the marker and checks every file it lists."""
    marker_path = slide_dir / MARKER_NAME
    if not marker_path.is_file():
        return None, "no completion marker"
    try:
        marker = loads_json(marker_path.read_text())
    except (OSError, ValueError):
        return None, "unreadable completion marker"
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None, "completion marker of another format"
    if marker.get("slide_id") != job.slide.slide_id:
        return None, "completion marker of another slide id"
    if marker.get("model_sha256") != model_sha256:
        return None, "made by another model"
    if marker.get("options_hash") != job.options_hash:
        return None, "made with other settings"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return None, "completion marker lists no files"
    for name, meta in files.items():
        f = slide_dir / name
        if Path(name).name != name or not f.is_file():
            return None, f"missing output {name}"
        if not isinstance(meta, dict) or f.stat().st_size != meta.get("bytes"):
            return None, f"output {name} has another size than recorded"
        if file_sha256(f) != meta.get("sha256"):
            return None, f"output {name} has another sha256 than recorded"
    try:
        fingerprint = slide_fingerprint(job.slide.path)
    except (OSError, FastInsightError):
        return None, "slide file unreadable"
    if marker.get("slide_fingerprint") != fingerprint:
        return None, "slide file changed"
    return marker, ""


def write_marker(
    partial: Path,
    job: SlideJob,
    model_sha256: str,
    fingerprint: str,
    written: Iterable[Path],
    outcome: dict[str, Any],
) -> None:
    """Write ``complete.json`` into the ``.partial`` folder, last (atomically): its presence says
    every file it lists was written in full."""
    marker = {
        "format": MARKER_FORMAT,
        "fastinsight": __version__,
        "slide_id": job.slide.slide_id,
        "slide_path": str(job.slide.path),
        "slide_fingerprint": fingerprint,
        "model_sha256": model_sha256,
        "options_hash": job.options_hash,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in written},
        "outcome": outcome,
    }
    with atomic_path(partial / MARKER_NAME) as tmp:
        tmp.write_text(dumps_json(marker, "complete.json", indent=2) + "\n", encoding="utf-8")


def _install(partial: Path, final: Path) -> None:
    """Move a finished ``.partial`` folder into place, replacing older outputs.

    POSIX cannot rename a folder over a non-empty one, so an old folder is first moved aside
    (``.<id>.old-*``, removed after; a crash in between leaves it for the next start to clean)."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}{OLD_INFIX}{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(partial, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _cohort_lock(out_dir: Path) -> Iterator[None]:
    """One cohort run per output folder at a time (two would replace each other's slides)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fh = open(out_dir / LOCK_NAME, "a")  # noqa: SIM115 (held for the whole run)
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(
                f"another predict-cohort is writing to {str(out_dir)!r}; wait for it to finish "
                "or choose another --out-dir"
            ) from None
        yield
    finally:
        fh.close()


def _clean_stale(out_dir: Path) -> None:
    """Remove what interrupted runs left: ``.<id>.partial`` and ``.<id>.old-*`` folders."""
    for p in out_dir.iterdir():
        if (
            p.name.startswith(".")
            and p.is_dir()
            and (p.name.endswith(PARTIAL_SUFFIX) or OLD_INFIX in p.name)
        ):
            shutil.rmtree(p, ignore_errors=True)


def remove_partials(out_dir: Path, slide_ids: Iterable[str]) -> None:
    """Remove the ``.partial`` folders of slides an interrupted run did not finish (what a killed
    worker had written; the next start would remove them too)."""
    for sid in slide_ids:
        shutil.rmtree(partial_dir(out_dir, sid), ignore_errors=True)


__all__ = [
    "MARKER_FORMAT",
    "SlideJob",
    "check_complete",
    "file_fingerprint",
    "slide_fingerprint",
    "options_hash",
    "remove_partials",
    "write_marker",
]
