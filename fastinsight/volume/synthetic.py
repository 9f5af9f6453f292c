"""Synthetic chest-CT-like volumes with known lesions (tests, demo, benchmarks; nothing downloaded).

Hounsfield units as a chest CT shows them: air -1000 around an elliptic body of soft tissue
(0..40 HU), two elliptic lungs (~-850 HU) with a few vessels (+40 HU), and optional ground-glass
lesions (-500..-300 HU, ellipsoids inside a lung) whose voxel masks are returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SyntheticCT:
    """Shapes: hu int16 ``[X, Y, Z]``; lesion_mask, lung_mask uint8 ``[X, Y, Z]``."""

    hu: np.ndarray
    lesion_mask: np.ndarray
    lung_mask: np.ndarray
    affine: np.ndarray
    label: int


def default_affine(
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5),
    origin: tuple[float, float, float] = (-120.0, -95.0, -60.0),
) -> np.ndarray:
    """An RAS affine with the given voxel size and origin (axis-aligned, no rotation)."""
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def make_chest_ct(
    shape: tuple[int, int, int] = (64, 64, 16),
    *,
    lesions: int = 0,
    seed: int = 0,
    affine: np.ndarray | None = None,
    lesion_radius: tuple[float, float] = (0.09, 0.14),
) -> SyntheticCT:
    """One volume; ``lesions`` ground-glass ellipsoids (radius as a fraction of the in-plane size)."""
    rng = np.random.default_rng(seed)
    x, y, z = shape
    gx, gy, gz = np.meshgrid(
        (np.arange(x) + 0.5) / x - 0.5,
        (np.arange(y) + 0.5) / y - 0.5,
        (np.arange(z) + 0.5) / z - 0.5,
        indexing="ij",
    )
    hu = np.full(shape, -1000.0)
    body = (gx / 0.46) ** 2 + (gy / 0.40) ** 2 <= 1.0
    hu[body] = rng.uniform(0, 40, size=int(body.sum()))
    lung = np.zeros(shape, dtype=bool)
    for cx in (-0.2, 0.2):
        lung |= ((gx - cx) / 0.15) ** 2 + (gy / 0.27) ** 2 + (gz / 0.6) ** 2 <= 1.0
    hu[lung] = rng.normal(-850, 25, size=int(lung.sum()))
    # Vessels: thin tubes along z through the lungs.
    for _ in range(4):
        vx, vy = rng.uniform(-0.3, 0.3), rng.uniform(-0.2, 0.2)
        tube = ((gx - vx) ** 2 + (gy - vy) ** 2 <= 0.012**2) & lung
        hu[tube] = 40.0
    lesion = np.zeros(shape, dtype=bool)
    for _ in range(lesions):
        side = rng.choice([-0.2, 0.2])
        cx = side + rng.uniform(-0.05, 0.05)
        cy = rng.uniform(-0.15, 0.15)
        cz = rng.uniform(-0.25, 0.25)
        r = rng.uniform(*lesion_radius)
        blob = ((gx - cx) / r) ** 2 + ((gy - cy) / r) ** 2 + ((gz - cz) / (1.6 * r)) ** 2 <= 1.0
        blob &= lung
        lesion |= blob
    hu[lesion] = rng.uniform(-500, -300, size=int(lesion.sum()))
    return SyntheticCT(
        hu=np.rint(hu).astype(np.int16),
        lesion_mask=lesion.astype(np.uint8),
        lung_mask=lung.astype(np.uint8),
        affine=default_affine() if affine is None else affine,
        label=int(lesion.any()),
    )


def write_cohort(
    folder: str | Path,
    n_volumes: int,
    *,
    shape: tuple[int, int, int] = (64, 64, 16),
    seed: int = 0,
    lesion_radius: tuple[float, float] = (0.09, 0.14),
) -> list[tuple[str, int]]:
    """``n_volumes`` NIfTI volumes (half with 1-2 lesions) + masks + ``labels.csv``.

    Layout: ``folder/volumes/<id>.nii.gz``, ``folder/masks/<id>.nii.gz`` (lesion masks),
    ``folder/labels.csv`` (``volume_id,label``). Returns ``[(id, label)]``.
    """
    from fastinsight.atomic import atomic_path
    from fastinsight.volume.io import write_nifti

    root = Path(folder)
    (root / "volumes").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_volumes):
        positive = i % 2 == 1
        rng = np.random.default_rng([seed, i])
        ct = make_chest_ct(
            shape,
            lesions=int(rng.integers(1, 3)) if positive else 0,
            seed=int(rng.integers(1 << 31)),
            lesion_radius=lesion_radius,
        )
        vid = f"ct{i:03d}"
        write_nifti(ct.hu, ct.affine, root / "volumes" / f"{vid}.nii.gz", dtype=np.int16)
        write_nifti(ct.lesion_mask, ct.affine, root / "masks" / f"{vid}.nii.gz", dtype=np.uint8)
        rows.append((vid, ct.label))
    with atomic_path(root / "labels.csv") as tmp:
        tmp.write_text("volume_id,label\n" + "".join(f"{v},{lab}\n" for v, lab in rows))
    return rows
