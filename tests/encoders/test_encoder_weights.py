"""Loading weight files: round trips, prefixes, and strict errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastinsight.encoders import (
    ResNetTruncConfig,
    ResNetTruncEncoder,
    ViTConfig,
    ViTEncoder,
    build_encoder,
)
from fastinsight.errors import CheckpointError
from fastinsight.fileformat import file_sha256


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_safetensors_round_trip(tmp_path: Path, tiny_vit_config: ViTConfig, tiles) -> None:
    src = ViTEncoder(tiny_vit_config, seed=7)
    path = tmp_path / "vit.safetensors"
    src.save_weights(path)
    dst = ViTEncoder(tiny_vit_config, weights=path)
    assert_same_weights(src, dst)
    torch.testing.assert_close(dst.encode(tiles), src.encode(tiles), rtol=0, atol=0)
    ident = dst.identity()
    assert ident["weights"] == file_sha256(path) and ident["seed"] is None
    assert ident["weights_file"] == "vit.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == ["vit.safetensors"]  # atomic: no temp left


def test_torch_bin_round_trip_via_registry(tmp_path: Path) -> None:
    """A ``torch.save`` state_dict (like UNI's pytorch_model.bin) into a registry name."""
    src = build_encoder("vit-tiny", tile_size_px=32, seed=3)
    path = tmp_path / "pytorch_model.bin"
    torch.save(src.state_dict(), path)
    dst = build_encoder("vit-tiny", path, tile_size_px=32)
    assert_same_weights(src, dst)
    assert dst.identity()["weights"] == file_sha256(path)


def test_loading_into_a_live_model_equals_loading_at_construction(
    tmp_path: Path, tiny_resnet_config: ResNetTruncConfig
) -> None:
    src = ResNetTruncEncoder(tiny_resnet_config, seed=1)
    path = tmp_path / "r.pth"
    torch.save(src.state_dict(), path)
    live = ResNetTruncEncoder(tiny_resnet_config, seed=2)
    live.load_weights(path)
    assert_same_weights(src, live)
    assert_same_weights(src, ResNetTruncEncoder(tiny_resnet_config, weights=path))


@pytest.mark.parametrize("prefix", ["module.", "model.", "module.backbone."], ids=str)
def test_common_prefixes_are_stripped(tmp_path: Path, tiny_vit_config: ViTConfig, prefix) -> None:
    src = ViTEncoder(tiny_vit_config, seed=4)
    path = tmp_path / "w.pth"
    torch.save({prefix + k: v for k, v in src.state_dict().items()}, path)
    dst = ViTEncoder(tiny_vit_config, weights=path)
    assert_same_weights(src, dst)
    assert any("stripped" in n for n in dst.load_notes)


def test_state_dict_wrapper_is_unwrapped(tmp_path: Path, tiny_vit_config: ViTConfig) -> None:
    src = ViTEncoder(tiny_vit_config, seed=4)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, path)
    assert_same_weights(src, ViTEncoder(tiny_vit_config, weights=path))


def test_half_precision_file_loads_as_float32(tmp_path: Path, tiny_vit_config: ViTConfig) -> None:
    src = ViTEncoder(tiny_vit_config, seed=4)
    path = tmp_path / "w.safetensors"
    save_file({k: v.half() for k, v in src.state_dict().items()}, str(path))
    dst = ViTEncoder(tiny_vit_config, weights=path)
    assert dst.dtype == torch.float32
    torch.testing.assert_close(dst.pos_embed, src.pos_embed.half().float())


def test_dtype_argument_converts_after_loading(tmp_path: Path, tiny_vit_config: ViTConfig) -> None:
    src = ViTEncoder(tiny_vit_config, seed=4)
    path = tmp_path / "w.safetensors"
    src.save_weights(path)
    dst = ViTEncoder(tiny_vit_config, weights=path, dtype=torch.bfloat16)
    assert dst.dtype == torch.bfloat16
    out = dst.encode(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 32, 4, 4)


# ---------------------------------------------------------------------------- strict errors
def test_file_of_another_architecture(tmp_path: Path, tiny_resnet_config: ResNetTruncConfig):
    path = tmp_path / "resnet.pth"
    torch.save(ResNetTruncEncoder(tiny_resnet_config, seed=0).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        build_encoder("vit-tiny", path, tile_size_px=32)
    msg = str(err.value)
    assert "missing key 'cls_token'" in msg and "'conv1.weight'" in msg
    assert "another architecture" in msg and "\n" not in msg


def test_vit_file_into_resnet(tmp_path: Path, tiny_vit_config: ViTConfig) -> None:
    path = tmp_path / "vit.safetensors"
    ViTEncoder(tiny_vit_config, seed=0).save_weights(path)
    with pytest.raises(CheckpointError, match="missing key 'conv1.weight'.*another architecture"):
        build_encoder("resnet-tiny", path)


def test_small_vit_file_given_as_uni_names_the_shape(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(build_encoder("vit-tiny").state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        build_encoder("uni", path)
    msg = str(err.value)
    assert "'cls_token' has shape [1, 1, 64], expected [1, 1, 1024]" in msg
    assert "UNI ViT-L/16" in msg and "pytorch_model.bin" in msg and "MahmoodLab/UNI" in msg


def test_wrong_shape(tmp_path: Path, tiny_vit_config: ViTConfig) -> None:
    state = ViTEncoder(tiny_vit_config, seed=0).state_dict()
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 32)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(
        CheckpointError,
        match=r"'blocks.1.mlp.fc1.weight' has shape \[100, 32\], expected \[128, 32\]",
    ):
        ViTEncoder(tiny_vit_config, weights=path)


def test_missing_key(tmp_path: Path, tiny_vit_config: ViTConfig) -> None:
    state = ViTEncoder(tiny_vit_config, seed=0).state_dict()
    del state["blocks.0.ls2.gamma"]
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="missing key 'blocks.0.ls2.gamma'"):
        ViTEncoder(tiny_vit_config, weights=path)


def test_unexpected_key(tmp_path: Path, tiny_vit_config: ViTConfig) -> None:
    state = ViTEncoder(tiny_vit_config, seed=0).state_dict()
    state["head.weight"] = torch.zeros(10, 32)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="unexpected key 'head.weight'"):
        ViTEncoder(tiny_vit_config, weights=path)


def test_integer_tensor_where_float_expected(tmp_path: Path, tiny_vit_config: ViTConfig) -> None:
    state = ViTEncoder(tiny_vit_config, seed=0).state_dict()
    state["norm.bias"] = torch.zeros(32, dtype=torch.int64)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="'norm.bias' has dtype torch.int64"):
        ViTEncoder(tiny_vit_config, weights=path)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_truncated_file(tmp_path: Path, tiny_vit_config: ViTConfig, fmt: str) -> None:
    src = ViTEncoder(tiny_vit_config, seed=0)
    path = tmp_path / f"w.{fmt}"
    if fmt == "pth":
        torch.save(src.state_dict(), path)
    else:
        src.save_weights(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ViTEncoder(tiny_vit_config, weights=path)


def test_pickled_object_is_refused(tmp_path: Path, tiny_vit_config: ViTConfig) -> None:
    """weights_only=True: a pickle that would build arbitrary objects is never executed."""
    path = tmp_path / "evil.pth"
    torch.save({"cfg": ViTConfig()}, path)  # a dataclass, not a tensor: needs full unpickling
    with pytest.raises(CheckpointError, match="cannot load .* as a PyTorch state_dict"):
        ViTEncoder(tiny_vit_config, weights=path)


def test_non_tensor_entry_is_refused(tmp_path: Path, tiny_vit_config: ViTConfig) -> None:
    path = tmp_path / "w.pth"
    torch.save({"cls_token": torch.zeros(1), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="entry 'epoch' is a int, not a tensor"):
        ViTEncoder(tiny_vit_config, weights=path)


@pytest.mark.parametrize("kind", ["missing", "directory", "text", "empty-dict"])
def test_unreadable_paths(tmp_path: Path, tiny_vit_config: ViTConfig, kind: str) -> None:
    path = tmp_path / "w.bin"
    if kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("not weights\n")
    elif kind == "empty-dict":
        torch.save({}, path)
    patterns = {
        "missing": "does not exist; pass the path of",
        "directory": "is a directory",
        "text": "neither a PyTorch state_dict nor a safetensors file",
        "empty-dict": r"does not hold a state_dict \(found dict \(empty\)\)",
    }
    with pytest.raises(CheckpointError, match=patterns[kind]):
        ViTEncoder(tiny_vit_config, weights=path)


def test_legacy_pickle_format_is_read(tmp_path: Path, tiny_vit_config: ViTConfig) -> None:
    src = ViTEncoder(tiny_vit_config, seed=0)
    path = tmp_path / "old.pth"
    torch.save(src.state_dict(), path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:2] == b"\x80\x02"  # pickle protocol 2, not a zip
    assert_same_weights(src, ViTEncoder(tiny_vit_config, weights=path))


# ------------------------------------------------------------------ ResNet-specific loading
def test_resnet_file_with_layer4_and_fc_is_accepted_with_a_note(
    tmp_path: Path, tiny_resnet_config: ResNetTruncConfig
) -> None:
    src = ResNetTruncEncoder(tiny_resnet_config, seed=0)
    state = dict(src.state_dict())
    state["layer4.0.conv1.weight"] = torch.zeros(16, 64, 1, 1)
    state["fc.weight"] = torch.zeros(1000, 2048)
    state["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    dst = ResNetTruncEncoder(tiny_resnet_config, weights=path)
    assert_same_weights(src, dst)
    assert any("ignored 3 keys" in n and "layer4.0.conv1.weight" in n for n in dst.load_notes)


def test_resnet_file_without_num_batches_tracked(
    tmp_path: Path, tiny_resnet_config: ResNetTruncConfig
) -> None:
    """Files saved before PyTorch 0.4.1 (CLAM's resnet50-19c8e357.pth) lack these buffers."""
    src = ResNetTruncEncoder(tiny_resnet_config, seed=0)
    state = {k: v for k, v in src.state_dict().items() if "num_batches_tracked" not in k}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    dst = ResNetTruncEncoder(tiny_resnet_config, weights=path)
    assert_same_weights(src, dst)


def test_resnet_missing_layer3_key_is_an_error(
    tmp_path: Path, tiny_resnet_config: ResNetTruncConfig
) -> None:
    state = dict(ResNetTruncEncoder(tiny_resnet_config, seed=0).state_dict())
    del state["layer3.0.downsample.1.running_var"]
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="missing key 'layer3.0.downsample.1.running_var'"):
        ResNetTruncEncoder(tiny_resnet_config, weights=path)


def test_resnet_other_extra_keys_are_errors(
    tmp_path: Path, tiny_resnet_config: ResNetTruncConfig
) -> None:
    state = dict(ResNetTruncEncoder(tiny_resnet_config, seed=0).state_dict())
    state["classifier.weight"] = torch.zeros(2, 2)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="unexpected key 'classifier.weight'"):
        ResNetTruncEncoder(tiny_resnet_config, weights=path)
