"""The options objects of training name their fields; the data options come as one object or as
keywords; train/ and evaluate/ keep their functions short."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import fastinsight.evaluate
import fastinsight.train
from fastinsight.errors import ConfigError, InputError
from fastinsight.train import FolderOptions, TrainConfig, train_from_folder
from tests.support.h5_layouts import grid_coords, write_insight

REPO = Path(__file__).resolve().parents[2]


def test_train_config_errors_name_every_bad_field() -> None:
    with pytest.raises(InputError, match="epochs must be >= 1.*lr must be > 0") as info:
        TrainConfig(epochs=0, lr=0.0, accumulate=2)
    assert info.value.fields == ("epochs", "lr")
    with pytest.raises(InputError) as info:
        TrainConfig(optimizer="sgd", val_fraction=1.0)
    assert set(info.value.fields) == {"optimizer", "val_fraction"}
    with pytest.raises(InputError) as info:
        TrainConfig(class_weights=(1.0, float("nan"))).per_class("class_weights", 2)
    assert info.value.fields == ("class_weights",)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"patch_size_l0": 0}, "patch_size_l0"),
        ({"tile_size_px": 22.5}, "tile_size_px"),
        ({"mpp": -0.5}, "mpp"),
        ({"mpp": float("inf")}, "mpp"),
        ({"encoder": " "}, "encoder"),
    ],
    ids=["patch0", "tile-float", "mpp-neg", "mpp-inf", "encoder-blank"],
)
def test_folder_options_refuse_bad_fields(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InputError, match=f"invalid FolderOptions: {field}") as info:
        FolderOptions(**kwargs)  # type: ignore[arg-type]
    assert info.value.fields == (field,)


def _folder(tmp_path: Path) -> tuple[Path, Path]:
    feats = np.random.default_rng(0).standard_normal((3, 8, 4, 4)).astype(np.float32)
    for i in range(4):
        write_insight(
            tmp_path / "f" / f"s{i}.h5", feats, grid_coords(np.c_[[0, 0, 1], [0, 1, 0]], 64)
        )
    (tmp_path / "l.csv").write_text("slide_id,tumor\ns0,0\ns1,1\ns2,0\ns3,1\n")
    return tmp_path / "f", tmp_path / "l.csv"


def test_folder_options_as_an_object_equal_the_keywords(tmp_path: Path) -> None:
    feats, labels = _folder(tmp_path)
    fields = {
        "encoder": "toy",
        "tile_size_px": 64,
        "mpp": 0.5,
        "model_options": {"reduce_dim": 8, "widths": (8, 8, 8)},
    }
    cfg = TrainConfig(epochs=1, val_fraction=0.0)
    a = train_from_folder(feats, labels, tmp_path / "a.safetensors", cfg, FolderOptions(**fields),
                          progress=False)  # fmt: skip
    b = train_from_folder(feats, labels, tmp_path / "b.safetensors", cfg, progress=False, **fields)
    assert a.model_config == b.model_config and a.model_config.target_mpp == 0.5
    assert a.history[0].train_loss == b.history[0].train_loss


def test_unknown_or_doubled_data_options_are_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    feats, labels = _folder(tmp_path)
    out = tmp_path / "m.safetensors"
    with pytest.raises(ConfigError, match=r"unknown options \['tile_size'\]") as info:
        train_from_folder(feats, labels, out, TrainConfig(epochs=1), tile_size=64)
    assert info.value.fields == ("tile_size",)
    with pytest.raises(ConfigError, match="not both"):
        train_from_folder(
            feats, labels, out, TrainConfig(epochs=1), FolderOptions(mpp=0.5), encoder="toy"
        )
    with pytest.raises(InputError, match="patches folder") as info:
        train_from_folder(
            feats, labels, out, TrainConfig(epochs=1), encoder="toy", tile_size_px=64, mpp=0.5,
            patches_dir=tmp_path / "nowhere",
        )  # fmt: skip
    assert info.value.fields == ("patches_dir",)
    assert not out.exists() and not out.with_suffix(".train.pt").exists()


def test_every_public_name_stays_importable_from_the_package() -> None:
    for pkg in (fastinsight.train, fastinsight.evaluate):
        for name in pkg.__all__:
            assert getattr(pkg, name) is not None, f"{pkg.__name__}.{name}"
    assert fastinsight.train.train_on_bags.__module__ == "fastinsight.train.api"
    assert fastinsight.evaluate.evaluate.__module__ == "fastinsight.evaluate.api"


@pytest.mark.parametrize("package", ["train", "evaluate"])
def test_no_function_of_the_package_is_over_80_lines(package: str) -> None:
    long = []
    for path in sorted((REPO / "fastinsight" / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert not long, long
