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
# The same head, reformulated for CPUs (``InsightModel`` uses it for inference on the CPU)
# ------------------------------------------------------------------------------------------------
# Winograd F(2x2, 3x3) (Lavin & Gray 2016): Y = A^T [(G g G^T) * (B^T d B)] A per 4x4 input tile
# d and 3x3 filter g, 2x2 outputs per tile: 16 multiplies where the direct form needs 36. The
# transforms of B and A are additions only; G has halves; all exact-ish in fp32 (error ~1e-7 rel).
_WINO_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
# Tiles per chunk: the channels-last activations of a chunk stay in the CPU's caches.
CPU_CHUNK = 32


def _wino_filters(weight: Tensor) -> Tensor:
    """``U = G g G^T`` for every (out, in) pair. Shapes: ``[O, I, 3, 3]`` -> ``[16, I, O]``."""
    g = torch.tensor(_WINO_G, dtype=weight.dtype, device=weight.device)
    u = torch.einsum("ak,oikl,bl->abio", g, weight, g)  # [4, 4, I, O]
    return u.reshape(16, weight.shape[1], weight.shape[0]).contiguous()


def _wino_conv3x3(x: Tensor, u: Tensor, bias: Tensor, h: int, w: int) -> Tensor:
    """Replicate-padded 3x3 convolution of channels-last grids by Winograd F(2x2, 3x3).

    Shapes: x ``[N, h*w, I]``, u ``[16, I, O]`` (``_wino_filters``), bias ``[O]`` ->
    ``[N, h*w, O]``. Odd sizes are handled by replicating one more border row/column into a
    tile whose extra outputs are cropped.
    """
    n, _, ci = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    rows = torch.arange(-1, 2 * th + 1, device=x.device).clamp(0, h - 1)
    cols = torch.arange(-1, 2 * tw + 1, device=x.device).clamp(0, w - 1)
    grid = x.view(n, h, w, ci)
    p = grid.index_select(1, rows).index_select(2, cols)  # [N, 2th+2, 2tw+2, I] replicate pad
    # d[i][j]: the 4x4 input tiles at stride 2, as 16 strided views [N, th, tw, I].
    d = [[p[:, i : i + 2 * th : 2, j : j + 2 * tw : 2] for j in range(4)] for i in range(4)]
    # B^T d: rows (d0 - d2, d1 + d2, d2 - d1, d1 - d3), then the same along the columns.
    t = [[d[0][j] - d[2][j], d[1][j] + d[2][j], d[2][j] - d[1][j], d[1][j] - d[3][j]]
         for j in range(4)]  # fmt: skip  # t[j][a]
    v = torch.stack(
        [
            torch.stack(
                [t[0][a] - t[2][a], t[1][a] + t[2][a], t[2][a] - t[1][a], t[1][a] - t[3][a]]
            )
            for a in range(4)
        ]
    )  # [4(a), 4(b), N, th, tw, I]
    m = torch.bmm(v.reshape(16, n * th * tw, ci), u).view(4, 4, n, th, tw, -1)
    # A^T m A with A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].
    r0 = m[0] + m[1] + m[2]
    r1 = m[1] - m[2] - m[3]
    y = torch.stack(
        [torch.stack([r[0] + r[1] + r[2], r[1] - r[2] - r[3]], dim=3) for r in (r0, r1)],
        dim=2,
    )  # [N, th, 2, tw, 2, O]
    y = y.reshape(n, 2 * th, 2 * tw, -1)[:, :h, :w]
    return (y + bias).reshape(n, h * w, -1)


def _cl_norm(y: Tensor, layer: ConvLayer, kind: str, eps: float, affine: tuple[Tensor, Tensor]):
    """LayerNorm of channels-last activations ``[N, h*w, c]`` (tile: over cells and channels)."""
    if kind == "tile":
        return F.layer_norm(y, tuple(y.shape[1:]), affine[0], affine[1], eps)
    return F.layer_norm(y, (y.shape[-1],), layer.norm_weight, layer.norm_bias, eps)


def insight_head_cpu(tokens: Tensor, weights: HeadWeights, chunk: int = CPU_CHUNK) -> Tensor:
    """``insight_head_reference``, computed the way a CPU is fast at, same values (fp32 ~1e-6).

    Channels-last throughout: the 1x1 convolutions are one GEMM each over all cells of a chunk
    (``[n*h*w, c_in] @ [c_in, c_out]``, no NCHW reorder), the replicate-padded 3x3 convolutions
    are Winograd F(2x2, 3x3) (2.25x fewer multiplies, 62 % of the head's FLOPs), LayerNorm
    ([c, h, w]) runs on ``[n, h*w, c]`` with its affine transposed once, and ``chunk`` tiles
    at a time keep the activations in cache. Official architecture with a 1x1 reduce.

    Shapes: tokens ``[N, C, h, w]`` (any strides; a channels-last view of ``[N, h*w, C]`` is
    read without a copy) -> heatmap ``[N, K, h, w]`` in the tokens' dtype.
    """
    n, c, h, w = tokens.shape
    dtype = weights.reduce.weight.dtype
    kind, eps = weights.norm, weights.eps

    def mat(layer: ConvLayer) -> Tensor:  # 1x1 conv weight [O, I, 1, 1] -> [I, O]
        return layer.weight[:, :, 0, 0].t()

    def affine(layer: ConvLayer) -> tuple[Tensor, Tensor]:  # [c, h, w] -> [h*w, c]
        if kind != "tile":
            return (layer.norm_weight, layer.norm_bias)
        return (layer.norm_weight.flatten(1).t(), layer.norm_bias.flatten(1).t())

    def hidden(y: Tensor, layer: ConvLayer) -> Tensor:
        return _cl_norm(F.gelu(y), layer, kind, eps, affine(layer))

    wino = [_wino_filters(layer.weight) for layer in weights.context]
    out = torch.empty((n, weights.num_classes, h, w), dtype=tokens.dtype, device=tokens.device)
    for s in range(0, n, chunk):
        x = tokens[s : s + chunk].to(dtype)
        b = x.shape[0]
        # [b, C, h, w] -> [b, h*w, C]: free for a channels-last view, one copy for NCHW.
        xc = x.flatten(2).transpose(1, 2)
        z = hidden(torch.matmul(xc, mat(weights.reduce)) + weights.reduce.bias, weights.reduce)
        d = z
        for layer in weights.detect:
            y = torch.addmm(layer.bias, d.reshape(b * h * w, -1), mat(layer)).view(b, h * w, -1)
            d = y if layer.norm_weight is None else hidden(y, layer)
        cx = z
        for layer, u in zip(weights.context, wino, strict=True):
            y = _wino_conv3x3(cx, u, layer.bias, h, w)
            cx = y if layer.norm_weight is None else hidden(y, layer)
        heat = torch.sigmoid(d) * torch.sigmoid(-cx)  # [b, h*w, K]
        out[s : s + b] = heat.transpose(1, 2).reshape(b, -1, h, w)
    return out
