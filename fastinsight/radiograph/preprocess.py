"""PYLON's eval transform: cubic resize to the model side, then ``(u8 / 255 - mean) / std``.

The official transform is albumentations ``Resize(S, S, cv2.INTER_CUBIC)`` on the uint8 image
(the result stays uint8: rounded and saturated) followed by ``Normalize(0.4984, 0.2483)`` with
``max_pixel_value=255``. OpenCV is not a dependency: torch's bicubic (Keys kernel, a = -0.75,
half-pixel centres, edge replication, no anti-aliasing) is the same interpolation as
``INTER_CUBIC``; OpenCV's fixed-point arithmetic can differ by one grey level here and there.
A non-square image is squashed to ``S x S`` as the official transform does.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastinsight.errors import ConfigError, InputError
from fastinsight.models.radiograph_common import stats_problems

MAX_SIDE = 65_536  # px per side of a model input; beyond it is a wrong argument, not an image


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_size(size: Any) -> tuple[int, int]:
    """``size`` (``S`` or ``(H, W)``) as ``(H, W)``; ConfigError unless each is in 1..65536."""
    pair = (size, size) if _is_int(size) else size
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(_is_int(v) and 1 <= int(v) <= MAX_SIDE for v in pair)
    ):
        raise ConfigError(
            f"size must be a side in 1..{MAX_SIDE} px or a pair (H, W) of them, got {size!r}",
            fields=("size",),
        )
    return int(pair[0]), int(pair[1])


def check_stats(mean: Any, std: Any) -> None:
    """ConfigError unless ``mean`` is finite and ``std`` finite and > 0 (else NaN inputs)."""
    if isinstance(mean, bool) or not isinstance(mean, numbers.Real):
        raise ConfigError(f"mean must be a number, got {mean!r}", fields=("mean",))
    if isinstance(std, bool) or not isinstance(std, numbers.Real):
        raise ConfigError(f"std must be a number, got {std!r}", fields=("std",))
    problems = stats_problems(float(mean), float(std))
    if problems:
        raise ConfigError(
            "invalid input normalisation: " + "; ".join(problems), fields=("mean", "std")
        )


def _check_image(image: Any) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2:
        what = (
            f"{image.dtype} {image.shape}"
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise InputError(f"expected a uint8 [H, W] image (numpy array); got {what}")
    if image.size == 0:
        raise InputError(f"the image is empty: shape {image.shape}")


@contextlib.contextmanager
def _memory(what: str, shape: tuple[int, ...]) -> Iterator[None]:
    """A MemoryError (numpy) or an allocator failure (torch raises RuntimeError "can't allocate
    memory") while ``what`` as one InputError line, not a traceback."""
    try:
        yield
    except MemoryError:
        pass
    except RuntimeError as exc:
        if "allocate" not in str(exc):
            raise
    else:
        return
    raise InputError(
        f"not enough memory to {what} an image of {' x '.join(map(str, shape))} px; free memory, "
        "or pass a smaller image"
    ) from None


def cubic_resize_u8(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bicubic resize of a uint8 image, rounded and clipped. Shapes: ``[H, W]`` -> ``[S, S]``.

    A non-uint8 / non-2-D / empty image is an InputError; a ``size`` outside 1..65536 px is a
    ConfigError.
    """
    _check_image(image)
    out_h, out_w = check_size(size)
    if image.shape == (out_h, out_w):
        return image.copy()
    with _memory("resize", image.shape):
        t = torch.tensor(image, dtype=torch.float32)[None, None]
        r = F.interpolate(t, size=(out_h, out_w), mode="bicubic", align_corners=False)
        del t
        return r[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def normalise(image_u8: np.ndarray, mean: float, std: float) -> Tensor:
    """``(u8 / 255 - mean) / std``. Shapes: ``[H, W]`` uint8 -> ``[1, 1, H, W]`` float32.

    A NaN or infinite ``mean``, or a ``std`` that is not finite and > 0, is a ConfigError (it
    would give NaN or infinite inputs).
    """
    check_stats(mean, std)
    _check_image(image_u8)
    with _memory("normalise", image_u8.shape):
        t = torch.tensor(image_u8, dtype=torch.float32).div_(255.0)
        return t.sub_(float(mean)).div_(float(std))[None, None]


def model_inputs(images: Sequence[np.ndarray], size: int, mean: float, std: float) -> Tensor:
    """Resize and normalise a batch. Shapes: B x uint8 ``[H_i, W_i]`` -> ``[B, 1, S, S]``.

    No image (an empty list), or an image that is not uint8 ``[H, W]``, is an InputError; a
    ``size`` outside 1..65536 px, a non-finite ``mean`` or a ``std`` that is not finite and
    > 0 is a ConfigError. Checked before any image is resized.
    """
    check_size(size)
    check_stats(mean, std)
    if isinstance(images, np.ndarray) and images.ndim == 2:
        raise InputError("model_inputs takes a list of images; got one [H, W] array: pass [image]")
    batch = list(images)
    if not batch:
        raise InputError("no images: model_inputs got an empty list")
    return torch.cat([normalise(cubic_resize_u8(im, size), mean, std) for im in batch])


__all__ = ["check_size", "check_stats", "cubic_resize_u8", "model_inputs", "normalise"]
