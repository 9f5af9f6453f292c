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
# Tiles per chunk: 64 tiles make 6.4 MB per 128-channel activation, reused from the allocator's
# free lists call after call. At 256 tiles (25 MB) every activation was a fresh mmap that the
# kernel had to fault in and zero (tens of thousands of page faults per call); measured on 2 EPYC
# cores, 64 was ~1.3x faster end to end than 256 and level with 32 (bench/README.md).
CPU_CHUNK = 64
# Layers with fewer output channels than this (the heads' last, K = classes) skip oneDNN, whose
# convolution runs a 64 -> 1 layer at a few GFLOP/s: one GEMM gives every tap's contribution,
# then the taps are gathered and summed (3x3 layers, and 1x1 layers with a single output).
NARROW_COUT = 16


def _clamped_cells(h: int, w: int, k: int, p: int, out_h: int, out_w: int) -> Tensor:
    """Source cell of every (output cell, tap) under replication padding.

    Entry ``[(y * out_w + x) * k*k + dy * k + dx]`` is ``clamp(y + dy - p) * w + clamp(x + dx - p)``:
    clamping a neighbour's coordinates into the grid IS replication padding.

    Shapes: -> ``[out_h * out_w * k * k]`` int64.
    """
    ys = (torch.arange(out_h)[:, None] + torch.arange(k)[None] - p).clamp(0, h - 1)
    xs = (torch.arange(out_w)[:, None] + torch.arange(k)[None] - p).clamp(0, w - 1)
    return (ys[:, None, :, None] * w + xs[None, :, None, :]).reshape(-1)


@dataclass(frozen=True)
class _CpuLayer:
    """One head layer prepared for channels-last rows ``[n, h*w, c]``.

    ``conv_weight`` (fp32 with oneDNN): ``[cout, cin, k, k]`` channels-last, run by oneDNN on the
    channels-last view of the rows (replicate-padded by ``F.pad`` when k > 1).
    ``tap_weight`` (narrow layers, cout < ``NARROW_COUT``): ``[cin, k*k*cout]`` (columns in
    (dy, dx, cout) order) gives every tap's contribution of every cell in one GEMM; ``taps``
    gathers each output cell's k*k contributions. Otherwise ``gemm_weight`` ``[k*k*cin, cout]``
    (rows in (dy, dx, cin) order) multiplies the im2col ``[n*hw, k*k*cin]`` gathered with
    ``taps``. ``norm_weight``/``norm_bias``: ``[h*w, c]`` (the tile norm's ``[c, h, w]`` affine
    in row order) or ``[c]`` (channel norm); None last.
    """

    bias: Tensor
    kernel_size: int
    grid: tuple[int, int]
    conv_weight: Tensor | None
    gemm_weight: Tensor | None
    tap_weight: Tensor | None
    taps: Tensor | None
    norm_weight: Tensor | None
    norm_bias: Tensor | None


def _cpu_layer(layer: ConvLayer, kind: str, grid: tuple[int, int], dtype: torch.dtype) -> _CpuLayer:
    h, w = grid
    k = layer.kernel_size
    p = k // 2
    weight = layer.weight.detach().to(dtype)
    device = weight.device
    conv_weight = gemm_weight = tap_weight = taps = None
    # 1x1 layers with 2-15 outputs stay on oneDNN: an sgemm with so few columns ran ~3x slower.
    if weight.shape[0] < NARROW_COUT and (k > 1 or weight.shape[0] == 1):
        tap_weight = weight.permute(1, 2, 3, 0).reshape(weight.shape[1], -1).contiguous()
        if k > 1:
            # Contribution (source cell, tap t) sits at column src * k*k*cout + t * cout + o.
            taps = _clamped_cells(h, w, k, p, h, w) * (k * k) + torch.arange(k * k).repeat(h * w)
            taps = taps.to(device)
    elif dtype == torch.float32 and torch.backends.mkldnn.is_available():
        conv_weight = weight.contiguous(memory_format=torch.channels_last)
    else:
        gemm_weight = weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()
        if k > 1:
            taps = _clamped_cells(h, w, k, p, h, w).to(device)
    nw = nb = None
    if layer.norm_weight is not None and layer.norm_bias is not None:
        nw, nb = layer.norm_weight.detach().to(dtype), layer.norm_bias.detach().to(dtype)
        if kind == "tile":
            nw = nw.permute(1, 2, 0).reshape(h * w, -1).contiguous()
            nb = nb.permute(1, 2, 0).reshape(h * w, -1).contiguous()
    bias = layer.bias.detach().to(dtype)
    return _CpuLayer(bias, k, grid, conv_weight, gemm_weight, tap_weight, taps, nw, nb)


def _cpu_conv(x: Tensor, g: _CpuLayer) -> Tensor:
    """A k x k convolution with replication padding on channels-last rows.

    ``y[cell] = sum_{dy,dx} x[clamp(cell + (dy, dx) - k//2)] @ W[:, :, dy, dx]^T + b``.

    Shapes: x ``[n, h*w, cin]`` contiguous -> ``[n, h*w, cout]``.
    """
    n, hw, cin = x.shape
    h, w = g.grid
    k = g.kernel_size
    if g.tap_weight is not None:
        cout = g.bias.shape[0]
        q = torch.mm(x.view(n * hw, cin), g.tap_weight).view(n, hw * k * k, cout)
        if g.taps is None:  # 1x1: the GEMM is the layer
            return q.add_(g.bias)
        return q.index_select(1, g.taps).view(n, hw, k * k, cout).sum(2).add_(g.bias)
    if g.conv_weight is not None:
        # A channels-last [n, cin, h, w] view of the rows (no copy): oneDNN's native layout, so
        # it skips the NCHW <-> blocked reorders, and writes channels-last rows back. F.pad keeps
        # the channels-last layout for the replicate-padded grid.
        grid = x.view(n, h, w, cin).permute(0, 3, 1, 2)
        if k > 1:
            grid = F.pad(grid, (k // 2,) * 4, mode="replicate")
        y = F.conv2d(grid, g.conv_weight, g.bias)
        return y.permute(0, 2, 3, 1).reshape(n, hw, -1)
    assert g.gemm_weight is not None  # _cpu_layer set exactly one of the three weights
    a = x if g.taps is None else x.index_select(1, g.taps)  # im2col [n, hw * k*k, cin]
    return torch.addmm(g.bias, a.view(n * hw, -1), g.gemm_weight).view(n, hw, -1)


def _cpu_hidden(y: Tensor, g: _CpuLayer, kind: str, eps: float) -> Tensor:
    """GELU, then LayerNorm over each tile's ``[h*w, c]`` rows (= LayerNorm([c, h, w]) of the
    official module, affine in row order) or over each cell's channels.

    Shapes: ``[n, h*w, c]`` contiguous -> ``[n, h*w, c]`` contiguous.
    """
    if g.norm_weight is None:
        return y
    act = torch.ops.aten.gelu_(y)  # exact erf GELU, in place (``y`` is a fresh conv output)
    shape = tuple(act.shape[1:]) if kind == "tile" else (act.shape[-1],)
    return F.layer_norm(act, shape, g.norm_weight, g.norm_bias, eps)


def insight_head_cpu(tokens: Tensor, weights: HeadWeights, chunk: int = CPU_CHUNK) -> Tensor:
    """``insight_head_reference`` laid out the way a CPU is fast at; same values (fp32 ~1e-6).

    Every activation is a channels-last row matrix ``[n, h*w, c]`` from the reduce layer on;
    convolutions run as oneDNN GEMM-style convolutions on channels-last views of it (fp32), or as
    one ``addmm`` per layer over an im2col (other dtypes); the narrow last layers as one GEMM of
    every tap's contribution plus a gather-sum. The reduce layer reads NCHW tokens as they lie:
    per tile ``z = x^T W^T`` with ``x^T`` a transposed view of ``[C, h*w]`` (one batched sgemm,
    no copy of the C-channel input, written channels-last), and the encoder's ``[N, h*w, C]``
    tokens (channels-last grids) as one ``[N*h*w, C]`` GEMM. Replication padding is ``F.pad``
    on the channels-last grid, or a gather of clamped cell indices. ``chunk`` tiles at a time
    keep the activations small enough to be reused rather than faulted in afresh; the GEMMs use
    ``torch.get_num_threads()`` threads.

    Shapes: tokens ``[N, C, h, w]`` (any strides) -> heatmap ``[N, K, h, w]`` in the tokens'
    dtype.
    """
    n, c_in, h, w = tokens.shape
    hw = h * w
    dtype = weights.reduce.weight.dtype
    kind, eps = weights.norm, weights.eps
    if weights.reduce.kernel_size != 1:
        raise InputError(
            f"the reduce layer must be 1x1, got {weights.reduce.kernel_size}x"
            f"{weights.reduce.kernel_size}; use insight_head_reference"
        )
    reduce = _cpu_layer(weights.reduce, kind, (h, w), dtype)
    reduce_weight = weights.reduce.weight.detach().to(dtype).reshape(-1, c_in)  # [128, C]
    detect = [_cpu_layer(layer, kind, (h, w), dtype) for layer in weights.detect]
    context = [_cpu_layer(layer, kind, (h, w), dtype) for layer in weights.context]

    out = torch.empty((n, weights.num_classes, h, w), dtype=tokens.dtype, device=tokens.device)
    out_rows = out.view(n, weights.num_classes, hw)
    for s in range(0, n, chunk):
        x = tokens[s : s + chunk].to(dtype)
        m = x.shape[0]
        rows = x.flatten(2).transpose(1, 2)  # [m, hw, C], a view
        if rows.is_contiguous():
            # Channels-last tokens (the encoder's [N, h*w, C]): a 1x1 convolution like the rest
            # (oneDNN ran it at ~1.5x the rate of one [m*hw, C] x [C, 128] sgemm, bench/README).
            z = _cpu_conv(rows, reduce)
        else:
            # NCHW tokens, read as they lie: per tile z = x^T W^T with x^T a transposed view of
            # [C, hw] (the GEMM's transpose flag, no copy), written channels-last.
            z = torch.baddbmm(reduce.bias, rows, reduce_weight.t().expand(m, -1, -1))
        z = _cpu_hidden(z, reduce, kind, eps)
        d = z
        for g in detect:
            d = _cpu_hidden(_cpu_conv(d, g), g, kind, eps)
        cx = z
        for g in context:
            cx = _cpu_hidden(_cpu_conv(cx, g), g, kind, eps)
        heat = torch.sigmoid(d).mul_(torch.sigmoid(cx.neg_()))  # [m, hw, K]
        out_rows[s : s + m] = heat.transpose(1, 2)
    return out
