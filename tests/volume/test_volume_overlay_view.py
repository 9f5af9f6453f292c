"""The CT overlay shows every slice the way a radiologist reads it, whatever the voxel order:
axial with anterior at the top and the patient's right on the image's left; coronal and
sagittal with superior at the top (right, resp. anterior, on the left)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff, ornt_transform

from fastinsight.volume.overlay import _panel, _panel_view, render_montage

SHAPE = (5, 4, 3)  # RAS voxels: x (towards the right) 5, y (anterior) 4, z (superior) 3


def _ras_scan() -> np.ndarray:
    """Every voxel's value names its RAS position, so any panel can be checked cell by cell."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    return (100 * x + 10 * y + z).astype(np.float32)


def _stored(ras: np.ndarray, axes: tuple[int, int, int], signs: tuple[int, int, int]):
    """The same scan stored with voxel axis i along world axis ``axes[i]`` in direction
    ``signs[i]``, with the affine that keeps every voxel at its world position."""
    start = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    end = np.array([[a, s] for a, s in zip(axes, signs, strict=True)], dtype=float)
    t = ornt_transform(start, end)
    data = apply_orientation(ras, t)
    affine = np.eye(4) @ inv_ornt_aff(t, ras.shape)
    return data, affine


LAYOUTS = [
    (axes, signs)
    for axes in [(0, 1, 2), (1, 0, 2)]
    for signs in itertools.product((1, -1), repeat=3)
]


@pytest.mark.parametrize(("axes", "signs"), LAYOUTS, ids=[f"{a}{s}" for a, s in LAYOUTS])
def test_axial_panels_are_the_same_for_every_voxel_order(axes, signs) -> None:
    ras = _ras_scan()
    data, affine = _stored(ras, axes, signs)
    k_ras = 1  # the middle axial slice in world terms
    k = k_ras if signs[2] > 0 else SHAPE[2] - 1 - k_ras
    panel = _panel(data[:, :, k], _panel_view(affine))
    # Radiological view of the RAS slice: rows from anterior (y max) down, columns from the
    # patient's right (x max) across.
    expected = ras[:, :, k_ras].T[::-1, ::-1]
    np.testing.assert_array_equal(panel, expected)


def test_sagittal_and_coronal_stacks_put_superior_at_the_top() -> None:
    ras = _ras_scan()
    sag, sag_affine = _stored(ras, (1, 2, 0), (1, 1, 1))  # slices along x: sagittal
    panel = _panel(sag[:, :, 2], _panel_view(sag_affine))
    np.testing.assert_array_equal(panel, ras[2, :, :].T[::-1, ::-1])  # S top, A left
    cor, cor_affine = _stored(ras, (0, 2, 1), (-1, 1, 1))  # slices along y: coronal
    panel = _panel(cor[:, :, 3], _panel_view(cor_affine))
    np.testing.assert_array_equal(panel, ras[:, 3, :].T[::-1, ::-1])  # S top, R left


def test_the_montage_of_two_voxel_orders_is_the_same_picture() -> None:
    ras = _ras_scan() * 2 - 1000
    heat = np.zeros(SHAPE, np.float32)
    heat[4, 3, 1] = 1.0  # right, anterior: the top-left corner of the axial panel
    las, las_affine = _stored(ras, (0, 1, 2), (-1, 1, 1))
    las_heat, _ = _stored(heat, (0, 1, 2), (-1, 1, 1))
    a = np.asarray(render_montage(ras, heat, n_slices=1, affine=np.eye(4)))
    b = np.asarray(render_montage(las, las_heat, n_slices=1, affine=las_affine))
    np.testing.assert_array_equal(a, b)
