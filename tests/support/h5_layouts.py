"""Writers of the three documented feature layouts (spec section 4), with realistic attributes.

Test helpers only: they write what the official INSIGHT code, CLAM and TRIDENT write, so the
readers are tested against the documented layouts rather than against themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np


def write_insight(path: Path, features: np.ndarray, coords: np.ndarray) -> Path:
    """Official INSIGHT: ``features`` [N, C, h, w] token grids, ``coords`` [N, 2]; no attrs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.asarray(features, dtype=np.float32))
        f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
    return path


def write_clam_patches(
    path: Path,
    coords: np.ndarray,
    *,
    patch_size: int = 256,
    patch_level: int = 1,
    downsample: tuple[float, float] = (2.0, 2.0),
    level_dim: tuple[int, int] = (40000, 30000),
    name: str = "slide",
) -> Path:
    """CLAM ``patches/<slide>.h5``: ``coords`` (N, 2) int64 with CLAM's attrs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        d.attrs["patch_size"] = patch_size
        d.attrs["patch_level"] = patch_level
        d.attrs["downsample"] = np.asarray(downsample, dtype=np.float64)
        d.attrs["downsampled_level_dim"] = np.asarray(level_dim, dtype=np.int64)
        d.attrs["level_dim"] = np.asarray(level_dim, dtype=np.int64)
        d.attrs["name"] = name
        d.attrs["save_path"] = str(path.parent)
    return path


def write_clam_features(path: Path, features: np.ndarray, coords: np.ndarray) -> Path:
    """CLAM ``h5_files/<slide>.h5``: ``features`` (N, D) float32, ``coords`` (N, 2) int32, NO attrs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.asarray(features, dtype=np.float32))
        f.create_dataset("coords", data=np.asarray(coords, dtype=np.int32))
    return path


def write_trident(
    path: Path,
    features: np.ndarray,
    coords: np.ndarray,
    *,
    encoder: str = "uni_v1",
    patch_size: int = 256,
    patch_size_level0: int = 512,
    level0_magnification: int = 40,
    target_magnification: int = 20,
    overlap: int = 0,
    level0_size: tuple[int, int] = (80000, 60000),
) -> Path:
    """TRIDENT ``features_<encoder>/<slide>.h5``: features (N, D) with attrs encoder/name; coords
    (N, 2) int64 with the patching attrs; a JSON dict attr and 'None' strings as TRIDENT writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    feats = np.asarray(features, dtype=np.float32)
    xy = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    with h5py.File(path, "w") as f:
        fd = f.create_dataset("features", data=feats)
        fd.attrs["encoder"] = encoder
        fd.attrs["name"] = path.stem
        fd.attrs["savetodir"] = "None"
        cd = f.create_dataset("coords", data=xy)
        cd.attrs["patch_size"] = patch_size
        cd.attrs["patch_size_level0"] = patch_size_level0
        cd.attrs["level0_magnification"] = level0_magnification
        cd.attrs["target_magnification"] = target_magnification
        cd.attrs["overlap"] = overlap
        cd.attrs["name"] = path.stem
        cd.attrs["savetodir"] = "None"
        cd.attrs["level0_width"] = level0_size[0]
        cd.attrs["level0_height"] = level0_size[1]
        cd.attrs["segmentation_params"] = json.dumps({"model": "hest", "holes": None, "conf": 0.5})
    return path


def grid_coords(rc: np.ndarray, pitch: int, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Top-left level-0 (x, y) of tiles at (tile_row, tile_col). Shapes: [N, 2] -> [N, 2]."""
    rc = np.asarray(rc, dtype=np.int64)
    return np.stack([origin[0] + rc[:, 1] * pitch, origin[1] + rc[:, 0] * pitch], axis=1)


def clam_contours(contours: list[tuple[tuple[int, int], np.ndarray]], pitch: int) -> np.ndarray:
    """CLAM's coordinates of several tissue contours, in CLAM's order (contour by contour).

    CLAM (``WholeSlideImage.process_contour``) starts each contour's patch grid at the corner of
    the contour's bounding box, so each contour is ``grid_coords(rc, pitch, origin)`` with its
    own ``origin``. Shapes: ``[(origin (x, y), rc [n_i, 2])]`` -> ``[sum n_i, 2]`` int64.
    """
    return np.concatenate([grid_coords(rc, pitch, origin) for origin, rc in contours])
