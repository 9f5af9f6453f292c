"""The streamed heatmap equals the heatmap of the whole token grid at once."""

from __future__ import annotations

import numpy as np
import torch

from fastinsight import InsightConfig, InsightModel
from fastinsight.encoders import build_encoder
from fastinsight.predict.slide import PredictOptions, predict_slide, tile_cells
from fastinsight.slide import (
    TileGrid,
    Tiler,
    cell_tissue_mask,
    detect_tissue,
    open_slide,
    tissue_tiles,
)


def test_streamed_equals_whole_grid(slides_dir) -> None:
    slide = slides_dir / "CMU-1-Small-Region.svs"
    encoder = build_encoder("vit-tiny")
    model = InsightModel(
        InsightConfig(in_dim=64, num_classes=3, encoder="vit-tiny"), backend="reference"
    )
    opts = PredictOptions(batch_size=7, num_workers=2, progress=False)  # ragged last batch
    streamed = predict_slide(slide, model, encoder, opts)

    # The same slide, every tissue tile's token grid held at once, one model.predict call.
    with open_slide(slide) as reader:
        grid = TileGrid.for_slide(reader, 0.5, 224, 14)
        tissue = detect_tissue(reader, "brightfield")
        tiles = tissue_tiles(grid, tissue, 0.1)
        mask = cell_tissue_mask(grid, tissue, 0.5, tiles=tiles)
        images = np.concatenate(
            [b.images for b in Tiler(reader, grid, tiles, num_workers=0).batches(10_000)]
        )
    with torch.no_grad():
        tokens = encoder.encode(torch.from_numpy(images))
    assert tokens.shape == (len(tiles), 64, 14, 14)
    mask_t = torch.from_numpy(tile_cells(mask, tiles, 14))
    whole = model.predict(tokens, mask_t)

    np.testing.assert_allclose(streamed.scores, whole.scores.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(streamed.thresholds, whole.thresholds.numpy(), rtol=0, atol=1e-6)
    heat = whole.heatmap.masked_fill(~mask_t[:, None], float("nan"))
    # Every tile's cells where its (tile_row, tile_col) says, written out by hand.
    expected = np.full((3, *grid.cell_shape), np.nan, dtype=np.float32)
    for t, v in zip(tiles, heat.numpy(), strict=True):
        expected[
            :, t.tile_row * 14 : (t.tile_row + 1) * 14, t.tile_col * 14 : (t.tile_col + 1) * 14
        ] = v
    np.testing.assert_allclose(streamed.cells, expected, rtol=0, atol=1e-6, equal_nan=True)
    assert streamed.n_tiles == len(tiles)


def test_head_gets_the_encoders_tokens_as_they_are(slides_dir, monkeypatch) -> None:
    """The pipeline hands the head ``[B, h*w, C]`` channels-last tokens straight from the
    encoder: no NCHW copy of the token grid is made between them (issue #11)."""
    slide = slides_dir / "CMU-1-Small-Region.svs"
    encoder = build_encoder("vit-tiny")
    model = InsightModel(InsightConfig(in_dim=64, encoder="vit-tiny"), backend="reference")
    seen: list[tuple[tuple[int, ...], int]] = []
    forward = model.forward

    def spy(tokens, cell_mask=None):
        seen.append((tuple(tokens.shape), tokens.data_ptr()))
        return forward(tokens, cell_mask)

    produced: list[int] = []
    encode_tokens = encoder.encode_tokens

    def spy_encoder(images, **kw):
        out = encode_tokens(images, **kw)
        produced.append(out.data_ptr())
        return out

    monkeypatch.setattr(model, "forward", spy)
    monkeypatch.setattr(encoder, "encode_tokens", spy_encoder)
    predict_slide(slide, model, encoder, PredictOptions(batch_size=16, progress=False))
    assert seen and all(shape[1:] == (14 * 14, 64) for shape, _ in seen)
    assert [ptr for _, ptr in seen] == produced  # the very tensors the encoder returned
