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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastinsight.atomic import atomic_path
from fastinsight.errors import CheckpointError, FastInsightError, InputError
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
    """Load PYLON or the multi-resolution network through the package's checkpoint sniffer."""
    from fastinsight.models.checkpoints import load_model

    model = load_model(path, device=device)
    if getattr(model, "modality", None) != "radiograph":
        raise CheckpointError(
            f"{str(path)!r} holds a {type(model).__name__}, not a radiograph model; pass a "
            "PYLON (.pth/.pkl/.safetensors) or multi-resolution (.safetensors) checkpoint"
        )
    return model


@dataclass(frozen=True)
class PredictOptions:
    """``batch_size`` images per forward; ``device`` None = the model's."""

    batch_size: int = 8
    device: str | None = None


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
    ``(path, error)`` for it and carries on.
    """
    opts = options or PredictOptions()
    if opts.batch_size < 1:
        raise InputError(f"batch size must be >= 1; got {opts.batch_size}")
    if getattr(model, "modality", None) != "radiograph":
        raise InputError(
            f"model family {getattr(model, 'family', type(model).__name__)!r} is not a "
            "radiograph model; pass a PYLON or multi-resolution LSE-LBA checkpoint"
        )
    device = torch.device(opts.device) if opts.device else _device_of(model)
    model = model.to(device).eval()
    cfg = model.config
    names = tuple(cfg.names)
    for start in range(0, len(paths), opts.batch_size):
        batch: list[Radiograph | tuple[str, FastInsightError]] = []
        for p in paths[start : start + opts.batch_size]:
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

    codes = encode_scores(result.heatmap(k), (0.0, 1.0))
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
    buf = io.StringIO()
    fields = ["path", "width", "height", *class_names, "error"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row.get(k, "")) for k in fields})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8", newline="")


def _csv_cell(value: Any) -> Any:
    """Text cells as valid Unicode (undecodable bytes as ``\\xNN``); numbers as they are."""
    if isinstance(value, (str, os.PathLike)):
        return clean_text(os.fspath(value))
    return value


def expand_inputs(items: Sequence[str]) -> list[str]:
    """Files, folders (their images, sorted), globs and CSV lists -> image paths in order."""
    out: list[str] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"folder {item!r} holds no image ({sorted(IMAGE_SUFFIXES)})")
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


def _paths_from_csv(p: Path) -> list[str]:
    with open(p, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        col = next((c for c in PATH_COLUMNS if c in cols), None)
        if col is None:
            raise InputError(
                f"{str(p)!r} has no image column; expected one of {list(PATH_COLUMNS)}, found {cols}"
            )
        paths = []
        for row in reader:
            q = Path(row[col]).expanduser()
            paths.append(str(q if q.is_absolute() else p.parent / q))
    if not paths:
        raise InputError(f"{str(p)!r} lists no image")
    return paths


__all__ = [
    "PredictOptions",
    "RadiographResult",
    "expand_inputs",
    "load_radiograph_model",
    "predict_radiographs",
    "upsample_map",
    "write_heatmap",
    "write_radiograph_overlay",
    "write_scores_csv",
]
