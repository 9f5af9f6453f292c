"""Small colour maps implemented here (no matplotlib): ``turbo``, ``jet``, ``gray``.

``turbo`` is the degree-5 polynomial approximation of Google's Turbo colormap (Mikhailov
2019, "Turbo, An Improved Rainbow Colormap for Visualization"; polynomial fit by Ruofei Du,
Apache-2.0). It follows Turbo's dark-blue -> cyan -> green -> yellow -> red -> dark-red ramp
closely in the middle and drifts at the very ends (at 0 it is (35, 23, 27) where the table has
(48, 18, 59)): a "turbo-like" map, good for viewing, not for colour-exact reproduction.
"""

from __future__ import annotations

import numpy as np

from fastinsight.errors import InputError

COLORMAPS: tuple[str, ...] = ("turbo", "jet", "gray")

_TURBO_R = (0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943)
_TURBO_G = (0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604)
_TURBO_B = (0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973)


def apply_colormap(values: np.ndarray, name: str = "turbo") -> np.ndarray:
    """Map values in [0, 1] (clipped; NaN maps like 0) to RGB.

    Shapes: ``[...]`` float -> ``uint8 [..., 3]``.
    """
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    if name == "turbo":
        powers = np.stack([x**i for i in range(6)], axis=-1)
        rgb = np.stack([powers @ np.asarray(c) for c in (_TURBO_R, _TURBO_G, _TURBO_B)], axis=-1)
    elif name == "jet":
        rgb = np.stack(
            [np.clip(1.5 - np.abs(4.0 * x - k), 0.0, 1.0) for k in (3.0, 2.0, 1.0)], axis=-1
        )
    elif name == "gray":
        rgb = np.repeat(x[..., None], 3, axis=-1)
    else:
        raise InputError(f"colormap must be one of {list(COLORMAPS)}; got {name!r}")
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def colormap_lut(name: str = "turbo") -> np.ndarray:
    """The colormap sampled at 256 levels. Shapes: -> ``uint8 [256, 3]``."""
    return apply_colormap(np.linspace(0.0, 1.0, 256), name)


def colorize(
    values: np.ndarray, value_range: tuple[float, float] = (0.0, 1.0), name: str = "turbo"
) -> np.ndarray:
    """Colour values over ``value_range`` through a 256-entry table (fast for large images).

    NaN comes out as the colour of the low end; callers paint non-tissue themselves.
    Shapes: ``[...]`` float -> ``uint8 [..., 3]``.
    """
    vmin, vmax = (float(v) for v in value_range)
    if not vmax > vmin:
        raise InputError(f"value_range must be (low, high) with low < high; got {value_range}")
    norm = (np.asarray(values, dtype=np.float32) - vmin) / (vmax - vmin)
    index = np.rint(np.clip(np.nan_to_num(norm, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
    return colormap_lut(name)[index]
