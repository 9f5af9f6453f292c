"""Encoders by name: the registry, missing-weights messages, seeded determinism, identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastinsight.encoders import Encoder, build_encoder, describe_encoders, list_encoders
from fastinsight.errors import BackendError, CheckpointError, ConfigError, InputError

TINY = ("vit-tiny", "resnet-tiny", "dinov2-tiny")


def test_list_encoders() -> None:
    assert list_encoders() == [
        "uni",
        "uni2-h",
        "virchow2",
        "h-optimus-0",
        "h-optimus-1",
        "prov-gigapath",
        "dinov2-vitl14-reg4",
        "vit-tiny",
        "dinov2-tiny",
        "resnet50-trunc",
        "resnet-tiny",
        "timm:<name>",
        "torchscript:<path>",
    ]
    assert set(describe_encoders()) == set(list_encoders())


def test_unknown_name_lists_the_names() -> None:
    with pytest.raises(ConfigError) as err:
        build_encoder("uni3")
    msg = str(err.value)
    assert "unknown encoder 'uni3'" in msg
    for name in list_encoders():
        assert name in msg


def test_names_are_case_and_underscore_insensitive() -> None:
    assert build_encoder("VIT_TINY", tile_size_px=32).name == "vit-tiny"


def test_unknown_option() -> None:
    with pytest.raises(ConfigError, match="unknown option 'depth' for encoder 'uni'"):
        build_encoder("uni", random_init=True, depth=2)


def test_uni_without_weights_says_what_to_fetch_and_where() -> None:
    with pytest.raises(CheckpointError) as err:
        build_encoder("uni")
    msg = str(err.value)
    assert "\n" not in msg
    for part in (
        "pytorch_model.bin",
        "MahmoodLab/UNI",
        "gated",
        "accept its terms",
        "--encoder-weights PATH",
        "nothing is downloaded",
    ):
        assert part in msg, part


def test_resnet50_trunc_without_weights_says_what_to_fetch() -> None:
    with pytest.raises(CheckpointError) as err:
        build_encoder("resnet50-trunc")
    msg = str(err.value)
    assert "resnet50-0676ba61.pth" in msg and "--encoder-weights PATH" in msg
    assert "random_init=True" in msg


def test_random_init_and_weights_conflict(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pass one of them"):
        build_encoder("resnet50-trunc", tmp_path / "w.pth", random_init=True)


@pytest.mark.parametrize("name", TINY)
def test_random_init_is_deterministic_given_the_seed(name: str) -> None:
    t = 28 if name == "dinov2-tiny" else 32
    tiles = torch.randint(0, 256, (2, t, t, 3), dtype=torch.uint8)
    a = build_encoder(name, tile_size_px=t)
    torch.manual_seed(1234)  # the global RNG plays no part
    b = build_encoder(name, tile_size_px=t, seed=0)
    c = build_encoder(name, tile_size_px=t, seed=1)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert torch.equal(a.encode(tiles), b.encode(tiles))
    assert not torch.equal(a.encode(tiles), c.encode(tiles))
    assert a.identity()["seed"] == 0 and c.identity()["seed"] == 1
    assert a.identity()["weights"] == "random-init"


def test_vit_tiny_seed0_values_are_pinned() -> None:
    """A head trained against vit-tiny seed 0 must meet the same encoder later: pin a few values."""
    enc = build_encoder("vit-tiny")
    got = enc.patch_embed.proj.weight.flatten()[:4].tolist()
    again = build_encoder("vit-tiny").patch_embed.proj.weight.flatten()[:4].tolist()
    assert got == again
    assert abs(enc.patch_embed.proj.weight.std().item() - 0.02) < 0.002  # trunc-normal std 0.02


@pytest.mark.parametrize("name", TINY)
def test_building_does_not_touch_the_global_rng(name: str) -> None:
    state = torch.random.get_rng_state()
    build_encoder(name, tile_size_px=28 if name == "dinov2-tiny" else 32)
    assert torch.equal(state, torch.random.get_rng_state())


def test_identity_is_json_and_complete() -> None:
    enc = build_encoder("vit-tiny", tile_size_px=64, depth=1)
    ident = json.loads(json.dumps(enc.identity()))
    assert ident["name"] == "vit-tiny"
    assert ident["weights"] == "random-init" and ident["seed"] == 0
    assert ident["embed_dim"] == 64 and ident["grid_size"] == [4, 4]
    assert ident["tile_size_px"] == 64 and ident["patch_size_px"] == 16
    assert ident["config"]["depth"] == 1
    assert "class token dropped" in ident["token_layout"]


@pytest.mark.slow
def test_uni_random_init_is_a_full_vit_large_and_runs() -> None:
    """For benchmarks without the gated weights; kept small by running on a 16 px tile."""
    enc = build_encoder("uni", random_init=True, tile_size_px=16)
    assert enc.embed_dim == 1024 and enc.grid_size == (1, 1)
    assert sum(p.numel() for p in enc.parameters()) == 303_350_784
    out = enc.encode(torch.zeros(1, 16, 16, 3, dtype=torch.uint8))
    assert out.shape == (1, 1024, 1, 1) and torch.isfinite(out).all()


def test_encoders_are_built_in_eval_mode() -> None:
    for name in TINY:
        enc = build_encoder(name, tile_size_px=28 if name == "dinov2-tiny" else 32)
        assert isinstance(enc, Encoder) and not enc.training


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_backend_error() -> None:
    with pytest.raises(BackendError, match="CUDA is not available here; pass --device cpu"):
        build_encoder("vit-tiny", device="cuda")


def test_unknown_device() -> None:
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        build_encoder("vit-tiny", device="gpu0")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast_on_cuda(name: str) -> None:
    t = 70 if name == "dinov2-tiny" else 64
    tiles = torch.randint(0, 256, (4, t, t, 3), dtype=torch.uint8).pin_memory()
    cpu = build_encoder(name, tile_size_px=t)
    # float32 weights under bf16 autocast (the path for encoders moved to CUDA with .to()).
    gpu = build_encoder(name, tile_size_px=t, device="cuda", dtype=torch.float32)
    want = cpu.encode(tiles)
    fp32 = gpu.encode(tiles, autocast=False).float().cpu()
    bf16 = gpu.encode(tiles).float().cpu()
    torch.testing.assert_close(fp32, want, rtol=1e-3, atol=1e-3)
    # bf16 has an 8-bit mantissa: its error is about 2^-8 of the values' scale.
    scale = want.abs().amax().item()
    assert (bf16 - want).abs().amax().item() < 0.05 * scale


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", TINY)
def test_bf16_weights_by_default_on_cuda(name: str) -> None:
    """On CUDA the weights are bf16 (a bf16 residual stream), and so are the tokens."""
    t = 70 if name == "dinov2-tiny" else 64
    tiles = torch.randint(0, 256, (4, t, t, 3), dtype=torch.uint8)
    cpu = build_encoder(name, tile_size_px=t)
    gpu = build_encoder(name, tile_size_px=t, device="cuda")
    assert gpu.dtype == torch.bfloat16
    want = cpu.encode(tiles)
    got = gpu.encode(tiles)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    tokens = gpu.encode_tokens(tiles)
    assert tokens.dtype == torch.bfloat16 and tokens.is_contiguous()
    assert tokens.shape == (4, want.shape[2] * want.shape[3], want.shape[1])
    scale = want.abs().amax().item()
    assert (got.float().cpu() - want).abs().amax().item() < 0.08 * scale
