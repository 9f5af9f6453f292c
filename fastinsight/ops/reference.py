"""The reference INSIGHT head as plain tensor functions: the ground truth for every kernel.

It reads like the paper (Zhang, Chen, Kanan, MLHC 2025) and the official code:

    z  = LN(GELU(conv1x1(tokens)))                      reduce_dimension_block
    D  = conv1x1 chain with GELU + LN between layers    backbone_block (detection)
    Cx = (replicate-pad, conv3x3) chain, GELU + LN      context_block
    H  = sigmoid(D) * (1 - sigmoid(Cx))                 the context branch gates detection

This module knows nothing of Triton. ``fastinsight.kernels.insight_head`` has the same signature
as ``insight_head_reference``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastinsight.errors import InputError


@dataclass(frozen=True)
class ConvLayer:
    """One convolution of the head, with the GELU + norm that follow it (absent on the last).

    Shapes: weight ``[out, in, k, k]``, bias ``[out]``; norm weight/bias ``[out, h, w]`` for the
    per-tile LayerNorm or ``[out]`` for the per-cell channel norm.
    """

    weight: Tensor
    bias: Tensor
    norm_weight: Tensor | None = None
    norm_bias: Tensor | None = None

    @property
    def kernel_size(self) -> int:
        return int(self.weight.shape[-1])


@dataclass(frozen=True)
class HeadWeights:
    """All parameters of an INSIGHT head, in the order the maths uses them.

    ``norm`` is ``"tile"`` (official ``LayerNorm([c, h, w])``) or ``"channel"``.
    """

    reduce: ConvLayer
    detect: tuple[ConvLayer, ...]
    context: tuple[ConvLayer, ...]
    norm: str = "tile"
    eps: float = 1e-5

    @property
    def in_dim(self) -> int:
        return int(self.reduce.weight.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.detect[-1].weight.shape[0])


def tokens_as_grid(tokens: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """Accept ``[N, C, h, w]`` or the encoder's natural ``[N, h*w, C]`` and return ``[N, C, h, w]``.

    Shapes: ``[N, C, h, w]`` | ``[N, h*w, C]`` -> ``[N, C, h, w]`` (a view where possible).
    """
    h, w = grid_size
    if tokens.ndim == 4:
        return tokens
    if tokens.ndim == 3 and tokens.shape[1] == h * w:
        n, _, c = tokens.shape
        return tokens.transpose(1, 2).reshape(n, c, h, w)
    raise InputError(
        f"token grids must be [N, C, {h}, {w}] or [N, {h * w}, C]; got {tuple(tokens.shape)}"
    )


def _norm(x: Tensor, layer: ConvLayer, kind: str, eps: float) -> Tensor:
    if kind == "tile":
        # LayerNorm([c, h, w]): statistics over channel and space of each tile.
        return F.layer_norm(x, tuple(x.shape[1:]), layer.norm_weight, layer.norm_bias, eps)
    # Per-cell LayerNorm over channels.
    y = F.layer_norm(x.movedim(1, -1), (x.shape[1],), layer.norm_weight, layer.norm_bias, eps)
    return y.movedim(-1, 1)


def _apply(x: Tensor, layer: ConvLayer, kind: str, eps: float, replicate_pad: bool) -> Tensor:
    if layer.kernel_size > 1 and replicate_pad:
        p = layer.kernel_size // 2
        x = F.pad(x, (p, p, p, p), mode="replicate")
    x = F.conv2d(x, layer.weight, layer.bias)
    if layer.norm_weight is None:
        return x
    return _norm(F.gelu(x), layer, kind, eps)


def insight_logits_reference(
    tokens: Tensor, weights: HeadWeights, cell_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Detection and context logits of the INSIGHT head.

    Shapes: tokens ``[N, C, h, w]``, cell_mask ``[N, h, w]`` bool or None ->
    (D ``[N, K, h, w]``, Cx ``[N, K, h, w]``).

    ``cell_mask`` is for a stitched slide grid (``context="slide"``): cells outside the tissue are
    zeroed before every context convolution, so the 3x3 context sees tissue neighbours only and
    the replication padding acts at the slide border. The official per-tile model passes None.
    """
    z = _apply(tokens, weights.reduce, weights.norm, weights.eps, replicate_pad=True)
    d = z
    for layer in weights.detect:
        d = _apply(d, layer, weights.norm, weights.eps, replicate_pad=True)
    keep = None if cell_mask is None else cell_mask[:, None].to(z.dtype)
    c = z
    for layer in weights.context:
        if keep is not None:
            c = c * keep
        c = _apply(c, layer, weights.norm, weights.eps, replicate_pad=True)
    return d, c


def gate(detect_logits: Tensor, context_logits: Tensor) -> Tensor:
    """The heatmap ``sigmoid(D) * (1 - sigmoid(Cx))``: context suppresses detection.

    The official code writes ``relu(sig(D) - sig(D) * sig(Cx))``; the values are the same.
    """
    return torch.sigmoid(detect_logits) * torch.sigmoid(-context_logits)


def insight_head_reference(tokens: Tensor, weights: HeadWeights) -> Tensor:
    """Raw (un-thresholded) INSIGHT heatmap of a batch of token grids.

    Shapes: tokens ``[N, C, h, w]`` -> heatmap ``[N, K, h, w]`` in the tokens' dtype.
    """
    d, c = insight_logits_reference(tokens, weights)
    return gate(d, c)


# ------------------------------------------------------------------------------------------------
# The same head, laid out for CPUs (``InsightModel`` uses it for inference on the CPU)
# ------------------------------------------------------------------------------------------------
# Tiles per chunk: a chunk's activations stay in the CPU's caches between layers.
CPU_CHUNK = 64


def _cl_hidden(y: Tensor, layer: ConvLayer, kind: str, eps: float, affine) -> Tensor:
    """GELU + LayerNorm of a channels-last ``[n, c, h, w]`` map, staying channels-last.

    The normalisation runs on the contiguous ``[n, h, w, c]`` view, with the ``[c, h, w]``
    affine permuted to ``[h, w, c]`` once (tile norm) or the channel affine (channel norm).
    """
    v = F.gelu(y).permute(0, 2, 3, 1)
    if kind == "tile":
        v = F.layer_norm(v, tuple(v.shape[1:]), affine[0], affine[1], eps)
    else:
        v = F.layer_norm(v, (v.shape[-1],), layer.norm_weight, layer.norm_bias, eps)
    return v.permute(0, 3, 1, 2)


def insight_head_cpu(tokens: Tensor, weights: HeadWeights, chunk: int = CPU_CHUNK) -> Tensor:
    """``insight_head_reference`` laid out the way a CPU is fast at; same values (fp32 ~1e-6).

    Every activation is channels-last (``torch.channels_last``: oneDNN's native layout, so its
    convolutions skip the NCHW <-> blocked reorders that take about half of their time on NCHW
    maps); the encoder's ``[N, h*w, C]`` tokens viewed as a grid are already channels-last
    (``tokens_as_grid``), NCHW tokens are converted once per chunk. LayerNorm([c, h, w]) runs on
    the contiguous ``[n, h, w, c]`` view with its affine permuted once; ``chunk`` tiles at a time
    keep the activations in cache.

    Shapes: tokens ``[N, C, h, w]`` (any strides) -> heatmap ``[N, K, h, w]`` in the tokens'
    dtype.
    """
    n, _, h, w = tokens.shape
    dtype = weights.reduce.weight.dtype
    kind, eps = weights.norm, weights.eps
    cl = torch.channels_last

    def affine(layer: ConvLayer):
        if kind != "tile" or layer.norm_weight is None:
            return None
        return (layer.norm_weight.permute(1, 2, 0), layer.norm_bias.permute(1, 2, 0))

    def prepared(layer: ConvLayer):
        return (layer.weight.contiguous(memory_format=cl), layer, affine(layer))

    reduce = prepared(weights.reduce)
    detect = [prepared(layer) for layer in weights.detect]
    context = [prepared(layer) for layer in weights.context]

    def conv(x: Tensor, spec, pad: bool) -> Tensor:
        weight, layer, aff = spec
        if pad and layer.kernel_size > 1:
            p = layer.kernel_size // 2
            x = F.pad(x, (p, p, p, p), mode="replicate")
        y = F.conv2d(x, weight, layer.bias)
        return y if layer.norm_weight is None else _cl_hidden(y, layer, kind, eps, aff)

    out = torch.empty((n, weights.num_classes, h, w), dtype=tokens.dtype, device=tokens.device)
    for s in range(0, n, chunk):
        x = tokens[s : s + chunk].to(dtype).contiguous(memory_format=cl)
        z = conv(x, reduce, pad=False)
        d = z
        for spec in detect:
            d = conv(d, spec, pad=False)
        c = z
        for spec in context:
            c = conv(c, spec, pad=True)
        out[s : s + x.shape[0]] = torch.sigmoid(d) * torch.sigmoid(-c)
    return out
