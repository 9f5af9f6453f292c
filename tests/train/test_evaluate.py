"""Slide AUC, Dice, ground truth on the heatmap grid (mask TIFFs, GeoJSON), evaluate end to end."""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile

from fastinsight.cli.evaluate import add_arguments, run
from fastinsight.errors import InputError
from fastinsight.evaluate import (
    EvalInput,
    Labels,
    average_ranks,
    dice,
    evaluate,
    load_prediction_npz,
    rasterize_polygons,
    read_geojson_polygons,
    read_labels,
    read_mask_tiff,
    resample_mask,
    roc_auc,
    save_prediction_npz,
)


# --------------------------------------------------------------------------------------------
# AUC
# --------------------------------------------------------------------------------------------
def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auc_equals_the_pairwise_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    scores = rng.integers(0, 5, n).astype(float)  # many ties
    labels = rng.integers(0, 2, n)
    labels[0], labels[1] = 0, 1
    assert roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)


def test_auc_edge_cases() -> None:
    assert roc_auc([0.1, 0.9], [0, 1]) == 1.0
    assert roc_auc([0.9, 0.1], [0, 1]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))
    with pytest.raises(InputError, match="0 or 1"):
        roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(InputError, match="NaN"):
        roc_auc([0.1, float("nan")], [0, 1])
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


# --------------------------------------------------------------------------------------------
# Dice and resampling
# --------------------------------------------------------------------------------------------
def test_dice_on_hand_made_masks() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0:2, 0:2] = True  # 4 cells
    b[1:3, 1:3] = True  # 4 cells, 1 shared
    assert dice(a, b) == pytest.approx(2 * 1 / 8)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    with pytest.raises(InputError, match="differ in shape"):
        dice(a, b[:3])


def test_resample_mask_nearest_and_area() -> None:
    # mask at downsample 4 of a 160 x 160 px level 0; heatmap cells of 16 px -> 10 x 10 grid
    m = np.zeros((40, 40), bool)
    m[8:16, 4:12] = True  # level-0 y 32..63, x 16..47: cells rows 2-3, cols 1-2 exactly
    near = resample_mask(m, 4.0, (10, 10), 16.0, method="nearest")
    expected = np.zeros((10, 10), bool)
    expected[2:4, 1:3] = True
    assert np.array_equal(near, expected)
    assert np.array_equal(resample_mask(m, 4.0, (10, 10), 16.0, method="area"), expected)
    # a block covering 3/4 of one cell and 1/4 of its neighbour
    m2 = np.zeros((40, 40), bool)
    m2[0:4, 1:4] = True  # x 4..15 of cell 0 (3/4), nothing of cell 1
    m2[0:4, 4:5] = True  # x 16..19 of cell 1 (1/4)
    area = resample_mask(m2, 4.0, (10, 10), 16.0, method="area")
    assert area[0, 0] and not area[0, 1]
    # cells beyond the mask image are negative; the grid origin shifts the sampling
    shifted = resample_mask(m, 4.0, (10, 10), 16.0, origin_l0=(16.0, 32.0))
    assert shifted[0:2, 0:2].all() and int(shifted.sum()) == 4


def _pred(sid: str, heat: np.ndarray, cell: float = 16.0, **kw: object) -> EvalInput:
    return EvalInput(
        slide_id=sid, scores=np.array([float(heat.max())]), heatmap=heat, cell_size_l0=cell, **kw
    )  # type: ignore[arg-type]


def test_mask_tiff_pyramid_picks_a_fine_enough_level(tmp_path: Path) -> None:
    level0 = np.zeros((320, 320), np.uint8)  # 1 px = 1 level-0 px
    level0[32:64, 16:48] = 255
    path = tmp_path / "pyr.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(level0, tile=(64, 64), subifds=2)
        tif.write(level0[::2, ::2], tile=(64, 64), subfiletype=1)
        tif.write(level0[::32, ::32], subfiletype=1)
    target = _pred("x", np.zeros((20, 20), np.float32), slide_size_l0=(320, 320))
    grid, info = read_mask_tiff(path, target)
    expected = np.zeros((20, 20), bool)
    expected[2:4, 1:3] = True
    assert np.array_equal(grid, expected)
    assert info["mask_level_size"] == [160, 160]  # /32 is coarser than a 16 px cell
    # a plain two-page TIFF (no pyramid flags); the scale estimated from the heatmap extent
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, (level0[::4, ::4] > 0).astype(np.uint8) * 2)
    grid2, info2 = read_mask_tiff(plain, _pred("x", np.zeros((20, 20), np.float32)), values=[2])
    assert np.array_equal(grid2, expected) and info2["scale"].startswith("estimated")
    with pytest.raises(InputError, match="aspect ratio"):
        read_mask_tiff(plain, _pred("x", np.zeros((20, 40), np.float32)))


def _single_level_mask(path: Path, mask: np.ndarray, tile: int = 256) -> None:
    tifffile.imwrite(path, mask, tile=(tile, tile), compression="zlib")


@pytest.mark.parametrize("method", ["area", "nearest"])
def test_mask_too_large_for_memory_is_streamed_in_blocks(
    tmp_path: Path, monkeypatch, method: str
) -> None:
    """A single-level mask that does not fit in memory is read tile by tile into per-block lesion
    fractions; the cells come out as when the whole level is read."""
    import fastinsight.inputs

    mask = np.zeros((3000, 2000), np.uint8)
    mask[600:1400, 300:1100] = 255  # cell-aligned lesion (cells of 100 px)
    yy, xx = np.mgrid[0:3000, 0:2000]
    mask[((yy - 2200) ** 2 + (xx - 1400) ** 2) < 330**2] = 128  # a disc: edges inside cells
    path = tmp_path / "single.tif"
    _single_level_mask(path, mask)
    target = _pred("x", np.zeros((30, 20), np.float32), cell=100.0, slide_size_l0=(2000, 3000))
    whole, info = read_mask_tiff(path, target, method=method)
    assert "streamed_block_px" not in info
    monkeypatch.setattr(fastinsight.inputs, "memory_bytes", lambda: 8 << 20)  # 8 MiB
    streamed, info2 = read_mask_tiff(path, target, method=method)
    assert info2["streamed_block_px"] > 1 and info2["mask_level_size"] == [2000, 3000]
    assert info2["mask_downsample_l0"] == info["mask_downsample_l0"]
    assert streamed[6:14, 3:11].all() and not streamed[:6].any()
    # The disc's rim cells may flip where a block straddles a cell edge: at most a few.
    assert int((streamed != whole).sum()) <= 4
    # Values pick lesion classes in the streamed path too.
    only_disc, _ = read_mask_tiff(path, target, method=method, values=[128])
    assert not only_disc[6:14, 3:11].any() and only_disc[22, 14]


def test_mask_too_large_even_in_blocks_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    import fastinsight.inputs

    path = tmp_path / "big.tif"
    _single_level_mask(path, np.zeros((2000, 2000), np.uint8))
    monkeypatch.setattr(fastinsight.inputs, "memory_bytes", lambda: 64 << 10)  # 64 KiB
    target = _pred("x", np.zeros((20, 20), np.float32), cell=100.0, slide_size_l0=(2000, 2000))
    with pytest.raises(InputError, match="save the mask with a pyramid"):
        read_mask_tiff(path, target)


# --------------------------------------------------------------------------------------------
# GeoJSON
# --------------------------------------------------------------------------------------------
def _square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(coords: object, kind: str = "Polygon", name: str = "Tumor") -> dict[str, object]:
    return {
        "type": "Feature",
        "geometry": {"type": kind, "coordinates": coords},
        "properties": {
            "objectType": "annotation",
            "classification": {"name": name, "color": [255, 0, 0]},
        },
    }


def test_geojson_rasterisation_at_cell_centres() -> None:
    # level-0 x 32..96, y 16..80 with 16 px cells: centres of cols 2..5 and rows 1..4
    polys = [[np.array(_square(32, 16, 96, 80))]]
    grid = rasterize_polygons(polys, (8, 8), 16.0)
    expected = np.zeros((8, 8), bool)
    expected[1:5, 2:6] = True
    assert np.array_equal(grid, expected)
    # a hole removes its cells (even-odd rule inside one polygon)
    holed = [[np.array(_square(0, 0, 128, 128)), np.array(_square(32, 32, 64, 64))]]
    g = rasterize_polygons(holed, (8, 8), 16.0)
    assert int(g.sum()) == 64 - 4 and not g[2:4, 2:4].any()
    # area mode: a polygon covering 3/4 of a cell is in, 1/4 is out
    part = [[np.array(_square(4, 0, 20, 16))]]  # cell 0: x 4..16 (3/4), cell 1: x 16..20 (1/4)
    ga = rasterize_polygons(part, (2, 2), 16.0, method="area")
    assert ga.tolist() == [[True, False], [False, False]]
    # a triangle: centres strictly inside only
    tri = [[np.array([[0, 0], [128, 0], [0, 128]])]]
    gt = rasterize_polygons(tri, (8, 8), 16.0)
    assert gt[0, 0] and gt[0, 6] and not gt[0, 7] and not gt[7, 7]
    assert int(gt.sum()) == sum(range(8))  # centres (j+.5, i+.5) with i + j < 7


def test_geojson_files_multipolygons_and_classes(tmp_path: Path) -> None:
    fc = {
        "type": "FeatureCollection",
        "features": [
            _feature([_square(0, 0, 32, 32)]),
            _feature([[_square(64, 64, 96, 96)], [_square(96, 0, 128, 32)]], "MultiPolygon"),
            _feature([_square(0, 96, 32, 128)], name="Stroma"),
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}},
        ],
    }
    p = tmp_path / "a.geojson"
    p.write_text(json.dumps(fc))
    assert len(read_geojson_polygons(p)) == 4
    tumour = read_geojson_polygons(p, classes=["Tumor"])
    assert len(tumour) == 3
    grid = rasterize_polygons(tumour, (8, 8), 16.0)
    assert int(grid.sum()) == 12 and grid[0:2, 0:2].all() and grid[4:6, 4:6].all()
    # QuPath also exports a bare list of features
    p2 = tmp_path / "b.json"
    p2.write_text(json.dumps(fc["features"][:1]))
    assert len(read_geojson_polygons(p2)) == 1
    bad = tmp_path / "bad.geojson"
    bad.write_text("{")
    with pytest.raises(InputError, match="GeoJSON"):
        read_geojson_polygons(bad)


# --------------------------------------------------------------------------------------------
# labels and predictions
# --------------------------------------------------------------------------------------------
def test_read_labels(tmp_path: Path) -> None:
    p = tmp_path / "l.csv"
    p.write_text("\ufeffslide_id,tumor,necrosis,split\na,1,0,train\nb,0,1,val\n")
    lab = read_labels(p)
    assert lab.class_names == ("tumor", "necrosis")
    assert lab.values == {"a": (1, 0), "b": (0, 1)} and lab.split == {"a": "train", "b": "val"}
    p.write_text("slide_id,tumor\na,1\na,0\n")
    with pytest.raises(InputError, match="listed twice"):
        read_labels(p)
    p.write_text("slide_id,tumor\na,yes\n")
    with pytest.raises(InputError, match="line 2: tumor='yes'"):
        read_labels(p)
    p.write_text("slide_id\na\n")
    with pytest.raises(InputError, match="no class column"):
        read_labels(p)


def test_prediction_npz_round_trip(tmp_path: Path) -> None:
    np.savez(tmp_path / "k.npz", scores=np.ones(1), heatmap=np.ones((2, 3, 4)), cell_size_l0=16.0)
    with pytest.raises(InputError, match="1 scores for a heatmap of 2 classes"):
        load_prediction_npz(tmp_path / "k.npz")
    pred = EvalInput(
        slide_id="s1",
        scores=np.array([0.2, 0.8]),
        heatmap=np.ones((2, 3, 4), np.float32),
        cell_size_l0=32.0,
        mask=np.ones((3, 4), bool),
        slide_size_l0=(128, 96),
        mpp=4.0,
        class_names=("a", "b"),
    )
    save_prediction_npz(pred, tmp_path / "s1.npz")
    back = load_prediction_npz(tmp_path / "s1.npz")
    assert back.slide_id == "s1" and back.class_names == ("a", "b")
    assert back.slide_size_l0 == (128, 96) and back.cell_size_l0 == 32.0 and back.mpp == 4.0
    np.testing.assert_allclose(back.scores, pred.scores, rtol=1e-6)
    with pytest.raises(InputError, match="tissue mask"):
        EvalInput("x", np.array([1.0]), np.ones((3, 4)), 16.0, mask=np.ones((4, 3), bool))
    np.savez(tmp_path / "bad.npz", scores=np.ones(1))
    with pytest.raises(InputError, match="lacks"):
        load_prediction_npz(tmp_path / "bad.npz")


# --------------------------------------------------------------------------------------------
# evaluate end to end
# --------------------------------------------------------------------------------------------
def test_evaluate_end_to_end(tmp_path: Path) -> None:
    preds_dir, gt_dir = tmp_path / "preds", tmp_path / "gt"
    preds_dir.mkdir()
    gt_dir.mkdir()
    # four slides on 8 x 8 grids of 16 px cells (128 x 128 px at level 0)
    h1 = np.zeros((8, 8), np.float32)
    h1[0:2, 0:4] = 0.9  # 8 cells predicted; truth rows 0-1, cols 0-1 (4 cells), 4 shared
    h2 = np.zeros((8, 8), np.float32)
    h2[4:8, 4:8] = 0.7  # 16 predicted, truth the same 16
    h2[0, 0] = 0.3  # below the 0.5 threshold
    h3 = np.zeros((8, 8), np.float32)
    h3[3, 3] = 0.2
    h4 = np.zeros((8, 8), np.float32)
    for sid, h, score in (("p1", h1, 0.9), ("p2", h2, 0.6), ("n1", h3, 0.7), ("n2", h4, 0.1)):
        save_prediction_npz(
            EvalInput(sid, np.array([score]), h, 16.0, mask=np.ones((8, 8), bool), mpp=8.0),
            preds_dir / f"{sid}.npz",
        )
    mask = np.zeros((128, 128), np.uint8)
    mask[0:32, 0:32] = 1
    tifffile.imwrite(gt_dir / "p1_mask.tif", mask)  # the official naming
    (gt_dir / "p2.geojson").write_text(
        json.dumps(
            {"type": "FeatureCollection", "features": [_feature([_square(64, 64, 128, 128)])]}
        )
    )
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,tumor\np1,1\np2,1\nn1,0\nn2,0\nmissing,1\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "res" / "eval"
    out.parent.mkdir()
    args = parser.parse_args(
        [str(preds_dir), str(labels), "--ground-truth", str(gt_dir), "--out", str(out)]
    )
    assert run(args) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    cls = result["classes"][0]
    # scores p1 .9, p2 .6 vs n1 .7, n2 .1: 3 of 4 pairs won
    assert cls["auc"] == pytest.approx(0.75) and (cls["n_pos"], cls["n_neg"]) == (2, 2)
    d1, d2 = 2 * 4 / (8 + 4), 1.0
    assert cls["dice_mean"] == pytest.approx((d1 + d2) / 2)
    assert cls["dice_sd"] == pytest.approx(np.std([d1, d2]))
    assert cls["dice_pooled"] == pytest.approx(2 * (4 + 16) / (8 + 4 + 16 + 16))
    assert cls["dice_slides"] == 2
    loc = result["localisation"]
    assert loc["threshold"] == 0.5 and loc["resolution"]["cell_size_l0_px"] == [16.0]
    # 16 level-0 px per cell at 8 um/px: a cell is 128 um on a side.
    assert loc["resolution"]["mpp_l0"] == [8.0] and loc["resolution"]["mpp_of_cell"] == [128.0]
    assert any("missing" in n for n in result["notes"])
    rows = {r["slide_id"]: r for r in csv.DictReader(open(out.with_suffix(".csv")))}
    assert set(rows) == {"p1", "p2", "n1", "n2"}
    assert float(rows["p1"]["dice_tumor"]) == pytest.approx(d1) and rows["n1"]["dice_tumor"] == ""

    # with negatives: n1 predicts nothing above 0.5 (Dice 1), n2 nothing (Dice 1)
    from fastinsight.evaluate import evaluate_from_folder

    res_all = evaluate_from_folder(preds_dir, labels, ground_truth_dir=gt_dir, dice_on="all")
    assert res_all.classes[0].dice_slides == 4
    # threshold 0: every cell the model's Otsu kept counts; n1 then has a false positive
    res0 = evaluate_from_folder(
        preds_dir, labels, ground_truth_dir=gt_dir, dice_on="all", threshold=0.0
    )
    n1 = next(s for s in res0.slides if s.slide_id == "n1")
    assert n1.dice == (0.0,) and n1.pred_cells == (1,)


def test_evaluate_refuses_mismatches() -> None:
    labels = Labels(class_names=("a", "b"), values={"s": (1, 0)})
    one_class = _pred("s", np.zeros((4, 4), np.float32))
    with pytest.raises(InputError, match="1 classes, the labels CSV 2"):
        evaluate([one_class], labels)
    with pytest.raises(InputError, match="no row in the labels"):
        evaluate([_pred("t", np.zeros((4, 4), np.float32))], Labels(("a",), {"s": (1,)}))
    two = EvalInput("s", np.array([0.1, 0.2]), np.zeros((2, 4, 4), np.float32), 16.0)
    with pytest.raises(InputError, match="--gt-class"):
        evaluate([two], labels, ground_truth={"s": "mask.tif"})
