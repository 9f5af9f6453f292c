"""CLAM's ResNet50-trunc: an ImageNet ResNet-50 cut after ``layer3``, kept as a token grid.

CLAM (Lu et al., Nature BME 2021) encodes tiles with torchvision's ImageNet ResNet-50 up to and
including ``layer3`` (1024 channels at stride 16) and average-pools that map to a 1024 vector.
We keep the ``1024 x 14 x 14`` map (224 px tiles), one cell per 16 px, as the token grid.

Key names and shapes are torchvision's ``resnet50`` (``conv1.weight``, ``bn1.*``,
``layer1.0.conv1.weight``, ..., ``layer3.5.bn3.*``, ``layerN.0.downsample.{0,1}.*``), written from
the architecture (Bottleneck blocks with the stride on the 3x3 convolution, "ResNet v1.5", as
torchvision and CLAM have it). A weight file may also carry ``layer4.*`` and ``fc.*``: those are
ignored with a note. BatchNorm's ``num_batches_tracked`` may be absent (files saved before
PyTorch 0.4.1, such as CLAM's ``resnet50-19c8e357.pth``); the encoder always runs in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastinsight.encoders.base import IMAGENET_MEAN, IMAGENET_STD, StateDictEncoder
from fastinsight.encoders.weights import PathLike
from fastinsight.errors import InputError

#: Total stride of the stem (conv1 /2, maxpool /2) and layer2, layer3 (/2 each).
RESNET_TRUNC_STRIDE = 16


@dataclass(frozen=True)
class ResNetTruncConfig:
    """Architecture of a truncated ResNet. The defaults are ResNet-50 up to ``layer3``.

    ``width`` is the stem width and ``layer1``'s bottleneck width (64 for ResNet-50); ``layer2``
    and ``layer3`` use 2x and 4x that, and each block expands by 4, so the grid has
    ``16 * width`` channels (1024).
    """

    layers: tuple[int, int, int] = (3, 4, 6)
    width: int = 64
    tile_size_px: int = 224
    bn_eps: float = 1e-5

    def __post_init__(self) -> None:
        problems = []
        if len(self.layers) != 3 or min(self.layers) < 1:
            problems.append(f"layers must be three block counts >= 1, got {self.layers}")
        if self.width < 1:
            problems.append(f"width must be >= 1, got {self.width}")
        if self.tile_size_px < RESNET_TRUNC_STRIDE or self.tile_size_px % RESNET_TRUNC_STRIDE:
            problems.append(
                f"tile_size_px must be a positive multiple of {RESNET_TRUNC_STRIDE}, got "
                f"{self.tile_size_px}"
            )
        if problems:
            raise InputError("invalid ResNet-trunc configuration: " + "; ".join(problems))

    @property
    def embed_dim(self) -> int:
        """Channels of ``layer3``'s output."""
        return 4 * 4 * self.width


RESNET50_TRUNC_CONFIG = ResNetTruncConfig()


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4; BN after each; projection shortcut.

    Shapes: ``[B, inplanes, H, W]`` -> ``[B, 4 * planes, H / stride, W / stride]``.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, eps: float) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, eps=eps)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=eps)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out, eps=eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out, eps=eps),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


def _make_layer(inplanes: int, planes: int, blocks: int, stride: int, eps: float) -> nn.Sequential:
    layers = [Bottleneck(inplanes, planes, stride, eps)]
    layers += [Bottleneck(planes * Bottleneck.expansion, planes, 1, eps) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNetTruncEncoder(StateDictEncoder):
    """ResNet truncated after ``layer3``; with the default config, CLAM's ResNet50-trunc.

    Random initialisation (from ``seed``) is torchvision's: Kaiming-normal (fan-out, ReLU)
    convolutions, BatchNorm weight 1 and bias 0, running statistics 0 and 1.

    Shapes: ``encode``: ``[B, T, T, 3]`` uint8 -> ``[B, 16 * width, T/16, T/16]``.
    """

    def __init__(
        self,
        config: ResNetTruncConfig = RESNET50_TRUNC_CONFIG,
        *,
        name: str = "resnet-trunc",
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
            patch_size_px=RESNET_TRUNC_STRIDE,
            embed_dim=config.embed_dim,
            mean=mean,
            std=std,
            autocast=autocast,
        )
        self.config = config
        self.arch = arch or (
            f"ResNet truncated after layer3 (torchvision layout; layers={list(config.layers)}, "
            f"width={config.width})"
        )
        if weights_hint:
            self.weights_hint = weights_hint
        w, eps = config.width, config.bn_eps
        n1, n2, n3 = config.layers
        with torch.device("meta"):
            self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(w, eps=eps)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.layer1 = _make_layer(w, w, n1, 1, eps)
            self.layer2 = _make_layer(4 * w, 2 * w, n2, 2, eps)
            self.layer3 = _make_layer(8 * w, 4 * w, n3, 2, eps)
        self._materialize(weights=weights, seed=seed, device=device, dtype=dtype)

    def _reset_parameters(self, generator: torch.Generator) -> None:
        init = nn.init
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                init.kaiming_normal_(
                    module.weight, mode="fan_out", nonlinearity="relu", generator=generator
                )
            elif isinstance(module, nn.BatchNorm2d):
                init.ones_(module.weight)
                init.zeros_(module.bias)
                module.reset_running_stats()

    def _ignorable_key(self, key: str) -> bool:
        # The full torchvision ResNet-50 file also holds layer4 and the ImageNet classifier.
        return key.startswith(("layer4.", "fc."))

    def _optional_key(self, key: str) -> bool:
        return key.endswith("num_batches_tracked")

    def _fill_optional(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        for key, ref in self.state_dict(keep_vars=True).items():
            if key not in state and self._optional_key(key):
                state[key] = torch.zeros((), dtype=ref.dtype)
        return state

    def forward(self, x: Tensor) -> Tensor:
        """``layer3``'s feature map.

        Shapes: ``[B, 3, T, T]`` -> ``[B, 16 * width, T/16, T/16]``.
        """
        self._check_input(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))
