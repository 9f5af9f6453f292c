"""PYLON's eval transform: cubic resize to the model side, then ``(u8 / 255 - mean) / std``.

The official transform is albumentations ``Resize(S, S, cv2.INTER_CUBIC)`` on the uint8 image
(the result stays uint8: rounded and saturated) followed by ``Normalize(0.4984, 0.2483)`` with
``max_pixel_value=255``. OpenCV is not a dependency: torch's bicubic (Keys kernel, a = -0.75,
half-pixel centres, edge replication, no anti-aliasing) is the same interpolation as
``INTER_CUBIC``; OpenCV's fixed-point arithmetic can differ by one grey level here and there.
A non-square image is squashed to ``S x S`` as the official transform does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastinsight.errors import InputError


def cubic_resize_u8(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bicubic resize of a uint8 image, rounded and clipped. Shapes: ``[H, W]`` -> ``[S, S]``."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise InputError(f"expected a uint8 [H, W] image; got {image.dtype} {image.shape}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    if image.shape == (out_h, out_w):
        return image.copy()
    t = torch.tensor(image, dtype=torch.float32)[None, None]
    r = F.interpolate(t, size=(out_h, out_w), mode="bicubic", align_corners=False)
    return r[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def normalise(image_u8: np.ndarray, mean: float, std: float) -> Tensor:
    """``(u8 / 255 - mean) / std``. Shapes: ``[H, W]`` uint8 -> ``[1, 1, H, W]`` float32."""
    t = torch.tensor(image_u8, dtype=torch.float32).div_(255.0)
    return ((t - mean) / std)[None, None]


def model_inputs(images: Sequence[np.ndarray], size: int, mean: float, std: float) -> Tensor:
    """Resize and normalise a batch. Shapes: B x uint8 ``[H_i, W_i]`` -> ``[B, 1, S, S]``."""
    return torch.cat([normalise(cubic_resize_u8(im, size), mean, std) for im in images])


__all__ = ["cubic_resize_u8", "model_inputs", "normalise"]
