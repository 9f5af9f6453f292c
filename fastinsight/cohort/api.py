"""``fastinsight predict-cohort``: many slides over the CPUs or GPUs of one machine or a Ray cluster.

Each slide is one Ray task (issue 7). The driver lists the slides (a folder, a glob or a manifest
CSV), skips those whose outputs are already complete and were made by the same model and
settings, puts the model's weights into the Ray object store once, and submits one task per
remaining slide. A task asks for one GPU when the cluster has GPUs (so N GPUs run N slides at a
time) and for CPU slots otherwise; it rebuilds the model from the object store (never from the
checkpoint file), builds the encoder the model's config names (cached per worker process), runs
:func:`fastinsight.predict.slide.predict_slide` and writes::

    DIR/<slide id>/heatmap.tif     pyramidal heatmap TIFF (heatmap.<class>.tif with --all-classes)
    DIR/<slide id>/overlay.png     heatmap over a thumbnail
    DIR/<slide id>/scores.npz      raw float heatmap cells and mask
    DIR/<slide id>/report.json     scores, thresholds, model, encoder, geometry, timings
    DIR/<slide id>/complete.json   written last: model sha256, settings hash, slide fingerprint,
                                   size and sha256 of every file above
    DIR/summary.csv                one row per slide, rewritten atomically as slides finish

Faults. A slide that fails with a :class:`~fastinsight.errors.FastInsightError` (corrupt file, no
mpp, no tissue) is recorded as ``failed`` with its one-line message and is not retried; the
cohort goes on. A worker process that dies mid-slide (killed, out of memory, node lost) is a
system failure: Ray retries the task up to ``max_retries`` times. A task writes into
``DIR/.<id>.partial`` and renames it into place only when complete, so a crash leaves no partial
output (stale ``.partial`` folders are removed at the next start). Rerunning the same command
skips slides whose ``complete.json`` matches the model's sha256, the settings hash and the slide
file, and whose files still have the recorded sizes and sha256; everything else is redone.

Exit code of the command: 0 when every slide is ``ok`` or ``skipped``; :data:`EXIT_SLIDES_FAILED`
(8) when at least one slide failed (the others are done, see ``summary.csv``); 2-7 for an error
that stops the whole cohort (bad model, bad manifest, no Ray; see ``fastinsight.errors``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastinsight._version import __version__
from fastinsight.atomic import atomic_path
from fastinsight.errors import (
    BackendError,
    FastInsightError,
    InputError,
    OutputError,
)
from fastinsight.fileformat import file_sha256
from fastinsight.predict.slide import STAGES, Outputs, PredictOptions
from fastinsight.text import dumps_json

EXIT_SLIDES_FAILED = 8
"""Exit code of ``predict-cohort`` when at least one slide failed (the rest were processed)."""

SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".tif", ".tiff", ".vms", ".vmu")
"""File endings taken from a SLIDES folder (a glob or a manifest takes any file)."""

MARKER_NAME = "complete.json"
MARKER_FORMAT = 1
SUMMARY_NAME = "summary.csv"
LOCK_NAME = ".predict-cohort.lock"
PARTIAL_SUFFIX = ".partial"
OLD_INFIX = ".old-"
STATUSES = ("ok", "failed", "skipped", "pending")

# Test-only fault injection (tests/cohort): a task whose slide id is listed in CRASH_ENV kills its
# own worker process with os._exit(1) after writing part of its outputs, once per id: the first
# attempt leaves CRASH_DIR_ENV/<id>.crashed behind and later attempts see it and run normally.
# Nothing happens unless both variables are set.
CRASH_ENV = "FASTINSIGHT_TEST_CRASH_ONCE"
CRASH_DIR_ENV = "FASTINSIGHT_TEST_CRASH_DIR"

_ID_RE = re.compile(r"^[^/\\\x00-\x1f]+$")
_RESERVED_IDS = {SUMMARY_NAME.lower(), LOCK_NAME.lower()}
_MANIFEST_PATH_COLUMNS = ("path", "slide_path", "slide", "file")
_MANIFEST_ID_COLUMNS = ("slide_id", "id")
_MIB = 1 << 20


# --------------------------------------------------------------------------------------------
# Slides: folder, glob or manifest
# --------------------------------------------------------------------------------------------


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
    from fastinsight.inputs import allow_long_csv_fields

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
    """SLIDES as a folder (its slide files, by ending), a glob (every file it matches), a
    manifest ``.csv`` (see :func:`read_manifest`) or one slide file. Ids must be unique."""
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
        if not files:
            raise InputError(
                f"no slide files in folder {text!r} (looked for {', '.join(SLIDE_EXTENSIONS)}); "
                "pass a glob such as 'dir/*.ext' or a manifest CSV for other names"
            )
        slides = [
            CohortSlide(check_slide_id(default_slide_id(f), str(f)), f.absolute()) for f in files
        ]
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


# --------------------------------------------------------------------------------------------
# Settings, fingerprints, the completion marker
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CohortOptions:
    """Settings of one cohort run; the flags of ``fastinsight predict-cohort`` map onto these.

    ``predict`` holds the per-slide settings (its ``device`` and ``progress`` are decided per
    task); a manifest's mpp overrides ``predict.mpp`` for its slide. ``gpus_per_slide=None``
    means 1 when the Ray cluster has GPUs and 0 (CPU) otherwise; fractions share a GPU.
    ``num_cpus`` sizes a local Ray instance (default: every core) and is ignored on a cluster.
    """

    predict: PredictOptions = field(default_factory=lambda: PredictOptions(progress=False))
    class_: str | None = None
    encoding: str = "score"
    all_classes: bool = False
    backend: str = "auto"
    ray_address: str | None = None
    num_cpus: int | None = None
    cpus_per_slide: float = 1.0
    gpus_per_slide: float | None = None
    max_retries: int = 2
    progress: bool = True
    ray_temp_dir: str | None = None

    def __post_init__(self) -> None:
        if self.encoding not in ("score", "rgb"):
            raise InputError(
                f"encoding must be 'score' or 'rgb', got {self.encoding!r}", fields=("encoding",)
            )
        if not self.cpus_per_slide > 0:
            raise InputError(
                f"cpus_per_slide must be > 0, got {self.cpus_per_slide}", fields=("cpus_per_slide",)
            )
        if self.gpus_per_slide is not None and self.gpus_per_slide < 0:
            raise InputError(
                f"gpus_per_slide must be >= 0, got {self.gpus_per_slide}",
                fields=("gpus_per_slide",),
            )
        if self.max_retries < 0:
            raise InputError(
                f"max_retries must be >= 0, got {self.max_retries}", fields=("max_retries",)
            )
        if self.num_cpus is not None and self.num_cpus < 1:
            raise InputError(f"num_cpus must be >= 1, got {self.num_cpus}", fields=("num_cpus",))


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
        marker = json.loads(marker_path.read_text())
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
        fingerprint = file_fingerprint(job.slide.path)
    except OSError:
        return None, "slide file unreadable"
    if marker.get("slide_fingerprint") != fingerprint:
        return None, "slide file changed"
    return marker, ""


# --------------------------------------------------------------------------------------------
# Outcomes and summary.csv
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideOutcome:
    """One row of ``summary.csv``. ``scores`` in the model's class order (empty unless ok/skipped)."""

    slide_id: str
    status: str
    slide_path: str
    scores: tuple[float, ...] = ()
    error: str = ""
    n_tiles: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    tiles_per_s: float = float("nan")
    node: str = ""
    internal: bool = False  # failed for a reason other than the slide (worker died, a bug)

    def as_json(self) -> dict[str, Any]:
        return {
            "scores": list(self.scores),
            "n_tiles": self.n_tiles,
            "timings": self.timings,
            "tiles_per_s": self.tiles_per_s,
            "node": self.node,
        }


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fmt(x: float) -> str:
    return "" if x != x else format(float(x), ".9g")  # 9 digits round-trip float32 exactly


def summary_header(class_names: Sequence[str]) -> list[str]:
    return [
        "slide_id",
        "status",
        *(f"score_{c}" for c in class_names),
        "error",
        "n_tiles",
        "seconds",
        "tiles_per_s",
        *(f"{s}_s" for s in STAGES),
        "node",
        "slide_path",
    ]


def write_summary(path: Path, outcomes: Sequence[SlideOutcome], class_names: Sequence[str]) -> None:
    """Rewrite ``summary.csv`` atomically: a reader never sees half a file."""
    from fastinsight.text import clean_text

    # UTF-8 whatever the locale; file names that are not UTF-8 are written as \xNN.
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(summary_header(class_names))
        for o in outcomes:
            scores = [_fmt(s) for s in o.scores] if o.scores else [""] * len(class_names)
            done = o.status in ("ok", "skipped")
            w.writerow(
                [
                    clean_text(o.slide_id),
                    o.status,
                    *scores,
                    clean_text(_one_line(o.error)),
                    o.n_tiles if done else "",
                    _fmt(o.timings.get("total", float("nan"))) if done else "",
                    _fmt(o.tiles_per_s) if done else "",
                    *(_fmt(o.timings[s]) if done and s in o.timings else "" for s in STAGES),
                    o.node,
                    clean_text(str(o.slide_path)),
                ]
            )


def read_summary(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a ``summary.csv`` as dicts (for tests and notebooks)."""
    from fastinsight.inputs import allow_long_csv_fields

    allow_long_csv_fields()  # error messages of failed slides can be long
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@dataclass(frozen=True)
class CohortReport:
    """What a cohort run did: one outcome per slide (input order), and how many tasks it ran."""

    out_dir: Path
    outcomes: tuple[SlideOutcome, ...]
    class_names: tuple[str, ...]
    submitted: int
    tiles_per_s: float

    @property
    def summary_path(self) -> Path:
        return self.out_dir / SUMMARY_NAME

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    def by_id(self) -> dict[str, SlideOutcome]:
        return {o.slide_id: o for o in self.outcomes}

    @property
    def exit_code(self) -> int:
        """0 when every slide is ok or skipped, :data:`EXIT_SLIDES_FAILED` otherwise."""
        return (
            0 if all(o.status in ("ok", "skipped") for o in self.outcomes) else EXIT_SLIDES_FAILED
        )


# --------------------------------------------------------------------------------------------
# The Ray task (runs in a worker process)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPayload:
    """The model as it travels through the object store: config JSON and numpy weights
    (numpy so that workers on one node share one read-only copy)."""

    config_json: str
    state: dict[str, Any]
    backend: str
    info: dict[str, Any]

    @property
    def sha256(self) -> str:
        return str(self.info["sha256"])


@dataclass(frozen=True)
class TaskPlan:
    """Everything a task needs besides its slide and the model."""

    options: CohortOptions
    device: str
    torch_threads: int
    model_sha256: str


# Per worker process: the model (rebuilt once per checkpoint) and the encoder (built once per
# name/weights/device). Ray reuses worker processes, so a worker pays for each only once.
_WORKER_CACHE: dict[tuple[Any, ...], Any] = {}


def _worker_model(model_box: list[Any], sha256: str, device: str) -> tuple[Any, dict[str, Any]]:
    key = ("model", sha256, device)
    if key not in _WORKER_CACHE:
        import numpy as np
        import ray
        import torch

        from fastinsight.models.config import InsightConfig
        from fastinsight.models.insight import InsightModel

        payload: ModelPayload = ray.get(model_box[0])
        model = InsightModel(InsightConfig.from_json(payload.config_json), backend=payload.backend)
        # The object store hands out read-only arrays; copy before they become parameters.
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in payload.state.items()})
        for k in [k for k in _WORKER_CACHE if k[0] == "model"]:
            del _WORKER_CACHE[k]  # one model per worker: a rerun with another model frees the old
        _WORKER_CACHE[key] = (model.to(device).eval(), dict(payload.info))
    return _WORKER_CACHE[key]  # type: ignore[no-any-return]


def _worker_encoder(model: Any, weights: str | None, device: str) -> Any:
    cfg = model.config
    key = ("encoder", cfg.encoder, weights, cfg.tile_size_px, device)
    if key not in _WORKER_CACHE:
        from fastinsight.encoders import build_encoder

        _WORKER_CACHE[key] = build_encoder(
            cfg.encoder, weights, tile_size_px=cfg.tile_size_px, device=device
        ).eval()
    return _WORKER_CACHE[key]


def _test_crash_hook(slide_id: str) -> None:
    """Test-only (see CRASH_ENV): die like a killed worker, once per listed slide id."""
    ids = os.environ.get(CRASH_ENV)
    crash_dir = os.environ.get(CRASH_DIR_ENV)
    if not ids or not crash_dir or slide_id not in ids.split(","):
        return
    marker = Path(crash_dir) / f"{slide_id}.crashed"
    if marker.exists():
        return
    marker.write_text(f"worker pid {os.getpid()} exited on purpose\n")
    os._exit(1)


def slide_dir(out_dir: Path, slide_id: str) -> Path:
    return out_dir / slide_id


def partial_dir(out_dir: Path, slide_id: str) -> Path:
    return out_dir / f".{slide_id}{PARTIAL_SUFFIX}"


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


def _write_outputs(result: Any, out: Path, options: CohortOptions) -> list[Path]:
    """The slide folder's outputs (``SlideResult.write_outputs``, the one writer)."""
    written = result.write_outputs(
        Outputs.folder(
            out,
            class_=options.class_,
            encoding=options.encoding,
            all_classes=options.all_classes,
        )
    )
    _test_crash_hook(result.slide_id)  # after the outputs, before the marker
    return written


def run_slide(model_box: list[Any], job: SlideJob, plan: TaskPlan) -> SlideOutcome:
    """One slide, in a Ray worker: predict, write into ``.<id>.partial``, marker last, rename.

    ``model_box`` is ``[ObjectRef]`` (a list, so Ray hands the reference over unresolved and the
    weights are fetched only on a worker's first slide for this model). FastInsightErrors come
    back as a ``failed`` outcome (never retried); a worker that dies is Ray's to retry.
    """
    import torch

    from fastinsight.predict.slide import predict_slide

    slide = job.slide
    node = socket.gethostname()
    partial = partial_dir(job.out_dir, slide.slide_id)
    try:
        torch.set_num_threads(plan.torch_threads)
        model, info = _worker_model(model_box, plan.model_sha256, plan.device)
        predict = plan.options.predict
        encoder = _worker_encoder(model, predict.encoder_weights, plan.device)
        mpp = slide.mpp if slide.mpp is not None else predict.mpp
        opts = dataclasses.replace(predict, device=plan.device, mpp=mpp, progress=False)
        fingerprint = file_fingerprint(slide.path) if slide.path.is_file() else ""
        result = predict_slide(slide.path, model, encoder, opts, model_info=info)
        result.slide_id = slide.slide_id
        shutil.rmtree(partial, ignore_errors=True)  # left by an attempt that died
        partial.mkdir(parents=True)
        written = _write_outputs(result, partial, plan.options)
        outcome = SlideOutcome(
            slide_id=slide.slide_id,
            status="ok",
            slide_path=str(slide.path),
            scores=tuple(float(s) for s in result.scores),
            n_tiles=int(result.n_tiles),
            timings={k: float(v) for k, v in result.timings.items()},
            tiles_per_s=float(result.tiles_per_second),
            node=node,
        )
        marker = {
            "format": MARKER_FORMAT,
            "fastinsight": __version__,
            "slide_id": slide.slide_id,
            "slide_path": str(slide.path),
            "slide_fingerprint": fingerprint,
            "model_sha256": plan.model_sha256,
            "options_hash": job.options_hash,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": {
                p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in written
            },
            "outcome": outcome.as_json(),
        }
        with atomic_path(partial / MARKER_NAME) as tmp:
            tmp.write_text(dumps_json(marker, "complete.json", indent=2) + "\n", encoding="utf-8")
        _install(partial, slide_dir(job.out_dir, slide.slide_id))
        return outcome
    except FastInsightError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        return SlideOutcome(
            slide.slide_id, "failed", str(slide.path), error=_one_line(str(exc)), node=node
        )
    except torch.cuda.OutOfMemoryError:
        shutil.rmtree(partial, ignore_errors=True)
        msg = f"GPU out of memory on this slide with --batch-size {plan.options.predict.batch_size}; lower it"
        return SlideOutcome(slide.slide_id, "failed", str(slide.path), error=msg, node=node)
    except Exception as exc:  # a bug or an unexpected library error: record it, keep going
        traceback.print_exc()  # lands in the Ray worker log
        shutil.rmtree(partial, ignore_errors=True)
        msg = f"unexpected {type(exc).__name__}: {_one_line(str(exc))} (a fastinsight bug? please report it)"
        return SlideOutcome(
            slide.slide_id, "failed", str(slide.path), error=msg, node=node, internal=True
        )


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BackendError(
            "predict-cohort needs Ray, which is not installed; pip install 'fastinsight[cohort]'"
        ) from None
    return ray


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


def _check_class(class_: str | None, names: Sequence[str]) -> None:
    if class_ is None or class_ in names:
        return
    if class_.isdigit() and int(class_) < len(names):
        return
    raise InputError(f"unknown class {class_!r}; the model has {list(names)} (or an index)")


@dataclass
class _RaySession:
    """The Ray module in use and, for a local instance, its session folder (runtime state)."""

    ray: Any
    temp_dir: str | None = None
    keep_logs: bool = False  # a worker died or hit a bug: keep the local logs for a post-mortem


@contextlib.contextmanager
def _ray_session(options: CohortOptions, quiet: bool) -> Iterator[_RaySession]:
    """An existing connection when this process already has one (it stays open), else
    ``--ray-address`` / ``$RAY_ADDRESS``, else a new local instance; what is started here is shut
    down on the way out, and a local instance's temp folder removed (kept if ``keep_logs``)."""
    import logging

    ray = _import_ray()
    if ray.is_initialized():
        yield _RaySession(ray)
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from a hospital
    address = options.ray_address or os.environ.get("RAY_ADDRESS") or None
    common: dict[str, Any] = {
        "log_to_driver": False,  # worker chatter would break the progress bar; logs stay on disk
        "configure_logging": True,
        "logging_level": logging.ERROR if quiet else logging.WARNING,
    }
    temp_dir: str | None = None
    made_temp: str | None = None
    if not address:
        # Short path: Ray's sockets live under it and Unix socket paths are limited to 107 bytes.
        temp_dir = os.path.abspath(options.ray_temp_dir or tempfile.mkdtemp(prefix="fi-ray-"))
        made_temp = None if options.ray_temp_dir else temp_dir
    try:
        if temp_dir is None:
            ray.init(address=address, **common)
        else:
            # Light on a laptop: no dashboard, a small object store (it only carries the head's
            # weights and small results), logs in the temp folder.
            ray.init(
                address="local",
                num_cpus=options.num_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                object_store_memory=256 * _MIB,
                _temp_dir=temp_dir,
                **common,
            )
    except Exception as exc:
        if made_temp:
            shutil.rmtree(made_temp, ignore_errors=True)
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        hint = (
            "check `ray status` on the head node and that this machine can reach it"
            if address
            else "check free memory and /dev/shm, or pass --ray-address of a running cluster"
        )
        raise BackendError(
            f"cannot start or reach {where} ({_one_line(str(exc))}); {hint}"
        ) from exc
    # ray.init makes SIGTERM exit(15) at once; put fastinsight's handler back so SIGTERM unwinds
    # through the finally below (Ray shut down, temp folder removed) and exits 143.
    from fastinsight.signals import rearm_sigterm

    rearm_sigterm()
    session = _RaySession(ray, temp_dir)
    try:
        yield session
    except KeyboardInterrupt:
        print(
            "fastinsight: stopping: shutting Ray down (finished slides are kept; rerun the same "
            "command to resume)",
            file=sys.stderr,
        )
        raise
    finally:
        ray.shutdown()
        if session.keep_logs and temp_dir:
            print(
                f"fastinsight: the Ray logs of the failed slides are in {temp_dir}", file=sys.stderr
            )
        elif made_temp:
            shutil.rmtree(made_temp, ignore_errors=True)


def _plan_resources(ray: Any, options: CohortOptions) -> tuple[float, float]:
    """``(num_cpus, num_gpus)`` per slide task, checked against what the cluster has."""
    resources = ray.cluster_resources()
    cluster_gpus = float(resources.get("GPU", 0.0))
    cluster_cpus = float(resources.get("CPU", 0.0))
    gpus = options.gpus_per_slide
    if gpus is None:
        gpus = 1.0 if cluster_gpus > 0 else 0.0
    if gpus > 0 and cluster_gpus <= 0:
        raise BackendError(
            f"--gpus-per-slide {gpus:g} but the Ray cluster has no GPU; pass --gpus-per-slide 0 "
            "to run on CPUs, or add GPU nodes"
        )
    if options.cpus_per_slide > cluster_cpus:
        raise BackendError(
            f"--cpus-per-slide {options.cpus_per_slide:g} but the Ray cluster has {cluster_cpus:g} "
            "CPUs; lower --cpus-per-slide"
        )
    return options.cpus_per_slide, gpus


def _model_payload(model: Any, info: dict[str, Any], backend: str) -> ModelPayload:
    state = {k: v.detach().to("cpu").contiguous().numpy() for k, v in model.state_dict().items()}
    return ModelPayload(model.config.to_json(), state, backend, dict(info))


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="slide",
        desc="cohort",
        disable=None if enabled else True,  # None: off when not a terminal
        dynamic_ncols=True,
        file=sys.stderr,
    )


def _check_encoder(config: Any, weights: str | None) -> None:
    """Check the model's encoder before Ray starts, so a missing weight file or an encoder that
    does not fit the model fails here, once, not in every slide task. With a weight file the
    architecture is built on the meta device (no memory); the file itself is read by the tasks."""
    from fastinsight.encoders import build_encoder
    from fastinsight.models.insight import InsightModel
    from fastinsight.predict.slide import check_compatible

    device = "meta" if weights else "cpu"  # without weights only small random encoders build
    encoder = build_encoder(
        config.encoder, weights, tile_size_px=config.tile_size_px, device=device
    )
    check_compatible(InsightModel(config, backend="reference"), encoder)


def predict_cohort(
    slides: str | os.PathLike[str] | Sequence[CohortSlide],
    model_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: CohortOptions | None = None,
) -> CohortReport:
    """Run every slide of a cohort through the model with Ray; see the module docstring.

    ``slides`` is a folder, glob or manifest (see :func:`discover_slides`) or a list of
    :class:`CohortSlide`. Returns one outcome per slide; failed slides do not raise. Raises a
    FastInsightError only for what stops the whole cohort (model, manifest, output folder, Ray).
    """
    from fastinsight.predict.loading import load_for_predict

    opts = options or CohortOptions()
    cohort = check_unique(
        list(slides)
        if isinstance(slides, Sequence) and not isinstance(slides, str)
        else discover_slides(slides)
    )
    out = Path(out_dir).expanduser().absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --out-dir {str(out)!r}: {exc.strerror or exc}") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"--out-dir {str(out)!r} is not writable; choose another folder")

    with _cohort_lock(out):
        model, info = load_for_predict(
            Path(model_path).expanduser(), opts.backend, quiet=not opts.progress
        )
        names = tuple(model.config.names)
        _check_class(opts.class_, names)
        weights = opts.predict.encoder_weights
        _check_encoder(model.config, weights)
        weights_id = None
        if weights:
            try:
                weights_id = file_fingerprint(Path(weights).expanduser())
            except OSError as exc:
                raise InputError(
                    f"cannot read --encoder-weights {weights!r}: {exc.strerror or exc}"
                ) from exc
        _clean_stale(out)

        jobs = [
            SlideJob(
                s,
                out,
                options_hash(opts, s.mpp if s.mpp is not None else opts.predict.mpp, weights_id),
            )
            for s in cohort
        ]
        outcomes: dict[str, SlideOutcome] = {}
        todo: list[SlideJob] = []
        for job in jobs:
            marker, _reason = check_complete(
                slide_dir(out, job.slide.slide_id), job, info["sha256"]
            )
            if marker is None:
                outcomes[job.slide.slide_id] = SlideOutcome(
                    job.slide.slide_id, "pending", str(job.slide.path)
                )
                todo.append(job)
            else:
                prev = marker.get("outcome", {})
                outcomes[job.slide.slide_id] = SlideOutcome(
                    slide_id=job.slide.slide_id,
                    status="skipped",
                    slide_path=str(job.slide.path),
                    scores=tuple(float(s) for s in prev.get("scores", ())),
                    n_tiles=int(prev.get("n_tiles", 0)),
                    timings={k: float(v) for k, v in prev.get("timings", {}).items()},
                    tiles_per_s=float(prev.get("tiles_per_s", float("nan"))),
                    node=str(prev.get("node", "")),
                )
        order = [j.slide.slide_id for j in jobs]
        summary = out / SUMMARY_NAME

        def flush() -> None:
            write_summary(summary, [outcomes[i] for i in order], names)

        flush()
        tiles_per_s = float("nan")
        if todo:
            tiles_per_s = _run_jobs(todo, model, info, opts, outcomes, flush)
        report = CohortReport(out, tuple(outcomes[i] for i in order), names, len(todo), tiles_per_s)
    return report


def _run_jobs(
    todo: list[SlideJob],
    model: Any,
    info: dict[str, Any],
    opts: CohortOptions,
    outcomes: dict[str, SlideOutcome],
    flush: Any,
) -> float:
    """Submit one task per slide, collect outcomes as they finish; returns tiles/s overall."""
    n_total = len(outcomes)
    n_skipped = n_total - len(todo)
    bar = _progress_bar(n_total, n_skipped, opts.progress)
    counts = {"ok": 0, "failed": 0}
    tiles = 0
    start = time.perf_counter()

    def postfix(refresh: bool = True) -> None:
        rate = tiles / max(time.perf_counter() - start, 1e-9)
        left = n_total - n_skipped - counts["ok"] - counts["failed"]
        bar.set_postfix_str(
            f"ok={counts['ok']} failed={counts['failed']} skipped={n_skipped} left={left} "
            f"{rate:.1f} tiles/s",
            refresh=refresh,
        )

    postfix()
    try:
        with _ray_session(opts, quiet=not opts.progress) as session:
            ray = session.ray
            num_cpus, num_gpus = _plan_resources(ray, opts)
            plan = TaskPlan(
                options=opts,
                device="cuda" if num_gpus > 0 else "cpu",
                torch_threads=max(1, int(num_cpus)),
                model_sha256=str(info["sha256"]),
            )
            model_ref = ray.put(_model_payload(model, info, opts.backend))
            task = ray.remote(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                max_retries=opts.max_retries,  # worker or node died: retry
                retry_exceptions=False,  # a bad slide fails the same way twice: never retry
            )(run_slide)
            pending = {
                task.options(name=f"slide {job.slide.slide_id}").remote([model_ref], job, plan): job
                for job in todo
            }
            start = time.perf_counter()  # tiles/s of the cluster at work, not of Ray's start-up
            try:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                    for ref in done:
                        job = pending.pop(ref)
                        outcome = _collect(ray, ref, job, opts.max_retries)
                        session.keep_logs |= outcome.internal
                        outcomes[job.slide.slide_id] = outcome
                        counts["ok" if outcome.status == "ok" else "failed"] += 1
                        tiles += outcome.n_tiles if outcome.status == "ok" else 0
                        postfix(refresh=False)
                        bar.update(1)
                        flush()
                    postfix()
            finally:
                for ref in pending:  # interrupted: stop the rest (their slides stay pending)
                    with contextlib.suppress(Exception):
                        ray.cancel(ref, force=True)
    finally:
        bar.close()
        flush()
    return tiles / max(time.perf_counter() - start, 1e-9)


def _collect(ray: Any, ref: Any, job: SlideJob, max_retries: int) -> SlideOutcome:
    """The task's outcome; a task Ray gave up on (the worker died every time) becomes failed."""
    sid, path = job.slide.slide_id, str(job.slide.path)
    try:
        outcome = ray.get(ref)
    except ray.exceptions.RayError as exc:
        shutil.rmtree(partial_dir(job.out_dir, sid), ignore_errors=True)
        text = str(exc).strip()
        first = _one_line(text.splitlines()[0] if text else "")[:300]
        if isinstance(exc, ray.exceptions.RayTaskError):  # raised outside run_slide's guard
            return SlideOutcome(
                sid,
                "failed",
                path,
                error=f"task error ({type(exc).__name__}: {first})",
                internal=True,
            )
        return SlideOutcome(
            sid,
            "failed",
            path,
            error=f"worker died on this slide {max_retries + 1} time(s) ({type(exc).__name__}: "
            f"{first}); look for out-of-memory kills in the Ray logs, or raise --max-retries",
            internal=True,
        )
    if not isinstance(outcome, SlideOutcome) or outcome.slide_id != sid:
        return SlideOutcome(
            sid,
            "failed",
            path,
            error=f"the task returned {type(outcome).__name__}, not an outcome",
            internal=True,
        )
    return outcome


__all__ = [
    "EXIT_SLIDES_FAILED",
    "CohortOptions",
    "CohortReport",
    "CohortSlide",
    "SlideOutcome",
    "check_complete",
    "discover_slides",
    "predict_cohort",
    "read_manifest",
    "read_summary",
]
