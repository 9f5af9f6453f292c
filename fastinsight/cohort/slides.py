"""The slides of a cohort: a folder, a glob, a manifest CSV or one file, each with its id.

A slide id names the slide's output folder, so it is checked like a file name (no separators, no
leading dot, not a name the cohort folder uses itself) and ids must be distinct ignoring case
(folders on macOS and Windows are). Torch-free.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastinsight.cohort.layout import LOCK_NAME, SUMMARY_NAME
from fastinsight.dicom import is_whole_slide_image
from fastinsight.errors import InputError
from fastinsight.inputs import allow_long_csv_fields

SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".tif", ".tiff", ".vms", ".vmu")
"""File endings taken from a SLIDES folder (a glob or a manifest takes any file)."""

_ID_RE = re.compile(r"^[^/\\\x00-\x1f]+$")
_RESERVED_IDS = {SUMMARY_NAME.lower(), LOCK_NAME.lower()}
_MANIFEST_PATH_COLUMNS = ("path", "slide_path", "slide", "file")
_MANIFEST_ID_COLUMNS = ("slide_id", "id")


@dataclass(frozen=True)
class CohortSlide:
    """One unit of work: a slide file, the id its outputs are filed under, an optional mpp."""

    slide_id: str
    path: Path
    mpp: float | None = None


def default_slide_id(path: str | os.PathLike[str]) -> str:
    """The file name without its ending (``x.ome.tif`` -> ``x``, ``x.svs`` -> ``x``)."""
    name = Path(path).name
    for ending in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return Path(name).stem


def check_slide_id(slide_id: str, where: str) -> str:
    """A slide id becomes a folder name: no separators, no leading dot, not a reserved name."""
    if (
        not slide_id
        or not _ID_RE.match(slide_id)
        or slide_id.startswith(".")
        or slide_id.lower() in _RESERVED_IDS
        or len(slide_id) > 200
    ):
        raise InputError(
            f"slide id {slide_id!r} ({where}) cannot name an output folder; use letters, digits, "
            "'-', '_' or '.', not starting with '.' (set it in a manifest's slide_id column)"
        )
    return slide_id


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def _parse_mpp(text: str, where: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        mpp = float(text)
    except ValueError:
        raise InputError(
            f"{where}: mpp {text!r} is not a number; give microns per pixel, e.g. 0.25"
        ) from None
    if not (mpp > 0 and mpp < 1000):
        raise InputError(
            f"{where}: mpp must be a positive number of microns per pixel, got {text!r}"
        )
    return mpp


def read_manifest(path: str | os.PathLike[str]) -> list[CohortSlide]:
    """A CSV with a header: ``path`` (or ``slide_path``/``slide``/``file``), optional ``slide_id``
    (or ``id``) and ``mpp``; other columns (labels, notes) are ignored. Relative paths are taken
    from the manifest's folder; an empty slide_id means the file name, an empty mpp the file's."""
    manifest = Path(path).expanduser()
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise InputError(f"cannot read manifest {str(manifest)!r}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise InputError(
            f"manifest {str(manifest)!r} is not UTF-8 text; save it as a UTF-8 CSV"
        ) from None
    allow_long_csv_fields()
    reader = csv.DictReader(io.StringIO(text))
    header = {(h or "").strip().lower(): h for h in reader.fieldnames or []}
    path_col = next((header[c] for c in _MANIFEST_PATH_COLUMNS if c in header), None)
    if path_col is None:
        raise InputError(
            f"manifest {str(manifest)!r} has no path column (header: {list(header)}); expected a "
            "header row with 'path' and optionally 'slide_id' and 'mpp'"
        )
    id_col = next((header[c] for c in _MANIFEST_ID_COLUMNS if c in header), None)
    mpp_col = header.get("mpp")
    slides = []
    for line, row in enumerate(reader, start=2):
        where = f"{manifest.name} line {line}"
        raw_path = (row.get(path_col) or "").strip()
        if not raw_path:
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # a blank line
            raise InputError(f"{where}: empty slide path; every row needs a path")
        p = Path(raw_path).expanduser()
        if not p.is_absolute():
            p = manifest.parent / p
        sid = (row.get(id_col) or "").strip() if id_col else ""
        mpp = _parse_mpp(row.get(mpp_col) or "", where) if mpp_col else None
        slides.append(
            CohortSlide(check_slide_id(sid or default_slide_id(p), where), p.absolute(), mpp)
        )
    if not slides:
        raise InputError(f"manifest {str(manifest)!r} lists no slides; add one row per slide")
    return slides


def discover_slides(spec: str | os.PathLike[str]) -> list[CohortSlide]:
    """SLIDES as a folder (its slide files, by ending, and its DICOM WSI subfolders), a glob
    (every file it matches), a manifest ``.csv`` (see :func:`read_manifest`) or one slide file.
    Ids must be unique."""
    text = os.path.expanduser(str(spec))
    p = Path(text)
    if p.is_dir():
        files = sorted(
            f
            for f in p.iterdir()
            if f.is_file()
            and not f.name.startswith(".")
            and f.name.lower().endswith(SLIDE_EXTENSIONS)
        )
        # DICOM whole-slide images are folders (one file per level): each subfolder holding
        # one is a slide, named by the subfolder; a folder that is one DICOM WSI is one slide.
        dicom_dirs = sorted(
            d
            for d in p.iterdir()
            if d.is_dir() and not d.name.startswith(".") and is_whole_slide_image(d)
        )
        if not files and not dicom_dirs and is_whole_slide_image(p):
            dicom_dirs = [p]
        if not files and not dicom_dirs:
            raise InputError(
                f"no slide files in folder {text!r} (looked for {', '.join(SLIDE_EXTENSIONS)} "
                "and DICOM whole-slide image folders); pass a glob such as 'dir/*.ext' or a "
                "manifest CSV for other names"
            )
        slides = [
            CohortSlide(check_slide_id(default_slide_id(f), str(f)), f.absolute()) for f in files
        ] + [CohortSlide(check_slide_id(d.name, str(d)), d.absolute()) for d in dicom_dirs]
    elif p.is_file() and p.suffix.lower() == ".csv":
        slides = read_manifest(p)
    elif p.is_file():
        slides = [CohortSlide(check_slide_id(default_slide_id(p), text), p.absolute())]
    elif _is_glob(text):
        files = sorted(Path(f) for f in glob.glob(text, recursive=True) if Path(f).is_file())
        if not files:
            raise InputError(
                f"the pattern {text!r} matches no file; check the folder and the quotes"
            )
        slides = [
            CohortSlide(check_slide_id(default_slide_id(f), str(f)), f.absolute()) for f in files
        ]
    else:
        raise InputError(
            f"SLIDES {text!r} is neither a folder, a glob, a manifest .csv nor a slide file; check the path"
        )
    return check_unique(slides)


def check_unique(slides: Sequence[CohortSlide]) -> list[CohortSlide]:
    """Every id valid and distinct (ignoring case: folders on macOS and Windows do)."""
    seen: dict[str, CohortSlide] = {}
    for s in slides:
        check_slide_id(s.slide_id, str(s.path))
        key = s.slide_id.lower()
        if key in seen:
            raise InputError(
                f"two slides get the id {s.slide_id!r} ({str(seen[key].path)!r} and {str(s.path)!r}); "
                "give them distinct ids in a manifest's slide_id column"
            )
        seen[key] = s
    return list(slides)


__all__ = [
    "SLIDE_EXTENSIONS",
    "CohortSlide",
    "check_slide_id",
    "check_unique",
    "default_slide_id",
    "discover_slides",
    "read_manifest",
]
