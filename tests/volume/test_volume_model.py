"""The per-slice INSIGHT on volumes and the cross-slice (3x3x3) context model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel
from fastinsight.volume.checkpoint import VolumeModelInfo, load_volume_model, save_volume_model
from fastinsight.volume.model import CrossSliceInsight, build_volume_model


def _cfg(norm: str = "channel") -> InsightConfig:
    return InsightConfig(in_dim=16, reduce_dim=8, widths=(8, 6, 6), grid_size=(5, 5), norm=norm)


@pytest.mark.parametrize("norm", ["channel", "tile"])
def test_from_2d_is_exactly_the_2d_model(norm: str) -> None:
    torch.manual_seed(0)
    m2 = InsightModel(_cfg(norm), backend="reference").eval()
    m3 = CrossSliceInsight.from_2d(m2).eval()
    x = torch.randn(7, 16, 5, 5)
    torch.testing.assert_close(m3(x), m2(x), atol=1e-6, rtol=0)
    p2, p3 = m2.predict(x), m3.predict(x)
    torch.testing.assert_close(p3.scores, p2.scores, atol=1e-6, rtol=0)


def _context_reference(m: CrossSliceInsight, z: torch.Tensor) -> torch.Tensor:
    """The 3-D context chain written out: replicate-pad (D, h, w), conv3d, GELU, per-slice LN."""
    convs = [mod for mod in m.context_block if isinstance(mod, torch.nn.Conv3d)]
    norms = [
        mod
        for mod in m.context_block
        if hasattr(mod, "weight") and not isinstance(mod, torch.nn.Conv3d)
    ]
    x = z.permute(1, 0, 2, 3)[None]
    for i, conv in enumerate(convs):
        x = F.conv3d(F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate"), conv.weight, conv.bias)
        if i < len(convs) - 1:
            y = F.gelu(x)[0].permute(1, 0, 2, 3)  # [D, c, h, w]
            y = F.layer_norm(y.movedim(1, -1), (y.shape[1],), norms[i].weight, norms[i].bias, 1e-5)
            x = y.movedim(-1, 1).permute(1, 0, 2, 3)[None]
    return x[0].permute(1, 0, 2, 3)


def test_cross_slice_context_sees_neighbours() -> None:
    torch.manual_seed(1)
    m = CrossSliceInsight(_cfg()).eval()
    x = torch.randn(6, 16, 5, 5)
    d, cx = m.logits(x)
    z = m.reduce_dimension_block(x)
    torch.testing.assert_close(cx, _context_reference(m, z), atol=1e-5, rtol=0)
    # Changing slice 3 changes the context of slices 2..4 (within the 4-layer receptive field
    # every slice), never the detection of other slices.
    x2 = x.clone()
    x2[3] += 1.0
    d2, cx2 = m.logits(x2)
    assert not torch.allclose(cx2[2], cx[2]) and not torch.allclose(cx2[4], cx[4])
    torch.testing.assert_close(d2[[0, 1, 2, 4, 5]], d[[0, 1, 2, 4, 5]])


def test_cross_slice_trains() -> None:
    torch.manual_seed(2)
    m = CrossSliceInsight(_cfg())
    from fastinsight.train import slide_forward

    scores, sd = slide_forward(m, torch.randn(4, 16, 5, 5), None, chunk_size=64)
    scores.sum().backward()
    conv = m.context_block[1]
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert conv.weight.shape == (8, 8, 3, 3, 3)


@pytest.mark.parametrize("ctx", ["2d", "3d"])
def test_checkpoint_round_trip(tmp_path: Path, ctx: str) -> None:
    torch.manual_seed(3)
    m = build_volume_model(_cfg(), ctx, backend="reference").eval()
    info = VolumeModelInfo(
        encoder="vit-tiny", encoder_options={"patch_size_px": 14}, tile_size=70, slices="all"
    )
    save_volume_model(m, info, tmp_path / "m.safetensors")
    back, info2 = load_volume_model(tmp_path / "m.safetensors", device="cpu", backend="reference")
    assert type(back) is type(m) and info2.slice_context == ctx
    assert info2.tile_size == 70 and info2.encoder_options == {"patch_size_px": 14}
    x = torch.randn(3, 16, 5, 5)
    torch.testing.assert_close(back(x), m(x))


def test_is_volume_model(tmp_path: Path) -> None:
    from fastinsight.volume.checkpoint import is_volume_model

    m = build_volume_model(_cfg(), "2d", backend="reference")
    save_volume_model(m, VolumeModelInfo(), tmp_path / "v.safetensors")
    m.save(str(tmp_path / "slide.safetensors"))
    assert is_volume_model(tmp_path / "v.safetensors")
    assert not is_volume_model(tmp_path / "slide.safetensors")
    assert not is_volume_model(tmp_path / "missing.safetensors")
