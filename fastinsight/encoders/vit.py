"""Encoders built with timm: Vision Transformers (UNI, UNI2-h, Virchow2, H-optimus, Prov-GigaPath,
DINOv2) and any other timm architecture, with their weights loaded from local files.

The network is ``timm.create_model(NAME, pretrained=False, **kwargs)`` (never timm's download), built
on the ``meta`` device and held as ``self.trunk``. Its state_dict is exposed *without* the
``trunk.`` prefix (state-dict hooks), so ``encoder.state_dict()`` is exactly timm's, the file a user
has loads as is, and ``save_weights`` writes a file that ``timm`` itself can load.

Token grid of a ViT: ``forward_features`` gives ``[B, P + h*w, C]`` after the final norm, with
``P = num_prefix_tokens`` = class token (1) + register tokens (0, 4 or 8); the patch tokens
``[:, P:]`` are in row-major order (``n = i*w + j``) and become the grid. A CNN's
``forward_features`` map ``[B, C, h, w]`` is the grid itself.

Speed (CUDA): weights in bf16 (``dtype=torch.bfloat16``, the default there), so the residual stream
is bf16 end to end rather than fp32 weights under autocast; attention through
``F.scaled_dot_product_attention`` (timm's ``fused_attn``, forced on); ``encode_tokens`` returns
``[B, h*w, C]`` channels-last without a transpose; :func:`compile_encoder` wraps the module in
``torch.compile`` with a static batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from fastinsight.encoders.base import IMAGENET_MEAN, IMAGENET_STD, StateDictEncoder
from fastinsight.encoders.weights import PathLike, resample_grid_embed
from fastinsight.errors import InputError

_TRUNK = "trunk."
# Attributes of the timm model reachable directly on the encoder (``encoder.blocks[0]``, ...).
_DELEGATED = frozenset(
    {"blocks", "pos_embed", "cls_token", "reg_token", "patch_embed", "norm", "num_prefix_tokens"}
)


def _strip_trunk(
    module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """state_dict post-hook: ``{prefix}trunk.X`` -> ``{prefix}X`` (timm's own key names)."""
    head = prefix + _TRUNK
    for key in [k for k in state if k.startswith(head)]:
        state[prefix + key[len(head) :]] = state.pop(key)


def _add_trunk(
    module: nn.Module, state: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
) -> None:
    """load_state_dict pre-hook: the inverse of :func:`_strip_trunk`."""
    for key in [k for k in state if k.startswith(prefix) and not k.startswith(prefix + _TRUNK)]:
        state[prefix + _TRUNK + key[len(prefix) :]] = state.pop(key)


def create_timm_model(timm_name: str, timm_kwargs: dict[str, Any]) -> Any:
    """``timm.create_model(timm_name, pretrained=False, **timm_kwargs)`` on the meta device.

    Never downloads: ``pretrained`` is always False (weights come from local files afterwards), and
    ``HF_HUB_OFFLINE`` is set so that nothing timm does can reach the hub.
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import timm

    kwargs = dict(timm_kwargs)
    kwargs.pop("pretrained", None)
    try:
        with torch.device("meta"):
            return timm.create_model(timm_name, pretrained=False, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise InputError(
                f"timm has no architecture {timm_name!r}; pass one of timm.list_models() "
                "(e.g. timm:vit_small_patch14_dinov2)"
            ) from exc
        raise InputError(f"timm could not build {timm_name!r} with {kwargs}: {exc}") from exc
    except TypeError as exc:
        raise InputError(
            f"timm architecture {timm_name!r} does not accept these arguments ({exc}); check "
            "the timm_kwargs option"
        ) from exc


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a timm ``VisionTransformer``. The defaults are UNI's ViT-L/16.

    - ``pos_embed_grid``: side of the grid the position embedding is built for (224 / 16 = 14
      for UNI); when ``tile_size_px / patch_size_px`` differs, timm resamples it at run time
      (``dynamic_img_size=True``: bicubic, antialias, prefix entries kept apart). A weight file
      whose embedding covers another square grid is resampled to this one on load.
    - ``init_values``: LayerScale initial value (UNI: 1e-5); ``None`` builds blocks without
      LayerScale (and without ``ls*.gamma`` keys).
    - ``reg_tokens``: register tokens after the class token (DINOv2-reg, UNI2-h, Virchow2,
      H-optimus); ``no_embed_class``: the position embedding covers patch tokens only.
    - ``mlp``: ``"gelu"`` (timm ``Mlp``) or ``"swiglu"`` (timm ``SwiGLUPacked`` with SiLU; then
      ``mlp_ratio`` is the *packed* ratio, e.g. 2.66667 * 2).
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
    reg_tokens: int = 0
    no_embed_class: bool = False
    mlp: str = "gelu"
    timm_model: str = "vit_large_patch16_224"

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
        if self.reg_tokens < 0:
            problems.append(f"reg_tokens must be >= 0, got {self.reg_tokens}")
        if self.mlp not in ("gelu", "swiglu"):
            problems.append(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if problems:
            raise InputError("invalid ViT configuration: " + "; ".join(problems))

    @property
    def mlp_hidden(self) -> int:
        """Width of ``mlp.fc1``'s output (4096 for ViT-L; packed gate+value for SwiGLU)."""
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def grid(self) -> int:
        """Side of the token grid on ``tile_size_px`` tiles."""
        return self.tile_size_px // self.patch_size_px

    def timm_kwargs(self) -> dict[str, Any]:
        """Every architecture-defining keyword of ``timm.create_model`` for this configuration."""
        from timm.layers import SwiGLUPacked

        kw: dict[str, Any] = {
            "img_size": self.pos_embed_grid * self.patch_size_px,
            "patch_size": self.patch_size_px,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": self.qkv_bias,
            "init_values": self.init_values,
            "reg_tokens": self.reg_tokens,
            "no_embed_class": self.no_embed_class,
            "class_token": True,
            "num_classes": 0,
            "dynamic_img_size": self.grid != self.pos_embed_grid,
        }
        if self.mlp == "swiglu":
            kw["mlp_layer"] = SwiGLUPacked
            kw["act_layer"] = nn.SiLU
        if self.ln_eps != 1e-6:  # timm's ViT default
            kw["norm_layer"] = partial(nn.LayerNorm, eps=self.ln_eps)
        return kw


UNI_CONFIG = ViTConfig()


def resample_pos_embed(
    pos_embed: Tensor, old_grid: int, new_hw: tuple[int, int], num_prefix: int = 1
) -> Tensor:
    """Resample an absolute position embedding to a new grid, as timm's ``dynamic_img_size`` does.

    The patch part is interpolated as an image (bicubic with antialias, in float32); the
    ``num_prefix`` leading entries (class token; 0 for ``no_embed_class`` models) are kept. The
    same resampling as weight loading (:func:`fastinsight.encoders.weights.resample_grid_embed`).

    Shapes: ``[1, P + g*g, D]`` -> ``[1, P + h*w, D]``.
    """
    return resample_grid_embed(
        pos_embed, (new_hw[0], new_hw[1]), num_prefix=num_prefix, old_hw=(old_grid, old_grid)
    )


class TimmEncoder(StateDictEncoder):
    """Any timm model as a patch encoder (ViT token grid or CNN feature map).

    ``timm_name``/``timm_kwargs`` are passed to ``timm.create_model`` (``pretrained=False``). The
    geometry is read off the model: a ViT's patch size, prefix-token count and width; a CNN's grid
    by a shape-only (meta) forward of one tile. Random initialisation (``seed``, no weights) is
    timm-style and seeded: truncated normal std 0.02 for linear/conv weights and the position
    embedding, std 1e-6 for class and register tokens, LayerScale ``init_values``, norms 1/0.

    Position embedding: the timm model's ``pos_embed`` covers the grid of its ``img_size``
    (timm's default for the architecture unless ``timm_kwargs`` sets it). A weight file trained on
    another square grid (timm's DINOv2 weights at 518 px, 37 x 37, in a model built with
    ``img_size=224``) is resampled to it on load, bicubic with antialiasing, class/register
    entries kept (a note in ``load_notes``); tiles of another size than ``img_size`` are served by
    timm's ``dynamic_img_size``, which resamples at run time in the same way.

    Shapes: ``encode``: ``[B, T, T, 3]`` uint8 -> ``[B, C, T/p, T/p]``;
    ``encode_tokens``: -> ``[B, (T/p)^2, C]``.
    """

    trunk: Any  # the timm model (typed loosely: timm's modules are dynamic)

    def __init__(
        self,
        timm_name: str,
        timm_kwargs: dict[str, Any] | None = None,
        *,
        tile_size_px: int,
        name: str | None = None,
        weights: PathLike | None = None,
        seed: int | None = 0,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        autocast: bool = True,
        arch: str | None = None,
        weights_hint: str | None = None,
        config: Any = None,
        patch_size_px: int | None = None,
        snapshot_archs: tuple[str, ...] = (),
    ) -> None:
        kwargs = dict(timm_kwargs or {})
        trunk = create_timm_model(timm_name, kwargs)
        is_vit = hasattr(trunk, "patch_embed") and hasattr(trunk, "num_prefix_tokens")
        if is_vit:
            patch = int(trunk.patch_embed.patch_size[0])
            embed = int(trunk.embed_dim)
            if tile_size_px % patch == 0 and tile_size_px >= patch:
                pos = tuple(trunk.patch_embed.grid_size)
                if (tile_size_px // patch,) * 2 != pos and not getattr(
                    trunk, "dynamic_img_size", 0
                ):
                    # A tile that is not the trained grid needs the run-time resampled embedding.
                    kwargs["dynamic_img_size"] = True
                    trunk = create_timm_model(timm_name, kwargs)
        else:
            embed, patch = self._probe_cnn(trunk, tile_size_px, timm_name, patch_size_px)
        super().__init__(
            name=name or f"timm:{timm_name}",
            tile_size_px=tile_size_px,
            patch_size_px=patch,
            embed_dim=embed,
            mean=mean,
            std=std,
            autocast=autocast,
        )
        self.timm_name = timm_name
        self.timm_kwargs = kwargs
        self.snapshot_archs = tuple(snapshot_archs)
        self.is_vit = is_vit
        self.config = config
        self.arch = arch or f"timm {timm_name}"
        if weights_hint:
            self.weights_hint = weights_hint
        self.trunk = trunk
        self.num_prefix = int(trunk.num_prefix_tokens) if is_vit else 0
        if is_vit:
            # Fused scaled-dot-product attention in every block (flash / memory-efficient on CUDA).
            for module in trunk.modules():
                if hasattr(module, "fused_attn"):
                    module.fused_attn = True  # type: ignore[assignment]
        self.register_state_dict_post_hook(_strip_trunk)
        self.register_load_state_dict_pre_hook(_add_trunk)
        # Buffers outside the state_dict (e.g. rotary-embedding tables of EVA-style models) are
        # computed by timm at construction: no weight file holds them, so build such a model on
        # the CPU and put them back after the parameters are allocated or loaded.
        persistent = set(trunk.state_dict())
        computed = [n for n, _ in trunk.named_buffers() if n not in persistent]
        saved: dict[str, Tensor] = {}
        if computed:
            import timm

            kwargs_cpu = {k: v for k, v in kwargs.items() if k != "pretrained"}
            cpu_trunk = timm.create_model(timm_name, pretrained=False, **kwargs_cpu)
            saved = {n: b for n, b in cpu_trunk.named_buffers() if n in set(computed)}
        self._put_buffers(saved, torch.device("cpu"))  # before: nothing stays on meta
        self._materialize(weights=weights, seed=seed, device=device, dtype=dtype)
        self._put_buffers(saved, self.device)  # after: to_empty() of a random init wiped them

    def _put_buffers(self, buffers: dict[str, Tensor], device: torch.device) -> None:
        for full, buf in buffers.items():
            owner_name, _, leaf = full.rpartition(".")
            owner = self.trunk.get_submodule(owner_name) if owner_name else self.trunk
            owner._buffers[leaf] = buf.to(device=device)

    @staticmethod
    def _probe_cnn(trunk: Any, tile: int, timm_name: str, patch: int | None) -> tuple[int, int]:
        """Channels and cell size of a CNN's ``forward_features`` map, from a meta forward."""
        with torch.no_grad():
            out = trunk.forward_features(torch.empty(1, 3, tile, tile, device="meta"))
        if out.ndim != 4 or out.shape[2] != out.shape[3] or tile % out.shape[2]:
            raise InputError(
                f"timm {timm_name!r} gives features of shape {list(out.shape)} for {tile} px "
                "tiles, expected a square [B, C, h, w] map that divides the tile; pass another "
                "tile size"
            )
        side = int(out.shape[2])
        if patch is not None and tile // side != patch:
            raise InputError(
                f"timm {timm_name!r} gives a {side} x {side} grid on {tile} px tiles (cells of "
                f"{tile // side} px), not patch_size_px={patch}; drop --patch-size or fix it"
            )
        return int(out.shape[1]), tile // side

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _DELEGATED:
                trunk = self._modules.get("trunk")
                if trunk is not None:
                    return getattr(trunk, name)
            raise

    # ------------------------------------------------------------------------ initialisation
    def _reset_parameters(self, generator: torch.Generator) -> None:
        init = nn.init
        trunk = self.trunk
        if self.is_vit:
            if getattr(trunk, "pos_embed", None) is not None:
                init.trunc_normal_(trunk.pos_embed, std=0.02, generator=generator)
            if getattr(trunk, "cls_token", None) is not None:
                init.normal_(trunk.cls_token, std=1e-6, generator=generator)
            if getattr(trunk, "reg_token", None) is not None:
                init.normal_(trunk.reg_token, std=1e-6, generator=generator)
        for module in trunk.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                if self.is_vit:
                    init.trunc_normal_(module.weight, std=0.02, generator=generator)
                else:
                    init.kaiming_normal_(
                        module.weight, mode="fan_out", nonlinearity="relu", generator=generator
                    )
                if module.bias is not None:
                    init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.BatchNorm2d):
                if module.weight is not None:
                    init.ones_(module.weight)
                    init.zeros_(module.bias)
                if isinstance(module, nn.BatchNorm2d):
                    module.reset_running_stats()
            elif hasattr(module, "gamma") and hasattr(module, "init_values"):
                init.constant_(module.gamma, module.init_values)
        # Anything not covered above (e.g. exotic timm layers) gets a small seeded value, never
        # the uninitialised memory of to_empty().
        covered = {
            id(p)
            for m in trunk.modules()
            for p in m.parameters(recurse=False)
            if isinstance(m, nn.Linear | nn.Conv2d | nn.LayerNorm | nn.GroupNorm | nn.BatchNorm2d)
            or hasattr(m, "init_values")
        }
        covered |= {
            id(getattr(trunk, a))
            for a in ("pos_embed", "cls_token", "reg_token")
            if self.is_vit and getattr(trunk, a, None) is not None
        }
        for p in trunk.parameters():
            if id(p) not in covered:
                init.trunc_normal_(p, std=0.02, generator=generator)

    # ------------------------------------------------------------------------ weight files
    def _snapshot_archs(self) -> tuple[str, ...]:
        return self.snapshot_archs

    def _pos_embed_grid(self) -> tuple[int, int] | None:
        pos = getattr(self.trunk, "pos_embed", None) if self.is_vit else None
        if not isinstance(pos, Tensor) or pos.ndim != 3:
            return None  # no absolute embedding (e.g. rotary), or not [1, N, D]
        h, w = self.trunk.patch_embed.grid_size
        return int(h), int(w)

    def _adapt_state(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        from fastinsight.encoders.weights import convert_dinov2_hub

        if self.is_vit and "mask_token" in state:
            return convert_dinov2_hub(
                state,
                reg_tokens=int(self.trunk.num_reg_tokens),
                encoder=self.name,
                what=self.weights_hint,
            )
        return state, []

    # ------------------------------------------------------------------------------ running
    def forward_features(self, x: Tensor) -> Tensor:
        """timm's ``forward_features``: all tokens after the final norm, prefix tokens first.

        Shapes: ``[B, 3, T, T]`` -> ``[B, P + h*w, D]`` (ViT) or ``[B, C, h, w]`` (CNN).
        """
        self._check_input(x)
        return self.trunk.forward_features(x)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Patch tokens in row-major order, prefix (class, register) tokens dropped.

        Shapes: ``[B, 3, T, T]`` -> ``[B, h*w, C]`` (a view of ``forward_features``; per sample
        contiguous, i.e. the channels-last layout of the grid).
        """
        out = self.forward_features(x)
        if out.ndim == 4:
            return out.flatten(2).transpose(1, 2)
        return out[:, self.num_prefix :]

    def forward(self, x: Tensor) -> Tensor:
        """Patch tokens as a channels-first grid (prefix tokens dropped), contiguous.

        Shapes: ``[B, 3, T, T]`` -> ``[B, C, T/p, T/p]``.
        """
        if not self.is_vit:
            self._check_input(x)
            return self.trunk.forward_features(x).contiguous()
        tokens = self.forward_tokens(x)
        b, _, d = tokens.shape
        h, w = self.grid_size
        return tokens.transpose(1, 2).reshape(b, d, h, w).contiguous()

    def extra_identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {"timm_model": self.timm_name, "num_prefix_tokens": self.num_prefix}
        cfg = self.config
        if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
            ident["config"] = dataclasses.asdict(cfg)
        return ident


class ViTEncoder(TimmEncoder):
    """A timm ``VisionTransformer`` from a :class:`ViTConfig`; by default UNI's ViT-L/16.

    ``device="meta"`` with no weights allocates nothing (to inspect the full-size key table).

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
            config.timm_model,
            config.timm_kwargs(),
            tile_size_px=config.tile_size_px,
            name=name,
            weights=weights,
            seed=seed,
            mean=mean,
            std=std,
            device=device,
            dtype=dtype,
            autocast=autocast,
            arch=arch
            or (
                f"ViT (timm VisionTransformer; D={config.embed_dim}, depth={config.depth}, "
                f"heads={config.num_heads}, patch={config.patch_size_px}, "
                f"registers={config.reg_tokens}, mlp={config.mlp})"
            ),
            weights_hint=weights_hint,
            config=config,
        )


def compile_encoder(
    encoder: nn.Module, *, mode: str | None = None, backend: Any = "inductor"
) -> nn.Module:
    """``torch.compile`` the encoder in place with a static batch (``dynamic=False``).

    For a timm ViT the token path ``forward_tokens`` is compiled (``encode_tokens`` and
    ``encode`` both go through it); other encoders compile their ``forward``. A different batch
    size (a slide's last, short batch) compiles once more; pad batches to one size to avoid that.
    Returns the encoder.
    """
    if getattr(encoder, "is_vit", False):
        fn: Any = encoder.forward_tokens
        compiled = torch.compile(fn, dynamic=False, mode=mode, backend=backend)
        object.__setattr__(encoder, "forward_tokens", compiled)
    else:
        encoder.compile(dynamic=False, mode=mode, backend=backend)
    return encoder


def tokens_to_grid(tokens: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """View ``[B, h*w, C]`` tokens as a ``[B, C, h, w]`` grid without copying (channels-last).

    Shapes: ``[B, h*w, C]`` -> ``[B, C, h, w]``.
    """
    b, n, c = tokens.shape
    h, w = grid_size
    if n != h * w:
        raise InputError(f"expected {h * w} tokens for a {h} x {w} grid, found {n}")
    return tokens.unflatten(1, (h, w)).permute(0, 3, 1, 2)
