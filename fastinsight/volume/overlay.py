"""Quick-look PNG for a CT heatmap: the most salient slices side by side, one colour bar.

Each panel is slice ``k`` in a lung window (-1000..400 HU, grey) with the heatmap blended where
it is non-zero, shown with image rows = voxel axis 1 and columns = axis 0 (the usual axial view
of an RAS/LPS scan; the NIfTI itself keeps the scan's own orientation).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from fastinsight.slide.overlay import _add_colorbar, render_overlay
from fastinsight.volume.preprocess import window


def salient_slices(heatmap: np.ndarray, n_slices: int) -> list[int]:
    """The ``n_slices`` slices with the highest heatmap maximum, in slice order."""
    peaks = heatmap.reshape(-1, heatmap.shape[2]).max(axis=0)
    order = np.argsort(-peaks, kind="stable")[: max(1, n_slices)]
    return sorted(int(k) for k in order)


def render_montage(
    data_hu: np.ndarray, heatmap: np.ndarray, *, n_slices: int = 6, alpha: float = 0.5
) -> Image.Image:
    """Shapes: data_hu, heatmap ``[X, Y, Z]`` -> RGB image (panels in a row + colour bar)."""
    vmax = float(max(heatmap.max(), 1e-6))
    panels = []
    for k in salient_slices(heatmap, n_slices):
        grey = np.rint(window(data_hu[:, :, k].T) * 255).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        hm = heatmap[:, :, k].T.astype(np.float32)
        hm = np.where(hm > 0, hm, np.nan)  # untouched where nothing was kept
        panels.append(
            render_overlay(
                rgb, hm, alpha=alpha, value_range=(0.0, vmax), colorbar=False, title=f"slice {k}"
            )
        )
    # Small volumes give tiny panels: scale up to >= 192 px for legibility.
    scale = max(1, int(np.ceil(192 / max(p.height for p in panels))))
    panels = [
        p.resize((p.width * scale, p.height * scale), Image.Resampling.NEAREST) for p in panels
    ]
    gap = 4
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, max(p.height for p in panels)), (255, 255, 255))
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + gap
    return _add_colorbar(canvas, 0.0, vmax, "turbo")
