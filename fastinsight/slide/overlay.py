"""A quick-look PNG: the heatmap blended over a slide thumbnail, with a colour bar (PIL only).

Non-tissue cells (NaN) leave the thumbnail untouched. The heatmap is placed from the
thumbnail's top-left corner with ``cell_scale`` thumbnail pixels per heatmap cell (use
:func:`cell_scale_for` to get it from a grid); heatmap cells are drawn as flat blocks (nearest).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fastinsight.atomic import atomic_path
from fastinsight.errors import InputError
from fastinsight.slide.colormap import COLORMAPS, colorize
from fastinsight.slide.grid import TileGrid


def cell_scale_for(grid: TileGrid, thumbnail_shape: tuple[int, ...]) -> tuple[float, float]:
    """``(x, y)`` thumbnail pixels per heatmap cell for a thumbnail of the whole slide."""
    th_h, th_w = int(thumbnail_shape[0]), int(thumbnail_shape[1])
    return (
        grid.l0_cell_size * th_w / grid.slide_width,
        grid.l0_cell_size * th_h / grid.slide_height,
    )


def render_overlay(
    thumbnail_rgb: np.ndarray,
    heatmap: np.ndarray,
    *,
    alpha: float = 0.5,
    colormap: str = "turbo",
    value_range: tuple[float, float] = (0.0, 1.0),
    cell_scale: tuple[float, float] | None = None,
    colorbar: bool = True,
    title: str | None = None,
) -> Image.Image:
    """Blend ``heatmap`` over ``thumbnail_rgb``; add a colour bar on the right.

    ``cell_scale=None`` stretches the heatmap over the whole thumbnail (same extent).
    Shapes: ``thumbnail_rgb`` uint8 ``[h, w, 3]``, ``heatmap`` float ``[H, W]`` (NaN =
    non-tissue) -> RGB image ``w (+ colour bar) x h (+ title)``.
    """
    thumb = np.asarray(thumbnail_rgb)
    if thumb.ndim != 3 or thumb.shape[-1] != 3 or thumb.dtype != np.uint8:
        raise InputError(f"thumbnail must be uint8 [h, w, 3] RGB; got {thumb.dtype} {thumb.shape}")
    hm = np.asarray(heatmap, dtype=np.float32)
    if hm.ndim != 2 or 0 in hm.shape:
        raise InputError(f"heatmap must be a non-empty 2-D array [H, W]; got shape {hm.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1]; got {alpha}")
    if colormap not in COLORMAPS:
        raise InputError(f"colormap must be one of {list(COLORMAPS)}; got {colormap!r}")
    vmin, vmax = (float(v) for v in value_range)
    if not vmax > vmin:
        raise InputError(f"value_range must be (low, high) with low < high; got {value_range}")
    h, w = thumb.shape[:2]
    if cell_scale is None:
        sx, sy = w / hm.shape[1], h / hm.shape[0]
    else:
        sx, sy = (float(v) for v in cell_scale)
        if not (sx > 0 and sy > 0):
            raise InputError(f"cell_scale must be positive; got {cell_scale}")
    rows = np.floor((np.arange(h) + 0.5) / sy).astype(np.int64)
    cols = np.floor((np.arange(w) + 0.5) / sx).astype(np.int64)
    inside = (rows[:, None] < hm.shape[0]) & (cols[None, :] < hm.shape[1])
    values = hm[np.ix_(np.minimum(rows, hm.shape[0] - 1), np.minimum(cols, hm.shape[1] - 1))]
    values = np.where(inside, values, np.nan)
    colours = colorize(values, (vmin, vmax), colormap).astype(np.float32)
    tissue = np.isfinite(values)[..., None]
    blended = thumb.astype(np.float32) * (1.0 - alpha) + colours * alpha
    out = np.where(tissue, np.rint(blended), thumb).astype(np.uint8)
    image = Image.fromarray(out)
    if colorbar:
        image = _add_colorbar(image, vmin, vmax, colormap)
    if title:
        image = _add_title(image, title)
    return image


def write_overlay(
    path: str | os.PathLike[str],
    thumbnail_rgb: np.ndarray,
    heatmap: np.ndarray,
    **kwargs: object,
) -> Image.Image:
    """Render with :func:`render_overlay` (same keyword arguments) and save a PNG atomically."""
    image = render_overlay(thumbnail_rgb, heatmap, **kwargs)  # type: ignore[arg-type]
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return image


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _add_colorbar(image: Image.Image, vmin: float, vmax: float, colormap: str) -> Image.Image:
    w, h = image.size
    font_size = max(10, min(24, h // 25))
    font = _font(font_size)
    bar_w = max(12, font_size)
    margin = max(8, font_size // 2)
    labels = [f"{vmax:.3g}", f"{(vmin + vmax) / 2:.3g}", f"{vmin:.3g}"]
    probe = ImageDraw.Draw(image)
    label_w = max(int(probe.textlength(t, font=font)) for t in labels)
    panel_w = margin + bar_w + 6 + label_w + margin
    bar_h = max(32, int(h * 0.8))
    canvas = Image.new("RGB", (w + panel_w, max(h, bar_h + 2 * margin)), (255, 255, 255))
    canvas.paste(image, (0, 0))
    top = (canvas.height - bar_h) // 2
    ramp = np.linspace(vmax, vmin, bar_h, dtype=np.float64)[:, None].repeat(bar_w, axis=1)
    bar = Image.fromarray(colorize(ramp, (vmin, vmax), colormap))
    x0 = w + margin
    canvas.paste(bar, (x0, top))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([x0 - 1, top - 1, x0 + bar_w, top + bar_h], outline=(0, 0, 0))
    for text, frac in zip(labels, (0.0, 0.5, 1.0), strict=True):
        y = top + frac * (bar_h - 1)
        draw.line([x0 + bar_w, y, x0 + bar_w + 4, y], fill=(0, 0, 0))
        draw.text((x0 + bar_w + 6, y), text, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas


def _add_title(image: Image.Image, title: str) -> Image.Image:
    w, h = image.size
    font_size = max(10, min(24, h // 25))
    font = _font(font_size)
    pad = font_size // 2
    canvas = Image.new("RGB", (w, h + font_size + 2 * pad), (255, 255, 255))
    canvas.paste(image, (0, font_size + 2 * pad))
    ImageDraw.Draw(canvas).text((pad, pad), title, fill=(0, 0, 0), font=font)
    return canvas
