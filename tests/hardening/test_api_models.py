"""The Python API of the models and ops on hostile input (API audit, defects 1, 7, 8, 9, 11, 12,
15 and 16): one error of the package's own classes, never a raw torch / numpy exception, and no
silent garbage (a 0/255 mask scaling the heatmap, NaN scores, BatchNorm statistics changed by
``predict``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastinsight.errors import (
    BackendError,
    CheckpointError,
    ConfigError,
    FastInsightError,
    InputError,
)
from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel
from fastinsight.models.multires import MultiResConfig, MultiResModel
from fastinsight.models.pylon import PylonConfig, PylonModel
from fastinsight.ops.otsu import otsu_threshold
from fastinsight.ops.pooling import Pooling, lse_lba, masked_max, masked_mean, smoothmax
from fastinsight.ops.threshold_pool import IMPL_EXPORT, IMPL_REFERENCE, ThresholdAndPool
from fastinsight.radiograph.preprocess import cubic_resize_u8, model_inputs, normalise


def _model(**changes) -> InsightModel:
    torch.manual_seed(0)
    return InsightModel(InsightConfig(in_dim=16, **changes), backend="reference").eval()


def _tokens(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 16, 14, 14, generator=torch.Generator().manual_seed(1))


def _slide_model() -> InsightModel:
    torch.manual_seed(0)
    cfg = InsightConfig(in_dim=8, norm="channel", context="slide", grid_size=(1, 1))
    return InsightModel(cfg, backend="reference").eval()


def _pylon() -> PylonModel:
    torch.manual_seed(0)
    return PylonModel(PylonConfig(num_classes=2, stem_width=8, layers=(1, 1, 1, 1), dec_channels=8))


def _multires() -> MultiResModel:
    torch.manual_seed(0)
    return MultiResModel(MultiResConfig(num_classes=2, width=4, growth=4, image_size=64))


RADIOGRAPH = [(_pylon, 256), (_multires, 64)]
RADIOGRAPH_IDS = ["pylon", "multires"]


# -- 1: a mask selects cells, whatever its dtype ------------------------------------------------
def _masks() -> dict[str, torch.Tensor]:
    cells = torch.zeros(5, 14, 14, dtype=torch.bool)
    cells[:3] = True
    cells[3, 2:9, 4:11] = True
    u8 = cells.to(torch.uint8) * 255
    return {"bool": cells, "uint8-255": u8, "float-half": cells.float() * 0.5, "int64": u8.long()}


@pytest.mark.parametrize("kind", ["uint8-255", "float-half", "int64", "numpy-uint8"])
def test_non_bool_masks_select_cells_and_never_scale_the_heatmap(kind: str) -> None:
    model, x = _model(), _tokens()
    masks = _masks()
    want = model.predict(x, mask=masks["bool"])
    mask = masks["uint8-255"].numpy() if kind == "numpy-uint8" else masks[kind]
    got = model.predict(x, mask=mask)
    assert float(got.heatmap.max()) <= 1.0
    torch.testing.assert_close(got.heatmap, want.heatmap, rtol=0, atol=0)
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=0)
    assert got.mask is not None and got.mask.dtype == torch.bool
    assert torch.equal(got.mask, masks["bool"])
    heatmap, t, scores = model.threshold_and_pool(want.raw_heatmap, masks["uint8-255"])
    torch.testing.assert_close(heatmap, want.heatmap, rtol=0, atol=0)
    torch.testing.assert_close(scores, want.scores, rtol=0, atol=0)


@pytest.mark.parametrize("impl", [IMPL_REFERENCE, IMPL_EXPORT])
@pytest.mark.parametrize("method", ["smoothmax", "lse_lba", "max", "mean"])
def test_every_op_reads_a_mask_the_same_way(impl: str, method: str) -> None:
    values = torch.rand(2, 40, generator=torch.Generator().manual_seed(2))
    cells = torch.rand(40, generator=torch.Generator().manual_seed(3)) > 0.4
    u8 = cells.to(torch.uint8) * 255
    tp = ThresholdAndPool(Pooling(method, 2), impl=impl)
    for got, want in zip(tp(values, u8), tp(values, cells), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    fns = {"smoothmax": smoothmax, "lse_lba": lse_lba, "max": masked_max, "mean": masked_mean}
    torch.testing.assert_close(fns[method](values, u8), fns[method](values, cells))
    torch.testing.assert_close(otsu_threshold(values, u8), otsu_threshold(values, cells))
    torch.testing.assert_close(
        otsu_threshold(values, cells.float() * 3), otsu_threshold(values, cells)
    )


# -- 7, 8: PYLON and the multi-resolution network ------------------------------------------------
@pytest.mark.parametrize(("build", "side"), RADIOGRAPH, ids=RADIOGRAPH_IDS)
def test_radiograph_predict_runs_in_eval_mode_and_restores_the_mode(build, side: int) -> None:
    model = build()
    x = torch.randn(2, 1, side, side, generator=torch.Generator().manual_seed(4))
    want = model.eval().predict(x).scores
    model.train()
    frozen = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    frozen.eval()  # a caller's mixed modes (a frozen BatchNorm) come back as they were
    modes = {name: m.training for name, m in model.named_modules()}
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    got = model.predict(x).scores
    one = model.predict(x[:1]).scores  # a batch of one: no "more than 1 value per channel"
    assert {name: m.training for name, m in model.named_modules()} == modes
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, buffers[k])]
    assert changed == []
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(one, want[:1])


@pytest.mark.parametrize(("build", "side"), RADIOGRAPH, ids=RADIOGRAPH_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_radiograph_predict_takes_any_float_dtype(build, side: int, dtype) -> None:
    model = build().eval()
    x = torch.randn(1, 1, side, side, generator=torch.Generator().manual_seed(5))
    want = model.predict(x).scores
    got = model.predict(x.to(dtype)).scores
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.02)
    torch.testing.assert_close(model.predict(x.numpy()).scores, want)


@pytest.mark.parametrize(("build", "side"), RADIOGRAPH, ids=RADIOGRAPH_IDS)
@pytest.mark.parametrize("bad", ["nan-all", "nan-one", "inf", "-inf"])
def test_radiograph_predict_refuses_non_finite_input(build, side: int, bad: str) -> None:
    model = build().eval()
    x = torch.randn(2, 1, side, side, generator=torch.Generator().manual_seed(6))
    if bad == "nan-all":
        x[:] = float("nan")
    else:
        x[1, 0, 3, 5] = {"nan-one": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[bad]
    with pytest.raises(InputError, match="NaN or inf"):
        model.predict(x)


@pytest.mark.parametrize(("build", "side"), RADIOGRAPH, ids=RADIOGRAPH_IDS)
def test_radiograph_predict_refuses_empty_meta_and_misplaced_input(build, side: int) -> None:
    model = build().eval()
    with pytest.raises(InputError, match="batch is empty"):
        model.predict(torch.zeros(0, 1, side, side))
    with pytest.raises(InputError, match="meta"):
        model.predict(torch.zeros(1, 1, side, side, device="meta"))
    with pytest.raises(InputError, match="input channel"):
        model.predict(torch.zeros(1, 2, side, side))
    with pytest.raises(InputError, match="numpy array"):
        model.predict("image.png")


# -- 9: an overflow is called an overflow -------------------------------------------------------
@pytest.mark.parametrize("check_finite", [True, False])
def test_overflow_of_finite_tokens_is_reported_as_overflow(check_finite: bool) -> None:
    model, x = _model(), _tokens()
    with pytest.raises(InputError, match="overflow") as info:
        model.predict(x * 1e30, check_finite=check_finite)
    assert "contain NaN" not in str(info.value)
    x[2, 3, 4, 5] = float("inf")
    with pytest.raises(InputError, match="token grids contain NaN or inf"):
        model.predict(x, check_finite=check_finite)


# -- 11: predict's arguments -------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, True, "8"])
def test_bad_chunk_size_is_a_config_error_naming_it(chunk_size) -> None:
    with pytest.raises(ConfigError, match="chunk_size") as info:
        _model().predict(_tokens(), chunk_size=chunk_size)
    assert info.value.fields == ("chunk_size",)
    with pytest.raises(ConfigError, match="chunk_size"):
        _model().raw_heatmap(_tokens(), chunk_size=chunk_size)


def test_numpy_tokens_and_masks_are_accepted() -> None:
    model, x = _model(), _tokens()
    mask = _masks()["bool"]
    want = model.predict(x, mask)
    got = model.predict(x.numpy(), mask.numpy())
    torch.testing.assert_close(got.scores, want.scores)
    torch.testing.assert_close(got.heatmap, want.heatmap)
    # The encoder's [N, h*w, C] layout as a numpy array, chunked.
    flat = x.flatten(2).transpose(1, 2).numpy()
    torch.testing.assert_close(model.predict(flat, chunk_size=2).scores, model.predict(x).scores)
    with pytest.raises(InputError, match="numpy array"):
        model.predict({"tokens": 1})  # type: ignore[arg-type]
    with pytest.raises(InputError, match="torch.Tensor"):
        model(x.numpy())


def test_tensors_without_data_or_on_another_device_are_input_errors() -> None:
    model, x = _model(), _tokens()
    with pytest.raises(InputError, match="meta"):
        model.predict(x.to("meta"))
    with pytest.raises(InputError, match="meta"):
        model.predict(x, torch.ones(5, 14, 14, dtype=torch.bool, device="meta"))
    with pytest.raises(InputError, match="meta"):
        model.threshold_and_pool(torch.zeros(5, 1, 14, 14, device="meta"))
    meta_model = _model().to("meta")
    with pytest.raises(InputError, match="on cpu but the model is on meta"):
        meta_model.predict(x)


def test_slide_context_mask_shape_and_empty_batch() -> None:
    model = _slide_model()
    grid = torch.randn(1, 8, 6, 7, generator=torch.Generator().manual_seed(7))
    cells = torch.rand(1, 6, 7, generator=torch.Generator().manual_seed(8)) > 0.3
    assert torch.isfinite(model.predict(grid, cells).scores).all()
    for shape in [(1, 6, 6), (2, 6, 7), (6, 7)]:
        with pytest.raises(InputError, match=r"mask must be \[N, h, w\] = \(1, 6, 7\)"):
            model.predict(grid, torch.ones(shape, dtype=torch.bool))
    with pytest.raises(InputError, match="empty") as info:
        model.predict(grid[:0], cells[:0])
    assert "tissue mask" not in str(info.value)
    u8 = model.predict(grid, cells.to(torch.uint8) * 255)
    torch.testing.assert_close(u8.heatmap, model.predict(grid, cells).heatmap)


def test_threshold_and_pool_refuses_bad_raw_heatmaps() -> None:
    model = _model()
    with pytest.raises(InputError, match=r"\[N, K, h, w\]"):
        model.threshold_and_pool(torch.zeros(14, 14))
    with pytest.raises(InputError, match="batch is empty"):
        model.threshold_and_pool(torch.zeros(0, 1, 14, 14), torch.zeros(0, 14, 14))
    with pytest.raises(InputError, match="no cells"):
        model.threshold_and_pool(torch.zeros(2, 1, 0, 14))


# -- 12: bad configuration values built in code --------------------------------------------------
def test_invalid_config_built_in_code_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="num_classes") as info:
        InsightConfig(num_classes=0)
    assert info.value.exit_code == ConfigError.exit_code == 2
    assert isinstance(info.value, CheckpointError)  # what earlier versions raised: still caught
    with pytest.raises(ConfigError, match="PYLON config"):
        PylonConfig(num_classes=0)
    with pytest.raises(ConfigError, match="wrong type"):
        PylonConfig(num_classes="3")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="multi-resolution config"):
        MultiResConfig(width=0)


def test_invalid_config_from_a_model_file_stays_a_checkpoint_error() -> None:
    raw = json.loads(InsightConfig().to_json())
    raw["smoothmax_a"] = -1.0
    with pytest.raises(CheckpointError, match="smoothmax_a") as info:
        InsightConfig.from_json(json.dumps(raw), source="m.safetensors")
    assert not isinstance(info.value, ConfigError)
    assert info.value.exit_code == 3 and "m.safetensors" in str(info.value)
    pylon = json.loads(PylonConfig().to_json())
    pylon["num_classes"] = 0
    with pytest.raises(CheckpointError, match="num_classes") as info:
        PylonConfig.from_json(json.dumps(pylon))
    assert not isinstance(info.value, ConfigError)


@pytest.mark.parametrize("backend", ["foo", "gpu", None, 3])
def test_unknown_backend_name_is_a_config_error(backend) -> None:
    with pytest.raises(ConfigError, match="backend must be one of") as info:
        InsightModel(InsightConfig(in_dim=16), backend=backend)
    assert info.value.exit_code == 2 and info.value.fields == ("backend",)
    assert isinstance(info.value, BackendError)  # what earlier versions raised: still caught
    with pytest.raises(ConfigError, match="InsightConfig"):
        InsightModel({"in_dim": 16})  # type: ignore[arg-type]


# -- 15: the ops' edge cases --------------------------------------------------------------------
OPS = {
    "otsu": otsu_threshold,
    "smoothmax": smoothmax,
    "lse_lba": lse_lba,
    "max": masked_max,
    "mean": masked_mean,
}


@pytest.mark.parametrize("name", list(OPS))
def test_ops_refuse_empty_and_misshaped_input(name: str) -> None:
    fn = OPS[name]
    values = torch.rand(2, 10)
    with pytest.raises(InputError, match="no cell"):
        fn(values, torch.zeros(10, dtype=torch.bool))
    with pytest.raises(InputError, match="no cells"):
        fn(torch.rand(2, 0))
    for shape in [(9,), (3, 10), (2, 9), (10, 1)]:
        with pytest.raises(InputError, match=r"\(2, 10\)") as info:
            fn(values, torch.ones(shape, dtype=torch.bool))
        assert str(shape) in str(info.value)  # both shapes named
    with pytest.raises(InputError, match="meta"):
        fn(values, torch.ones(10, dtype=torch.bool, device="meta"))


def test_every_error_of_the_ops_is_a_package_error() -> None:
    values = torch.rand(2, 10)
    for fn in OPS.values():
        for mask in (torch.ones(10, dtype=torch.complex64), "mask", torch.ones(2, 10, 1)):
            with pytest.raises(FastInsightError):
                fn(values, mask)  # type: ignore[arg-type]


# -- 16: radiograph.model_inputs ------------------------------------------------------------------
def test_model_inputs_refuses_bad_arguments_before_work() -> None:
    image = np.full((20, 30), 128, np.uint8)
    assert model_inputs([image], 32, 0.5, 0.25).shape == (1, 1, 32, 32)
    with pytest.raises(InputError, match="no images"):
        model_inputs([], 32, 0.5, 0.25)
    for size in (0, -5, 2.5, True, (32,), 1 << 20):
        with pytest.raises(ConfigError, match="size"):
            model_inputs([image], size, 0.5, 0.25)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="size"):
            cubic_resize_u8(image, size)  # type: ignore[arg-type]
    for mean, std in ((0.5, 0.0), (0.5, -1.0), (0.5, float("nan")), (float("inf"), 0.2)):
        with pytest.raises(ConfigError, match="std|mean"):
            model_inputs([image], 32, mean, std)
        with pytest.raises(ConfigError, match="std|mean"):
            normalise(image, mean, std)
    with pytest.raises(InputError, match="uint8"):
        model_inputs([image.tolist()], 32, 0.5, 0.25)  # type: ignore[list-item]
    with pytest.raises(InputError, match="empty"):
        model_inputs([np.zeros((0, 5), np.uint8)], 32, 0.5, 0.25)
    with pytest.raises(InputError, match="list of images"):
        model_inputs(image, 32, 0.5, 0.25)  # type: ignore[arg-type]
