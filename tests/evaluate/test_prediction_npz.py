"""One prediction npz: every writer writes the scores-sidecar layout; the reader also takes the
older evaluation layout that earlier versions' ``save_prediction_npz`` wrote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fastinsight.errors import InputError
from fastinsight.evaluate import (
    EvalInput,
    load_prediction_npz,
    load_predictions,
    save_prediction_npz,
)
from fastinsight.slide import read_scores_sidecar

LAYOUT = {"scores", "mask", "class_names", "geometry"}


def _heatmap(k: int, rows: int, cols: int) -> np.ndarray:
    return np.random.default_rng(0).random((k, rows, cols)).astype(np.float32)


def _assert_same(back: EvalInput, pred: EvalInput) -> None:
    assert back.slide_id == pred.slide_id and back.class_names == pred.class_names
    assert back.cell_size_l0 == pred.cell_size_l0 and back.origin_l0 == pred.origin_l0
    assert back.slide_size_l0 == pred.slide_size_l0 and back.mpp == pred.mpp
    np.testing.assert_array_equal(back.heatmap, pred.heatmap)
    np.testing.assert_allclose(back.scores, pred.scores, rtol=1e-12)


def test_save_writes_the_one_layout_and_reads_back(tmp_path: Path) -> None:
    mask = np.ones((6, 5), bool)
    mask[0, :2] = False
    pred = EvalInput(
        slide_id="case-1",
        scores=np.array([0.25, 0.75]),
        heatmap=_heatmap(2, 6, 5) * mask,
        cell_size_l0=32.0,
        mask=mask,
        slide_size_l0=(150, 180),  # ceil(150 / 32) = 5 columns, ceil(180 / 32) = 6 rows
        mpp=0.25,
        class_names=("tumor", "necrosis"),
    )
    path = tmp_path / "case-1.npz"
    save_prediction_npz(pred, path)
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == LAYOUT  # the sidecar predict and predict-cohort write
    side = read_scores_sidecar(path)
    assert side.grid.cell_shape == (6, 5) and side.grid.l0_cell_size == 32.0
    assert (side.grid.slide_width, side.grid.slide_height, side.grid.slide_mpp) == (150, 180, 0.25)
    assert side.class_names == ("tumor", "necrosis") and side.metadata["slide_id"] == "case-1"
    np.testing.assert_array_equal(side.mask, mask)
    back = load_prediction_npz(path)
    _assert_same(back, pred)
    np.testing.assert_array_equal(back.mask, mask)


def test_unknowns_and_offsets_survive_the_round_trip(tmp_path: Path) -> None:
    """No mpp, no slide size, no class names, no mask, a grid origin off (0, 0), a cell size that
    is not a whole number of px: all read back as they were given."""
    pred = EvalInput(
        slide_id="s",
        scores=np.array([0.5]),
        heatmap=_heatmap(1, 3, 4),
        cell_size_l0=16.5,
        origin_l0=(7.0, 300.5),
    )
    save_prediction_npz(pred, tmp_path / "s.npz")
    back = load_prediction_npz(tmp_path / "s.npz")
    _assert_same(back, pred)
    assert back.mask is not None and back.mask.all()  # no mask: every cell counts
    # a slide size the heatmap does not cover cell for cell is kept as given
    part = EvalInput("p", np.array([0.5]), _heatmap(1, 3, 4), 16.0, slide_size_l0=(1000, 900))
    save_prediction_npz(part, tmp_path / "p.npz")
    _assert_same(load_prediction_npz(tmp_path / "p.npz"), part)


def test_old_layout_files_still_read(tmp_path: Path) -> None:
    """Exactly the keys and dtypes earlier versions' save_prediction_npz wrote."""
    heatmap = _heatmap(2, 3, 4)
    mask = np.ones((3, 4), bool)
    mask[2, 3] = False
    with open(tmp_path / "old.npz", "wb") as fh:
        np.savez_compressed(
            fh,
            slide_id=np.asarray("old-1"),
            scores=np.array([0.2, 0.8], np.float32),
            heatmap=heatmap,
            cell_size_l0=np.asarray(32.0),
            origin_l0=np.asarray((8.0, 16.0)),
            mask=mask,
            slide_size_l0=np.asarray((128, 96), np.int64),
            mpp=np.asarray(4.0),
            class_names=np.asarray(("a", "b")),
        )
    old = load_prediction_npz(tmp_path / "old.npz")
    assert old.slide_id == "old-1" and old.class_names == ("a", "b")
    assert old.origin_l0 == (8.0, 16.0) and old.slide_size_l0 == (128, 96) and old.mpp == 4.0
    assert old.cell_size_l0 == 32.0
    np.testing.assert_allclose(old.scores, [0.2, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(old.heatmap, heatmap)
    np.testing.assert_array_equal(old.mask, mask)

    # the minimal old file: optional keys absent
    np.savez(tmp_path / "min.npz", scores=np.ones(1), heatmap=np.ones((3, 4)), cell_size_l0=16.0)
    bare = load_prediction_npz(tmp_path / "min.npz")
    assert bare.slide_id == "min" and bare.mask is None and bare.mpp is None
    assert bare.origin_l0 == (0.0, 0.0) and bare.slide_size_l0 is None and bare.class_names == ()

    # re-saved, an old file becomes the one layout with the same content
    (tmp_path / "new").mkdir()
    save_prediction_npz(old, tmp_path / "new" / "old-1.npz")
    with np.load(tmp_path / "new" / "old-1.npz") as z:
        assert set(z.files) == LAYOUT
    _assert_same(load_prediction_npz(tmp_path / "new" / "old-1.npz"), old)


def test_a_folder_may_mix_old_and_new_files(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", scores=np.ones(1), heatmap=np.ones((2, 2)), cell_size_l0=16.0)
    save_prediction_npz(EvalInput("b", np.zeros(1), np.zeros((2, 2)), 16.0), tmp_path / "b.npz")
    assert [p.slide_id for p in load_predictions(tmp_path)] == ["a", "b"]


def test_sidecar_metadata_that_is_not_a_prediction_is_an_input_error(tmp_path: Path) -> None:
    pred = EvalInput("m", np.array([0.5]), np.zeros((2, 2)), 16.0)
    save_prediction_npz(pred, tmp_path / "m.npz")
    side = read_scores_sidecar(tmp_path / "m.npz")
    from fastinsight.slide import write_scores_sidecar

    write_scores_sidecar(
        tmp_path / "m.npz", side.scores, side.grid, metadata={"scores": [0.5], "origin_l0": 3}
    )
    with pytest.raises(InputError, match="unreadable prediction metadata"):
        load_prediction_npz(tmp_path / "m.npz")
