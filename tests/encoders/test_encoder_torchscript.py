"""TorchScript encoders: save/load round trips with the three output layouts, and bad modules."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from fastinsight.encoders import TorchScriptEncoder, build_encoder
from fastinsight.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated


class GridNet(nn.Module):
    """A patchify convolution: ``[B, 3, T, T]`` -> ``[B, 12, T/8, T/8]``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 12, 8, stride=8)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class TokenNet(GridNet):
    """The same tokens as ``[B, h*w, C]``, row-major."""

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ClsTokenNet(GridNet):
    """The same tokens behind a class token: ``[B, 1 + h*w, C]``."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.full((1, 1, 12), 7.0))

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)


class TupleNet(GridNet):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.proj(x)
        return y, y


def save_script(module: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), str(path))
    return path


@pytest.mark.parametrize(
    ("net", "layout"),
    [(GridNet, "grid"), (TokenNet, "tokens"), (ClsTokenNet, "cls+tokens")],
    ids=["grid", "tokens", "cls+tokens"],
)
@pytest.mark.parametrize("patch", [8, None], ids=["patch=8", "patch=inferred"])
def test_round_trip_with_each_layout(tmp_path: Path, tiles, net, layout, patch) -> None:
    torch.manual_seed(0)
    module = net()
    path = save_script(module, tmp_path / "enc.pt")
    enc = build_encoder(f"torchscript:{path}", tile_size_px=32, patch_size_px=patch)
    assert isinstance(enc, TorchScriptEncoder)
    assert enc.output_layout == layout
    assert (enc.embed_dim, enc.grid_size, enc.patch_size_px) == (12, (4, 4), 8)
    out = enc.encode(tiles)
    assert out.shape == (2, 12, 4, 4) and out.is_contiguous()
    ref = GridNet()
    ref.proj.load_state_dict(module.proj.state_dict())
    with torch.no_grad():
        want = ref(enc.normalize(tiles))
    torch.testing.assert_close(out, want)
    ident = enc.identity()
    assert ident["output_layout"] == layout and len(ident["weights"]) == 64


def test_name_and_weights_forms_are_equivalent(tmp_path: Path, tiles) -> None:
    path = save_script(GridNet(), tmp_path / "enc.pt")
    a = build_encoder(f"torchscript:{path}", tile_size_px=32)
    b = build_encoder("torchscript", path, tile_size_px=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert a.name == "torchscript:enc.pt"
    assert b.mean == (0.5, 0.5, 0.5)
    assert not torch.equal(a.encode(tiles), b.encode(tiles))  # normalisation is the user's


def test_grid_that_disagrees_with_patch_size(tmp_path: Path) -> None:
    path = save_script(GridNet(), tmp_path / "enc.pt")
    with pytest.raises(CheckpointError, match=r"returns a 4 x 4 grid for 32 px tiles, expected 2"):
        build_encoder(f"torchscript:{path}", tile_size_px=32, patch_size_px=16)


def test_token_count_that_disagrees_with_patch_size(tmp_path: Path) -> None:
    path = save_script(TokenNet(), tmp_path / "enc.pt")
    with pytest.raises(CheckpointError, match=r"returns 16 tokens .* expected 4 .* or 5"):
        build_encoder(f"torchscript:{path}", tile_size_px=32, patch_size_px=16)


def test_non_square_token_count(tmp_path: Path) -> None:
    class Odd(GridNet):
        def forward(self, x: Tensor) -> Tensor:
            return self.proj(x).flatten(2).transpose(1, 2)[:, :7]

    path = save_script(Odd(), tmp_path / "enc.pt")
    with pytest.raises(CheckpointError, match="7 tokens, neither a square grid"):
        build_encoder(f"torchscript:{path}", tile_size_px=32)


def test_tuple_output_is_refused(tmp_path: Path) -> None:
    path = save_script(TupleNet(), tmp_path / "enc.pt")
    with pytest.raises(CheckpointError, match="returns a tuple, expected one tensor"):
        build_encoder(f"torchscript:{path}", tile_size_px=32)


def test_module_failing_on_the_tile_size(tmp_path: Path) -> None:
    class Fixed(GridNet):
        def forward(self, x: Tensor) -> Tensor:
            return self.proj(x).reshape(x.shape[0], 12, 4, 4)

    path = save_script(Fixed(), tmp_path / "enc.pt")
    with pytest.raises(CheckpointError, match=r"fails on a \[2, 3, 64, 64\] batch"):
        build_encoder(f"torchscript:{path}", tile_size_px=64)


def test_state_dict_is_not_a_torchscript_file(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(GridNet().state_dict(), path)
    with pytest.raises(CheckpointError, match="cannot load .* as a TorchScript module"):
        build_encoder(f"torchscript:{path}", tile_size_px=32)


def test_missing_file_and_missing_tile_size(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        build_encoder(f"torchscript:{tmp_path / 'nope.pt'}", tile_size_px=32)
    path = save_script(GridNet(), tmp_path / "enc.pt")
    with pytest.raises(ConfigError, match="needs the tile size"):
        build_encoder(f"torchscript:{path}")
    with pytest.raises(ConfigError, match="needs a file"):
        build_encoder("torchscript", tile_size_px=32)
    with pytest.raises(ConfigError, match="unknown option 'depth'"):
        build_encoder(f"torchscript:{path}", tile_size_px=32, depth=3)
