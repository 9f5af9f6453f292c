"""Readers of the official INSIGHT, CLAM and TRIDENT h5 layouts, stitching, and parity."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fastinsight.errors import InputError
from fastinsight.features import (
    decode_attr,
    find_feature_files,
    inspect_features,
    read_features,
    unstitch,
)
from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel
from tests.support.h5_layouts import (
    clam_contours,
    grid_coords,
    write_clam_features,
    write_clam_patches,
    write_insight,
    write_trident,
)

RC = np.array([[0, 0], [0, 2], [1, 1], [2, 0], [2, 3]])  # tile_row, tile_col (with gaps)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------
def test_official_insight_layout(tmp_path: Path) -> None:
    feats = _rng().standard_normal((5, 16, 14, 14)).astype(np.float32)
    xy = grid_coords(RC, 448, origin=(1000, 2000))
    p = write_insight(tmp_path / "slide_a.h5", feats, xy)
    sf = read_features(p)
    assert sf.layout == "insight" and sf.slide_id == "slide_a"
    assert sf.tokens.shape == (5, 16, 14, 14) and sf.tokens.dtype == torch.float32
    assert torch.equal(sf.tokens, torch.from_numpy(feats))
    assert sf.l0_xy.dtype == torch.int64 and sf.l0_xy.tolist() == xy.tolist()
    assert sf.patch_size_l0 is None and sf.grid_size == (14, 14) and not sf.is_vector
    with pytest.raises(InputError, match="--patch-size-l0"):
        sf.stitched()
    sf2 = read_features(p, patch_size_l0=448)
    assert sf2.tile_rc().tolist() == RC.tolist()
    assert sf2.cell_size_l0() == 32.0
    info = inspect_features(p)
    assert info.layout == "insight" and info.features_shape == (5, 16, 14, 14)


def test_clam_layout_with_patches_file(tmp_path: Path) -> None:
    feats = _rng(1).standard_normal((5, 24)).astype(np.float32)
    xy = grid_coords(RC, 512, origin=(512, 1024))
    pf = write_clam_features(tmp_path / "h5_files" / "s1.h5", feats, xy)
    pp = write_clam_patches(tmp_path / "patches" / "s1.h5", xy[::-1], patch_size=256)
    with h5py.File(pf) as f:  # the documented CLAM layout: int32 coords, no attributes
        assert f["coords"].dtype == np.int32 and not dict(f["coords"].attrs)
    sf = read_features(pf, patches_h5=pp)
    assert sf.layout == "clam" and sf.is_vector and sf.tokens.shape == (5, 24, 1, 1)
    assert sf.patch_size_l0 == 512 and sf.step_l0 == 512 and sf.tile_size_px == 256
    assert sf.l0_xy.dtype == torch.int64
    assert sf.tile_rc().tolist() == RC.tolist()
    # without the patches file: the user gives the level-0 tile size
    with pytest.raises(InputError, match="patch-size-l0"):
        read_features(pf).stitched()
    assert read_features(pf, patch_size_l0=512).tile_rc().tolist() == RC.tolist()
    # a contradicting flag or a patches file of another run
    with pytest.raises(InputError, match="records a level-0 tile of 512"):
        read_features(pf, patches_h5=pp, patch_size_l0=256)
    other = write_clam_patches(tmp_path / "patches" / "other.h5", xy[:3])
    with pytest.raises(InputError, match="do not match"):
        read_features(pf, patches_h5=other)
    # the CLAM root folder is accepted (h5_files/ is used)
    assert set(find_feature_files(tmp_path)) == {"s1"}


def test_trident_layout_attrs(tmp_path: Path) -> None:
    feats = _rng(2).standard_normal((5, 32)).astype(np.float32)
    xy = grid_coords(RC, 512)
    p = write_trident(tmp_path / "features_uni_v1" / "t1.h5", feats, xy)
    sf = read_features(p)
    assert sf.layout == "trident" and sf.encoder == "uni_v1"
    assert sf.patch_size_l0 == 512 and sf.step_l0 == 512 and sf.tile_size_px == 256
    assert sf.mpp == pytest.approx(0.5) and sf.level0_size == (80000, 60000)
    assert sf.attrs["coords.savetodir"] is None  # 'None' string
    assert sf.attrs["coords.segmentation_params"] == {"model": "hest", "holes": None, "conf": 0.5}
    assert sf.tile_rc().tolist() == RC.tolist()
    info = inspect_features(p)
    assert info.layout == "trident" and info.encoder == "uni_v1" and info.geometry.mpp == 0.5


def test_trident_overlap_sets_the_pitch(tmp_path: Path) -> None:
    # 256 px at 20x with 32 px overlap -> tile 512 px at level 0, pitch (256 - 32) * 2 = 448
    xy = grid_coords(RC, 448)
    p = write_trident(tmp_path / "o.h5", np.ones((5, 8), np.float32), xy, overlap=32)
    sf = read_features(p)
    assert sf.patch_size_l0 == 512 and sf.step_l0 == 448
    assert sf.tile_rc().tolist() == RC.tolist()


def test_empty_trident_slide(tmp_path: Path) -> None:
    p = write_trident(tmp_path / "empty.h5", np.zeros((0, 32), np.float32), np.zeros((0, 2)))
    sf = read_features(p)
    assert sf.num_tiles == 0 and sf.tokens.shape == (0, 32, 1, 1)
    for call in (sf.require_tiles, sf.stitched, sf.tile_mask):
        with pytest.raises(InputError, match="has no tiles"):
            call()
    assert inspect_features(p).num_tiles == 0


def test_int32_and_int64_coords_give_the_same_tiles(tmp_path: Path) -> None:
    feats = _rng(3).standard_normal((5, 8)).astype(np.float32)
    xy = grid_coords(RC, 256, origin=(256, 0))
    a = write_clam_features(tmp_path / "a.h5", feats, xy.astype(np.int32))
    b = write_trident(tmp_path / "b.h5", feats, xy.astype(np.int64), patch_size_level0=256)
    sa, sb = read_features(a, patch_size_l0=256), read_features(b)
    assert torch.equal(sa.l0_xy, sb.l0_xy)
    ga, gb = sa.stitched(), sb.stitched()
    assert torch.equal(ga.grid, gb.grid) and torch.equal(ga.cell_mask, gb.cell_mask)


def test_integral_float_coords_are_accepted_and_fractional_ones_refused(tmp_path: Path) -> None:
    p = tmp_path / "f.h5"
    with h5py.File(p, "w") as f:
        f["features"] = np.ones((2, 4), np.float32)
        f["coords"] = np.array([[0.0, 0.0], [256.0, 0.0]])
    assert read_features(p).l0_xy.tolist() == [[0, 0], [256, 0]]
    with h5py.File(p, "w") as f:
        f["features"] = np.ones((2, 4), np.float32)
        f["coords"] = np.array([[0.0, 0.0], [128.5, 0.0]])
    with pytest.raises(InputError, match="tile 1"):
        read_features(p)


# --------------------------------------------------------------------------------------------
# bad files
# --------------------------------------------------------------------------------------------
def _write_raw(path: Path, **datasets: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v
    return path


@pytest.mark.parametrize(
    ("datasets", "message"),
    [
        ({"coords": np.zeros((2, 2), np.int64)}, "no dataset 'features'"),
        ({"features": np.zeros((2, 4), np.float32)}, "no dataset 'coords'"),
        (
            {"features": np.zeros((2, 196, 4), np.float32), "coords": np.zeros((2, 2))},
            r"shape \(2, 196, 4\)",
        ),
        ({"features": np.zeros((2, 4), np.float32), "coords": np.zeros((2, 3))}, r"\(N, 2\)"),
        (
            {"features": np.zeros((3, 4), np.float32), "coords": np.zeros((2, 2))},
            "3 tiles but 'coords' has 2",
        ),
        ({"features": np.zeros((2, 4), np.int64), "coords": np.zeros((2, 2))}, "floating point"),
    ],
    ids=["no-features", "no-coords", "3d-features", "coords-3-cols", "n-mismatch", "int-features"],
)
def test_malformed_files(tmp_path: Path, datasets: dict[str, np.ndarray], message: str) -> None:
    p = _write_raw(tmp_path / "bad.h5", **datasets)
    with pytest.raises(InputError, match=message):
        read_features(p)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_features_name_the_first_bad_tile(tmp_path: Path, bad: float) -> None:
    feats = np.ones((6, 4, 2, 2), np.float32)
    feats[3, 1, 0, 1] = bad
    feats[5, 0, 0, 0] = bad
    p = write_insight(tmp_path / "n.h5", feats, grid_coords(np.c_[np.zeros(6), np.arange(6)], 64))
    with pytest.raises(InputError, match=r"tile 3 at l0 \(x=192, y=0\).*2 bad tiles"):
        read_features(p)


def test_not_an_h5_file(tmp_path: Path) -> None:
    p = tmp_path / "slide.h5"
    p.write_text("not hdf5")
    with pytest.raises(InputError, match="not an HDF5 file"):
        read_features(p)
    with pytest.raises(InputError, match="does not exist"):
        read_features(tmp_path / "missing.h5")
    with pytest.raises(InputError, match="folder"):
        read_features(tmp_path)


def test_off_grid_coords_name_the_first_offending_tile(tmp_path: Path) -> None:
    xy = grid_coords(RC, 256)
    xy[2] += (100, 0)  # tile 2 off the grid
    xy[4] += (0, 7)
    p = write_trident(tmp_path / "off.h5", np.ones((5, 4), np.float32), xy, patch_size_level0=256)
    with pytest.raises(InputError, match=r"tile 2 at l0 \(x=356, y=256\) is off the tile grid"):
        read_features(p).stitched()
    # snapping rounds every tile to the nearest cell (CLAM's per-contour grids)
    assert read_features(p).tile_rc(snap=True).tolist() == [[0, 0], [0, 2], [1, 1], [2, 0], [2, 3]]


def test_duplicate_tiles_are_refused(tmp_path: Path) -> None:
    xy = grid_coords(np.array([[0, 0], [0, 1], [1, 1], [0, 1]]), 256)
    p = write_trident(tmp_path / "dup.h5", np.ones((4, 4), np.float32), xy, patch_size_level0=256)
    with pytest.raises(InputError, match=r"tiles 1 and 3 fall on the same grid cell"):
        read_features(p).stitched()


def test_coordinates_in_other_units_are_refused(tmp_path: Path) -> None:
    xy = np.array([[0, 0], [2_000_000, 2_000_000]])
    p = write_trident(tmp_path / "far.h5", np.ones((2, 4), np.float32), xy, patch_size_level0=1)
    with pytest.raises(InputError, match="does not match the coordinates|in other units"):
        read_features(p).stitched()


def test_decode_attr() -> None:
    assert decode_attr(b"abc") == "abc"
    assert decode_attr("None") is None
    assert decode_attr('{"a": 1}') == {"a": 1}
    assert decode_attr("{not json") == "{not json"
    assert decode_attr(np.int64(3)) == 3 and isinstance(decode_attr(np.int64(3)), int)
    assert decode_attr(np.array([2.0, 2.0])) == [2.0, 2.0]


# --------------------------------------------------------------------------------------------
# stitching
# --------------------------------------------------------------------------------------------
def test_stitched_vectors_land_on_their_cells(tmp_path: Path) -> None:
    feats = _rng(4).standard_normal((5, 6)).astype(np.float32)
    p = write_trident(tmp_path / "v.h5", feats, grid_coords(RC, 512, origin=(4096, 1024)))
    st = read_features(p).stitched()
    grid, mask, rc = st  # unpacks as a 3-tuple
    assert grid.shape == (1, 6, 3, 4) and mask.shape == (1, 3, 4)
    assert st.origin_l0 == (4096, 1024) and st.cell_size_l0 == 512
    expected = torch.zeros(3, 4, dtype=torch.bool)
    for i, (r, c) in enumerate(RC):
        assert torch.equal(grid[0, :, r, c], torch.from_numpy(feats[i]))
        expected[r, c] = True
    assert torch.equal(mask[0], expected)
    assert float(grid[0, :, ~expected].abs().sum()) == 0.0
    assert torch.equal(rc, torch.from_numpy(RC))


def test_stitched_token_grids_and_unstitch(tmp_path: Path) -> None:
    feats = _rng(5).standard_normal((5, 3, 4, 4)).astype(np.float32)
    p = write_insight(tmp_path / "g.h5", feats, grid_coords(RC, 64))
    sf = read_features(p, patch_size_l0=64)
    st = sf.stitched()
    grid, mask, rc = st
    cell = st.cell_size_l0
    assert grid.shape == (1, 3, 12, 16) and cell == 16.0
    for i, (r, c) in enumerate(RC):
        block = grid[0, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4]
        assert torch.equal(block, torch.from_numpy(feats[i]))
        assert bool(mask[0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].all())
    assert int(mask.sum()) == 5 * 16
    assert torch.equal(unstitch(grid, rc, (4, 4)), sf.tokens)
    tokens, tmask = sf.model_inputs("tile")
    assert tokens is sf.tokens and tmask.shape == (5, 4, 4) and bool(tmask.all())


# --------------------------------------------------------------------------------------------
# parity with the model
# --------------------------------------------------------------------------------------------
def test_grid_layout_predicts_like_the_same_tokens(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = InsightConfig(in_dim=16, grid_size=(14, 14), reduce_dim=16, widths=(16, 8, 8))
    model = InsightModel(cfg, backend="reference").eval()
    tokens = torch.randn(5, 16, 14, 14)
    p = write_insight(tmp_path / "p.h5", tokens.numpy(), grid_coords(RC, 448))
    sf = read_features(p)
    direct = model.predict(tokens)
    via_file = model.predict(*sf.model_inputs("tile"))
    assert torch.equal(direct.scores, via_file.scores)
    assert torch.equal(direct.heatmap, via_file.heatmap)


@pytest.mark.parametrize("layout", ["clam", "trident", "insight"])
def test_slide_context_on_stitched_features_matches_a_hand_built_grid(
    tmp_path: Path, layout: str
) -> None:
    """Every layout stitches to the same slide grid; the slide-context model on it equals the
    model run on the grid built by hand, and heatmap cells map back to their tiles."""
    torch.manual_seed(1)
    cfg = InsightConfig(
        in_dim=12,
        grid_size=(1, 1),
        norm="channel",
        context="slide",
        reduce_dim=16,
        widths=(8, 8, 8),
    )
    model = InsightModel(cfg, backend="reference").eval()
    vecs = torch.randn(5, 12)
    xy = grid_coords(RC, 512, origin=(512, 512))
    if layout == "clam":
        p = write_clam_features(tmp_path / "c.h5", vecs.numpy(), xy)
        sf = read_features(p, patches_h5=write_clam_patches(tmp_path / "pp.h5", xy))
    elif layout == "trident":
        sf = read_features(write_trident(tmp_path / "t.h5", vecs.numpy(), xy))
    else:
        p = write_insight(tmp_path / "i.h5", vecs.numpy()[:, :, None, None], xy)
        sf = read_features(p, patch_size_l0=512)
    grid, mask = sf.model_inputs("slide")
    by_hand = torch.zeros(1, 12, 3, 4)
    hand_mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    for i, (r, c) in enumerate(RC):
        by_hand[0, :, r, c] = vecs[i]
        hand_mask[0, r, c] = True
    assert torch.equal(grid, by_hand) and torch.equal(mask, hand_mask)
    pred = model.predict(grid, mask)
    ref = model.predict(by_hand, hand_mask)
    assert torch.equal(pred.scores, ref.scores) and torch.equal(pred.heatmap, ref.heatmap)
    per_tile = unstitch(pred.heatmap, sf.tile_rc(), (1, 1))
    assert per_tile.shape == (5, 1, 1, 1)
    for i, (r, c) in enumerate(RC):
        assert per_tile[i, 0, 0, 0] == pred.heatmap[0, 0, r, c]


def test_clam_contours_stitch_one_exact_grid_per_lattice(tmp_path: Path) -> None:
    """Two CLAM contours 100 px off each other's lattice: one grid per lattice, in file order,
    nothing rounded; one grid for all of them still needs snap=True (and says lattices())."""
    xy = clam_contours(
        [((3000, 1000), np.array([[0, 0], [1, 1]])), ((100, 37), np.array([[0, 0], [0, 2]]))],
        512,
    )
    feats = _rng(5).standard_normal((4, 6)).astype(np.float32)
    h5 = write_clam_features(tmp_path / "h5_files" / "c.h5", feats, xy)
    sf = read_features(h5, patch_size_l0=512)
    with pytest.raises(InputError, match=r"tile 0 at l0 \(x=3000, y=1000\) is off.*lattices\(\)"):
        sf.stitched()
    groups = sf.stitched_lattices()
    assert [g[0].tolist() for g in groups] == [[0, 1], [2, 3]]
    (_, a), (_, b) = groups
    assert a.origin_l0 == (3000, 1000) and b.origin_l0 == (100, 37)
    assert a.tile_rc.tolist() == [[0, 0], [1, 1]] and b.tile_rc.tolist() == [[0, 0], [0, 2]]
    assert torch.equal(a.grid[0, :, 1, 1], torch.from_numpy(feats[1]))
    assert torch.equal(b.grid[0, :, 0, 2], torch.from_numpy(feats[3]))
    assert b.cell_mask[0].tolist() == [[True, False, True]]
