"""Guards of a training run (audit defects 6-8): a fresh run never replaces a previous run's
outputs unasked and its per-epoch saves are all-or-nothing; the training split itself has both
labels; the recorded encoder's token dimension matches the features."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

import fastinsight.train.loop as loop
from fastinsight.errors import InputError, OutputError
from fastinsight.train import TrainConfig, stratified_split, train_from_folder

GEOMETRY = {"patch_size_l0": 224, "tile_size_px": 224, "mpp": 0.5}


def _features(folder: Path, n: int, dim: int = 8) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        with h5py.File(folder / f"s{i}.h5", "w") as f:
            f["features"] = rng.random((2, dim, 2, 2), dtype=np.float32)
            f["coords"] = np.array([[0, 0], [224, 0]], dtype=np.int64)
    return folder


def _labels(path: Path, rows: str) -> Path:
    split = ",split" if rows.count(",") > rows.count("\n") else ""
    path.write_text(f"slide_id,tumour{split}\n{rows}")
    return path


def _train(tmp_path: Path, labels: Path, **kw: object) -> object:
    cfg = kw.pop("config", TrainConfig(epochs=1))
    return train_from_folder(
        tmp_path / "f",
        labels,
        kw.pop("out", tmp_path / "m.safetensors"),
        cfg,  # type: ignore[arg-type]
        progress=False,
        **{"encoder": "features-x", **GEOMETRY, **kw},  # type: ignore[arg-type]
    )


def test_two_slides_of_two_labels_both_train() -> None:
    # Before: the fallback moved the only slide of one label into validation.
    assert stratified_split(["a", "b"], [(1,), (0,)], 0.2, seed=0) == (["a", "b"], [])
    tr, va = stratified_split(["a", "b", "c"], [(1,), (0,), (0,)], 0.1, seed=0)
    assert len(va) == 1 and "a" in tr


def test_a_one_sided_training_split_is_refused(tmp_path: Path) -> None:
    _features(tmp_path / "f", 4)
    rows = "s0,0,train\ns1,0,train\ns2,1,val\ns3,0,val\n"
    with pytest.raises(InputError, match="the 2 training slides .* are all negative"):
        _train(tmp_path, _labels(tmp_path / "l.csv", rows))
    assert not list(tmp_path.glob("m.*"))


def test_encoder_dimension_must_match_the_features(tmp_path: Path) -> None:
    _features(tmp_path / "f", 2, dim=16)
    labels = _labels(tmp_path / "l.csv", "s0,0\ns1,1\n")
    with pytest.raises(InputError, match="'vit-tiny' gives 64-channel tokens .* 16-channel"):
        _train(tmp_path, labels, encoder="vit-tiny")
    assert not list(tmp_path.glob("m.*"))


def test_fresh_run_refuses_previous_outputs_and_saves_epochs_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _features(tmp_path / "f", 2)
    labels = _labels(tmp_path / "l.csv", "s0,0\ns1,1\n")
    _train(tmp_path, labels)
    outputs = ["m.safetensors", "m.train.pt", "m.metrics.csv", "m.metrics.json"]
    before = {n: (tmp_path / n).read_bytes() for n in outputs}
    with pytest.raises(OutputError, match="--resume .* --overwrite"):
        _train(tmp_path, labels)
    assert {n: (tmp_path / n).read_bytes() for n in outputs} == before

    # An epoch whose saving fails half-way (after the model was written) keeps the whole
    # previous set: model, state and metrics are renamed into place together.
    def broken(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "write_metrics", broken)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, labels, config=TrainConfig(epochs=2), resume=True)
    assert {n: (tmp_path / n).read_bytes() for n in outputs} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*outputs, "f", "l.csv"])
    monkeypatch.undo()
    # --overwrite starts afresh.
    result = _train(tmp_path, labels, overwrite=True)
    assert result.best_epoch == 1  # type: ignore[attr-defined]
