"""The pretrained encoders users run, each with the exact timm constructor of its model card.

Every entry records: timm architecture and keyword arguments (copied from the model card or the
hub ``config.json``, source in ``source``), tile size, patch size, token grid, width, how many
prefix tokens (class + registers) precede the patch tokens in ``forward_features``, the input
mean/std, and where users get the weights. Nothing here downloads; weights are local files.

| name               | timm architecture               | tile | patch | grid    | C    | prefix |
| ------------------ | ------------------------------- | ---- | ----- | ------- | ---- | ------ |
| uni                | vit_large_patch16_224           | 224  | 16    | 14 x 14 | 1024 | 1      |
| uni2-h             | vit_giant_patch14_224           | 224  | 14    | 16 x 16 | 1536 | 1 + 8  |
| virchow2           | vit_huge_patch14_224            | 224  | 14    | 16 x 16 | 1280 | 1 + 4  |
| h-optimus-0        | vit_giant_patch14_reg4_dinov2   | 224  | 14    | 16 x 16 | 1536 | 1 + 4  |
| h-optimus-1        | vit_giant_patch14_reg4_dinov2   | 224  | 14    | 16 x 16 | 1536 | 1 + 4  |
| prov-gigapath      | vit_giant_patch14_dinov2 (p=16) | 224  | 16    | 14 x 14 | 1536 | 1      |
| dinov2-vitl14-reg4 | vit_large_patch14_reg4_dinov2   | 518  | 14    | 37 x 37 | 1024 | 1 + 4  |

Prov-GigaPath's ``config.json`` names ``vit_giant_patch14_dinov2`` but overrides ``patch_size`` to
16 (pos_embed [1, 197, 1536]): its grid is 14 x 14, not 16 x 16.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastinsight.encoders.base import IMAGENET_MEAN, IMAGENET_STD

#: H-optimus-0/1 input statistics (bioptimus model cards).
HOPTIMUS_MEAN: tuple[float, float, float] = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD: tuple[float, float, float] = (0.211883, 0.230117, 0.177517)
#: No normalisation (RGB in [0, 1] as is): the official INSIGHT CT code feeds DINOv2 this way.
IDENTITY_MEAN: tuple[float, float, float] = (0.0, 0.0, 0.0)
IDENTITY_STD: tuple[float, float, float] = (1.0, 1.0, 1.0)

# Markers for the two layer classes model cards pass as objects; resolved when timm is imported.
SWIGLU = "timm.layers.SwiGLUPacked"
SILU = "torch.nn.SiLU"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One pretrained encoder: timm constructor, geometry, normalisation, weights."""

    name: str
    title: str
    timm_name: str
    timm_kwargs: dict[str, Any]
    tile_size_px: int
    patch_size_px: int
    embed_dim: int
    num_prefix_tokens: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_hint: str
    source: str
    snapshot_archs: tuple[str, ...] = ()
    depth: int = 0

    @property
    def grid(self) -> int:
        """Side of the token grid on the native tile."""
        return self.tile_size_px // self.patch_size_px

    def resolved_kwargs(self) -> dict[str, Any]:
        """``timm_kwargs`` with the layer markers replaced by the classes timm expects."""
        import torch
        from timm.layers import SwiGLUPacked

        table = {SWIGLU: SwiGLUPacked, SILU: torch.nn.SiLU}
        return {
            k: table.get(v, v) if isinstance(v, str) else v for k, v in self.timm_kwargs.items()
        }


_GATED = "gated: log in to Hugging Face and accept its terms, then `huggingface-cli download`"

_H_OPTIMUS_0 = ModelSpec(
    name="h-optimus-0",
    title="H-optimus-0 ViT-g/14, 4 registers (Bioptimus)",
    timm_name="vit_giant_patch14_reg4_dinov2",
    # bioptimus/H-optimus-0 card: timm.create_model("hf-hub:bioptimus/H-optimus-0",
    # init_values=1e-5, dynamic_img_size=False); config.json: vit_giant_patch14_reg4_dinov2,
    # img_size 224, num_classes 0, global_pool "token".
    timm_kwargs={
        "img_size": 224,
        "init_values": 1e-5,
        "dynamic_img_size": False,
        "num_classes": 0,
        "global_pool": "token",
    },
    tile_size_px=224,
    patch_size_px=14,
    embed_dim=1536,
    num_prefix_tokens=5,
    mean=HOPTIMUS_MEAN,
    std=HOPTIMUS_STD,
    weights_hint=(
        f"H-optimus-0's model.safetensors (bioptimus/H-optimus-0; {_GATED}) or its checkpoint.pth"
    ),
    source="huggingface.co/bioptimus/H-optimus-0 model card and config.json",
    snapshot_archs=("vit_giant_patch14_reg4_dinov2",),
    depth=40,
)

SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            name="uni",
            title="UNI ViT-L/16 (Mahmood Lab)",
            timm_name="vit_large_patch16_224",
            # MahmoodLab/UNI model card: timm.create_model("vit_large_patch16_224", img_size=224,
            # patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)
            timm_kwargs={
                "img_size": 224,
                "patch_size": 16,
                "init_values": 1e-5,
                "num_classes": 0,
                "dynamic_img_size": True,
            },
            tile_size_px=224,
            patch_size_px=16,
            embed_dim=1024,
            num_prefix_tokens=1,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            weights_hint=(
                "UNI's pytorch_model.bin (Hugging Face repo MahmoodLab/UNI; gated: log in and "
                "accept its terms)"
            ),
            source="huggingface.co/MahmoodLab/UNI model card",
            snapshot_archs=("vit_large_patch16_224",),
            depth=24,
        ),
        ModelSpec(
            name="uni2-h",
            title="UNI2-h ViT-H/14, SwiGLU, 8 registers (Mahmood Lab)",
            timm_name="vit_giant_patch14_224",
            # MahmoodLab/UNI2-h model card timm_kwargs (also in CLAM/TRIDENT loaders).
            timm_kwargs={
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "num_classes": 0,
                "no_embed_class": True,
                "mlp_layer": SWIGLU,
                "act_layer": SILU,
                "reg_tokens": 8,
                "dynamic_img_size": True,
            },
            tile_size_px=224,
            patch_size_px=14,
            embed_dim=1536,
            num_prefix_tokens=9,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            weights_hint=f"UNI2-h's pytorch_model.bin (Hugging Face repo MahmoodLab/UNI2-h; {_GATED})",
            source="huggingface.co/MahmoodLab/UNI2-h model card",
            snapshot_archs=("vit_giant_patch14_224",),
            depth=24,
        ),
        ModelSpec(
            name="virchow2",
            title="Virchow2 ViT-H/14, SwiGLU, 4 registers (Paige)",
            timm_name="vit_huge_patch14_224",
            # paige-ai/Virchow2 config.json model_args plus the card's create_model arguments
            # mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU; output [B, 261, 1280], patch tokens
            # [:, 5:] (class token, 4 registers first).
            timm_kwargs={
                "img_size": 224,
                "init_values": 1e-5,
                "num_classes": 0,
                "mlp_ratio": 5.3375,
                "reg_tokens": 4,
                "global_pool": "",
                "dynamic_img_size": True,
                "mlp_layer": SWIGLU,
                "act_layer": SILU,
            },
            tile_size_px=224,
            patch_size_px=14,
            embed_dim=1280,
            num_prefix_tokens=5,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            weights_hint=f"Virchow2's model.safetensors or pytorch_model.bin (paige-ai/Virchow2; {_GATED})",
            source="huggingface.co/paige-ai/Virchow2 model card and config.json",
            snapshot_archs=("vit_huge_patch14_224",),
            depth=32,
        ),
        _H_OPTIMUS_0,
        # bioptimus/H-optimus-1 card: same constructor and statistics as H-optimus-0.
        dataclasses.replace(
            _H_OPTIMUS_0,
            name="h-optimus-1",
            title="H-optimus-1 ViT-g/14, 4 registers (Bioptimus)",
            weights_hint=f"H-optimus-1's model.safetensors (bioptimus/H-optimus-1; {_GATED})",
            source="huggingface.co/bioptimus/H-optimus-1 model card",
        ),
        ModelSpec(
            name="prov-gigapath",
            title="Prov-GigaPath tile encoder ViT-g, patch 16 (Microsoft/Providence)",
            timm_name="vit_giant_patch14_dinov2",
            # prov-gigapath/prov-gigapath config.json: architecture vit_giant_patch14_dinov2,
            # model_args img_size 224, in_chans 3, patch_size 16, embed_dim 1536, depth 40,
            # num_heads 24, init_values 1e-05, mlp_ratio 5.33334, num_classes 0.
            timm_kwargs={
                "img_size": 224,
                "in_chans": 3,
                "patch_size": 16,
                "embed_dim": 1536,
                "depth": 40,
                "num_heads": 24,
                "init_values": 1e-5,
                "mlp_ratio": 5.33334,
                "num_classes": 0,
            },
            tile_size_px=224,
            patch_size_px=16,
            embed_dim=1536,
            num_prefix_tokens=1,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            weights_hint=(
                f"Prov-GigaPath's pytorch_model.bin (prov-gigapath/prov-gigapath; {_GATED})"
            ),
            source="huggingface.co/prov-gigapath/prov-gigapath config.json",
            snapshot_archs=("vit_giant_patch14_dinov2",),
            depth=40,
        ),
        ModelSpec(
            name="dinov2-vitl14-reg4",
            title="DINOv2 ViT-L/14 with 4 registers, 518 px, no normalisation (INSIGHT CT)",
            timm_name="vit_large_patch14_reg4_dinov2",
            # timm's conversion of facebookresearch/dinov2 dinov2_vitl14_reg (patch 14, 1024, depth
            # 24, 16 heads, init_values 1e-5, reg_tokens 4, no_embed_class); INSIGHT's CT code runs
            # it on 518 px slices in [0, 1] without mean/std and keeps x_norm[:, 5:] as 37 x 37.
            timm_kwargs={"img_size": 518, "num_classes": 0},
            tile_size_px=518,
            patch_size_px=14,
            embed_dim=1024,
            num_prefix_tokens=5,
            mean=IDENTITY_MEAN,
            std=IDENTITY_STD,
            weights_hint=(
                "DINOv2's dinov2_vitl14_reg4_pretrain.pth (https://dl.fbaipublicfiles.com/dinov2/"
                "dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth; torch.hub keeps it in "
                "~/.cache/torch/hub/checkpoints) or the timm/vit_large_patch14_reg4_dinov2.lvd142m "
                "snapshot folder"
            ),
            source="docs/radiographs-and-ct.md section 3; timm vit_large_patch14_reg4_dinov2",
            snapshot_archs=("vit_large_patch14_reg4_dinov2",),
            depth=24,
        ),
    )
}
