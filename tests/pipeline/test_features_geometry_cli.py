"""``fastinsight predict --features`` on h5 files laid out exactly as CLAM and TRIDENT write them
(spec section 4), through the real command line: CLAM tiles are placed where CLAM put them (each
tissue contour's lattice starts at the contour's corner), the slide size comes from the patches
file, and TRIDENT's recorded slide name, size and magnification are checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from fastinsight import InsightConfig, InsightModel
from fastinsight.slide import read_scores_sidecar
from tests.support.h5_layouts import (
    grid_coords,
    write_clam_features,
    write_clam_patches,
    write_trident,
)

FASTINSIGHT = str(Path(sys.executable).parent / "fastinsight")
D = 16


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FASTINSIGHT, "predict", *args, "--quiet", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, InsightModel]:
    """A per-tile-vector model (one cell per tile) saved as a fastinsight checkpoint."""
    torch.manual_seed(0)
    cfg = InsightConfig(
        in_dim=D, grid_size=(1, 1), norm="channel", context="tile", encoder="uni_v1",
        tile_size_px=256, patch_size_px=256, target_mpp=0.5,
    )  # fmt: skip
    m = InsightModel(cfg, backend="reference").eval()
    path = tmp_path_factory.mktemp("model") / "vec.safetensors"
    m.save(str(path))
    return path, m


def _clam_slide(root: Path, dtype: type) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """CLAM at patch level 1 (downsample 2): 256 px tiles = 512 level-0 px; two contours whose
    lattices start at their bounding-box corners, one edge tile past the slide's right edge."""
    a = grid_coords(np.array([[r, c] for r in range(3) for c in range(2)]), 512, (1000, 2000))
    b = grid_coords(np.array([[0, 0], [0, 1], [1, 0]]), 512, (5123, 801))
    xy = np.concatenate([a, b]).astype(np.int64)  # b's second tile ends at 6147 > 6000
    feats = np.random.default_rng(1).standard_normal((len(xy), D)).astype(np.float32)
    patches = write_clam_patches(
        root / "patches" / "s1.h5", xy, patch_size=256, patch_level=1, downsample=(2.0, 2.0),
        level_dim=(3000, 2000), name="s1",
    )  # fmt: skip
    h5 = write_clam_features(root / "h5_files" / "s1.h5", feats, xy.astype(dtype))
    return h5, patches, xy, feats


@pytest.mark.parametrize("dtype", [np.int32, np.int64], ids=["int32", "int64"])
def test_clam_tiles_are_placed_where_clam_put_them(
    tmp_path: Path, model: tuple[Path, InsightModel], dtype: type
) -> None:
    path, m = model
    h5, patches, xy, feats = _clam_slide(tmp_path, dtype)
    out = tmp_path / "s1.scores.npz"
    res = _cli("--features", str(h5), "--patches-h5", str(patches), "--mpp", "0.25",
               "--model", str(path), "--scores", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    side = read_scores_sidecar(out)
    # The slide is level_dim x downsample, not the largest coordinate plus a tile.
    assert (side.grid.slide_width, side.grid.slide_height) == (6000, 4000)
    with torch.no_grad():
        tokens = torch.from_numpy(feats)[:, :, None, None]
        heat = m.predict(tokens, torch.ones(len(xy), 1, 1, dtype=torch.bool)).heatmap
    cell = side.grid.l0_cell_size
    assert cell <= 512 / 8  # finer than a tile: the contours' lattices are not the slide's
    for i, (x, y) in enumerate(xy):
        for f in (0.1, 0.5, 0.9):
            r, c = int((y + f * 512) // cell), int((x + f * 512) // cell)
            if c < side.scores.shape[2]:
                assert side.scores[0, r, c] == pytest.approx(float(heat[i, 0, 0, 0]), abs=1e-5)
    assert np.isnan(side.scores[0, 0, 0])  # no tile at the slide's corner


def test_clam_snap_to_grid_still_rounds(tmp_path: Path, model: tuple[Path, InsightModel]) -> None:
    path, _ = model
    h5, patches, _, _ = _clam_slide(tmp_path, np.int32)
    out = tmp_path / "snap.npz"
    res = _cli("--features", str(h5), "--patches-h5", str(patches), "--mpp", "0.25",
               "--snap-to-grid", "--model", str(path), "--scores", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert read_scores_sidecar(out).grid.l0_cell_size == 512


def _trident(root: Path) -> Path:
    xy = grid_coords(np.array([[0, 0], [0, 1], [1, 1]]), 512)
    feats = np.random.default_rng(2).standard_normal((3, D)).astype(np.float32)
    return write_trident(
        root / "features_uni_v1" / "s2.h5", feats, xy, patch_size=256, patch_size_level0=512,
        level0_magnification=40, target_magnification=20, level0_size=(1536, 1024),
    )  # fmt: skip


def _plain_tiff(path: Path, size: tuple[int, int]) -> Path:
    """A slide without an mpp (no resolution tags)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.full((size[1], size[0], 3), 230, np.uint8), tile=(256, 256))
    return path


def test_trident_mpp_comes_from_the_file_when_the_slide_has_none(
    tmp_path: Path, model: tuple[Path, InsightModel]
) -> None:
    path, _ = model
    h5 = _trident(tmp_path)
    slide = _plain_tiff(tmp_path / "s2.tif", (1536, 1024))
    out = tmp_path / "s2.npz"
    res = _cli("--features", str(h5), "--slide", str(slide), "--model", str(path),
               "--scores", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert read_scores_sidecar(out).grid.slide_mpp == pytest.approx(0.25)


def test_trident_refuses_a_contradicting_slide_or_mpp(
    tmp_path: Path, model: tuple[Path, InsightModel]
) -> None:
    path, _ = model
    h5 = _trident(tmp_path)
    out = tmp_path / "x.npz"
    other = _plain_tiff(tmp_path / "other.tif", (1536, 1024))
    res = _cli("--features", str(h5), "--slide", str(other), "--model", str(path),
               "--scores", str(out))  # fmt: skip
    assert res.returncode == 4 and "records slide 's2'" in res.stderr and not out.exists()
    wrong_size = _plain_tiff(tmp_path / "sub" / "s2.tif", (1024, 1024))
    res = _cli("--features", str(h5), "--slide", str(wrong_size), "--model", str(path),
               "--scores", str(out))  # fmt: skip
    assert res.returncode == 4 and "1536 x 1024" in res.stderr and not out.exists()
    res = _cli("--features", str(h5), "--mpp", "0.5", "--model", str(path), "--scores", str(out))
    assert res.returncode == 4 and "40x" in res.stderr and "--mpp" in res.stderr
    assert not out.exists()
    res = _cli("--features", str(h5), "--mpp", "0.5", "--ignore-file-geometry",
               "--model", str(path), "--scores", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert read_scores_sidecar(out).grid.slide_mpp == pytest.approx(0.5)
