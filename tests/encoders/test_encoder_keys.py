"""The full-size encoders have exactly the state_dict of the files they must load.

Built on the ``meta`` device: the 303M-parameter ViT-L costs no memory here. The expected tables
are written from the architectures (UNI's timm ViT-L/16, torchvision's ResNet-50 up to layer3),
not read off our modules.
"""

from __future__ import annotations

import torch

from fastinsight.encoders import ResNetTruncEncoder, ViTEncoder, build_encoder


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def uni_table() -> dict[str, tuple[int, ...]]:
    """timm ``vit_large_patch16_224`` (UNI: init_values=1e-5, num_classes=0), in timm's order."""
    d, hidden, depth = 1024, 4096, 24
    table: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 197, d),
        "patch_embed.proj.weight": (d, 3, 16, 16),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        table |= {
            b + "norm1.weight": (d,),
            b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d),
            b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d),
            b + "attn.proj.bias": (d,),
            b + "ls1.gamma": (d,),
            b + "norm2.weight": (d,),
            b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (hidden, d),
            b + "mlp.fc1.bias": (hidden,),
            b + "mlp.fc2.weight": (d, hidden),
            b + "mlp.fc2.bias": (d,),
            b + "ls2.gamma": (d,),
        }
    table |= {"norm.weight": (d,), "norm.bias": (d,)}
    return table


def resnet50_trunc_table() -> dict[str, tuple[int, ...]]:
    """torchvision ``resnet50`` keys up to and including layer3 (no layer4, no fc)."""

    def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
        return {
            prefix + ".weight": (c,),
            prefix + ".bias": (c,),
            prefix + ".running_mean": (c,),
            prefix + ".running_var": (c,),
            prefix + ".num_batches_tracked": (),
        }

    table: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    inplanes = 64
    for layer, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6)], start=1):
        for i in range(blocks):
            b = f"layer{layer}.{i}."
            table |= {b + "conv1.weight": (planes, inplanes, 1, 1), **bn(b + "bn1", planes)}
            table |= {b + "conv2.weight": (planes, planes, 3, 3), **bn(b + "bn2", planes)}
            table |= {b + "conv3.weight": (4 * planes, planes, 1, 1), **bn(b + "bn3", 4 * planes)}
            if i == 0:
                table |= {
                    b + "downsample.0.weight": (4 * planes, inplanes, 1, 1),
                    **bn(b + "downsample.1", 4 * planes),
                }
            inplanes = 4 * planes
    return table


def test_uni_key_table_matches_timm_vit_large() -> None:
    model = ViTEncoder(device="meta")
    got = shapes(model)
    want = uni_table()
    assert list(got) == list(want)  # same keys in the same order as timm's state_dict
    assert got == want
    assert len(got) == 4 + 24 * 14 + 2
    assert sum(p.numel() for p in model.parameters()) == 303_350_784
    assert model.grid_size == (14, 14) and model.embed_dim == 1024


def test_uni_from_registry_on_meta_has_the_same_table() -> None:
    enc = build_encoder("uni", device="meta")
    assert shapes(enc) == uni_table()
    assert enc.patch_size_px == 16 and enc.tile_size_px == 224


def test_uni_layer_hyperparameters() -> None:
    model = ViTEncoder(device="meta")
    block = model.blocks[0]
    assert block.norm1.eps == 1e-6 and model.norm.eps == 1e-6
    assert block.attn.num_heads == 16 and block.attn.head_dim == 64
    assert block.mlp.act.approximate == "none"  # exact-erf GELU
    assert model.patch_embed.proj.stride == (16, 16)


def test_resnet50_trunc_key_table_matches_torchvision_to_layer3() -> None:
    model = ResNetTruncEncoder(device="meta")
    got = shapes(model)
    want = resnet50_trunc_table()
    assert set(got) == set(want)
    assert got == want
    assert len(got) == 258
    assert not any(k.startswith(("layer4.", "fc.")) for k in got)
    assert sum(p.numel() for p in model.parameters()) == 8_543_296
    assert model.embed_dim == 1024 and model.grid_size == (14, 14)


def test_resnet50_trunc_from_registry_on_meta() -> None:
    assert shapes(build_encoder("resnet50-trunc", device="meta")) == resnet50_trunc_table()
