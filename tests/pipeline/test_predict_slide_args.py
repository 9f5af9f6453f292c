"""``predict_slide``, ``encode_slide`` and ``load_model`` refuse arguments of the wrong kind with
one fastinsight error each (never an AttributeError or a TypeError from deep inside), before
anything is read or moved.

The natural mistake: ``fastinsight.load_model`` sniffs a radiograph checkpoint and returns a
PYLON model, which then goes to ``predict_slide``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fastinsight
from fastinsight.encoders import build_encoder
from fastinsight.errors import ConfigError, FastInsightError, InputError
from fastinsight.models.config import InsightConfig
from fastinsight.predict.slide import PredictOptions, encode_slide, predict_slide
from fastinsight.synthetic import make_cohort
from fastinsight.volume.model import CrossSliceInsight

OPTS = PredictOptions(device="cpu", progress=False, num_workers=1, tissue="all")


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("cohort"), n_slides=1, size_px=(448, 448))[0].path


@pytest.fixture(scope="module")
def model(tiny_model_path: Path) -> fastinsight.InsightModel:
    return fastinsight.load_model(tiny_model_path, device="cpu")


def test_a_radiograph_model_is_named_as_one(slide: Path, pylon_path: Path) -> None:
    pylon = fastinsight.load_model(pylon_path, device="cpu")  # the sniffer's PYLON, by design
    before = {k: v.clone() for k, v in pylon.state_dict().items()}
    pylon.train()
    with pytest.raises(InputError, match=r"'pylon' is a radiograph model.*predict_radiographs"):
        predict_slide(slide, pylon, options=OPTS)
    assert pylon.training  # refused before it was lent (eval mode, device)
    assert all(torch.equal(before[k], v) for k, v in pylon.state_dict().items())


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (None, r"model must be an INSIGHT slide model .*got NoneType"),
        ("model.safetensors", r"model must be a loaded model.*fastinsight\.load_model\(path\)"),
        (torch.nn.Linear(2, 2), r"model must be an INSIGHT slide model .*got Linear"),
    ],
)
def test_other_models_are_refused(slide: Path, bad: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        predict_slide(slide, bad, options=OPTS)  # type: ignore[arg-type]


def test_a_cross_slice_ct_model_is_refused(slide: Path) -> None:
    cfg = InsightConfig(in_dim=64, reduce_dim=8, widths=(8, 8, 8), encoder="vit-tiny")
    with pytest.raises(InputError, match=r"cross-slice .*predict_volume"):
        predict_slide(slide, CrossSliceInsight(cfg), options=OPTS)


def test_options_must_be_predict_options(slide: Path, model: fastinsight.InsightModel) -> None:
    with pytest.raises(ConfigError, match=r"options must be a .*PredictOptions, got dict"):
        predict_slide(slide, model, options={"batch_size": 4})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"got dict"):
        predict_slide(slide, model, options={})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"options must be a .*PredictOptions, got dict"):
        encode_slide(slide, object(), options={"batch_size": 4})  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [None, 3, b"slide.tif"])
def test_the_slide_must_be_a_path(model: fastinsight.InsightModel, bad: object) -> None:
    with pytest.raises(InputError, match=r"slide must be the path of a slide file"):
        predict_slide(bad, model, options=OPTS)  # type: ignore[arg-type]


def test_the_encoder_must_be_an_encoder(slide: Path, model: fastinsight.InsightModel) -> None:
    with pytest.raises(ConfigError, match=r"encoder must be an encoder object, got the str "):
        predict_slide(slide, model, "vit-tiny", options=OPTS)
    with pytest.raises(ConfigError, match=r"encoder must be an encoder object.*got int"):
        predict_slide(slide, model, 3, options=OPTS)
    with pytest.raises(ConfigError, match=r"encoder must be an encoder object.*got NoneType"):
        encode_slide(slide, None, options=OPTS)
    with pytest.raises(ConfigError, match=r"model_info must be a dict"):
        predict_slide(slide, model, options=OPTS, model_info="mine")  # type: ignore[arg-type]


def test_good_arguments_still_run(slide: Path, model: fastinsight.InsightModel) -> None:
    encoder = build_encoder("vit-tiny", None, tile_size_px=224, device="cpu")
    result = predict_slide(str(slide), model, encoder, OPTS, model_info={"name": "tiny"})
    assert result.scores.shape == (2,) and result.n_tiles > 0
    tokens, mask, _ = encode_slide(slide, encoder, 0.5, OPTS)
    assert tokens.shape[0] == mask.shape[0] == result.n_tiles


@pytest.mark.parametrize("bad", [None, 123, torch.nn.Linear(2, 2)])
def test_load_model_takes_a_path(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"load_model takes the path of a model file") as info:
        fastinsight.load_model(bad)  # type: ignore[arg-type]
    assert isinstance(info.value, FastInsightError)
