"""A synthetic cohort of H&E-like slides with planted lesions, for the demo and for tests.

Each slide is bright-field tissue on a white background: pink stroma with scattered small
nuclei. Positive slides carry one to three lesions: patches of crowded, larger, darker nuclei
(a caricature of a tumour focus). The true lesion mask is kept at level-0 resolution, so
localisation (Dice) can be scored against it. Nothing is downloaded; everything is seeded.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fastinsight.errors import OutputError

STROMA = np.array([236, 178, 206], dtype=np.float32)  # eosin pink
NUCLEUS = np.array([92, 52, 140], dtype=np.float32)  # haematoxylin purple
LESION_NUCLEUS = np.array([58, 30, 110], dtype=np.float32)
BACKGROUND = np.array([246, 246, 244], dtype=np.float32)


@dataclass(frozen=True)
class SyntheticSlide:
    """One generated slide: its file, its label and the level-0 lesion mask file."""

    slide_id: str
    path: Path
    label: int
    mask_path: Path
    mpp: float


def _blob_mask(
    size: tuple[int, int],
    rng: np.random.Generator,
    n: int,
    radius: tuple[float, float],
    centre_box: tuple[float, float, float, float],
) -> Image.Image:
    w, h = size
    img = Image.new("L", size, 0)
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = centre_box
    for _ in range(n):
        cx, cy = rng.uniform(x0 * w, x1 * w), rng.uniform(y0 * h, y1 * h)
        rx, ry = rng.uniform(*radius), rng.uniform(*radius)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    return img


def _nuclei(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    where: np.ndarray,
    density: float,
    r: tuple[float, float],
    colour: np.ndarray,
) -> None:
    ys, xs = np.nonzero(where)
    if xs.size == 0:
        return
    count = int(xs.size * density)
    pick = rng.integers(0, xs.size, size=count)
    jitter = rng.uniform(-12, 12, size=(count, 3))
    radii = rng.uniform(*r, size=count)
    for (x, y), rad, j in zip(np.stack([xs[pick], ys[pick]], 1), radii, jitter, strict=True):
        c = tuple(int(v) for v in np.clip(colour + j, 0, 255))
        draw.ellipse([x - rad, y - rad * rng.uniform(0.7, 1.3), x + rad, y + rad], fill=c)


def render_slide(
    size_px: tuple[int, int], positive: bool, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Render one slide. Returns (RGB uint8 ``[H, W, 3]``, lesion mask bool ``[H, W]``)."""
    rng = np.random.default_rng(seed)
    w, h = size_px
    tissue = (
        np.asarray(
            _blob_mask(
                size_px, rng, 4, (0.22 * min(w, h), 0.38 * min(w, h)), (0.3, 0.3, 0.7, 0.7)
            ).filter(ImageFilter.GaussianBlur(6))
        )
        > 127
    )
    lesion = np.zeros((h, w), dtype=bool)
    if positive:
        for _ in range(int(rng.integers(1, 4))):
            blob = (
                np.asarray(
                    _blob_mask(
                        size_px, rng, 2, (0.05 * min(w, h), 0.09 * min(w, h)), (0.3, 0.3, 0.7, 0.7)
                    )
                )
                > 127
            )
            lesion |= blob
        lesion &= tissue
    noise = rng.normal(0, 6, size=(h, w, 1)).astype(np.float32)
    base = np.where(tissue[..., None], STROMA + noise, BACKGROUND + noise / 3)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    _nuclei(draw, rng, tissue & ~lesion, 0.0025, (2.0, 3.5), NUCLEUS)
    _nuclei(draw, rng, lesion, 0.02, (3.0, 5.5), LESION_NUCLEUS)
    img = img.filter(ImageFilter.GaussianBlur(0.8))
    return np.asarray(img), lesion


def make_cohort(
    out_dir: str | Path,
    n_slides: int = 32,
    size_px: tuple[int, int] = (1120, 1120),
    mpp: float = 0.5,
    seed: int = 0,
) -> list[SyntheticSlide]:
    """Write ``n_slides`` pyramidal TIFF slides (half positive) with their masks and labels.

    Files: ``slides/<id>.tif`` (pyramidal, JPEG, mpp in the resolution tags),
    ``masks/<id>.tif`` (level-0 lesion mask, 255 = lesion; what ``fastinsight evaluate
    --ground-truth`` reads), ``labels.csv`` (slide_id, lesion) and
    ``cohort.json``.
    """
    from fastinsight.slide.pyramid import write_pyramid_tiff

    out = Path(out_dir)
    try:
        (out / "slides").mkdir(parents=True, exist_ok=True)
        (out / "masks").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the cohort folder {str(out)!r}: {exc}") from exc
    slides = []
    for i in range(n_slides):
        positive = i % 2 == 1
        sid = f"synthetic-{i:03d}"
        rgb, lesion = render_slide(size_px, positive, seed * 100_003 + i)
        path = out / "slides" / f"{sid}.tif"
        write_pyramid_tiff(
            path,
            rgb,
            mpp=mpp,
            compression="jpeg",
            description=f"fastinsight synthetic slide {sid} (label {int(positive)})",
        )
        mask_path = out / "masks" / f"{sid}.tif"
        write_pyramid_tiff(
            mask_path,
            lesion.astype(np.uint8) * 255,
            mpp=mpp,
            compression="zlib",
            description=f"lesion mask of {sid} (255 = lesion)",
        )
        slides.append(SyntheticSlide(sid, path, int(positive), mask_path, mpp))
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "lesion"])
        writer.writerows([s.slide_id, s.label] for s in slides)
    (out / "cohort.json").write_text(
        json.dumps(
            [
                {
                    "slide_id": s.slide_id,
                    "path": str(s.path),
                    "label": s.label,
                    "mask": str(s.mask_path),
                    "mpp": s.mpp,
                }
                for s in slides
            ],
            indent=2,
        )
    )
    return slides
