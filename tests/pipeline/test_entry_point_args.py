"""The remaining public entry points refuse arguments of the wrong kind with one fastinsight
error each (never an AttributeError or a TypeError from deep inside, nor a misleading message),
before anything is read, encoded or started: ``predict_features``, ``predict_volume``,
``predict_cohort`` (before Ray), ``load_radiograph_model``, ``load_volume_model`` and
``predict_radiographs``.

The natural mistakes: a PYLON model from ``fastinsight.load_model`` (which sniffs radiograph
checkpoints) handed to a slide or CT entry point, an encoder passed by name, an options dict,
a loaded model where a path is expected, None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

import fastinsight
import fastinsight.cohort.api as cohort_api
from fastinsight.errors import CheckpointError, ConfigError, FastInsightError, InputError
from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel
from fastinsight.predict.features import predict_features
from fastinsight.predict.slide import PredictOptions
from fastinsight.synthetic import make_cohort

OPTS = PredictOptions(device="cpu", progress=False, num_workers=0, tissue="all")


@pytest.fixture(scope="module")
def pylon(pylon_path: Path) -> Any:
    return fastinsight.load_model(pylon_path, device="cpu")  # the sniffer's PYLON, by design


@pytest.fixture(scope="module")
def model(tiny_model_path: Path) -> InsightModel:
    return fastinsight.load_model(tiny_model_path, device="cpu")


def _error(call: Any, error: type[FastInsightError], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        call()
    assert "\n" not in str(info.value)  # one line


# --------------------------------------------------------------------------------------------
# predict_features
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def features_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Official-layout token grids of 4 tiles (2 x 2 at 224 level-0 px) for the tiny model."""
    path = tmp_path_factory.mktemp("features") / "s.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f["features"] = rng.standard_normal((4, 64, 14, 14)).astype(np.float32)
        f["coords"] = np.array([[0, 0], [224, 0], [0, 224], [224, 224]], dtype=np.int64)
    return path


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ("pylon", InputError, r"'pylon' is a radiograph model, not a slide .*predict_radiographs"),
        ("model=None", InputError, r"model must be an INSIGHT slide model .*got NoneType"),
        ("options", ConfigError, r"options must be a .*PredictOptions, got dict; pass Predict"),
        ("path=None", InputError, r"path must be the path of a feature file .*got NoneType"),
    ],
)
def test_predict_features_refuses(
    features_h5: Path,
    model: InsightModel,
    pylon: Any,
    bad: str,
    error: type[FastInsightError],
    match: str,
) -> None:
    args: dict[str, Any] = {"path": features_h5, "model": model, "options": OPTS}
    args.update(
        {
            "pylon": {"model": pylon},
            "model=None": {"model": None},
            "options": {"options": {"batch_size": 4}},
            "path=None": {"path": None},
        }[bad]
    )
    _error(lambda: predict_features(**args, patch_size_l0=224), error, match)


def test_predict_features_still_runs(features_h5: Path, model: InsightModel) -> None:
    result = predict_features(str(features_h5), model, OPTS, patch_size_l0=224)
    assert result.scores.shape == (2,) and result.n_tiles == 4


# --------------------------------------------------------------------------------------------
# predict_volume
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def volume_setup() -> tuple[Any, InsightModel, Any, Any]:
    from fastinsight.volume.io import Volume
    from fastinsight.volume.predict import VolumeOptions, build_volume_encoder
    from fastinsight.volume.preprocess import PreprocessOptions
    from fastinsight.volume.synthetic import make_chest_ct

    ct = make_chest_ct((24, 24, 3), lesions=1, seed=1)
    volume = Volume(ct.hu.astype(np.float32), ct.affine, {"path": "ct.nii.gz"})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = build_volume_encoder("vit-tiny", 32, options={"patch_size_px": 8})
        head = InsightModel(
            InsightConfig(
                in_dim=64, reduce_dim=16, widths=(16, 8, 8), grid_size=(4, 4), norm="channel",
                encoder="vit-tiny", tile_size_px=32, patch_size_px=8,
            ),
            backend="reference",
        )  # fmt: skip
    options = VolumeOptions(PreprocessOptions(tile_size=32, lung_mask="none"), batch_size=2)
    return volume, head, encoder, options


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ("model=None", InputError, r"model must be an INSIGHT CT volume model .*got NoneType"),
        ("pylon", InputError, r"'pylon' is a radiograph model, not a CT volume .*predict_radiog"),
        ("path", InputError, r"model must be a loaded model, got the path .*load_volume_model"),
        ("encoder=None", ConfigError, r"encoder must be an encoder object .*got NoneType"),
        ("encoder name", ConfigError, r"got the str 'vit-tiny'; build it with .*build_volume_enc"),
        ("options", ConfigError, r"options must be a VolumeOptions, got dict; pass VolumeOpt"),
    ],
)
def test_predict_volume_refuses(
    volume_setup: tuple[Any, InsightModel, Any, Any],
    pylon: Any,
    bad: str,
    error: type[FastInsightError],
    match: str,
) -> None:
    from fastinsight.volume.predict import predict_volume

    volume, head, encoder, options = volume_setup
    args: dict[str, Any] = {"volume": volume, "model": head, "encoder": encoder}
    args["options"] = options
    args.update(
        {
            "model=None": {"model": None},
            "pylon": {"model": pylon},
            "path": {"model": "model.safetensors"},
            "encoder=None": {"encoder": None},
            "encoder name": {"encoder": "vit-tiny"},
            "options": {"options": {}},
        }[bad]
    )
    _error(lambda: predict_volume(**args), error, match)


def test_predict_volume_still_runs(volume_setup: tuple[Any, InsightModel, Any, Any]) -> None:
    from fastinsight.volume.predict import predict_volume

    volume, head, encoder, options = volume_setup
    assert np.isfinite(predict_volume(volume, head, encoder, options).scores).all()


# --------------------------------------------------------------------------------------------
# predict_cohort: refused before Ray is imported or started (Ray need not be installed)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slides_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    return make_cohort(out, n_slides=1, size_px=(448, 448))[0].path.parent


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Importing Ray is recorded (a no-op); starting it fails the test."""
    seen: list[str] = []

    def never(*_a: object, **_k: object) -> float:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cohort_api, "_import_ray", lambda: seen.append("import"))
    monkeypatch.setattr(cohort_api, "_run_jobs", never)
    return seen


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ("None", ConfigError, r"predict_cohort takes the path of a model file .*got NoneType"),
        ("loaded", ConfigError, r"got a loaded InsightModel; save it .*pass that path"),
        ("options", ConfigError, r"options must be a .*CohortOptions, got dict; pass Cohort"),
    ],
)
def test_predict_cohort_refuses_before_ray(
    slides_folder: Path,
    tiny_model_path: Path,
    model: InsightModel,
    tmp_path: Path,
    no_ray: list[str],
    bad: str,
    error: type[FastInsightError],
    match: str,
) -> None:
    model_path: Any = {"None": None, "loaded": model, "options": tiny_model_path}[bad]
    options: Any = {"batch_size": 4} if bad == "options" else None
    out = tmp_path / "out"
    _error(lambda: cohort_api.predict_cohort(slides_folder, model_path, out, options), error, match)
    assert no_ray == [] and not out.exists()  # before Ray's import and the output folder


def test_predict_cohort_refuses_a_radiograph_model_file(
    slides_folder: Path, pylon_path: Path, tmp_path: Path, no_ray: list[str]
) -> None:
    out = tmp_path / "out"
    _error(
        lambda: cohort_api.predict_cohort(slides_folder, pylon_path, out),
        CheckpointError,
        r"pylon\.safetensors': model family 'pylon' is a radiograph model, not a slide",
    )
    assert not (out / "summary.csv").exists()


# --------------------------------------------------------------------------------------------
# loaders and predict_radiographs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loader", ["load_radiograph_model", "load_volume_model"])
@pytest.mark.parametrize("bad", [None, 3, "loaded"])
def test_loaders_take_a_path(loader: str, bad: object, model: InsightModel) -> None:
    from fastinsight.radiograph.predict import load_radiograph_model
    from fastinsight.volume.checkpoint import load_volume_model

    load = {"load_radiograph_model": load_radiograph_model, "load_volume_model": load_volume_model}
    arg = model if bad == "loaded" else bad
    got = "a loaded InsightModel; use the model as it is" if bad == "loaded" else "got "
    _error(
        lambda: load[loader](arg),  # type: ignore[operator]
        ConfigError,
        rf"{loader} takes the path of a model file.*{got}",
    )


@pytest.mark.parametrize(("bad", "name"), [(None, "NoneType"), (3, "int")])
def test_predict_radiographs_needs_paths(pylon: Any, bad: object, name: str) -> None:
    from fastinsight.radiograph.predict import predict_radiographs

    _error(
        lambda: predict_radiographs(bad, pylon),  # type: ignore[arg-type]
        ConfigError,
        rf"paths must be a list of image paths, got {name}; pass \[path\]",
    )
