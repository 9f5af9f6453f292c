"""Label files that cannot train a model are refused before any epoch runs."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from fastinsight.errors import InputError
from fastinsight.evaluate import read_labels
from fastinsight.train import TrainConfig, train_from_folder


def _features(folder, n: int) -> None:
    folder.mkdir()
    for i in range(n):
        with h5py.File(folder / f"s{i}.h5", "w") as f:
            f["features"] = np.random.rand(3, 8, 14, 14).astype(np.float32)
            f["coords"] = np.array([[0, 0], [224, 0], [448, 0]], dtype=np.int64)


def test_single_class_labels_are_refused(tmp_path) -> None:
    _features(tmp_path / "f", 4)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,tumour\n" + "".join(f"s{i},0\n" for i in range(4)))
    with pytest.raises(InputError, match="all negative"):
        train_from_folder(
            tmp_path / "f",
            labels,
            tmp_path / "m.safetensors",
            TrainConfig(epochs=1),
            patch_size_l0=224,
            encoder="vit-tiny",
            tile_size_px=224,
            mpp=0.5,
        )
    assert not (tmp_path / "m.safetensors").exists()


def test_labels_need_a_slide_id_column(tmp_path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("foo,label\ns0,1\n")
    with pytest.raises(InputError, match="slide_id"):
        read_labels(labels)
