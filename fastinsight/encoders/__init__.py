"""Patch encoders: RGB tiles in, channels-first token grids ``[B, C, h, w]`` out (or the
channels-last tokens ``[B, h*w, C]`` with ``encode_tokens``).

Build one by name with :func:`build_encoder` (``"uni"``, ``"uni2-h"``, ``"virchow2"``,
``"h-optimus-0"``, ``"h-optimus-1"``, ``"prov-gigapath"``, ``"dinov2-vitl14-reg4"``,
``"vit-tiny"``, ``"dinov2-tiny"``, ``"resnet50-trunc"``, ``"resnet-tiny"``, ``"timm:<name>"``,
``"torchscript:<path>"``); networks come from timm, weights from local files only.

May import: ``fastinsight.errors``, ``fastinsight.atomic``, ``fastinsight.fileformat`` (and timm,
torch); never the slide, model, predict or CLI layers.
"""

from __future__ import annotations

from fastinsight.encoders.base import IMAGENET_MEAN, IMAGENET_STD, TOKEN_LAYOUT, Encoder
from fastinsight.encoders.check import check_encoder, encoder_table
from fastinsight.encoders.models import SPECS, ModelSpec
from fastinsight.encoders.registry import (
    build_encoder,
    build_from_spec,
    describe_encoders,
    list_encoders,
)
from fastinsight.encoders.resnet import ResNetTruncConfig, ResNetTruncEncoder
from fastinsight.encoders.torchscript import TorchScriptEncoder
from fastinsight.encoders.vit import (
    TimmEncoder,
    ViTConfig,
    ViTEncoder,
    compile_encoder,
    tokens_to_grid,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPECS",
    "TOKEN_LAYOUT",
    "Encoder",
    "ModelSpec",
    "ResNetTruncConfig",
    "ResNetTruncEncoder",
    "TimmEncoder",
    "TorchScriptEncoder",
    "ViTConfig",
    "ViTEncoder",
    "build_encoder",
    "build_from_spec",
    "check_encoder",
    "compile_encoder",
    "describe_encoders",
    "encoder_table",
    "list_encoders",
    "tokens_to_grid",
]
