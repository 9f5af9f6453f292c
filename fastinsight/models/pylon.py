"""PYLON (Preeyanon et al., cmb-chula/pylon): a chest-radiograph segmentation-style classifier.

Written from the published module tree (see docs/radiographs.md); the parameter names are the
official ones, so the released ``pylon,nih,256.pkl`` state_dicts load unchanged.

Architecture (input ``[B, 1, H, W]``, H and W multiples of 256):

- **encoder**: ResNet-50 in torchvision naming (``conv1/bn1``, ``layer1..4`` of Bottleneck blocks
  ``[3, 4, 6, 3]`` with the stride on ``conv2``; convolutions without bias), one input channel.
  Features ``f2`` (256 ch, /4), ``f3`` (512, /8), ``f4`` (1024, /16), ``f5`` (2048, /32).
- **PA** (pyramid attention, the FPA block of PAN without its global branch) on ``f5``:
  ``mid = CBR1x1(f5)``; ``x1 = CBR7(maxpool(f5))``, ``x2 = CBR5(maxpool(x1))``,
  ``x3 = CBR3(maxpool(x2))``; ``y = up(conv3(x3)) + conv2(x2)``; ``y = up(y) + conv1(x1)``;
  ``out = up(y) * mid`` where ``up`` doubles the side. Three /2 steps below ``f5`` are why a side
  must be a multiple of 32 * 8 = 256 (the official code fails at 320, 384, 448).
- **UP** x3: ``up_k(dec, skip) = resize(dec, skip.size) + conv1(skip)`` with ``conv1`` one
  (``'1layer'``, arXiv 2020 weights) or two (``'2layer'``, released since 2021-03) ConvBnReLU 1x1.
- **segmentation head**: a 1x1 convolution (with bias) to K class logits at /4.

Every resize is bilinear with ``align_corners=True``, as in the official code. The CAM is the
logit map ``[B, K, H/4, W/4]``; the image score is ``sigmoid(max_{h,w} logits)`` (the official
``AdaptiveMaxPool2d(1)`` on logits, then BCE-with-logits in training).

Checkpoints: the official plain ``state_dict`` (keys ``net.…``; 411 entries '2layer', 390
'1layer'), read with ``torch.load(weights_only=True)``, the variant told from the keys and K from
the head's shape; or fastinsight's safetensors with this module's ``PylonConfig`` as JSON. Every
key is checked (name, shape, dtype) before anything is loaded: a file that matches only in part is
refused naming its first offending key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastinsight.errors import CheckpointError
from fastinsight.models.config import InvalidConfigError
from fastinsight.models.radiograph_common import (
    FAMILY_KEY,
    NIH14_CLASSES,
    RadiographConfig,
    RadiographPrediction,
    check_finite_prediction,
    eval_mode,
    load_state_checked,
    model_from_metadata,
    model_input,
    read_family_safetensors,
    ready,
    save_radiograph_model,
    sniff_weights_file,
    stats_problems,
)
from fastinsight.models.statefiles import read_torch_state_dict

UpType = Literal["1layer", "2layer"]
FAMILY = "pylon"
SIDE_MULTIPLE = 256


@dataclass(frozen=True)
class PylonConfig(RadiographConfig):
    """PYLON's architecture and its input transform; the defaults are the released NIH model.

    ``stem_width`` / ``layers`` / ``dec_channels`` give reduced variants of the same topology
    (the official model is 64 / (3, 4, 6, 3) / 128). ``image_size`` is the side the image is
    resized to (256 for the released weights; 512 also works); ``mean``/``std`` normalise
    ``u8 / 255`` as the official eval transform does.
    """

    num_classes: int = 14
    up_type: UpType = "2layer"
    in_channels: int = 1
    stem_width: int = 64
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    dec_channels: int = 128
    image_size: int = 256
    mean: float = 0.4984
    std: float = 0.2483
    class_names: tuple[str, ...] = ()
    FAMILY: ClassVar[str] = FAMILY
    LABEL: ClassVar[str] = "PYLON"
    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("layers", "class_names")

    def _problems(self) -> list[str]:
        problems = []
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        if self.up_type not in ("1layer", "2layer"):
            problems.append(f"up_type must be '1layer' or '2layer', got {self.up_type!r}")
        if len(self.layers) != 4 or min(self.layers) < 1:
            problems.append(f"layers must be four block counts >= 1, got {self.layers}")
        if self.stem_width < 1 or self.dec_channels < 1 or self.in_channels < 1:
            problems.append("stem_width, dec_channels and in_channels must be >= 1")
        if self.image_size < SIDE_MULTIPLE or self.image_size % SIDE_MULTIPLE:
            problems.append(f"image_size must be a multiple of 256, got {self.image_size}")
        problems += stats_problems(self.mean, self.std)
        problems += self.class_problems()
        return problems


# ============================================================================== building blocks


class ConvBnRelu(nn.Module):
    """``relu(bn(conv(x)))`` with a biased convolution (keys ``conv.*``, ``bn.*``)."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=True)
        self.bn = nn.BatchNorm2d(cout)
        self.activation = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """torchvision's ResNet V1.5 bottleneck (1x1, 3x3 with the stride, 1x1 x4), bias-free convs."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(y + skip)


class ResNetEncoder(nn.Module):
    """ResNet-50 trunk without ``avgpool``/``fc``. Returns ``(f2, f3, f4, f5)`` at /4 ... /32."""

    def __init__(self, in_channels: int, stem_width: int, layers: tuple[int, ...]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._inplanes = stem_width
        self.layer1 = self._stage(stem_width, layers[0], 1)
        self.layer2 = self._stage(stem_width * 2, layers[1], 2)
        self.layer3 = self._stage(stem_width * 4, layers[2], 2)
        self.layer4 = self._stage(stem_width * 8, layers[3], 2)
        self.out_channels = tuple(stem_width * 2**i * Bottleneck.expansion for i in range(4))

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        stage = []
        for b in range(blocks):
            stage.append(Bottleneck(self._inplanes, planes, stride if b == 0 else 1))
            self._inplanes = planes * Bottleneck.expansion
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f2 = self.layer1(x)
        f3 = self.layer2(f2)
        f4 = self.layer3(f3)
        f5 = self.layer4(f4)
        return f2, f3, f4, f5


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    # The official code resizes bilinearly with align_corners=True everywhere.
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _double(x: Tensor) -> Tensor:
    return _resize(x, (2 * x.shape[-2], 2 * x.shape[-1]))


class PA(nn.Module):
    """Pyramid attention on the bottleneck feature (keys ``mid``, ``down1..3``, ``conv1..3``)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.mid = nn.Sequential(ConvBnRelu(cin, cout, 1))
        self.down1 = nn.Sequential(nn.MaxPool2d(2), ConvBnRelu(cin, 1, 7))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), ConvBnRelu(1, 1, 5))
        self.down3 = nn.Sequential(nn.MaxPool2d(2), ConvBnRelu(1, 1, 3))
        self.conv3 = ConvBnRelu(1, 1, 3)
        self.conv2 = ConvBnRelu(1, 1, 5)
        self.conv1 = ConvBnRelu(1, 1, 7)

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: ``[B, cin, h, w]`` (h, w multiples of 8) -> ``[B, cout, h, w]``."""
        mid = self.mid(x)
        x1 = self.down1(x)
        x2 = self.down2(x1)
        x3 = self.down3(x2)
        y = _double(self.conv3(x3)) + self.conv2(x2)
        y = _double(y) + self.conv1(x1)
        return _double(y) * mid


class UP(nn.Module):
    """``resize(dec, skip) + conv1(skip)``; conv1 is one or two ConvBnReLU 1x1."""

    def __init__(self, cin: int, cout: int, up_type: UpType) -> None:
        super().__init__()
        if up_type == "1layer":
            self.conv1: nn.Module = ConvBnRelu(cin, cout, 1)
        else:
            self.conv1 = nn.Sequential(ConvBnRelu(cin, cin, 1), ConvBnRelu(cin, cout, 1))

    def forward(self, skip: Tensor, dec: Tensor) -> Tensor:
        """Shapes: skip ``[B, cin, h, w]``, dec ``[B, cout, h', w']`` -> ``[B, cout, h, w]``."""
        return _resize(dec, (skip.shape[-2], skip.shape[-1])) + self.conv1(skip)


class PylonDecoder(nn.Module):
    def __init__(self, enc_channels: tuple[int, ...], dec: int, up_type: UpType) -> None:
        super().__init__()
        c2, c3, c4, c5 = enc_channels
        self.pa = PA(c5, dec)
        self.up3 = UP(c4, dec, up_type)
        self.up2 = UP(c3, dec, up_type)
        self.up1 = UP(c2, dec, up_type)

    def forward(self, f2: Tensor, f3: Tensor, f4: Tensor, f5: Tensor) -> Tensor:
        x = self.pa(f5)
        x = self.up3(f4, x)
        x = self.up2(f3, x)
        return self.up1(f2, x)


class PylonCore(nn.Module):
    """``net``: encoder, decoder and the 1x1 segmentation head (keys ``segmentation_head.0``)."""

    def __init__(self, config: PylonConfig) -> None:
        super().__init__()
        self.encoder = ResNetEncoder(config.in_channels, config.stem_width, config.layers)
        self.decoder = PylonDecoder(self.encoder.out_channels, config.dec_channels, config.up_type)
        self.segmentation_head = nn.Sequential(
            nn.Conv2d(config.dec_channels, config.num_classes, 1, bias=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.segmentation_head(self.decoder(*self.encoder(x)))


class PylonModel(nn.Module):
    """PYLON with the official parameter names (``net.encoder…``, ``net.decoder…``)."""

    family = FAMILY
    modality = "radiograph"

    def __init__(self, config: PylonConfig | None = None) -> None:
        super().__init__()
        self.config = config or PylonConfig()
        self.net = PylonCore(self.config)

    @property
    def stride(self) -> int:
        """Input pixels per CAM pixel."""
        return 4

    def forward(self, x: Tensor) -> Tensor:
        """Class logit maps. Shapes: ``[B, 1, H, W]`` -> ``[B, K, H/4, W/4]`` float32.

        Any float dtype is cast to the weights' dtype; see ``model_input`` for what is refused.
        """
        x = model_input(x, self, SIDE_MULTIPLE, "PYLON", self.config.in_channels)
        return self.net(x).float()

    @staticmethod
    def pool(logits: Tensor) -> Tensor:
        """The official global max over the map. Shapes: ``[B, K, h, w]`` -> ``[B, K]``."""
        return logits.amax(dim=(-2, -1))

    @torch.no_grad()
    def predict(self, x: Tensor) -> RadiographPrediction:
        """CAM and image scores ``sigmoid(max logits)``. Shapes: ``[B, 1, H, W]`` -> see result.

        Runs in eval mode whatever mode the model is in (BatchNorm on its running statistics,
        no buffer changes) and leaves the mode as it was. Any float dtype is accepted (cast to
        the weights'); NaN/inf in the input, or an overflow, is one InputError.
        """
        x = model_input(x, self, SIDE_MULTIPLE, "PYLON", self.config.in_channels)
        with eval_mode(self):
            logits = self(x)
        scores = torch.sigmoid(self.pool(logits))
        check_finite_prediction(x, logits, scores, "PYLON")
        return RadiographPrediction(logits=logits, scores=scores)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ==================================================================================== checkpoints


def _block_counts(keys: list[str]) -> tuple[int, int, int, int]:
    counts = []
    for i in range(1, 5):
        pat = re.compile(rf"^net\.encoder\.layer{i}\.(\d+)\.")
        idx = {int(m.group(1)) for k in keys if (m := pat.match(k))}
        counts.append(max(idx) + 1 if idx else 0)
    return tuple(counts)  # type: ignore[return-value]


def config_from_state_dict(state: dict[str, Tensor], source: str = "state_dict") -> PylonConfig:
    """Read variant, K and widths off an official PYLON state_dict's keys and shapes."""
    head = state.get("net.segmentation_head.0.weight")
    stem = state.get("net.encoder.conv1.weight")
    if head is None or stem is None or head.ndim != 4 or stem.ndim != 4:
        first = next(iter(state), "<empty>")
        raise CheckpointError(
            f"{source}: not a PYLON checkpoint (no 'net.segmentation_head.0.weight' / "
            f"'net.encoder.conv1.weight' 4-D tensors; first key {first!r}); pass the "
            "state_dict saved by the official PYLON code or a fastinsight .safetensors"
        )
    if "net.decoder.up3.conv1.0.conv.weight" in state:
        up_type: UpType = "2layer"
    elif "net.decoder.up3.conv1.conv.weight" in state:
        up_type = "1layer"
    else:
        raise CheckpointError(
            f"{source}: PYLON decoder key 'net.decoder.up3.conv1.0.conv.weight' ('2layer') or "
            "'net.decoder.up3.conv1.conv.weight' ('1layer') is missing"
        )
    layers = _block_counts(list(state))
    if min(layers) < 1:
        raise CheckpointError(f"{source}: PYLON encoder stages have {layers} blocks; one is empty")
    try:
        return PylonConfig(
            num_classes=int(head.shape[0]),
            up_type=up_type,
            in_channels=int(stem.shape[1]),
            stem_width=int(stem.shape[0]),
            layers=layers,
            dec_channels=int(head.shape[1]),
        )
    except InvalidConfigError as exc:  # read off the file's shapes: the file is at fault
        raise CheckpointError(f"{source}: {exc}") from None


NET_PREFIX = "net."


def with_net_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with PYLON's ``net.`` prefix on every key when none has it.

    The official trainer saves ``model.state_dict()`` (keys ``net.encoder...``); saving the inner
    network (``model.net.state_dict()``) gives the same tensors without the prefix. Only a
    state_dict whose every key lacks it is renamed, so a mixed one is still refused key by key.
    """
    if state and not any(k.startswith(NET_PREFIX) for k in state):
        return {NET_PREFIX + k: v for k, v in state.items()}
    return state


def is_pylon_state_dict(state: dict[str, Any]) -> bool:
    """True when the keys look like PYLON's, with or without ``net.`` (for a family sniffer)."""
    keys = with_net_prefix(state)
    return "net.segmentation_head.0.weight" in keys and "net.decoder.pa.mid.0.conv.weight" in keys


def pylon_from_state_dict(state: dict[str, Tensor], source: str = "state_dict") -> PylonModel:
    """Build the PYLON the keys describe and load them strictly."""
    state = with_net_prefix(state)
    model = PylonModel(config_from_state_dict(state, source))
    load_state_checked(model, state, source)
    return model


def load_pylon(
    path: str | os.PathLike[str], device: str | torch.device | None = None
) -> PylonModel:
    """Load an official PYLON state_dict (.pth/.pkl) or a fastinsight PYLON .safetensors.

    The model comes back in eval mode on ``device`` (default: CUDA when available, else CPU).
    """
    p = Path(path).expanduser()
    if sniff_weights_file(p) == "torch":
        model = pylon_from_state_dict(read_torch_state_dict(p), str(p))
    else:
        meta, state = read_family_safetensors(p, PylonConfig)
        model = model_from_metadata(PylonModel, PylonConfig, meta, state, str(p))
    return ready(model, device)


def save_pylon(model: PylonModel, path: str | os.PathLike[str]) -> None:
    """Write ``model`` as safetensors with its config embedded (atomically).

    BatchNorm's ``num_batches_tracked`` stays int64, so the file reloads key for key.
    """
    save_radiograph_model(model, path)


__all__ = [
    "NIH14_CLASSES",
    "PylonConfig",
    "PylonModel",
    "RadiographPrediction",
    "config_from_state_dict",
    "is_pylon_state_dict",
    "load_pylon",
    "pylon_from_state_dict",
    "save_pylon",
]


# ============================================================== the checkpoint sniffer's entries
# fastinsight.models.checkpoints lists these in its loader table (duck-typed CheckpointFile:
# ``format``, ``state``, ``metadata``, ``path``), so this module never imports it back.


def accepts_pylon_file(ckpt: Any) -> bool:
    if ckpt.format == "torch":
        return is_pylon_state_dict(ckpt.state)
    return ckpt.metadata.get(FAMILY_KEY) == FAMILY


def load_pylon_file(ckpt: Any, backend: str = "auto") -> PylonModel:
    """Build and strictly load PYLON from an already-read checkpoint (``backend`` is unused)."""
    if ckpt.format == "torch":
        return pylon_from_state_dict(ckpt.state, str(ckpt.path))
    return model_from_metadata(PylonModel, PylonConfig, ckpt.metadata, ckpt.state, str(ckpt.path))
