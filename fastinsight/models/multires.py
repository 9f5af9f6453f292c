"""The multi-resolution weakly supervised network of Yao et al. 2018 (arXiv 1803.07703).

"Weakly supervised medical diagnosis and localization from multiple resolutions": a ResNet-style
down path, DenseNet-style blocks that keep resolution, upsampling with channel concatenation, a
1x1 head giving a per-class saliency map, and log-sum-exp pooling with a learnt lower bound
adaptation (LSE-LBA) from the map to image scores.

What is known and what is chosen here (the paper's full text could not be read; see
docs/radiographs.md and the shared notes, section 2):

- **Known (abstract, summaries)**: ResNet-style encoder, DenseNet-style blocks, upsampling +
  concatenation, saliency map, LSE-LBA with ``r = r0 + exp(beta)``.
- **Secondary (third-party code comments, not the paper)**: 512 px input, a /64 bottleneck (8 x 8),
  three x2 up-stages to a **64 x 64 map**, ``S`` = sigmoid probabilities before LSE-LBA,
  ``r0 = 10``. These are the defaults here.
- **Chosen**: the stage widths (``width * (1, 1, 2, 4, 8, 8)``; the third party tied them to K,
  we make the base width a parameter, default 32); basic residual blocks (two 3x3 convs, one per
  down stage, configurable); DenseNet blocks of ``dense_layers`` BN-ReLU-Conv3x3 layers with
  growth ``growth`` on each skip path; nearest-neighbour x2 upsampling (the summary's; the third
  party used bilinear: ``upsample="bilinear"``); ``beta`` per class, initialised to 0
  (``r = r0 + 1``); the input normalisation of PYLON (mean 0.4984, sd 0.2483 of u8/255), so one
  reader serves both models.
- **Map as probabilities or logits**: ``map_is_prob=True`` (default) pools ``sigmoid(s)`` and
  trains with BCE on the pooled probability clamped to ``(eps, 1 - eps)``; ``False`` pools the
  logits and applies a sigmoid to the pooled value (BCE-with-logits).

The pooling is :func:`fastinsight.ops.pooling.lse_lba` (the package's stable implementation; nothing
is re-implemented here).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastinsight.errors import CheckpointError
from fastinsight.models.radiograph_common import (
    FAMILY_KEY,
    RadiographConfig,
    RadiographPrediction,
    check_finite_prediction,
    eval_mode,
    model_from_metadata,
    model_input,
    read_family_safetensors,
    ready,
    save_radiograph_model,
    stats_problems,
)
from fastinsight.ops.pooling import lse_lba

FAMILY = "multires"
NAME = "the multi-resolution network"
Upsample = Literal["nearest", "bilinear"]


@dataclass(frozen=True)
class MultiResConfig(RadiographConfig):
    """Geometry, widths and pooling of the multi-resolution LSE-LBA network."""

    num_classes: int = 14
    in_channels: int = 1
    width: int = 32
    blocks_per_stage: int = 1
    dense_layers: int = 2
    growth: int = 16
    upsample: Upsample = "nearest"
    r0: float = 10.0
    map_is_prob: bool = True
    prob_eps: float = 1e-6
    image_size: int = 512
    mean: float = 0.4984
    std: float = 0.2483
    class_names: tuple[str, ...] = ()
    FAMILY: ClassVar[str] = FAMILY
    LABEL: ClassVar[str] = "multi-resolution"

    def _problems(self) -> list[str]:
        problems = []
        if self.num_classes < 1 or self.width < 1 or self.growth < 1:
            problems.append("num_classes, width and growth must be >= 1")
        if self.blocks_per_stage < 1 or self.dense_layers < 1:
            problems.append("blocks_per_stage and dense_layers must be >= 1")
        if self.upsample not in ("nearest", "bilinear"):
            problems.append(f"upsample must be 'nearest' or 'bilinear', got {self.upsample!r}")
        if not 0 <= self.r0 < math.inf:
            # r = r0 + exp(beta): an infinite r0 makes LSE-LBA's r * S overflow to NaN scores.
            problems.append(f"r0 must be finite and >= 0, got {self.r0}")
        if not 0 < self.prob_eps < 0.5:
            # the BCE clamp (eps, 1 - eps) is empty for eps >= 0.5
            problems.append(f"prob_eps must be in (0, 0.5), got {self.prob_eps}")
        problems += stats_problems(self.mean, self.std)
        if self.image_size < 64 or self.image_size % 64:
            problems.append(f"image_size must be a multiple of 64, got {self.image_size}")
        problems += self.class_problems()
        return problems


class ResBlock(nn.Module):
    """Basic residual block (3x3, 3x3) with a strided 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.proj: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.proj is None else self.proj(x)))


class DenseBlock(nn.Module):
    """DenseNet block at constant resolution: each layer sees the concatenation of all before.

    Shapes: ``[B, c, h, w]`` -> ``[B, c + layers * growth, h, w]``.
    """

    def __init__(self, cin: int, layers: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.BatchNorm2d(cin + i * growth),
                nn.ReLU(),
                nn.Conv2d(cin + i * growth, growth, 3, padding=1, bias=False),
            )
            for i in range(layers)
        )
        self.out_channels = cin + layers * growth

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, dim=1)))
        return torch.cat(feats, dim=1)


class MultiResModel(nn.Module):
    """512 px -> /64 bottleneck -> three x2 up-stages -> ``[B, K, 64, 64]`` saliency -> LSE-LBA."""

    family = FAMILY
    modality = "radiograph"

    def __init__(self, config: MultiResConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config or MultiResConfig()
        w = cfg.width
        widths = (w, w, 2 * w, 4 * w, 8 * w, 8 * w)  # /2, /4, /8, /16, /32, /64
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, w, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
        )
        stages = []
        for i in range(1, 6):
            blocks = [ResBlock(widths[i - 1], widths[i], 2)]
            blocks += [ResBlock(widths[i], widths[i], 1) for _ in range(cfg.blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
        self.down = nn.ModuleList(stages)
        # Up-stages from /64 to /32, /16, /8, each concatenating a dense-block skip.
        self.skips = nn.ModuleList()
        self.fuse = nn.ModuleList()
        c = widths[5]
        for skip_c, out_c in (
            (widths[4], widths[4]),
            (widths[3], widths[3]),
            (widths[2], widths[2]),
        ):
            dense = DenseBlock(skip_c, cfg.dense_layers, cfg.growth)
            self.skips.append(dense)
            self.fuse.append(
                nn.Sequential(
                    nn.Conv2d(c + dense.out_channels, out_c, 1, bias=False),
                    nn.BatchNorm2d(out_c),
                    nn.ReLU(),
                )
            )
            c = out_c
        self.head = nn.Conv2d(c, cfg.num_classes, 1)
        # LSE-LBA's learnable lower-bound adaptation, r = r0 + exp(beta), one beta per class.
        self.beta = nn.Parameter(torch.zeros(cfg.num_classes))

    @property
    def stride(self) -> int:
        return 8

    @property
    def sharpness(self) -> Tensor:
        """``r = r0 + exp(beta)``. Shapes: -> ``[K]``."""
        return self.config.r0 + torch.exp(self.beta)

    def forward(self, x: Tensor) -> Tensor:
        """Saliency logits. Shapes: ``[B, 1, H, W]`` (multiples of 64) -> ``[B, K, H/8, W/8]``.

        Any float dtype is cast to the weights' dtype; see ``model_input`` for what is refused.
        """
        x = model_input(x, self, 64, NAME, self.config.in_channels)
        feats = []
        y = self.stem(x)
        for stage in self.down:
            y = stage(y)
            feats.append(y)
        y = feats[-1]
        for skip, fuse, f in zip(
            self.skips, self.fuse, (feats[3], feats[2], feats[1]), strict=False
        ):
            if self.config.upsample == "nearest":
                y = F.interpolate(y, scale_factor=2.0, mode="nearest")
            else:
                y = F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)
            y = fuse(torch.cat([y, skip(f)], dim=1))
        return self.head(y).float()

    def pool(self, logits: Tensor) -> Tensor:
        """Image scores in [0, 1] by LSE-LBA. Shapes: ``[B, K, h, w]`` -> ``[B, K]``."""
        b, k = logits.shape[:2]
        values = torch.sigmoid(logits) if self.config.map_is_prob else logits
        r = self.sharpness.repeat(b)  # the [B*K] rows below are batch-major
        pooled = lse_lba(values.reshape(b * k, -1), None, r).reshape(b, k)
        return pooled if self.config.map_is_prob else torch.sigmoid(pooled)

    @torch.no_grad()
    def predict(self, x: Tensor) -> RadiographPrediction:
        """Saliency logits and LSE-LBA image scores. Shapes: ``[B, 1, H, W]`` -> see result.

        Runs in eval mode whatever mode the model is in (BatchNorm on its running statistics,
        no buffer changes) and leaves the mode as it was. Any float dtype is accepted (cast to
        the weights'); NaN/inf in the input, or an overflow, is one InputError.
        """
        x = model_input(x, self, 64, NAME, self.config.in_channels)
        with eval_mode(self):
            logits = self(x)
        scores = self.pool(logits)
        check_finite_prediction(x, logits, scores, NAME)
        return RadiographPrediction(logits=logits, scores=scores)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def is_multires_state_dict(state: dict[str, Any]) -> bool:
    return "beta" in state and "head.weight" in state and "stem.0.weight" in state


def multires_from_state_dict(state: dict[str, Tensor], source: str) -> MultiResModel:
    """A plain state_dict does not carry r0, the map convention or the geometry: refuse it."""
    raise CheckpointError(
        f"{source}: a plain state_dict of the multi-resolution network does not say its r0, "
        "map convention or widths; save it with fastinsight.models.multires.save_multires "
        "(.safetensors with the config)"
    )


def accepts_multires_file(ckpt: Any) -> bool:
    """Sniffer entry (duck-typed CheckpointFile of fastinsight.models.checkpoints)."""
    if ckpt.format == "torch":
        return is_multires_state_dict(ckpt.state)
    return ckpt.metadata.get(FAMILY_KEY) == FAMILY


def load_multires_file(ckpt: Any, backend: str = "auto") -> MultiResModel:
    if ckpt.format == "torch":
        return multires_from_state_dict(ckpt.state, str(ckpt.path))
    return model_from_metadata(
        MultiResModel, MultiResConfig, ckpt.metadata, ckpt.state, str(ckpt.path)
    )


def load_multires(
    path: str | os.PathLike[str], device: str | torch.device | None = None
) -> MultiResModel:
    """Load a fastinsight multi-resolution ``.safetensors`` (config embedded)."""
    p = Path(path).expanduser()
    meta, state = read_family_safetensors(p, MultiResConfig)
    return ready(model_from_metadata(MultiResModel, MultiResConfig, meta, state, str(p)), device)


def save_multires(model: MultiResModel, path: str | os.PathLike[str]) -> None:
    """Write safetensors with the config embedded (atomically)."""
    save_radiograph_model(model, path)


__all__ = [
    "MultiResConfig",
    "MultiResModel",
    "is_multires_state_dict",
    "load_multires",
    "save_multires",
]
