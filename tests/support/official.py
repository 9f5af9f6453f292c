"""An independent float64 re-implementation of the official INSIGHT formulas, for parity tests.

Written from the spec (section 1), in numpy, sharing no code with fastinsight: explicit einsum
convolutions, LayerNorm over [c, h, w], replication padding by index clamping, exact-erf GELU,
the heatmap as the official ``relu(sig(D) - sig(D) * sig(Cx))``, Otsu from scikit-image and
SmoothMax as written in the paper.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import erf
from skimage.filters import threshold_otsu

OFFICIAL_KEYS = (
    [f"reduce_dimension_block.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    + [f"backbone_block.{i}.{p}" for i in (0, 2, 3, 5, 6, 8, 9) for p in ("weight", "bias")]
    + [f"context_block.{i}.{p}" for i in (1, 3, 5, 7, 9, 11, 13) for p in ("weight", "bias")]
)


def official_shapes(c: int, k: int, h: int = 14, w: int = 14) -> dict[str, tuple[int, ...]]:
    """The official checkpoint's key -> shape table (spec section 1)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cin: int, cout: int, ks: int) -> None:
        shapes[f"{name}.weight"] = (cout, cin, ks, ks)
        shapes[f"{name}.bias"] = (cout,)

    def ln(name: str, ch: int) -> None:
        shapes[f"{name}.weight"] = (ch, h, w)
        shapes[f"{name}.bias"] = (ch, h, w)

    conv("reduce_dimension_block.0", c, 128, 1)
    ln("reduce_dimension_block.2", 128)
    dims = [(128, 128), (128, 64), (64, 64), (64, k)]
    for (cin, cout), ci, li in zip(dims, (0, 3, 6, 9), (2, 5, 8, None), strict=True):
        conv(f"backbone_block.{ci}", cin, cout, 1)
        if li is not None:
            ln(f"backbone_block.{li}", cout)
    for (cin, cout), ci, li in zip(dims, (1, 5, 9, 13), (3, 7, 11, None), strict=True):
        conv(f"context_block.{ci}", cin, cout, 3)
        if li is not None:
            ln(f"context_block.{li}", cout)
    return shapes


def random_official_state_dict(c: int, k: int, seed: int = 0, h: int = 14, w: int = 14) -> dict:
    """A state_dict with the official layout and trained-looking (non-trivial) values."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_shapes(c, k, h, w).items():
        if name.endswith("weight") and len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            t = torch.randn(shape, generator=g) / np.sqrt(fan_in)
        elif len(shape) == 3 and name.endswith("weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.1 * torch.randn(shape, generator=g)
        state[name] = t
    return {k_: state[k_] for k_ in OFFICIAL_KEYS}


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _layer_norm_chw(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mu = x.mean(axis=(1, 2, 3), keepdims=True)
    var = x.var(axis=(1, 2, 3), keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * weight[None] + bias[None]


def _conv1x1(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return np.einsum("nchw,oc->nohw", x, weight[:, :, 0, 0]) + bias[None, :, None, None]


def _conv3x3_replicate(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    rows = np.clip(np.arange(-1, h + 1), 0, h - 1)
    cols = np.clip(np.arange(-1, w + 1), 0, w - 1)
    padded = x[:, :, rows][:, :, :, cols]
    out = np.zeros((n, weight.shape[0], h, w))
    for dy in range(3):
        for dx in range(3):
            patch = padded[:, :, dy : dy + h, dx : dx + w]
            out += np.einsum("nchw,oc->nohw", patch, weight[:, :, dy, dx])
    return out + bias[None, :, None, None]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def official_forward(state: dict, tokens: np.ndarray) -> np.ndarray:
    """Raw heatmap [N, K, h, w] in float64."""
    s = {k: v.double().numpy() for k, v in state.items()}
    x = tokens.astype(np.float64)
    z = _conv1x1(x, s["reduce_dimension_block.0.weight"], s["reduce_dimension_block.0.bias"])
    z = _layer_norm_chw(
        _gelu(z), s["reduce_dimension_block.2.weight"], s["reduce_dimension_block.2.bias"]
    )
    d = z
    for ci, li in ((0, 2), (3, 5), (6, 8), (9, None)):
        d = _conv1x1(d, s[f"backbone_block.{ci}.weight"], s[f"backbone_block.{ci}.bias"])
        if li is not None:
            d = _layer_norm_chw(
                _gelu(d), s[f"backbone_block.{li}.weight"], s[f"backbone_block.{li}.bias"]
            )
    cx = z
    for ci, li in ((1, 3), (5, 7), (9, 11), (13, None)):
        cx = _conv3x3_replicate(cx, s[f"context_block.{ci}.weight"], s[f"context_block.{ci}.bias"])
        if li is not None:
            cx = _layer_norm_chw(
                _gelu(cx), s[f"context_block.{li}.weight"], s[f"context_block.{li}.bias"]
            )
    sd = _sigmoid(d)
    return np.maximum(sd - sd * _sigmoid(cx), 0.0)


def official_predict(state: dict, tokens: np.ndarray, a: float = 8.0):
    """(heatmap, thresholds, scores) as the official inference computes them, in float64."""
    raw = official_forward(state, tokens)
    k = raw.shape[1]
    thresholds = np.zeros(k)
    heat = np.zeros_like(raw)
    scores = np.zeros(k)
    for j in range(k):
        # The official code runs Otsu on the float32 heatmap of the slide.
        vals = raw[:, j].astype(np.float32)
        t = float(threshold_otsu(vals))
        thresholds[j] = t
        heat[:, j] = raw[:, j] * (raw[:, j] > t)
        x = heat[:, j].ravel()
        e = np.exp(a * (x - x.max()))
        scores[j] = (x * e).sum() / e.sum()
    return heat, thresholds, scores
