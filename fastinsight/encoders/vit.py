"""A Vision Transformer whose state_dict is timm's ``vit_large_patch16_224`` as UNI uses it.

UNI (Chen et al., Nature Medicine 2024; MahmoodLab/UNI) is built with
``timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5,
num_classes=0, dynamic_img_size=True)``. This module is written from that architecture, not from
timm's code: pre-norm blocks ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``, LayerNorm
eps 1e-6, exact-erf GELU, a fused ``qkv`` projection with bias, LayerScale (``gamma``), a learned
class token and absolute position embedding over ``1 + 14 * 14`` tokens, and a final ``norm``.
With ``num_classes=0`` timm's head is an identity and has no keys.

State_dict of the full size (24 blocks): ``cls_token`` [1, 1, 1024], ``pos_embed`` [1, 197, 1024],
``patch_embed.proj.{weight [1024, 3, 16, 16], bias}``, per block ``norm1``, ``attn.qkv``
[3072, 1024], ``attn.proj``, ``ls1.gamma``, ``norm2``, ``mlp.fc1`` [4096, 1024], ``mlp.fc2``,
``ls2.gamma``; ``norm``.

Output: the patch tokens after the final norm, class token dropped, as ``[B, C, h, w]`` (the
official INSIGHT input, spec section 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastinsight.encoders.base import IMAGENET_MEAN, IMAGENET_STD, StateDictEncoder
from fastinsight.encoders.weights import PathLike
from fastinsight.errors import InputError


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ViT encoder. The defaults are UNI's ViT-L/16.

    - ``pos_embed_grid``: side of the grid the position embedding was trained for (224 / 16 = 14
      for UNI); when ``tile_size_px / patch_size_px`` differs, the embedding is resampled at run
      time as timm's ``dynamic_img_size=True`` does (bicubic, antialias, class token kept apart).
    - ``init_values``: LayerScale initial value (UNI: 1e-5); ``None`` builds blocks without
      LayerScale (and without ``ls*.gamma`` keys).
    """

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size_px: int = 16
    tile_size_px: int = 224
    pos_embed_grid: int = 14
    init_values: float | None = 1e-5
    ln_eps: float = 1e-6
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.embed_dim < 1 or self.depth < 0 or self.num_heads < 1:
            problems.append(
                f"embed_dim, depth, num_heads must be positive, got {self.embed_dim}, "
                f"{self.depth}, {self.num_heads}"
            )
        elif self.embed_dim % self.num_heads:
            problems.append(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.mlp_ratio <= 0:
            problems.append(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.patch_size_px < 1 or self.pos_embed_grid < 1:
            problems.append(
                f"patch_size_px and pos_embed_grid must be >= 1, got {self.patch_size_px}, "
                f"{self.pos_embed_grid}"
            )
        elif self.tile_size_px < self.patch_size_px or self.tile_size_px % self.patch_size_px:
            problems.append(
                f"tile_size_px {self.tile_size_px} is not a positive multiple of patch_size_px "
                f"{self.patch_size_px}"
            )
        if problems:
            raise InputError("invalid ViT configuration: " + "; ".join(problems))

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the MLP (4096 for ViT-L)."""
        return int(self.embed_dim * self.mlp_ratio)


UNI_CONFIG = ViTConfig()


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution (timm key ``patch_embed.proj``)."""

    def __init__(self, patch_size_px: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size_px, stride=patch_size_px)

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: ``[B, 3, H, W]`` -> ``[B, D, H/p, W/p]``."""
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm keys ``attn.qkv``, ``attn.proj``).

    ``softmax(q k^T / sqrt(d)) v`` per head, computed by ``F.scaled_dot_product_attention``
    (flash / memory-efficient kernels on CUDA). The fused projection's output is laid out as
    ``[3, heads, head_dim]`` along its features, as in timm, so UNI's ``qkv.weight`` rows are
    q (heads 0..15), then k, then v.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project and split into q, k, v.

        Shapes: ``[B, N, D]`` -> three ``[B, heads, N, head_dim]``.
        """
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: ``[B, N, D]`` -> ``[B, N, D]``."""
        b, n, d = x.shape
        q, k, v = self.split_heads(x)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (Touvron et al., CaiT 2021); timm key ``gamma``."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: ``[..., D]`` -> ``[..., D]``."""
        return x * self.gamma


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` with the exact-erf GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: ``[..., D]`` -> ``[..., D]``."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.attn = Attention(d, cfg.num_heads, qkv_bias=cfg.qkv_bias)
        self.ls1: nn.Module = (
            LayerScale(d, cfg.init_values) if cfg.init_values is not None else nn.Identity()
        )
        self.norm2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.mlp = Mlp(d, cfg.mlp_hidden)
        self.ls2: nn.Module = (
            LayerScale(d, cfg.init_values) if cfg.init_values is not None else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: ``[B, N, D]`` -> ``[B, N, D]``."""
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def resample_pos_embed(pos_embed: Tensor, old_grid: int, new_hw: tuple[int, int]) -> Tensor:
    """Resample an absolute position embedding with one class-token entry to a new grid.

    The patch part is interpolated as an image (bicubic with antialias, in float32), the class
    token's entry is kept, as timm's ``dynamic_img_size=True`` does.

    Shapes: ``[1, 1 + g*g, D]`` -> ``[1, 1 + h*w, D]``.
    """
    if new_hw == (old_grid, old_grid):
        return pos_embed
    d = pos_embed.shape[-1]
    prefix, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.float().reshape(1, old_grid, old_grid, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_hw, mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], d).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class ViTEncoder(StateDictEncoder):
    """ViT patch encoder; with the default config, UNI's ViT-L/16 (timm key names and shapes).

    Built on the ``meta`` device, then either loaded from ``weights`` (strict: every key and shape
    must match, see :meth:`load_weights`) or initialised from ``seed`` (timm-style: truncated
    normal std 0.02 for linear layers, patch projection and position embedding; class token std
    1e-6; LayerScale ``init_values``). ``device="meta"`` with no weights allocates nothing (for
    inspecting the full-size key table).

    Shapes: ``encode``: ``[B, T, T, 3]`` uint8 -> ``[B, D, T/p, T/p]``.
    """

    def __init__(
        self,
        config: ViTConfig = UNI_CONFIG,
        *,
        name: str = "vit",
        weights: PathLike | None = None,
        seed: int | None = 0,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        autocast: bool = True,
        arch: str | None = None,
        weights_hint: str | None = None,
    ) -> None:
        super().__init__(
            name=name,
            tile_size_px=config.tile_size_px,
            patch_size_px=config.patch_size_px,
            embed_dim=config.embed_dim,
            mean=mean,
            std=std,
            autocast=autocast,
        )
        self.config = config
        self.arch = arch or (
            f"ViT (timm vision_transformer layout; D={config.embed_dim}, depth={config.depth}, "
            f"heads={config.num_heads}, patch={config.patch_size_px})"
        )
        if weights_hint:
            self.weights_hint = weights_hint
        d, g = config.embed_dim, config.pos_embed_grid
        with torch.device("meta"):
            self.cls_token = nn.Parameter(torch.empty(1, 1, d))
            self.pos_embed = nn.Parameter(torch.empty(1, 1 + g * g, d))
            self.patch_embed = PatchEmbed(config.patch_size_px, d)
            self.blocks = nn.ModuleList([Block(config) for _ in range(config.depth)])
            self.norm = nn.LayerNorm(d, eps=config.ln_eps)
        self._materialize(weights=weights, seed=seed, device=device, dtype=dtype)

    def _reset_parameters(self, generator: torch.Generator) -> None:
        init = nn.init
        init.trunc_normal_(self.pos_embed, std=0.02, generator=generator)
        init.normal_(self.cls_token, std=1e-6, generator=generator)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                init.trunc_normal_(module.weight, std=0.02, generator=generator)
                if module.bias is not None:
                    init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                init.ones_(module.weight)
                init.zeros_(module.bias)
            elif isinstance(module, LayerScale):
                init.constant_(module.gamma, module.init_values)

    def forward_features(self, x: Tensor) -> Tensor:
        """All tokens after the final norm, class token first.

        Shapes: ``[B, 3, T, T]`` -> ``[B, 1 + h*w, D]``.
        """
        self._check_input(x)
        b = x.shape[0]
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        pos = resample_pos_embed(self.pos_embed, self.config.pos_embed_grid, (h, w))
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:
        """Patch tokens as a channels-first grid (class token dropped).

        Shapes: ``[B, 3, T, T]`` -> ``[B, D, T/p, T/p]``.
        """
        tokens = self.forward_features(x)[:, 1:]
        b, _, d = tokens.shape
        h, w = self.grid_size
        return tokens.transpose(1, 2).reshape(b, d, h, w).contiguous()
