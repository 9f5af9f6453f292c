"""The timm-built encoders: model-card constructors, token parity with timm, weight-file layouts.

How the big models are tested. UNI2-h (ViT-H, 681M parameters), Virchow2 (ViT-H, 631M),
H-optimus-0/1 and Prov-GigaPath (ViT-g, 1.13B) are too big to instantiate in CI. So:

1. their registry constructors are built on ``torch.device("meta")`` (no memory, no compute) and
   checked against the numbers of the model cards: width, depth, heads, patch, registers, the
   position-embedding shape, the MLP type, and the parameter count, which is recomputed here from
   the architecture formula (not read off the model);
2. token parity runs on depth-reduced copies (depth 1, every width and option as on the card:
   SwiGLU, registers, no_embed_class, init_values), through the same registry build path
   (``build_from_spec``), with random weights written in the layout users download, against
   timm's own ``forward_features`` of a timm model holding the same weights: fp32 on CPU,
   max |diff| <= 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastinsight.encoders import (
    SPECS,
    build_encoder,
    build_from_spec,
    compile_encoder,
    tokens_to_grid,
)
from fastinsight.errors import CheckpointError, ConfigError, InputError

timm = pytest.importorskip("timm")

TOL = 1e-5


def timm_model(name: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    """A real (CPU, fp32) timm model with sizeable random weights, seeded."""
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def normalised(tiles: torch.Tensor, mean, std) -> torch.Tensor:
    x = tiles.permute(0, 3, 1, 2).double() / 255.0
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    return ((x - m) / s).float()


def vit_param_count(
    *,
    d: int,
    depth: int,
    patch: int,
    grid: int,
    hidden: int,
    swiglu: bool,
    regs: int,
    no_embed_class: bool,
    layerscale: bool = True,
) -> int:
    """Parameters of a timm ViT written out from the architecture (class token, registers,
    position embedding, patch projection, blocks, final norm; no head)."""
    # Without no_embed_class timm's position embedding covers every prefix token (Virchow2: 261).
    pos = grid * grid + (0 if no_embed_class else 1 + regs)
    top = 3 * patch * patch * d + d + d + regs * d + pos * d
    mlp = (d * hidden + hidden + (hidden // 2) * d + d) if swiglu else (2 * d * hidden + hidden + d)
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + mlp + (2 * d if layerscale else 0)
    return top + depth * block + 2 * d


# ------------------------------------------------------------------ model cards, on meta
CARDS = {
    # name: (D, depth, heads, patch, grid, mlp hidden (fc1 out), swiglu, registers, no_embed_class)
    "uni": (1024, 24, 16, 16, 14, 4096, False, 0, False),
    "uni2-h": (1536, 24, 24, 14, 16, 8192, True, 8, True),
    "virchow2": (1280, 32, 16, 14, 16, 6832, True, 4, False),
    "h-optimus-0": (1536, 40, 24, 14, 16, 8192, True, 4, True),
    "h-optimus-1": (1536, 40, 24, 14, 16, 8192, True, 4, True),
    "prov-gigapath": (1536, 40, 24, 16, 14, 8192, True, 0, False),
    "dinov2-vitl14-reg4": (1024, 24, 16, 14, 37, 4096, False, 4, True),
}


@pytest.mark.parametrize("name", list(CARDS))
def test_registry_constructor_matches_model_card_on_meta(name: str) -> None:
    d, depth, heads, patch, grid, hidden, swiglu, regs, nec = CARDS[name]
    spec = SPECS[name]
    enc = build_encoder(name, device="meta")
    trunk = enc.trunk
    assert (enc.embed_dim, enc.patch_size_px, enc.grid_size) == (d, patch, (grid, grid))
    assert (spec.embed_dim, spec.patch_size_px, spec.grid) == (d, patch, grid)
    assert len(trunk.blocks) == depth and trunk.blocks[0].attn.num_heads == heads
    assert trunk.num_reg_tokens == regs and trunk.no_embed_class == nec
    assert enc.num_prefix == 1 + regs == spec.num_prefix_tokens
    assert tuple(trunk.pos_embed.shape) == (1, grid * grid + (0 if nec else 1 + regs), d)
    assert trunk.blocks[0].mlp.fc1.out_features == hidden
    mlp_kind = type(trunk.blocks[0].mlp).__name__
    assert mlp_kind == ("GluMlp" if swiglu else "Mlp")  # timm's SwiGLUPacked is a packed GluMlp
    if swiglu:
        assert isinstance(trunk.blocks[0].mlp.act, torch.nn.SiLU)
    assert trunk.blocks[0].ls1.gamma.shape == (d,)  # init_values=1e-5 on every card
    want = vit_param_count(
        d=d,
        depth=depth,
        patch=patch,
        grid=grid,
        hidden=hidden,
        swiglu=swiglu,
        regs=regs,
        no_embed_class=nec,
    )
    assert sum(p.numel() for p in enc.parameters()) == want
    # The encoder's state_dict is timm's, key for key (what the downloaded file holds).
    with torch.device("meta"):
        ref = timm.create_model(spec.timm_name, pretrained=False, **spec.resolved_kwargs())
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in enc.state_dict().items()} == ref_shapes


def test_model_card_statistics() -> None:
    assert SPECS["h-optimus-0"].mean == (0.707223, 0.578729, 0.703617)
    assert SPECS["h-optimus-1"].std == (0.211883, 0.230117, 0.177517)
    assert SPECS["dinov2-vitl14-reg4"].mean == (0.0, 0.0, 0.0)
    assert SPECS["dinov2-vitl14-reg4"].std == (1.0, 1.0, 1.0)
    for name in ("uni", "uni2-h", "virchow2", "prov-gigapath"):
        assert SPECS[name].mean == (0.485, 0.456, 0.406), name


# ----------------------------------------------------- token parity, depth-reduced copies
def _write(layout: str, state: dict, tmp: Path, spec) -> Path:
    if layout == "bin":
        path = tmp / "pytorch_model.bin"
        torch.save(state, path)
        return path
    if layout == "safetensors":
        path = tmp / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return path
    # A hub snapshot folder as `huggingface-cli download` leaves it.
    folder = tmp / "snapshot"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps({"architecture": spec.timm_name, "num_classes": 0, "model_args": {}})
    )
    return folder


# The layout each model's users download.
PARITY = [
    ("uni", "bin"),
    ("uni2-h", "bin"),
    ("virchow2", "snapshot"),
    ("h-optimus-0", "snapshot"),
    ("h-optimus-1", "safetensors"),
    ("prov-gigapath", "bin"),
    ("dinov2-vitl14-reg4", "snapshot"),
]


@pytest.mark.parametrize(("name", "layout"), PARITY)
def test_token_parity_with_timm_forward_features(tmp_path: Path, name: str, layout: str) -> None:
    spec = SPECS[name]
    kwargs = {**spec.resolved_kwargs(), "depth": 1}
    ref = timm_model(spec.timm_name, kwargs, seed=len(name))
    path = _write(layout, ref.state_dict(), tmp_path, spec)
    enc = build_from_spec(spec, path, depth=1)
    assert enc.weights_sha256 is not None
    tile = 224 if spec.tile_size_px == 224 else 70  # DINOv2 at 5 x 5 cells: resampled pos_embed
    if tile != spec.tile_size_px:
        enc = build_from_spec(spec, path, depth=1, tile_size_px=tile)
        ref = timm.create_model(
            spec.timm_name, pretrained=False, **{**kwargs, "dynamic_img_size": True}
        )
        ref.load_state_dict(enc.state_dict())
        ref.eval()
    gen = torch.Generator().manual_seed(5)
    tiles = torch.randint(0, 256, (2, tile, tile, 3), dtype=torch.uint8, generator=gen)
    x = normalised(tiles, spec.mean, spec.std)
    with torch.no_grad():
        want = ref.forward_features(x)[:, spec.num_prefix_tokens :]
    got = enc.encode_tokens(tiles)
    g = tile // spec.patch_size_px
    assert got.shape == (2, g * g, spec.embed_dim) and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= TOL
    grid = enc.encode(tiles)
    assert grid.shape == (2, spec.embed_dim, g, g) and grid.is_contiguous()
    assert (grid - want.transpose(1, 2).reshape(2, -1, g, g)).abs().max().item() <= TOL


# --------------------------------------------------------------- DINOv2 torch-hub layout
def hub_layout(timm_state: dict, with_registers: bool) -> dict:
    """The facebookresearch/dinov2 torch-hub keys that give ``timm_state`` after conversion:
    pos_embed [1, 1 + g*g, D] with a class entry, register_tokens, mask_token."""
    state = dict(timm_state)
    d = state["cls_token"].shape[-1]
    if with_registers:
        pos0 = torch.randn(1, 1, d, generator=torch.Generator().manual_seed(9)) * 0.05
        state["cls_token"] = state["cls_token"] - pos0
        state["pos_embed"] = torch.cat([pos0, state["pos_embed"]], dim=1)
        state["register_tokens"] = state.pop("reg_token")
    state["mask_token"] = torch.zeros(1, d)
    return state


def test_dinov2_torch_hub_file_matches_timms_own_conversion(tmp_path: Path) -> None:
    """A dinov2_vitl14_reg4_pretrain.pth-style file (depth 1) gives the tokens of timm's model
    loaded through timm's own checkpoint filter."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    spec = SPECS["dinov2-vitl14-reg4"]
    # The 37 x 37 position embedding of the real file, run on 70 px tiles (resampled to 5 x 5).
    kwargs = {**spec.resolved_kwargs(), "depth": 1, "dynamic_img_size": True}
    src = timm_model(spec.timm_name, kwargs, seed=2)
    hub = hub_layout(src.state_dict(), with_registers=True)
    path = tmp_path / "dinov2_vitl14_reg4_pretrain.pth"
    torch.save(hub, path)
    ref = timm.create_model(spec.timm_name, pretrained=False, **kwargs).eval()
    ref.load_state_dict(checkpoint_filter_fn(torch.load(path, weights_only=True), ref))
    enc = build_from_spec(spec, path, depth=1, tile_size_px=70)
    assert any("DINOv2" in n for n in enc.load_notes)
    tiles = torch.randint(0, 256, (2, 70, 70, 3), dtype=torch.uint8)
    with torch.no_grad():
        want = ref.forward_features(normalised(tiles, spec.mean, spec.std))[:, 5:]
    got = enc.encode_tokens(tiles)
    assert got.shape == (2, 25, 1024)
    assert (got - want).abs().max().item() <= TOL


def test_dinov2_file_without_registers_is_refused(tmp_path: Path) -> None:
    spec = SPECS["dinov2-vitl14-reg4"]
    kwargs = {**spec.resolved_kwargs(), "depth": 1}
    state = hub_layout(timm_model(spec.timm_name, kwargs).state_dict(), with_registers=True)
    state.pop("register_tokens")
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="without register tokens.*reg4"):
        build_from_spec(spec, path, depth=1)


# -------------------------------------------------------------- folders and their errors
def test_snapshot_of_another_model_names_the_folder(tmp_path: Path) -> None:
    spec = SPECS["uni2-h"]
    folder = tmp_path / "UNI"
    folder.mkdir()
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_large_patch16_224"}))
    with pytest.raises(CheckpointError) as err:
        build_encoder("uni2-h", folder)
    msg = str(err.value)
    assert "'vit_large_patch16_224' snapshot" in msg and "vit_giant_patch14_224" in msg
    assert "MahmoodLab/UNI2-h" in msg and "\n" not in msg
    del spec


def test_hub_cache_folder_with_one_snapshot(tmp_path: Path) -> None:
    src = build_encoder("vit-tiny", tile_size_px=32, seed=4)
    snap = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    torch.save(src.state_dict(), snap / "pytorch_model.bin")
    dst = build_encoder("vit-tiny", tmp_path / "models--org--tiny", tile_size_px=32)
    assert dst.weights_path.endswith("pytorch_model.bin")
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds none of model.safetensors, pytorch_model.bin"):
        build_encoder("uni", tmp_path)


def test_each_pretrained_name_without_weights_says_what_to_fetch() -> None:
    for name, spec in SPECS.items():
        with pytest.raises(CheckpointError) as err:
            build_encoder(name)
        msg = str(err.value)
        assert "nothing is downloaded" in msg and "--encoder-weights PATH" in msg, name
        assert spec.weights_hint.split(" (")[0] in msg, name


# ----------------------------------------------------------------------- dinov2-tiny
@pytest.mark.parametrize(("tile", "grid"), [(70, 5), (28, 2), (518, 37)])
def test_dinov2_tiny_grid(tile: int, grid: int) -> None:
    enc = build_encoder("dinov2-tiny", tile_size_px=tile, depth=1 if tile == 518 else 2)
    assert enc.grid_size == (grid, grid) and enc.patch_size_px == 14 and enc.num_prefix == 5
    assert enc.mean == (0.0, 0.0, 0.0) and enc.std == (1.0, 1.0, 1.0)
    tiles = torch.randint(0, 256, (1, tile, tile, 3), dtype=torch.uint8)
    tokens = enc.encode_tokens(tiles)
    assert tokens.shape == (1, grid * grid, 64) and tokens.is_contiguous()
    torch.testing.assert_close(tokens_to_grid(tokens, enc.grid_size), enc.encode(tiles))


def test_dinov2_tiny_takes_float_slices_without_normalisation() -> None:
    """CT slices come as float in [0, 1]: the encoder sees them unchanged (no mean/std)."""
    enc = build_encoder("dinov2-tiny", tile_size_px=28)
    s = torch.rand(2, 28, 28, 1).expand(-1, -1, -1, 3)
    torch.testing.assert_close(enc.normalize(s), s.permute(0, 3, 1, 2))


def test_dinov2_tiny_rejects_tiles_off_the_patch() -> None:
    with pytest.raises(ConfigError, match="multiple of 14"):
        build_encoder("dinov2-tiny", tile_size_px=64)


# -------------------------------------------------------------------------- timm:NAME
def test_timm_name_vit_parity(tmp_path: Path) -> None:
    kwargs = {"depth": 1, "img_size": 32, "num_classes": 0}
    ref = timm_model("vit_small_patch16_224", kwargs, seed=1)
    path = tmp_path / "vit_small.safetensors"
    save_file(ref.state_dict(), str(path))
    enc = build_encoder("timm:vit_small_patch16_224", path, tile_size_px=32, timm_kwargs=kwargs)
    assert enc.grid_size == (2, 2) and enc.embed_dim == 384
    tiles = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        want = ref.forward_features(normalised(tiles, enc.mean, enc.std))[:, 1:]
    assert (enc.encode_tokens(tiles) - want).abs().max().item() <= TOL


def test_timm_name_cnn_feature_map(tmp_path: Path) -> None:
    enc = build_encoder("timm:resnet18", tile_size_px=64, random_init=True)
    assert enc.grid_size == (2, 2) and enc.patch_size_px == 32 and enc.embed_dim == 512
    tiles = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        want = enc.trunk.forward_features(normalised(tiles, enc.mean, enc.std))
    torch.testing.assert_close(enc.encode(tiles), want, rtol=0, atol=TOL)


def test_timm_name_errors() -> None:
    with pytest.raises(InputError, match="timm has no architecture 'no_such_net'"):
        build_encoder("timm:no_such_net", tile_size_px=32, random_init=True)
    with pytest.raises(ConfigError, match="needs the tile size"):
        build_encoder("timm:vit_small_patch16_224", random_init=True)
    with pytest.raises(CheckpointError, match="nothing is downloaded"):
        build_encoder("timm:vit_small_patch16_224", tile_size_px=32)


def test_pretrained_true_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """``pretrained`` is dropped: timm's download path is never entered, the hub is offline."""
    import timm.models._builder as builder

    def boom(*a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("timm tried to load pretrained weights")

    monkeypatch.setattr(builder, "load_pretrained", boom)
    enc = build_encoder(
        "timm:vit_small_patch16_224",
        tile_size_px=32,
        random_init=True,
        timm_kwargs={"pretrained": True, "depth": 1, "img_size": 32},
    )
    assert enc.grid_size == (2, 2)
    import os

    assert os.environ.get("HF_HUB_OFFLINE") == "1"


# --------------------------------------------------------------------- speed plumbing
def test_fused_attention_is_on_in_every_block() -> None:
    enc = build_encoder("vit-tiny", tile_size_px=32)
    assert all(b.attn.fused_attn for b in enc.blocks)


@pytest.mark.parametrize("name", ["dinov2-tiny", "resnet-tiny"])
def test_compiled_encoder_gives_the_same_tokens(name: str) -> None:
    enc = build_encoder(name, tile_size_px=28 if name == "dinov2-tiny" else 32)
    t = enc.tile_size_px
    tiles = torch.randint(0, 256, (2, t, t, 3), dtype=torch.uint8)
    want, want_tokens = enc.encode(tiles), enc.encode_tokens(tiles)
    graphs = []

    def backend(gm, example_inputs):  # records that the compiled path runs; executes eagerly
        graphs.append(gm)
        return gm.forward

    compile_encoder(enc, backend=backend)  # inductor needs a C compiler; the wiring is the same
    torch.testing.assert_close(enc.encode_tokens(tiles), want_tokens)
    assert graphs, "encode_tokens did not go through torch.compile"
    torch.testing.assert_close(enc.encode(tiles), want)


def test_tokens_to_grid_is_a_view() -> None:
    t = torch.randn(2, 6, 4)
    g = tokens_to_grid(t, (2, 3))
    assert g.shape == (2, 4, 2, 3) and g.data_ptr() == t.data_ptr()
    assert g.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(InputError, match="expected 9 tokens"):
        tokens_to_grid(t, (3, 3))


def test_saved_weights_load_into_timm_directly(tmp_path: Path) -> None:
    """save_weights writes timm's own layout: timm loads it strictly, no prefix to strip."""
    enc = build_encoder("dinov2-tiny", tile_size_px=28, seed=3)
    path = tmp_path / "w.safetensors"
    enc.save_weights(path)
    from safetensors.torch import load_file

    ref = timm.create_model(enc.timm_name, pretrained=False, **enc.timm_kwargs).eval()
    ref.load_state_dict(load_file(str(path)), strict=True)
    tiles = torch.randint(0, 256, (1, 28, 28, 3), dtype=torch.uint8)
    with torch.no_grad():
        want = ref.forward_features(normalised(tiles, enc.mean, enc.std))[:, 5:]
    assert (enc.encode_tokens(tiles) - want).abs().max().item() <= TOL


def test_timm_name_with_computed_buffers_parity(tmp_path: Path) -> None:
    """EVA-02 keeps rotary tables in buffers outside the state_dict: they are rebuilt, not lost."""
    kwargs = {"depth": 1}
    ref = timm_model("eva02_tiny_patch14_224", kwargs, seed=3)
    path = tmp_path / "eva.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    enc = build_encoder("timm:eva02_tiny_patch14_224", path, tile_size_px=224, timm_kwargs=kwargs)
    tiles = torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8)
    with torch.no_grad():
        want = ref.forward_features(normalised(tiles, enc.mean, enc.std))[:, enc.num_prefix :]
    got = enc.encode_tokens(tiles)
    assert got.shape == (1, 256, 192)
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["vit-tiny", "resnet-tiny"])
def test_encode_tokens_is_the_grid_channels_last(name: str) -> None:
    """encode_tokens [B, h*w, C] holds the cells of encode [B, C, h, w] in row-major order."""
    enc = build_encoder(name, tile_size_px=64)
    tiles = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    grid = enc.encode(tiles)
    tokens = enc.encode_tokens(tiles)
    assert tokens.shape == (2, 16, grid.shape[1]) and tokens.is_contiguous()
    for i, j in ((0, 0), (1, 3), (3, 2)):
        torch.testing.assert_close(tokens[:, i * 4 + j], grid[:, :, i, j], rtol=0, atol=TOL)
