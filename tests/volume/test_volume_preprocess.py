"""Preprocessing against an independent re-implementation of the official INSIGHT-CT steps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fastinsight.errors import ConfigError, InputError
from fastinsight.volume.preprocess import (
    PreprocessOptions,
    apply_mask,
    lung_mask,
    prepare_hu,
    select_slices,
    slice_images,
)
from fastinsight.volume.synthetic import make_chest_ct


def official_slices(volume: np.ndarray, mask: np.ndarray | None, size: int) -> np.ndarray:
    """save_crop.py + store_embedding.py, step by step, on the whole volume at once."""
    v = volume.astype(np.float32)
    if mask is not None:
        v = np.where(np.isin(mask, [1, 2]), v, -1024).astype(np.float32)
    v = v.astype(np.float64)  # the _crop.nii is read back with get_fdata()
    x, y, _ = v.shape
    v = ndimage.zoom(v, (size / x, size / y, 1), order=1)
    out = []
    for k in range(v.shape[2]):
        s = v[:, :, k]
        s = np.clip(s, -1000, 400)
        s = ((s + 1000) / 1400).astype(np.float32)
        out.append(np.stack([s] * 3, -1))
    return np.stack(out)  # [D, S, S, 3]


def official_middle32(d: int) -> tuple[list[int], int]:
    idx = list(range(d))
    if d < 32:
        return idx, 32 - d
    return idx[max(0, d // 2 - 16) : min(d, d // 2 + 16)], 0


@pytest.mark.parametrize("size", [56, 37])
def test_slices_match_official(size: int) -> None:
    ct = make_chest_ct((30, 22, 5), lesions=1, seed=2)
    mask = ct.lung_mask.astype(np.int8)
    mask[mask == 1] = np.where(np.arange(30)[:, None, None] < 15, 1, 2)[
        np.nonzero(mask == 1)[0], 0, 0
    ]
    opts = PreprocessOptions(tile_size=size)
    hu, used = prepare_hu(ct.hu.astype(np.float32), opts, mask)
    ours = slice_images(hu, range(5), opts)
    ref = official_slices(ct.hu, mask, size)
    assert ours.shape == ref.shape == (5, size, size, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    assert used is not None and used.sum() == (mask > 0).sum()


def test_no_transpose_rows_are_axis0() -> None:
    vol = np.full((8, 4, 1), -1000.0, np.float32)
    vol[0, :, 0] = 400.0  # first index along axis 0 = first image row
    img = slice_images(vol, [0], PreprocessOptions(tile_size=8))[0, ..., 0]
    assert img[0].min() == 1.0 and img[-1].max() == 0.0


@pytest.mark.parametrize("d", [1, 5, 31, 32, 33, 40, 64, 65])
def test_middle32_official_rule(d: int) -> None:
    assert select_slices(d, "middle32") == official_middle32(d)
    assert select_slices(d, "all") == (list(range(d)), 0)


def test_mask_shape_mismatch_refused() -> None:
    with pytest.raises(InputError, match="lung mask is"):
        apply_mask(np.zeros((4, 4, 2), np.float32), np.ones((4, 4, 3)))


def test_builtin_lung_mask_finds_the_lungs() -> None:
    ct = make_chest_ct((64, 64, 12), lesions=2, seed=4)
    m = lung_mask(ct.hu.astype(np.float32))
    truth = ct.lung_mask > 0
    dice = 2 * (m & truth).sum() / (m.sum() + truth.sum())
    assert dice > 0.95
    assert not m[0].any() and not m[:, 0].any()  # the air outside the body is gone
    assert m[ct.lesion_mask > 0].mean() > 0.9  # ground-glass lesions inside the lung are kept


def test_builtin_mask_without_lungs_refused() -> None:
    with pytest.raises(InputError, match="no lung"):
        prepare_hu(np.zeros((16, 16, 3), np.float32), PreprocessOptions(lung_mask="auto"))


def test_bad_options_refused() -> None:
    """Option values: ConfigError (exit 2) naming the fields, never a raw TypeError."""
    with pytest.raises(ConfigError, match="slices must be") as err:
        PreprocessOptions(slices="middle")
    assert err.value.fields == ("slices",)
    for bad in ({"tile_size": "224"}, {"tile_size": 1.5}, {"window": (400, float("nan"))}):
        with pytest.raises(ConfigError, match="invalid preprocessing options"):
            PreprocessOptions(**bad)
