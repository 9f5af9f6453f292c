"""Quick-look PNG for a CT heatmap: the most salient slices side by side, one colour bar.

Each panel is slice ``k`` (voxel axis 2) in a lung window (-1000..400 HU, grey) with the
heatmap blended where it is non-zero. Given the scan's affine, a panel is shown the way a
radiologist reads it whatever order the voxels are stored in (dcm2niix's LAS, DICOM's LPS, any
flip or transpose): axial slices with anterior at the top and the patient's right on the
image's left; coronal ones with superior at the top and right on the left; sagittal ones with
superior at the top and anterior on the left. Without an affine, rows are voxel axis 1 and
columns axis 0. The heatmap NIfTI itself keeps the scan's own voxel order.
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


# Radiological display. RAS world axes: 0 = x (+ towards the patient's right), 1 = y (+
# anterior), 2 = z (+ superior). For the two world axes a slice spans: the one that runs down
# the panel and the one that runs across, each with True where it runs against its + direction.
# The patient's right is on the image's left, so columns run towards -x (axial, coronal) or,
# sagittal, towards -y (anterior on the left); anterior or superior is at the top, so rows run
# towards -y or -z.
_VIEWS = {
    frozenset({0, 1}): ((1, True), (0, True)),  # axial: A at the top, R on the left
    frozenset({0, 2}): ((2, True), (0, True)),  # coronal: S at the top, R on the left
    frozenset({1, 2}): ((2, True), (1, True)),  # sagittal: S at the top, A on the left
}


def _panel_view(affine: np.ndarray | None) -> tuple[bool, bool, bool]:
    """How a voxel slice ``[axis0, axis1]`` becomes a panel ``[row, col]``: (transpose,
    flip rows, flip columns), from the world axis and direction of each voxel axis
    (``nibabel.orientations.io_orientation``, which tolerates oblique scans)."""
    if affine is None:
        return True, False, False
    from nibabel.orientations import io_orientation

    ornt = io_orientation(np.asarray(affine, dtype=np.float64))  # per voxel axis: world axis, sign
    if not np.isfinite(ornt[:2]).all():  # an axis with no direction: show as stored
        return True, False, False
    world = {int(ornt[a, 0]): (a, int(ornt[a, 1])) for a in (0, 1)}
    view = _VIEWS.get(frozenset(world))
    if view is None:  # the slice axis is not the scan's third world axis: show as stored
        return True, False, False
    (down, down_against), (across, across_against) = view
    row_axis, row_sign = world[down]
    _, col_sign = world[across]
    transpose = row_axis == 1  # panel rows come from voxel axis 1: [axis1, axis0] = slice.T
    flip_rows = (row_sign > 0) == down_against
    flip_cols = (col_sign > 0) == across_against
    return transpose, flip_rows, flip_cols


def _panel(slice2d: np.ndarray, view: tuple[bool, bool, bool]) -> np.ndarray:
    transpose, flip_rows, flip_cols = view
    out = slice2d.T if transpose else slice2d
    if flip_rows:
        out = out[::-1]
    if flip_cols:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def render_montage(
    data_hu: np.ndarray,
    heatmap: np.ndarray,
    *,
    n_slices: int = 6,
    alpha: float = 0.5,
    affine: np.ndarray | None = None,
) -> Image.Image:
    """Shapes: data_hu, heatmap ``[X, Y, Z]`` -> RGB image (panels in a row + colour bar);
    ``affine``: the scan's voxel-to-RAS affine, for the radiological view (module doc)."""
    vmax = float(max(heatmap.max(), 1e-6))
    view = _panel_view(affine)
    panels = []
    for k in salient_slices(heatmap, n_slices):
        grey = np.rint(window(_panel(data_hu[:, :, k], view)) * 255).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        hm = _panel(heatmap[:, :, k], view).astype(np.float32)
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
