"""Radiographs -> class scores, CAM heatmaps at image size, overlay, report; many -> one CSV.

Pipeline per batch: read (PNG/JPEG/DICOM, :mod:`fastinsight.radiograph.io`) -> display uint8 ->
the model's eval transform (cubic resize to ``image_size``, normalise) -> ``model.predict`` on
the device in batches -> per image: scores ``[K]`` and the class probability maps
``sigmoid(logits)`` ``[K, h, w]``.

The heatmap at image size is the probability map upsampled bilinearly with
``align_corners=True`` straight to the image's height and width (the model saw the image squashed
to ``S x S``; both grids span the whole image, so this is the same geometry as upsampling to
``S x S`` and stretching back). The arg-max point of a class is the first maximum (row-major) of
that upsampled map, in image pixels ``(x, y)``, as PYLON's point-localisation metric takes it.
"""

from __future__ import annotations

import csv
import glob
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastinsight.atomic import atomic_path
from fastinsight.errors import CheckpointError, ConfigError, FastInsightError, InputError
from fastinsight.radiograph.io import Radiograph, read_radiograph
from fastinsight.radiograph.preprocess import model_inputs
from fastinsight.text import ascii_text, clean_text, dumps_json

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff"}
PATH_COLUMNS = ("path", "image", "Image Index", "file")


class RadiographModel(Protocol):
    """What the pipeline needs of a radiograph model (PYLON, Yao et al. multi-resolution)."""

    family: str
    modality: str
    config: Any

    def predict(self, x: Tensor) -> Any: ...
    def parameters(self) -> Iterator[torch.nn.Parameter]: ...


def load_radiograph_model(
    path: str | os.PathLike[str], device: str | torch.device | None = None
) -> Any:
    """Load PYLON or the multi-resolution network through the package's loader table.

    The radiograph families (and any registered before them) are tried; a file none of them
    claims is explained in radiograph terms (an INSIGHT slide model, a safetensors without
    fastinsight's config, a state_dict of another network) instead of falling through to
    INSIGHT's loader, whose advice ("pass an official INSIGHT .pth") is wrong here. A model whose
    stem wants more than one channel is refused by name (:func:`check_grey_model`).
    """
    from fastinsight.inputs import check_input_path, resolve_device
    from fastinsight.models.checkpoints import LOADERS, CheckpointFile, check_model_path
    from fastinsight.models.radiograph_common import ready, sniff_weights_file
    from fastinsight.models.statefiles import read_safetensors, read_torch_state_dict

    check_model_path(path, "load_radiograph_model")  # None, a loaded model: a ConfigError
    # A bad name (ConfigError) or an absent GPU (BackendError) before the file is read.
    dev = resolve_device(device)
    p = check_input_path(path, "model file", CheckpointError)
    if sniff_weights_file(p) == "torch":
        ckpt = CheckpointFile(p, "torch", read_torch_state_dict(p))
    else:
        meta, state = read_safetensors(p)
        ckpt = CheckpointFile(p, "safetensors", state, meta)
    entry = next((e for e in LOADERS if not e.name.startswith("insight") and e.accepts(ckpt)), None)
    if entry is None:
        raise CheckpointError(_not_a_radiograph_model(ckpt))
    model = entry.load(ckpt, "auto")
    if getattr(model, "modality", None) != "radiograph":
        raise CheckpointError(
            f"{str(p)!r} holds a {type(model).__name__}, not a radiograph model; pass a "
            "PYLON (.pth/.pkl/.safetensors) or multi-resolution (.safetensors) checkpoint"
        )
    check_grey_model(model, repr(str(p)))
    return ready(model, dev)


RADIOGRAPH_CHECKPOINTS = (
    "pass the official PYLON state_dict (.pth/.pkl, keys 'net.encoder...') or a fastinsight "
    "radiograph .safetensors (PYLON or multi-resolution, saved with its config)"
)


def _not_a_radiograph_model(ckpt: Any) -> str:
    """Why no radiograph family claims ``ckpt``, in words a radiograph user can act on."""
    from fastinsight.models.insight import CONFIG_KEY

    name = repr(str(ckpt.path))
    if ckpt.format == "torch":
        if "reduce_dimension_block.0.weight" in ckpt.state:
            return f"{name} is an INSIGHT slide model, not a radiograph model; " + (
                RADIOGRAPH_CHECKPOINTS
            )
        first = next(iter(ckpt.state), "<empty>")
        return (
            f"{name} is not a PYLON checkpoint: none of its {len(ckpt.state)} keys is "
            f"'net.segmentation_head.0.weight' / 'net.decoder.pa.mid.0.conv.weight' (first "
            f"key {first!r}); " + RADIOGRAPH_CHECKPOINTS
        )
    if CONFIG_KEY in ckpt.metadata:
        return f"{name} is a fastinsight INSIGHT (slide) model, not a radiograph model; " + (
            RADIOGRAPH_CHECKPOINTS
        )
    return (
        f"{name} is a safetensors file without fastinsight's config (metadata key "
        f"{CONFIG_KEY!r}), so its architecture is unknown; " + RADIOGRAPH_CHECKPOINTS
    )


def check_grey_model(model: Any, source: str) -> None:
    """Refuse a model whose stem wants other than one channel: radiographs are read as one grey
    channel, so such a model would fail on its first batch with a message naming no file."""
    channels = int(getattr(model.config, "in_channels", 1))
    if channels != 1:
        raise CheckpointError(
            f"{source}: the {getattr(model, 'family', 'radiograph')} model's first convolution "
            f"takes {channels} channels; fastinsight reads radiographs as one grey channel (the "
            "official PYLON stem); pass a single-channel checkpoint"
        )


@dataclass(frozen=True)
class PredictOptions:
    """``batch_size`` images per forward; ``device`` None = the model's.

    Checked when made (ConfigError naming the field; the CLI shows its flag)."""

    batch_size: int = 8
    device: str | None = None

    def __post_init__(self) -> None:
        from fastinsight.inputs import option_device, option_int

        object.__setattr__(self, "batch_size", option_int(self.batch_size, "batch_size", 1))
        option_device(self.device)


ON_ERROR = ("raise", "yield")


@dataclass(eq=False)
class RadiographResult:
    """One image's prediction. ``prob_maps``: ``sigmoid(logits)`` ``[K, h, w]`` at model stride."""

    radiograph: Radiograph
    scores: np.ndarray
    prob_maps: Tensor
    class_names: tuple[str, ...]
    facts: dict[str, Any] = field(default_factory=dict)

    def heatmap(self, k: int) -> np.ndarray:
        """Class ``k``'s map at image size. Shapes: -> float32 ``[H, W]`` in [0, 1]."""
        return upsample_map(self.prob_maps[k], (self.radiograph.height, self.radiograph.width))

    def argmax_point(self, k: int) -> tuple[int, int, float]:
        """``(x, y, value)``: the first maximum of :meth:`heatmap` in image pixels."""
        hm = self.heatmap(k)
        flat = int(np.argmax(hm))
        y, x = divmod(flat, hm.shape[1])
        return x, y, float(hm[y, x])

    def report(self) -> dict[str, Any]:
        pts = {}
        for k, name in enumerate(self.class_names):
            x, y, v = self.argmax_point(k)
            pts[name] = {"x": x, "y": y, "value": round(v, 6)}
        return {
            "image": self.radiograph.path,
            "width": self.radiograph.width,
            "height": self.radiograph.height,
            "pixel_spacing_mm": self.radiograph.pixel_spacing_mm,
            "input": self.radiograph.facts,
            "scores": {n: float(s) for n, s in zip(self.class_names, self.scores, strict=False)},
            "argmax_points": pts,
            **self.facts,
        }


def upsample_map(prob: Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinear, ``align_corners=True`` (as the official metric). Shapes: ``[h, w]`` -> ``[H, W]``."""
    t = prob.detach().float().cpu()[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=True)[0, 0].numpy()


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - models always have parameters
        return torch.device("cpu")


def predict_radiographs(
    paths: Sequence[str | os.PathLike[str]],
    model: Any,
    options: PredictOptions | None = None,
    *,
    on_error: str = "raise",
) -> Iterator[RadiographResult | tuple[str, FastInsightError]]:
    """Predict images in batches; yields one result per path, in order.

    ``on_error="raise"`` stops at the first unreadable image; ``"yield"`` yields
    ``(path, error)`` for it and carries on. The arguments are checked here, when the function
    is called (not at the first ``next``). While the iterator runs the model is in eval mode on
    the run's device; it gets its training mode and device back when the iterator ends, fails
    or is closed.
    """
    from fastinsight.inputs import option_choice, resolve_device

    opts = PredictOptions() if options is None else options
    if not isinstance(opts, PredictOptions):
        raise ConfigError(
            f"options must be a fastinsight.radiograph.predict.PredictOptions, got "
            f"{type(opts).__name__}"
        )
    option_choice(on_error, "on_error", ON_ERROR)
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise ConfigError(
            f"paths must be a list of image paths, got one path {os.fspath(paths)!r}; pass "
            "[path] (or expand_inputs([...]) for folders, globs and CSV lists)"
        )
    if not isinstance(paths, Iterable):
        raise ConfigError(
            f"paths must be a list of image paths, got {type(paths).__name__}; pass [path] "
            "(or expand_inputs([...]) for folders, globs and CSV lists)"
        )
    if getattr(model, "modality", None) != "radiograph":
        raise InputError(
            f"model family {getattr(model, 'family', type(model).__name__)!r} is not a "
            "radiograph model; pass a PYLON or multi-resolution LSE-LBA checkpoint"
        )
    check_grey_model(model, f"model {getattr(model, 'family', type(model).__name__)!r}")
    device = resolve_device(opts.device) if opts.device else _device_of(model)
    return _predict_batches(list(paths), model, opts.batch_size, device, on_error)


def _predict_batches(
    paths: list[str | os.PathLike[str]],
    model: Any,
    batch_size: int,
    device: torch.device,
    on_error: str,
) -> Iterator[RadiographResult | tuple[str, FastInsightError]]:
    from fastinsight.inputs import lent_to

    cfg = model.config
    names = tuple(cfg.names)
    with lent_to(device, model):
        for start in range(0, len(paths), batch_size):
            batch: list[Radiograph | tuple[str, FastInsightError]] = []
            for p in paths[start : start + batch_size]:
                try:
                    batch.append(read_radiograph(p))
                except FastInsightError as exc:
                    if on_error == "raise":
                        raise
                    batch.append((str(p), exc))
            good = [r for r in batch if isinstance(r, Radiograph)]
            out = None
            if good:
                x = model_inputs([r.image for r in good], cfg.image_size, cfg.mean, cfg.std)
                out = model.predict(x.to(device))
            i = 0
            for item in batch:
                if not isinstance(item, Radiograph):
                    yield item
                    continue
                assert out is not None
                yield RadiographResult(
                    radiograph=item,
                    scores=out.scores[i].float().cpu().numpy(),
                    prob_maps=out.probabilities[i].float().cpu(),
                    class_names=names,
                )
                i += 1


# ======================================================================================= outputs


def heatmap_description(result: RadiographResult, k: int, model_name: str) -> str:
    lines = [
        "fastinsight radiograph heatmap",
        f"model: {model_name}",
        f"class: {result.class_names[k]}",
        "encoding: uint8 score; v in 1..255 -> probability = (v - 1) / 254; 0 unused",
        f"image: {result.radiograph.path} ({result.radiograph.width} x "
        f"{result.radiograph.height} px)",
        f"score: {float(result.scores[k]):.6f}",
        "map: sigmoid(CAM logits) upsampled bilinearly (align_corners=True) to the image size",
    ]
    # A TIFF ASCII tag holds 7-bit text only: image paths, model files and class names in any
    # script (or with undecodable bytes) are written as \xNN / \uNNNN escapes.
    return ascii_text("\n".join(" ".join(line.split()) for line in lines))


def write_heatmap(
    path: str | os.PathLike[str], result: RadiographResult, k: int, model_name: str
) -> None:
    """Class ``k``'s heatmap as a tiled uint8 TIFF the size of the input image (atomically).

    Codes as the slide heatmaps: ``1 + round(254 p)``; the pixel size is set when the image
    carries one.
    """
    import tifffile

    from fastinsight.slide.heatmap_tiff import encode_scores

    codes = encode_scores(result.heatmap(k), (0.0, 1.0))  # in blocks: a few MB of temporaries
    kwargs: dict[str, Any] = {}
    spacing = result.radiograph.pixel_spacing_mm
    if spacing is not None:
        kwargs = {
            "resolution": (10.0 / spacing[1], 10.0 / spacing[0]),
            "resolutionunit": "CENTIMETER",
        }
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            codes,
            photometric="minisblack",
            compression="zlib",
            tile=(256, 256),
            description=heatmap_description(result, k, model_name),
            software="fastinsight",
            metadata=None,
            **kwargs,
        )


def write_radiograph_overlay(
    path: str | os.PathLike[str], result: RadiographResult, k: int, max_side: int = 1024
) -> None:
    """The heatmap of class ``k`` blended over the picture, with a colour bar (PNG, atomically)."""
    from PIL import Image

    from fastinsight.slide.overlay import write_overlay

    r = result.radiograph
    scale = min(1.0, max_side / max(r.width, r.height))
    w, h = max(1, round(r.width * scale)), max(1, round(r.height * scale))
    grey = np.asarray(Image.fromarray(r.image).resize((w, h), Image.Resampling.BILINEAR))
    hm = upsample_map(result.prob_maps[k], (h, w))
    title = f"{result.class_names[k]}: p = {float(result.scores[k]):.3f}"
    write_overlay(path, np.stack([grey] * 3, axis=-1), hm, alpha=0.45, title=title)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """``obj`` as strict UTF-8 JSON (atomically): undecodable file-name bytes as ``\\xNN``
    (``fastinsight.text.clean_text``), a non-finite number as ``null`` (an undefined metric)."""
    with atomic_path(path) as tmp:
        tmp.write_text(
            dumps_json(obj, "report", nan_as_null=True, indent=2) + "\n", encoding="utf-8"
        )


def write_scores_csv(
    path: str | os.PathLike[str], rows: Sequence[dict[str, Any]], class_names: Sequence[str]
) -> None:
    """One row per image: path, width, height, one score column per class, error.

    UTF-8 whatever the locale. Paths whose bytes are not UTF-8 (``b"chest\\xff.png"``) are written
    with each such byte as the text ``\\xNN`` (``fastinsight.text.clean_text``); commas, quotes and
    newlines in paths or error messages are quoted as RFC 4180 says, so ``csv.reader`` reads every
    field back as written.
    """
    check_score_columns(class_names)
    buf = io.StringIO()
    fields = ["path", "width", "height", *class_names, "error"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row.get(k, "")) for k in fields})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8", newline="")


SCORE_CSV_FIXED = ("path", "width", "height", "error")


def check_score_columns(class_names: Sequence[str], source: str = "the model") -> None:
    """Refuse class names equal to a fixed column of the scores CSV: the row dict would hold one
    value for both (a class ``error`` wrote its score into the error column, or the reverse) and
    a reader could not tell them apart. Checked before any image is read."""
    clash = [n for n in class_names if n in SCORE_CSV_FIXED]
    if clash:
        raise CheckpointError(
            f"{source} names a class {clash[0]!r}, which is also a fixed column of the scores "
            f"CSV {list(SCORE_CSV_FIXED)}; rename the class (save the model with other "
            "class_names) or predict one image at a time (--out heatmap.tif)"
        )


def _csv_cell(value: Any) -> Any:
    """Text cells as valid Unicode (undecodable bytes as ``\\xNN``); numbers as they are."""
    if isinstance(value, (str, os.PathLike)):
        return clean_text(os.fspath(value))
    return value


def expand_inputs(items: Sequence[str], notes: list[str] | None = None) -> list[str]:
    """Files, folders (their images, sorted), globs and CSV lists -> image paths in order.

    A folder gives its files with an image suffix and its DICOM files found by content (PACS and
    DICOMDIR exports name them ``IM0001``, without suffix), not the DICOMDIR index itself. Files
    that look like pictures of another format (BMP, GIF, JPEG 2000, ...) are skipped, and a line
    saying so is appended to ``notes`` (the CLI prints it), so they do not vanish silently.
    """
    out: list[str] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = _folder_images(p, notes)
            if not found:
                raise InputError(
                    f"folder {item!r} holds no image ({sorted(IMAGE_SUFFIXES)} or DICOM files)"
                )
            out += found
        elif p.suffix.lower() == ".csv" and p.is_file():
            out += _paths_from_csv(p)
        elif any(c in item for c in "*?["):
            found = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            if not found:
                raise InputError(f"pattern {item!r} matches no file")
            out += found
        else:
            out.append(str(p))
    return out


# DICOM's Media Storage Directory (DICOMDIR): an index of the other files, never an image.
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


def _is_dicom_image_file(f: Path) -> bool:
    """A Part 10 file or bare dataset holding an image (``Rows``) of a modality that can be a
    radiograph. A damaged Part 10 file counts, so that reading it names the damage instead of
    the file vanishing from the run; a DICOMDIR and the non-image objects PACS exports put beside
    the films (key object selections, presentation states, reports: no ``Rows``), or images of
    other modalities, are not inputs of a folder."""
    from fastinsight.dicom import read_header
    from fastinsight.radiograph.io import NOT_RADIOGRAPH

    try:
        ds = read_header(f)
    except InputError:
        return True
    if ds is None or "Rows" not in ds:
        return False
    sop = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
    if sop == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return False
    return str(ds.get("Modality", "") or "").strip().upper() not in NOT_RADIOGRAPH


def _picture_suffixes() -> set[str]:
    """Suffixes of picture formats Pillow knows (BMP, GIF, WebP, JPEG 2000, ...)."""
    from PIL import Image

    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()} | {".jp2", ".j2k", ".heic"}


def _folder_images(folder: Path, notes: list[str] | None) -> list[str]:
    found: list[str] = []
    skipped: list[str] = []
    pictures: set[str] | None = None
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        suffix = f.suffix.lower()
        # Any other name may be DICOM (IM0001, 1.2.840....320, x.IMA): 132 bytes tell.
        if suffix in IMAGE_SUFFIXES or _is_dicom_image_file(f):
            found.append(str(f))
            continue
        pictures = _picture_suffixes() if pictures is None else pictures
        if suffix in pictures:
            skipped.append(f.name)
    if skipped and notes is not None:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        notes.append(
            f"skipped {len(skipped)} file(s) in {str(folder)!r} that are pictures but not PNG, "
            f"JPEG, TIFF or DICOM ({shown}); convert them to PNG to include them"
        )
    return found


def _paths_from_csv(p: Path) -> list[str]:
    """The image column of a CSV list (UTF-8, a BOM allowed) -> paths relative to the CSV's folder.

    A row too short to reach the column, or with the cell empty, is one InputError naming its
    line: DictReader gives None for a missing cell, which used to end in a TypeError traceback.
    """
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            col = next((c for c in PATH_COLUMNS if c in cols), None)
            if col is None:
                raise InputError(
                    f"{str(p)!r} has no image column; expected one of {list(PATH_COLUMNS)}, "
                    f"found {cols}"
                )
            paths = []
            for row in reader:
                value = row.get(col)
                if value is None or not value.strip():
                    what = "has no cell" if value is None else "has an empty cell"
                    raise InputError(
                        f"{str(p)!r} line {reader.line_num} {what} in column {col!r}; every "
                        "row needs an image path: fix or remove the row"
                    )
                q = Path(value.strip()).expanduser()
                paths.append(str(q if q.is_absolute() else p.parent / q))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{str(p)!r} is not a readable UTF-8 CSV list of images ({exc})") from None
    except OSError as exc:
        raise InputError(f"cannot read {str(p)!r}: {exc.strerror or exc}") from None
    if not paths:
        raise InputError(f"{str(p)!r} lists no image")
    return paths


__all__ = [
    "SCORE_CSV_FIXED",
    "PredictOptions",
    "RadiographResult",
    "check_grey_model",
    "check_score_columns",
    "expand_inputs",
    "load_radiograph_model",
    "predict_radiographs",
    "upsample_map",
    "write_heatmap",
    "write_radiograph_overlay",
    "write_scores_csv",
]
