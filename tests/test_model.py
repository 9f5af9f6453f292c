"""The reference INSIGHT model: official layout, official numbers, options and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinsight import InsightConfig, InsightModel, load_model
from fastinsight.errors import CheckpointError, InputError
from tests.support.official import (
    OFFICIAL_KEYS,
    official_predict,
    official_shapes,
    random_official_state_dict,
)


@pytest.mark.parametrize("k", [1, 3], ids=lambda k: f"K={k}")
def test_state_dict_is_the_official_layout(k: int) -> None:
    model = InsightModel(InsightConfig(num_classes=k), backend="reference")
    state = model.state_dict()
    assert list(state) == OFFICIAL_KEYS
    assert len(state) == 32
    assert {n: tuple(t.shape) for n, t in state.items()} == official_shapes(1024, k)


@pytest.mark.parametrize("k", [1, 3], ids=lambda k: f"K={k}")
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_official_checkpoint_matches_official_numbers(tmp_path, k: int, zip_format: bool) -> None:
    state = random_official_state_dict(1024, k, seed=k)
    path = tmp_path / "insight.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)

    model = load_model(path, backend="reference", device="cpu")
    assert model.config.in_dim == 1024 and model.config.num_classes == k
    assert model.config.grid_size == (14, 14)
    assert model.config.pooling == "smoothmax" and model.config.smoothmax_a == 8.0

    tokens = torch.randn(12, 1024, 14, 14)
    pred = model.predict(tokens)
    heat, thresholds, scores = official_predict(state, tokens.numpy())

    raw_ref = pred.raw_heatmap.double().numpy()
    from tests.support.official import official_forward

    np.testing.assert_allclose(raw_ref, official_forward(state, tokens.numpy()), atol=1e-5)
    bin_width = (raw_ref.max() - raw_ref.min()) / 256
    np.testing.assert_allclose(pred.thresholds.numpy(), thresholds, atol=bin_width)
    np.testing.assert_allclose(pred.heatmap.numpy(), heat, atol=1e-5)
    np.testing.assert_allclose(pred.scores.numpy(), scores, atol=1e-5)


def test_channels_last_tokens_equal_grid_tokens() -> None:
    model = InsightModel(InsightConfig(in_dim=48, num_classes=2), backend="reference")
    grid = torch.randn(3, 48, 14, 14)
    seq = grid.flatten(2).transpose(1, 2).contiguous()  # [N, 196, C], the encoder's layout
    torch.testing.assert_close(model(seq), model(grid))


def test_chunked_heatmap_equals_one_pass() -> None:
    model = InsightModel(InsightConfig(in_dim=32, num_classes=2), backend="reference")
    tokens = torch.randn(11, 32, 14, 14)
    torch.testing.assert_close(model.raw_heatmap(tokens, chunk_size=4), model(tokens))


def test_masked_cells_take_no_part() -> None:
    model = InsightModel(InsightConfig(in_dim=32, num_classes=2), backend="reference")
    tokens = torch.randn(6, 32, 14, 14)
    mask = torch.zeros(6, 14, 14, dtype=torch.bool)
    mask[:3] = True
    mask[3, 2:5, 2:5] = True
    a = model.predict(tokens, mask)
    # Changing only the non-tissue tiles must not change thresholds or scores (those tiles are
    # whole tiles, so the per-tile LayerNorm of tissue tiles is unaffected).
    tokens2 = tokens.clone()
    tokens2[4:] = 50 * torch.randn(2, 32, 14, 14)
    b = model.predict(tokens2, mask)
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(a.thresholds, b.thresholds)
    assert torch.all(a.heatmap[~mask[:, None].expand_as(a.heatmap)] == 0)


def test_single_valid_cell() -> None:
    model = InsightModel(InsightConfig(in_dim=16), backend="reference")
    mask = torch.zeros(2, 14, 14, dtype=torch.bool)
    mask[1, 7, 7] = True
    pred = model.predict(torch.randn(2, 16, 14, 14), mask)
    raw = pred.raw_heatmap[1, 0, 7, 7]
    # One value: Otsu returns it, the strict threshold zeroes it, every pooling gives 0.
    torch.testing.assert_close(pred.thresholds[0], raw)
    assert torch.isfinite(pred.scores).all() and pred.scores[0] == 0


@pytest.mark.parametrize("pooling", ["smoothmax", "lse_lba", "max", "mean"])
@pytest.mark.parametrize("norm", ["tile", "channel"])
def test_options_run_and_round_trip(tmp_path, pooling: str, norm: str) -> None:
    cfg = InsightConfig(
        in_dim=24, num_classes=3, pooling=pooling, norm=norm, class_names=("a", "b", "c")
    )
    model = InsightModel(cfg, backend="reference")
    if pooling == "lse_lba":
        with torch.no_grad():
            model.pooling.beta.copy_(torch.tensor([0.5, -1.0, 2.0]))
    tokens = torch.randn(4, 24, 14, 14)
    pred = model.predict(tokens)
    assert pred.scores.shape == (3,) and torch.isfinite(pred.scores).all()
    path = tmp_path / "m.safetensors"
    model.save(str(path))
    again = load_model(path, backend="reference", device="cpu")
    assert again.config == cfg
    torch.testing.assert_close(again.predict(tokens).scores, pred.scores)
    assert set(pred.as_dict()["scores"]) == {"a", "b", "c"}


def test_channel_norm_runs_on_any_grid() -> None:
    model = InsightModel(InsightConfig(in_dim=16, norm="channel"), backend="reference")
    assert model(torch.randn(2, 16, 7, 9)).shape == (2, 1, 7, 9)
    tile_model = InsightModel(InsightConfig(in_dim=16), backend="reference")
    with pytest.raises(InputError, match="14 x 14"):
        tile_model(torch.randn(2, 16, 7, 9))


def test_slide_context_sees_neighbouring_tiles() -> None:
    cfg = InsightConfig(in_dim=8, norm="channel", context="slide")
    model = InsightModel(cfg, backend="reference")
    grid = torch.randn(1, 8, 6, 6)
    mask = torch.ones(1, 6, 6, dtype=torch.bool)
    base = model(grid, mask)
    moved = grid.clone()
    moved[:, :, 0, 0] += 5.0  # a neighbour of (1, 1) in the slide grid
    assert not torch.allclose(model(moved, mask)[0, 0, 1, 1], base[0, 0, 1, 1])
    # Non-tissue cells are invisible to the context.
    mask[0, 0, 0] = False
    torch.testing.assert_close(model(moved, mask)[0, 0, 1, 1], model(grid, mask)[0, 0, 1, 1])
    with pytest.raises(CheckpointError, match="norm='channel'"):
        InsightConfig(context="slide")


def test_bad_tokens_are_clear_errors() -> None:
    model = InsightModel(InsightConfig(in_dim=16), backend="reference")
    with pytest.raises(InputError, match="16"):
        model.predict(torch.randn(2, 32, 14, 14))
    bad = torch.randn(2, 16, 14, 14)
    bad[1, 3, 4, 5] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        model.predict(bad)
    with pytest.raises(InputError, match="empty"):
        model.predict(torch.randn(0, 16, 14, 14))
    with pytest.raises(InputError, match="tissue mask is empty"):
        model.predict(torch.randn(2, 16, 14, 14), torch.zeros(2, 14, 14, dtype=torch.bool))
    with pytest.raises(InputError, match="mask must be"):
        model.predict(torch.randn(2, 16, 14, 14), torch.ones(3, 14, 14, dtype=torch.bool))
    with pytest.raises(InputError, match="token grids must be"):
        model.predict(torch.randn(16, 14))


def test_gradients_flow_for_training() -> None:
    model = InsightModel(InsightConfig(in_dim=16, pooling="lse_lba"), backend="reference")
    raw = model(torch.randn(3, 16, 14, 14))
    heat, t, scores = model.threshold_and_pool(raw)
    scores.sum().backward()
    assert model.pooling.beta.grad is not None
    assert model.reduce_dimension_block[0].weight.grad is not None


@pytest.mark.cuda
def test_reference_runs_on_cuda_like_cpu() -> None:
    model = InsightModel(InsightConfig(in_dim=64, num_classes=3), backend="reference")
    tokens = torch.randn(9, 64, 14, 14)
    cpu = model.predict(tokens)
    with torch.backends.cudnn.flags(allow_tf32=False):
        torch.backends.cuda.matmul.allow_tf32 = False
        gpu = model.cuda().predict(tokens.cuda())
    torch.testing.assert_close(gpu.raw_heatmap.cpu(), cpu.raw_heatmap, atol=1e-5, rtol=0)
    torch.testing.assert_close(gpu.scores.cpu(), cpu.scores, atol=1e-5, rtol=0)


def test_half_precision_tokens_run_in_the_weights_dtype() -> None:
    """A bf16-autocast encoder (e.g. the ResNet trunk on CUDA) hands over bf16 token grids."""
    model = InsightModel(InsightConfig(in_dim=16), backend="reference")
    tokens = torch.randn(2, 16, 14, 14)
    out = model(tokens.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, model(tokens.bfloat16().float()))
