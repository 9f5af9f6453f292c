"""Patch encoders: RGB tiles in, channels-first token grids ``[B, C, h, w]`` out.

Build one by name with :func:`build_encoder` (``"uni"``, ``"vit-tiny"``, ``"resnet50-trunc"``,
``"resnet-tiny"``, ``"torchscript:<path>"``); weights come from local files only.
"""

from __future__ import annotations

from fastinsight.encoders.base import IMAGENET_MEAN, IMAGENET_STD, TOKEN_LAYOUT, Encoder
from fastinsight.encoders.registry import build_encoder, describe_encoders, list_encoders
from fastinsight.encoders.resnet import ResNetTruncConfig, ResNetTruncEncoder
from fastinsight.encoders.torchscript import TorchScriptEncoder
from fastinsight.encoders.vit import ViTConfig, ViTEncoder

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TOKEN_LAYOUT",
    "Encoder",
    "ResNetTruncConfig",
    "ResNetTruncEncoder",
    "TorchScriptEncoder",
    "ViTConfig",
    "ViTEncoder",
    "build_encoder",
    "describe_encoders",
    "list_encoders",
]
