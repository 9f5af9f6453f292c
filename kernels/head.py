"""The INSIGHT head as a chain of fused Triton layer kernels: token grids in, raw heatmap out.

The head, per tile of ``P = h*w`` cells (official: 1024 -> 128 -> 128 -> 64 -> 64 -> K)::

    Z  = LN(GELU(X W_r + b_r))                              reduce (the only read of the tokens)
    D  = detection chain: three (1x1 conv, GELU, LN) + 1x1 conv           -> [P, K]
    Cx = context chain: three (replicate-pad 3x3 conv, GELU, LN) + 3x3 conv -> [P, K]
    H  = sigmoid(D) * sigmoid(-Cx)                           written as [N, K, h, w] (fp32)

Design (measured on an H200, ``bench/results/kernels.csv``; the first design, one persistent
program per tile running all nine layers through a global scratch, was latency-bound at ~8 % of
the roofline and slower than ``torch.compile``): every convolution is one implicit GEMM over
*all* cells of the batch, ``M = N*P`` rows, with large pipelined blocks
(``BLOCK_M x COUT x BLOCK_K``, ``num_stages`` deep), so the tensor cores see long K loops:

- ``_reduce_kernel`` reads the tokens once, in any layout: programs own blocks of consecutive
  cells of the batch (a block may span two tiles; no rows are spent on a tile's padding), and
  NCHW (cells contiguous) and NHWC (channels contiguous, the encoder's ``[N, h*w, C]``) both
  load as wide vectors. The 3x3 layers (``_conv_kernel``) walk one flattened K loop over
  ``(tap, input channel)``; a tap's A rows are the neighbour cells with row and column clamped
  to the tile, which *is* the replication padding.
- Every epilogue is fused: bias, exact-erf GELU, and what the next layer needs of the norm.
- **LayerNorm([c, h, w]) is folded into the next convolution.** The tile statistics are only
  known once every cell of the tile is done, but a convolution is linear, so with
  ``u = GELU(y) * gamma`` (gamma, beta the per-position affine) the next layer's input is
  ``z = rstd * (u - mu * gamma) + beta`` and::

      conv(z)[p, o] = rstd * (conv(u)[p, o] - mu * conv(gamma)[p, o]) + conv(beta)[p, o]

  ``conv(gamma)`` and ``conv(beta)`` (replication padded, no bias) are ``[P, cout]`` tables
  computed once per model in float64. A layer therefore stores ``u`` (compute dtype) and per-row
  ``(mean, M2)`` of its GELU output; ``_tile_stats_kernel`` merges each tile's rows with Chan's
  update into ``(mu, rstd)``; the next layer applies them in its epilogue. No pass re-reads an
  activation to normalise it.
- The per-cell channel norm needs only the row a program already holds (``BLOCK_N = cout``):
  it is applied in the epilogue and the normalised activation is stored.
- Activations are ``[M, c]`` row-major in the compute dtype (bf16/fp16: 16-byte loads); tiles are
  processed in chunks of ``chunk_tiles`` so the activations stay a few hundred MB.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from fastinsight.errors import InputError
from fastinsight.ops.reference import HeadWeights

from ._runtime import INTERPRET, KernelSpec, aligned, check_device, device_arch, next_pow2

# Token layouts the reduce kernel specialises on (a constexpr): a unit stride becomes a
# compile-time constant so the loads of the token grid vectorise.
LAYOUT_STRIDED = 0  # any strides
LAYOUT_NCHW = 1  # [N, C, h, w] with the h*w cells contiguous (stride_xw = 1, stride_xh = w)
LAYOUT_NHWC = 2  # channels last, e.g. the encoder's [N, h*w, C] (stride_xc = 1)
LAYOUT_NAMES = {LAYOUT_STRIDED: "strided", LAYOUT_NCHW: "nchw", LAYOUT_NHWC: "nhwc"}

# What a layer's epilogue writes (compile-time constants).
OUT_TILE = 0  # u = GELU(y) * gamma[p, o] and per-row (mean, M2): the tile norm, folded forward
OUT_CHANNEL = 1  # LN over the row's channels of GELU(y), with the per-channel affine
OUT_LOGITS = 2  # y itself in fp32 (the detection logits D)
OUT_GATE = 3  # sigmoid(D) * sigmoid(-y) into the heatmap [N, K, h, w]
OUT_NAMES = {OUT_TILE: "tile-norm", OUT_CHANNEL: "channel-norm", OUT_LOGITS: "logits",
             OUT_GATE: "gate"}  # fmt: skip

PRECISIONS = ("ieee", "tf32")
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class HeadLaunchConfig:
    """Block sizes of the layer kernels (fixed configs; no autotuning).

    ``BLOCK_M`` cells per program of the chain layers (the dots' M; the dots' N is the layer's
    whole output width), ``BLOCK_MW`` the same for layers wider than 64 channels (their
    epilogue holds several ``[BLOCK_M, cout]`` fp32 tables), ``BLOCK_MR`` cells per program of
    the reduce layer, ``BLOCK_K`` input channels per dot step,
    ``num_stages`` the software-pipelining depth of the K loops, ``chunk_tiles`` tiles per
    launch sequence (bounds the activation memory). ``overlap`` runs each chunk's reduce (memory
    bound) on a side CUDA stream while the previous chunk's chains (compute bound) run, with
    the reduce's outputs double-buffered (an option to measure: not a default yet).
    ``num_warps_wide`` (0: ``num_warps``) the warps of the reduce and of the layers wider than
    64 channels, so those may take larger blocks (``BLOCK_MW``, ``BLOCK_MR``) than the narrow
    layers: each program streams the layer's whole weight matrix (the reduce's 256 KB in bf16)
    once per block of cells, so a block twice as tall halves that traffic (``traffic_bytes``).
    ``half_tables``: the per-position tables of the 16-bit heads (folded norm ``conv(gamma)``,
    bias, output gamma; about a quarter of the modelled traffic) in fp16 instead of fp32,
    converted to fp32 as the epilogue loads them (an option to measure: the bench checks parity
    first).
    """

    BLOCK_M: int = 128
    BLOCK_MW: int = 64
    BLOCK_MR: int = 128
    BLOCK_K: int = 64
    num_warps: int = 8
    num_stages: int = 3
    chunk_tiles: int = 4096
    overlap: bool = False
    num_warps_wide: int = 0
    half_tables: bool = False

    def describe(self) -> str:
        """``M64-X64-R64-K64-w4-s3``, then ``-c<chunk_tiles>``, ``-o1``, ``-W<warps>`` and
        ``-T1`` where not default."""
        text = (
            f"M{self.BLOCK_M}-X{self.BLOCK_MW}-R{self.BLOCK_MR}-K{self.BLOCK_K}-w{self.num_warps}"
            f"-s{self.num_stages}"
        )
        if self.chunk_tiles != HeadLaunchConfig.chunk_tiles:
            text += f"-c{self.chunk_tiles}"
        text += "-o1" if self.overlap else ""
        text += f"-W{self.num_warps_wide}" if self.num_warps_wide else ""
        return text + ("-T1" if self.half_tables else "")

    def table_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The per-position tables' dtype for compute dtype ``dtype`` (fp32 heads: always fp32)."""
        return torch.float16 if self.half_tables and dtype != torch.float32 else torch.float32

    def warps(self, cout: int, wide: bool) -> int:
        """Warps of a layer with ``cout`` outputs (``wide``: the reduce, or ``cout`` > 64). The
        K-class layers (``cout`` <= 16) run at most 4 (8 spill on sm_80)."""
        if 0 < cout <= 16:
            return min(4, self.num_warps)
        return (self.num_warps_wide or self.num_warps) if wide else self.num_warps


# One config per compute type; ``fastinsight kernels check`` proves every variant compiles for
# sm_80 and sm_90 without spilling. 16-bit: 64-cell blocks of 4 warps (one warpgroup, wgmma
# m64nCOUTk16; two or more programs per SM, so one program's epilogue overlaps another's K loop)
# measured fastest of four configs side by side on an H200 (bench/results/kernels.csv, N = 8192,
# K = 3: 7.68 ms against 8.43-8.81 ms for 128-cell blocks of 8 warps and 3-4 stages). fp32 (IEEE
# dots run on the FMA units; the parity setting) takes smaller K steps.
FAST_16BIT = HeadLaunchConfig(BLOCK_M=64, BLOCK_MW=64, BLOCK_MR=64, BLOCK_K=64, num_warps=4,
                              num_stages=3)  # fmt: skip
# Before Hopper (mma.sync, more registers per thread for the same block): the 4-warp blocks
# spill 32 B on sm_80 in the 128-wide tile-norm layers; 128-cell blocks of 8 warps (64 for the
# wide layers) do not. Unmeasured on an A100.
AMPERE_16BIT = HeadLaunchConfig(BLOCK_M=128, BLOCK_MW=64, BLOCK_MR=128, BLOCK_K=64, num_warps=8,
                                num_stages=3)  # fmt: skip
HOPPER = 90
GPU_CONFIGS: dict[str, HeadLaunchConfig] = {
    "bf16": FAST_16BIT,
    "fp16": FAST_16BIT,
    "fp32-tf32": HeadLaunchConfig(BLOCK_M=64, BLOCK_MW=64, BLOCK_MR=64, BLOCK_K=32),
    "fp32-ieee": HeadLaunchConfig(BLOCK_M=64, BLOCK_MW=64, BLOCK_MR=64, BLOCK_K=16, num_stages=2),
}
# The interpreter's cost is per operation, not per element: few, large blocks are fastest.
INTERPRETER_CONFIG = HeadLaunchConfig(BLOCK_M=512, BLOCK_MW=512, BLOCK_MR=256, BLOCK_K=64, num_warps=4,
                                      num_stages=1)  # fmt: skip


def compute_key(dtype: torch.dtype, precision: str) -> str:
    """``bf16``, ``fp16``, ``fp32-ieee`` or ``fp32-tf32``: what picks a config."""
    name = _TL_DTYPES[dtype]
    return f"{name}-{precision}" if name == "fp32" else name


def arch_config(key: str, arch: int) -> HeadLaunchConfig:
    """The GPU config of a compute key on an architecture (compute capability x 10)."""
    if key in ("bf16", "fp16") and arch < HOPPER:
        return AMPERE_16BIT
    return GPU_CONFIGS[key]


CONFIG_KEYS = {"M": "BLOCK_M", "X": "BLOCK_MW", "R": "BLOCK_MR", "K": "BLOCK_K", "w": "num_warps",
               "s": "num_stages", "c": "chunk_tiles", "o": "overlap", "W": "num_warps_wide",
               "T": "half_tables"}  # fmt: skip


# (lowest, highest, power of two) of each field: a dot needs at least 16 rows and 16 input
# channels; warps as Triton launches them (0 for ``W``: as ``w``); flags 0 or 1.
_CONFIG_RANGES = {
    "BLOCK_M": (16, 1024, True), "BLOCK_MW": (16, 1024, True), "BLOCK_MR": (16, 1024, True),
    "BLOCK_K": (16, 256, True), "num_warps": (1, 32, True), "num_warps_wide": (0, 32, True),
    "num_stages": (1, 8, False), "chunk_tiles": (1, 1 << 20, False), "overlap": (0, 1, False),
    "half_tables": (0, 1, False),
}  # fmt: skip


def parse_config(text: str, base: HeadLaunchConfig = FAST_16BIT) -> HeadLaunchConfig:
    """``M128-X64-R128-K64-w8-s3`` (any subset of ``describe``'s fields, over ``base``) -> config.

    M: cells per program of the chain layers, X: of the layers wider than 64 channels, R: of the
    reduce layer, K: input channels per dot step, w: warps, s: pipeline stages, c: tiles per
    chunk, o1: each chunk's reduce on a side stream beside the previous chunk's chains, W: warps
    of the reduce and the wide layers, T1: fp16 per-position tables. Raises ``InputError`` naming
    the first bad part.
    """
    fields: dict[str, object] = {}
    for part in text.split("-"):
        match = re.fullmatch(r"([MXRKwscoWT])(\d+)", part)
        if not match:
            raise InputError(
                f"a kernel config is e.g. M64-X128-R128-K64-w4-s3-W8; {part!r} in {text!r} is "
                f"not one of {', '.join(k + '<n>' for k in CONFIG_KEYS)}"
            )
        key, value = CONFIG_KEYS[match.group(1)], int(match.group(2))
        low, high, power = _CONFIG_RANGES[key]
        if not low <= value <= high or (power and value & (value - 1)):
            what = f"{'a power of two ' if power else ''}from {low} to {high}"
            what = f"0 or a power of two up to {high}" if power and low == 0 else what
            raise InputError(f"{part!r} in the kernel config {text!r}: must be {what}")
        fields[key] = bool(value) if key in ("overlap", "half_tables") else value
    return dataclasses.replace(base, **fields)


def launch_config(
    cells: int, dtype: torch.dtype, precision: str, arch: int = HOPPER
) -> HeadLaunchConfig:
    """The config the launcher uses for grids of ``cells`` cells on ``arch``."""
    if INTERPRET:
        return dataclasses.replace(INTERPRETER_CONFIG, BLOCK_MR=min(256, max(16, next_pow2(cells))))
    return arch_config(compute_key(dtype, precision), arch)


# --------------------------------------------------------------------------------------------
# Triton code
# --------------------------------------------------------------------------------------------
@triton.jit
def _epilogue(
    acc, m, m_ok, n, p, P,
    stat_in_ptr, bnw_ptr, bias_ptr, nw_ptr, nb_ptr, dst_ptr, rowstat_ptr, d_ptr, eps,
    COUT: tl.constexpr, BLOCK_N: tl.constexpr, IN_FOLD: tl.constexpr, OUT: tl.constexpr,
):  # fmt: skip
    """What follows a layer's GEMM, for rows ``m`` (tile ``n``, cell ``p``) of one block.

    ``IN_FOLD``: the input was tile-normalised lazily, ``y = rstd * (acc - mu * conv(gamma)) +
    conv(beta) + b`` (``bias_ptr`` holds ``conv(beta) + b`` as ``[P, COUT]``); else
    ``y = acc + b`` (``[P, COUT]`` too, the bias repeated per cell).
    """
    o = tl.arange(0, BLOCK_N)
    o_ok = o < COUT
    ok = m_ok[:, None] & o_ok[None, :]
    table = p[:, None] * COUT + o[None, :]  # [P, COUT] per-position tables
    y = acc
    if IN_FOLD:
        mu = tl.load(stat_in_ptr + 2 * n, mask=m_ok, other=0.0)
        rstd = tl.load(stat_in_ptr + 2 * n + 1, mask=m_ok, other=0.0)
        bnw = tl.load(bnw_ptr + table, mask=ok, other=0.0).to(tl.float32)
        y = rstd[:, None] * (y - mu[:, None] * bnw)
    y += tl.load(bias_ptr + table, mask=ok, other=0.0).to(tl.float32)
    rows = m.to(tl.int64)[:, None] * COUT + o[None, :]
    if OUT == 0 or OUT == 1:
        # Exact (erf) GELU, as nn.GELU() and the official code.
        g = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        g = tl.where(ok, g, 0.0)
        mean = tl.sum(g, axis=1) / COUT
        dev = tl.where(ok, g - mean[:, None], 0.0)
        m2 = tl.sum(dev * dev, axis=1)
        if OUT == 0:
            gamma = tl.load(nw_ptr + table, mask=ok, other=0.0).to(tl.float32)
            tl.store(dst_ptr + rows, (g * gamma).to(dst_ptr.dtype.element_ty), mask=ok)
            tl.store(rowstat_ptr + 2 * m.to(tl.int64), mean, mask=m_ok)
            tl.store(rowstat_ptr + 2 * m.to(tl.int64) + 1, m2, mask=m_ok)
        else:
            rstd_row = 1.0 / tl.sqrt_rn(m2 / COUT + eps)
            cw = tl.load(nw_ptr + o, mask=o_ok, other=0.0)
            cb = tl.load(nb_ptr + o, mask=o_ok, other=0.0)
            z = dev * rstd_row[:, None] * cw[None, :] + cb[None, :]
            tl.store(dst_ptr + rows, z.to(dst_ptr.dtype.element_ty), mask=ok)
    elif OUT == 2:
        tl.store(dst_ptr + rows, y, mask=ok)
    else:
        d = tl.load(d_ptr + rows, mask=ok, other=0.0)
        heat = (1.0 / (1.0 + tl.exp(-d))) * (1.0 / (1.0 + tl.exp(y)))
        out = n.to(tl.int64)[:, None] * (COUT * P) + o[None, :] * P + p[:, None]
        tl.store(dst_ptr + out, heat, mask=ok)


@triton.jit(do_not_specialize=["N", "stride_xn", "stride_xc", "stride_xh", "stride_xw", "eps"])
def _reduce_kernel(
    x_ptr, w_ptr, bias_ptr, nw_ptr, nb_ptr, dst_ptr, rowstat_ptr,
    N, stride_xn, stride_xc, stride_xh, stride_xw, eps,
    C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, COUT: tl.constexpr,
    BLOCK_N: tl.constexpr, LAYOUT: tl.constexpr, VEC: tl.constexpr, OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """The reduce layer: ``tokens[N, C, h, w]`` (any strides) -> ``[N*P, COUT]`` activations.

    Like the chain layers, programs own ``BLOCK_M`` consecutive cells of the flattened batch
    (``m = n*P + p``, blocks may span tiles), so no dot rows are wasted on a tile's padding
    (14 x 14 = 196 cells in 64-cell blocks would otherwise compute 256 rows per tile). The token
    address of a row is loop-invariant: ``n*stride_xn + p*stride`` (NCHW: cells contiguous, NHWC:
    channels contiguous, the encoder's ``[N, h*w, C]``), so only the channel offset moves in the
    K loop. ``VEC`` (> 1): the launcher checked that the tile stride, the cell count or cell
    pitch and the data pointer are multiples of ``VEC`` elements, so the loads may be ``VEC``
    elements wide (NHWC 16 bytes; NCHW 14 x 14 bf16, a 392-byte channel pitch, 8 bytes). The
    rows past ``M`` wrap to the first cells (``m mod M``: every address valid, groups of ``VEC``
    still contiguous, no row mask on the loads) and their results are not stored.
    """
    P: tl.constexpr = H * W
    M = N * P
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    ms = m % M
    n = ms // P
    p = ms - n * P
    k = tl.arange(0, BLOCK_K)
    o = tl.arange(0, BLOCK_N)
    tile = n.to(tl.int64) * stride_xn
    if LAYOUT == 1:
        rows = tile + p
        if VEC > 1:
            rows = tl.max_contiguous(tl.multiple_of(rows, VEC), VEC)
    elif LAYOUT == 2:
        rows = tile + p.to(tl.int64) * stride_xw
        if VEC > 1:
            rows = tl.multiple_of(rows, VEC)
    else:
        rows = tile + (p // W).to(tl.int64) * stride_xh + (p % W).to(tl.int64) * stride_xw
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, C, BLOCK_K, num_stages=STAGES):
        kk = k0 + k
        if LAYOUT == 2:
            cols = tl.max_contiguous(tl.multiple_of(kk, BLOCK_K), BLOCK_K)
        else:
            cols = kk.to(tl.int64) * stride_xc
            if VEC > 1:
                cols = tl.multiple_of(cols, VEC)
        if C % BLOCK_K == 0:
            a = tl.load(x_ptr + rows[:, None] + cols[None, :])
            wt = tl.load(w_ptr + kk[:, None] * COUT + o[None, :], mask=(o < COUT)[None, :],
                         other=0.0)  # fmt: skip
        else:
            k_ok = kk < C
            a = tl.load(x_ptr + rows[:, None] + cols[None, :], mask=k_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + kk[:, None] * COUT + o[None, :],
                         mask=k_ok[:, None] & (o < COUT)[None, :], other=0.0)  # fmt: skip
        acc = tl.dot(a.to(wt.dtype), wt, acc, input_precision=PRECISION)
    _epilogue(acc, m, m_ok, n, p, P, bias_ptr, bias_ptr, bias_ptr, nw_ptr, nb_ptr, dst_ptr,
              rowstat_ptr, dst_ptr, eps, COUT, BLOCK_N, False, OUT)  # fmt: skip


@triton.jit(do_not_specialize=["M", "eps"])
def _conv_kernel(
    src_ptr, w_ptr, stat_in_ptr, bnw_ptr, bias_ptr, nw_ptr, nb_ptr, dst_ptr, rowstat_ptr, d_ptr,
    M, eps,
    H: tl.constexpr, W: tl.constexpr, CIN: tl.constexpr, COUT: tl.constexpr, BLOCK_N: tl.constexpr, KS: tl.constexpr,
    IN_FOLD: tl.constexpr, OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One chain layer over ``M`` cells: ``src[M, CIN]`` -> epilogue ``OUT`` of a KSxKS conv.

    Weights are ``[KS*KS*CIN, COUT]`` (tap-major), so one flattened K loop walks taps and input
    channels. For KS = 3 a tap reads the neighbour cell with its row and column clamped to the
    tile: the replication padding, for free.
    """
    P: tl.constexpr = H * W
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    ms = tl.minimum(m, M - 1)
    n = ms // P
    p = ms - n * P
    pr = p // W
    pc = p - pr * W
    tile0 = n * P
    k = tl.arange(0, BLOCK_K)
    o = tl.arange(0, BLOCK_N)
    o_ok = o < COUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kk in tl.range(0, KS * KS * CIN, BLOCK_K, num_stages=STAGES):
        tap = kk // CIN
        c0 = kk - tap * CIN
        if KS == 1:
            cell = ms
        else:
            nr = tl.minimum(tl.maximum(pr + (tap // KS - KS // 2), 0), H - 1)
            nc = tl.minimum(tl.maximum(pc + (tap % KS - KS // 2), 0), W - 1)
            cell = tile0 + nr * W + nc
        cols = tl.max_contiguous(tl.multiple_of(c0 + k, BLOCK_K), BLOCK_K)
        a = tl.load(src_ptr + cell.to(tl.int64)[:, None] * CIN + cols[None, :])
        wt = tl.load(w_ptr + (kk + k)[:, None] * COUT + o[None, :], mask=o_ok[None, :], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    _epilogue(acc, m, m_ok, n, p, P, stat_in_ptr, bnw_ptr, bias_ptr, nw_ptr, nb_ptr, dst_ptr,
              rowstat_ptr, d_ptr, eps, COUT, BLOCK_N, IN_FOLD, OUT)  # fmt: skip


@triton.jit(do_not_specialize=["eps"])
def _tile_stats_kernel(rowstat_ptr, stat_ptr, eps, P: tl.constexpr, COUT: tl.constexpr,
                       BLOCK: tl.constexpr):  # fmt: skip
    """Per tile: merge its cells' ``(mean, M2)`` over ``COUT`` channels into ``(mu, rstd)``.

    Every row counts ``COUT`` values, so ``mu`` is the mean of the row means and
    ``M2 = sum(M2_r) + COUT * sum((mean_r - mu)^2)`` (Chan's merge, in a fixed order).
    """
    n = tl.program_id(0)
    base = rowstat_ptr + n.to(tl.int64) * P * 2
    r = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for r0 in range(0, P, BLOCK):
        ok = r0 + r < P
        total += tl.load(base + 2 * (r0 + r), mask=ok, other=0.0)
    mu = tl.sum(total) / P
    spread = tl.zeros([BLOCK], dtype=tl.float32)
    for r0 in range(0, P, BLOCK):
        ok = r0 + r < P
        mean_r = tl.load(base + 2 * (r0 + r), mask=ok, other=0.0)
        m2_r = tl.load(base + 2 * (r0 + r) + 1, mask=ok, other=0.0)
        dev = tl.where(ok, mean_r - mu, 0.0)
        spread += m2_r + COUT * dev * dev
    rstd = 1.0 / tl.sqrt_rn(tl.sum(spread) / (P * COUT) + eps)
    tl.store(stat_ptr + 2 * n, mu)
    tl.store(stat_ptr + 2 * n + 1, rstd)


# --------------------------------------------------------------------------------------------
# Host side: the weights as named, kernel-ready layers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedLayer:
    """One convolution, laid out for the layer kernels.

    ``weight`` ``[ks*ks*cin, cout]`` (compute dtype, tap-major); ``bias`` ``[P, cout]`` fp32 (the
    bias, plus ``conv(beta_in)`` when the input norm is folded); ``bnw`` ``[P, cout]``
    ``conv(gamma_in)`` or None; ``nw``/``nb`` the output norm's affine (tile: ``nw`` ``[P, cout]``
    gamma, ``nb`` unused; channel: ``[cout]`` each), None on the last layer of a chain.
    """

    ks: int
    cin: int
    cout: int
    weight: Tensor
    bias: Tensor
    bnw: Tensor | None
    nw: Tensor | None
    nb: Tensor | None


@dataclass(frozen=True)
class PackedHead:
    """The whole head: the reduce layer and the two chains, each a tuple of ``PackedLayer``."""

    reduce: PackedLayer
    detect: tuple[PackedLayer, ...]
    context: tuple[PackedLayer, ...]
    norm: str
    grid: tuple[int, int]


_PACK_CACHE: dict[tuple, tuple[list[Tensor], tuple[int, ...], PackedHead]] = {}
_PACK_CACHE_SIZE = 8


def flatten_weights(weights: HeadWeights) -> list[Tensor]:
    """The 32 head tensors in the order the custom op takes them (the official checkpoint's 32).

    reduce (w, b, norm w, norm b), detect 0..2 (w, b, nw, nb), detect 3 (w, b), context likewise.
    """
    if len(weights.detect) != 4 or len(weights.context) != 4:
        raise InputError(
            "the fused head implements the official architecture (reduce + 4 detection + 4 "
            f"context convolutions); got {len(weights.detect)} detection and "
            f"{len(weights.context)} context layers. Use backend='reference' for other shapes"
        )
    out: list[Tensor] = []
    hidden = (weights.reduce, *weights.detect[:3], *weights.context[:3])
    for i, layer in enumerate(hidden):
        if layer.norm_weight is None or layer.norm_bias is None:
            raise InputError("every layer but the last of each chain needs a norm weight and bias")
        out += [layer.weight, layer.bias, layer.norm_weight, layer.norm_bias]
        if i == 3:
            out += [weights.detect[3].weight, weights.detect[3].bias]
    out += [weights.context[3].weight, weights.context[3].bias]
    return out


def _chains(params: list[Tensor]) -> tuple[list[tuple[Tensor, ...]], list[tuple[Tensor, ...]]]:
    """(detect, context) layers of the flat list: (w, b, nw, nb) or (w, b) for the last."""
    d = [tuple(params[4 + 4 * i : 8 + 4 * i]) for i in range(3)] + [tuple(params[16:18])]
    c = [tuple(params[18 + 4 * i : 22 + 4 * i]) for i in range(3)] + [tuple(params[30:32])]
    return d, c


def _per_position(t: Tensor) -> Tensor:
    """LayerNorm([c, h, w]) affine ``[c, h, w]`` -> ``[P, c]`` fp32 (the activations' layout)."""
    return t.detach().reshape(t.shape[0], -1).t().to(torch.float32).contiguous()


def _folded_tables(
    weight: Tensor, nw_in: Tensor, nb_in: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor]:
    """``conv(gamma)`` and ``conv(beta) + b`` as ``[P, cout]`` fp32, computed in float64.

    The convolution pads like the layer (replicate): padding commutes with the elementwise norm.
    """
    w64 = weight.detach().to(torch.float64)
    pad = weight.shape[-1] // 2

    def conv(t: Tensor) -> Tensor:
        x = t.detach().to(torch.float64)[None]
        if pad:
            x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        return F.conv2d(x, w64)[0]  # [cout, h, w]

    bnw = _per_position(conv(nw_in))
    bnb = conv(nb_in) + bias.detach().to(torch.float64)[:, None, None]
    return bnw, _per_position(bnb)


def _pack_layer(
    w: Tensor, b: Tensor, norm_in: tuple[Tensor, Tensor] | None, norm_out: tuple[Tensor, Tensor] | None,
    norm: str, cells: int, dtype: torch.dtype, table_dtype: torch.dtype = torch.float32,
) -> PackedLayer:  # fmt: skip
    cout, cin, kh, kw = w.shape
    weight = w.detach().permute(2, 3, 1, 0).reshape(kh * kw * cin, cout).to(dtype).contiguous()
    bnw = None
    if norm == "tile" and norm_in is not None:
        bnw, bias = _folded_tables(w, norm_in[0], norm_in[1], b)
    else:
        bias = b.detach().to(torch.float32)[None, :].expand(cells, cout).contiguous()
    nw = nb = None
    if norm_out is not None:
        if norm == "tile":
            nw = _per_position(norm_out[0])
        else:
            nw, nb = (t.detach().to(torch.float32).contiguous() for t in norm_out)
    if table_dtype != torch.float32:  # the [P, cout] tables only (the channel affine stays fp32)
        bias = bias.to(table_dtype)
        bnw = bnw.to(table_dtype) if bnw is not None else None
        nw = nw.to(table_dtype) if nw is not None and norm == "tile" else nw
    return PackedLayer(kh, cin, cout, aligned(weight), bias, bnw, nw, nb)


def pack_head(
    params: list[Tensor], norm: str, grid: tuple[int, int], dtype: torch.dtype,
    table_dtype: torch.dtype = torch.float32,
) -> PackedHead:  # fmt: skip
    """The 32 tensors of ``flatten_weights`` -> a ``PackedHead`` for ``grid`` in ``dtype``, its
    per-position tables in ``table_dtype``."""
    cells = grid[0] * grid[1]
    rw, rb, rnw, rnb = params[:4]
    reduce = _pack_layer(rw, rb, None, (rnw, rnb), norm, cells, dtype, table_dtype)
    chains = []
    for chain in _chains(params):
        layers, norm_in = [], (rnw, rnb)
        for i, layer in enumerate(chain):
            norm_out = (layer[2], layer[3]) if i < 3 else None
            layers.append(_pack_layer(layer[0], layer[1], norm_in, norm_out, norm, cells, dtype,
                                      table_dtype))  # fmt: skip
            norm_in = norm_out
        chains.append(tuple(layers))
    return PackedHead(reduce, chains[0], chains[1], norm, grid)


def _versions(params: list[Tensor]) -> tuple[int, ...] | None:
    """Version counters (shared by ``detach()`` views); None for inference tensors (no counter)."""
    try:
        return tuple(t._version for t in params)
    except RuntimeError:
        return None


def packed_head(
    params: list[Tensor], norm: str, grid: tuple[int, int], dtype: torch.dtype,
    table_dtype: torch.dtype = torch.float32,
) -> PackedHead:  # fmt: skip
    """``pack_head``, cached on where the parameters live and their version counters.

    Inference pays the packing (a few small convolutions in float64) once; an in-place update
    (an optimiser step, ``load_state_dict``) bumps a version counter and repacks. The cache holds
    the source tensors (a few MB per model, 8 models at most), so their memory cannot be reused by
    other tensors while an entry could still match.
    """
    versions = _versions(params)
    key = (dtype, table_dtype, norm, grid,
           *((t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride()) for t in params))  # fmt: skip
    hit = _PACK_CACHE.get(key)
    if hit is not None and versions is not None and hit[1] == versions:
        return hit[2]
    packed = pack_head(params, norm, grid, dtype, table_dtype)
    if versions is not None:
        if len(_PACK_CACHE) >= _PACK_CACHE_SIZE:
            _PACK_CACHE.pop(next(iter(_PACK_CACHE)))
        _PACK_CACHE[key] = (list(params), versions, packed)
    return packed


def token_layout(x: Tensor) -> int:
    """Which layout variant reads ``x[N, C, h, w]`` (strides in elements)."""
    _, c, h, w = x.shape
    sn, sc, sh, sw = x.stride()
    if (sw == 1 or w == 1) and (sh == w or h == 1):
        return LAYOUT_NCHW
    if (sc == 1 or c == 1) and (sh == w * sw or h == 1):
        return LAYOUT_NHWC
    return LAYOUT_STRIDED


def token_vector(x: Tensor, layout: int) -> int:
    """Elements per token load the reduce kernel may assume (1: no alignment hints).

    NHWC loads along the channels: 16 bytes when the data pointer, the tile stride and the cell
    pitch are multiples of 16 bytes. NCHW loads along the cells: the widest vector (<= 16 bytes)
    dividing the cells per tile, the channel pitch and the tile stride (14 x 14 = 196 cells: 4).
    """
    sn, sc, sh, sw = x.stride()
    size = x.element_size()
    if layout == LAYOUT_NHWC:
        v = 16 // size
        ok = (
            x.data_ptr() % 16 == 0 and sn % v == 0 and (sw % v == 0 or x.shape[2] * x.shape[3] == 1)
        )
        return v if ok else 1
    if layout == LAYOUT_NCHW:
        cells = x.shape[2] * x.shape[3]
        v = 16 // size
        while v > 1:
            if x.data_ptr() % (v * size) == 0 and not (sn % v or sc % v or cells % v):
                return v
            v //= 2
    return 1


def head_dims(params: list[Tensor]) -> dict[str, int]:
    """The architecture's channel widths, read off the conv weights."""
    rw, d0w, d1w, d2w, d3w = params[0], params[4], params[8], params[12], params[16]
    return {
        "C": int(rw.shape[1]),
        "CR": int(rw.shape[0]),
        "W1": int(d0w.shape[0]),
        "W2": int(d1w.shape[0]),
        "W3": int(d2w.shape[0]),
        "K": int(d3w.shape[0]),
    }


def check_head_inputs(tokens: Tensor, params: list[Tensor], norm: str) -> dict[str, int]:
    """Validate shapes; return the dims. No host sync."""
    if tokens.ndim != 4:
        raise InputError(
            f"insight_head expects token grids [N, C, h, w], got {tuple(tokens.shape)}; "
            "pass [N, h*w, C] through fastinsight.ops.reference.tokens_as_grid (a view)"
        )
    if not tokens.is_floating_point() or tokens.dtype not in _TL_DTYPES:
        raise InputError(f"token grids must be float32, float16 or bfloat16, got {tokens.dtype}")
    if norm not in ("tile", "channel"):
        raise InputError(f"norm must be 'tile' or 'channel', got {norm!r}")
    if len(params) != 32:
        raise InputError(f"the head takes 32 tensors, got {len(params)}")
    dims = head_dims(params)
    n, c, h, w = tokens.shape
    if c != dims["C"]:
        raise InputError(f"token grids have {c} channels but the head expects {dims['C']}")
    chain = [dims["CR"], dims["W1"], dims["W2"], dims["W3"], dims["K"]]
    for i, (cin, cout) in enumerate(zip(chain[:-1], chain[1:], strict=True)):
        for j, ks in ((4 + 4 * i, 1), (18 + 4 * i, 3)):
            if tuple(params[j].shape) != (cout, cin, ks, ks):
                raise InputError(
                    f"head weight {j} has shape {tuple(params[j].shape)}, expected "
                    f"{(cout, cin, ks, ks)}"
                )
    if tuple(params[0].shape) != (dims["CR"], c, 1, 1):
        raise InputError(f"reduce weight has shape {tuple(params[0].shape)}")
    norm_shape = (lambda ch: (ch, h, w)) if norm == "tile" else (lambda ch: (ch,))
    norms = [(2, dims["CR"])]
    for i, ch in enumerate((dims["W1"], dims["W2"], dims["W3"])):
        norms += [(6 + 4 * i, ch), (20 + 4 * i, ch)]
    for j, ch in norms:
        for t in (params[j], params[j + 1]):
            if tuple(t.shape) != norm_shape(ch):
                hint = "; the per-tile LayerNorm ties the model to its grid size"
                raise InputError(
                    f"{norm} norm parameters must be {norm_shape(ch)}, got {tuple(t.shape)}"
                    + (hint if norm == "tile" else "")
                )
    widths = (dims["CR"], dims["W1"], dims["W2"], dims["W3"])
    if max(widths) > 256 or any(width % 16 for width in widths):
        raise InputError(
            f"the fused head supports hidden widths that are multiples of 16 up to 256; got "
            f"{widths}. Use backend='reference' for this architecture"
        )
    if dims["K"] > 256:
        raise InputError(f"the fused head supports up to 256 classes, got {dims['K']}")
    if n < 1:
        raise InputError("no tiles: the batch of token grids is empty")
    return dims


def _block_n(cout: int) -> int:
    return max(16, next_pow2(cout))


def _block_k(cin: int, cfg: HeadLaunchConfig) -> int:
    """The largest power of two <= cfg.BLOCK_K that divides ``cin`` (a multiple of 16)."""
    bk = cfg.BLOCK_K
    while cin % bk:
        bk //= 2
    return bk


def _precision(dtype: torch.dtype, precision: str, folded: bool = False) -> str:
    """The dots' ``input_precision``.

    fp32 tokens with ``precision="tf32"``: TF32 dots, except in the layers that take a folded
    tile norm. There the conv of the un-centred ``u = GELU(y) * gamma`` loses the mean that the
    epilogue subtracts afterwards, and TF32's 10-bit operands left 5.4-5.9e-3 of heatmap error on
    an H200 (over the 5e-3 TF32 bound; the IEEE path is within 1e-5): those layers run
    ``tf32x3`` (three TF32 products, about fp32 accuracy).
    """
    if dtype != torch.float32:
        return "ieee"
    return "tf32x3" if precision == "tf32" and folded else precision


def reduce_constexprs(C: int, grid: tuple[int, int], cout: int, out: int, layout: int, vec: int,
                      dtype: torch.dtype, precision: str, cfg: HeadLaunchConfig) -> dict[str, object]:  # fmt: skip
    """Compile-time arguments of one ``_reduce_kernel`` variant (launcher and check share it)."""
    return {
        "C": C,
        "H": grid[0],
        "W": grid[1],
        "COUT": cout,
        "BLOCK_N": _block_n(cout),
        "LAYOUT": layout,
        "VEC": vec,
        "OUT": out,
        "BLOCK_M": cfg.BLOCK_MR,
        "BLOCK_K": cfg.BLOCK_K,
        "STAGES": cfg.num_stages,
        "PRECISION": _precision(dtype, precision),
    }


def conv_constexprs(grid: tuple[int, int], ks: int, cin: int, cout: int, in_fold: bool, out: int,
                    dtype: torch.dtype, precision: str, cfg: HeadLaunchConfig) -> dict[str, object]:  # fmt: skip
    """Compile-time arguments of one ``_conv_kernel`` variant."""
    return {
        "H": grid[0],
        "W": grid[1],
        "CIN": cin,
        "COUT": cout,
        "BLOCK_N": _block_n(cout),
        "KS": ks,
        "IN_FOLD": in_fold,
        "OUT": out,
        "BLOCK_M": cfg.BLOCK_MW if _wide(cout) else cfg.BLOCK_M,
        "BLOCK_K": _block_k(cin, cfg),
        "STAGES": cfg.num_stages,
        "PRECISION": _precision(dtype, precision, in_fold),
    }


def _wide(cout: int) -> bool:
    """Layers wider than 64 channels take ``BLOCK_MW`` cells (and ``num_warps_wide`` warps)."""
    return cout > 64


def _options(cfg: HeadLaunchConfig, cout: int, reduce: bool = False) -> dict[str, object]:
    """Launch options of a layer (``HeadLaunchConfig.warps``: the reduce counts as wide)."""
    warps = cfg.warps(cout, reduce or _wide(cout))
    return {"num_warps": warps, "num_stages": 1, "enable_fp_fusion": True}


def _hidden_out(norm: str) -> int:
    return OUT_TILE if norm == "tile" else OUT_CHANNEL


# Cells per chunk of the plan: a 128-channel bf16 activation of 2^20 cells is 256 MB.
MAX_CHUNK_CELLS = 1 << 20

# A launch of the plan: (label, launch(), {"flops": ..., "bytes": ...} the minimal work it does,
# "traffic": what its programs load and store by the model of ``traffic_bytes``, "cells": how
# many cells it covers).
Step = tuple[str, Callable[[], object], dict[str, float]]


def traffic_bytes(
    m: int, block_m: int, taps: int, cin: int, cout: int, size: int,
    tables: int, out_size: int, table_size: int = 4,
) -> float:  # fmt: skip
    """Bytes a layer launch moves between L2 (or HBM) and the SMs, by its block structure.

    Each of the ``cdiv(m, block_m)`` programs loads its cells' inputs (``block_m * taps * cin``
    elements of ``size`` bytes: a 3x3 layer reads each neighbour once per tap), the layer's whole
    weight matrix (``taps * cin * cout``), ``tables`` ``[block_m, cout]`` per-position tables of
    ``table_size`` bytes (folded norm, bias, output gamma), and stores ``block_m * cout`` values
    of ``out_size`` bytes (the gate counts its read of the fp32 logits there too). The weights are read per program, so their share falls as ``1 / block_m``: with
    64-cell blocks the bf16 3x3 128 -> 128 layer moves ~4.6 KB of weights per cell beside 2.3 KB
    of activations. A launch that takes more time than this traffic at the device's L2
    bandwidth is not limited by it.
    """
    programs = -(-m // block_m)
    per_program = block_m * (taps * cin * size + cout * (table_size * tables + out_size))
    return float(programs * (per_program + taps * cin * cout * size))


def _chain_steps(
    head: PackedHead, layers: tuple[PackedLayer, ...], z: Tensor, stat_z: Tensor,
    bufs: tuple[Tensor, Tensor], rowstat: Tensor, stat: Tensor, d: Tensor, out: Tensor,
    last_out: int, m: int, eps: float, precision: str, cfg: HeadLaunchConfig, name: str,
) -> list[Step]:  # fmt: skip
    """The launches of one chain (detection or context) over ``m`` cells, starting from ``z``."""
    h, w = head.grid
    cells = h * w
    src, stat_in = z, stat_z
    fold = head.norm == "tile"
    steps: list[Step] = []
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        mode = last_out if last else _hidden_out(head.norm)
        dst = (out if mode == OUT_GATE else d) if last else bufs[i % 2]
        consts = conv_constexprs(head.grid, layer.ks, layer.cin, layer.cout, fold, mode, z.dtype,
                                 precision, cfg)  # fmt: skip
        dummy = layer.bias
        args = (src, layer.weight, stat_in if fold else dummy, layer.bnw if fold else dummy,
                layer.bias, layer.nw if layer.nw is not None else dummy,
                layer.nb if layer.nb is not None else dummy, dst, rowstat, d, m, float(eps))  # fmt: skip
        launch = _conv_kernel[(triton.cdiv(m, consts["BLOCK_M"]),)]
        opts = {**consts, **_options(cfg, layer.cout)}
        label = f"{name}{i} {layer.ks}x{layer.ks} {layer.cin}->{layer.cout}"
        size = z.element_size()
        # Tables: bias (+ conv(gamma) when folded) in, gamma out (tile norm). The last layers
        # write fp32, and the gate also reads the fp32 logits D.
        tables = 1 + fold + (mode == OUT_TILE)
        out_size = (8 if mode == OUT_GATE else 4) if last else size
        work = {"flops": 2.0 * m * layer.ks**2 * layer.cin * layer.cout, "cells": m,
                "bytes": float(m * (layer.cin + layer.cout) * size),
                "traffic": traffic_bytes(m, consts["BLOCK_M"], layer.ks**2, layer.cin,
                                         layer.cout, size, tables, out_size,
                                         layer.bias.element_size())}  # fmt: skip
        steps.append((label, functools.partial(launch, *args, **opts), work))
        if not last and fold:
            stats = _tile_stats_kernel[(m // cells,)]
            steps.append((f"{name}{i} tile statistics", functools.partial(
                stats, rowstat, stat, float(eps), P=cells, COUT=layer.cout,
                BLOCK=min(1024, next_pow2(cells)), num_warps=4),
                {"flops": 0.0, "bytes": m * 8.0, "traffic": m * 16.0, "cells": m}))  # fmt: skip
            stat_in = stat
        src = dst
    return steps


def head_plan(
    tokens: Tensor,
    params: list[Tensor],
    norm: str,
    eps: float,
    precision: str = "ieee",
    config: HeadLaunchConfig | None = None,
) -> tuple[Tensor, list[Step]]:
    """The heatmap tensor to be written and the named launches that write it, in order.

    Per chunk of ``chunk_tiles`` tiles: the reduce (+ tile statistics), then the detection chain
    (ending in the logits D) and the context chain (ending in the gate): 16 launches with the
    tile norm, 10 with the channel norm. Each step's work dict also names its ``chunk`` and its
    ``role`` (``"reduce"`` or ``"chain"``); with ``config.overlap`` the reduce's outputs (z, its
    row and tile statistics) alternate between two buffers, so ``run_plan`` may run chunk
    ``i + 1``'s reduce beside chunk ``i``'s chains. ``insight_head_launch`` runs the steps; the
    kernel benchmark times them one by one (bench_kernels.py, its per-launch option).
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dims = check_head_inputs(tokens, params, norm)
    device = check_device(tokens, *params, what="insight_head")
    n, c, h, w = tokens.shape
    cells = h * w
    cfg = config or launch_config(cells, tokens.dtype, precision, device_arch(device))
    if INTERPRET and tokens.dtype == torch.bfloat16:
        raise InputError("the Triton interpreter has no bfloat16 dots; test bf16 on a GPU")
    dtype = tokens.dtype
    head = packed_head(params, norm, (h, w), dtype, cfg.table_dtype(dtype))
    x = aligned(tokens)
    layout = token_layout(x)
    # fp32 whatever the tokens: bf16 keeps ~8 bits, coarser than a 256-bin Otsu histogram over
    # [0, 1] above 0.5, which would move the threshold against the fp32 official model.
    out = torch.empty((n, dims["K"], h, w), device=device, dtype=torch.float32)
    # Chunks of whole tiles, at most MAX_CHUNK_CELLS cells (37 x 37 CT grids: ~765 tiles).
    chunk = min(n, cfg.chunk_tiles, max(1, MAX_CHUNK_CELLS // cells))
    rows = chunk * cells
    widest = max(dims["CR"], dims["W1"], dims["W2"], dims["W3"])
    bufs = (torch.empty((rows, widest), device=device, dtype=dtype),
            torch.empty((rows, widest), device=device, dtype=dtype))  # fmt: skip
    d = torch.empty((rows, dims["K"]), device=device, dtype=torch.float32)
    rowstat = torch.empty((rows, 2), device=device, dtype=torch.float32)
    stat = torch.empty((chunk, 2), device=device, dtype=torch.float32)
    # The reduce's outputs: one set, or two alternating ones (with their own row statistics)
    # when a chunk's reduce may run beside the previous chunk's chains.
    n_sets = 2 if cfg.overlap and n > chunk else 1
    reduce_sets = [
        (torch.empty((rows, dims["CR"]), device=device, dtype=dtype),
         torch.empty((rows, 2), device=device, dtype=torch.float32) if n_sets > 1 else rowstat,
         torch.empty((chunk, 2), device=device, dtype=torch.float32))
        for _ in range(n_sets)
    ]  # fmt: skip
    red = head.reduce
    steps: list[Step] = []
    for index, n0 in enumerate(range(0, n, chunk)):
        z, zstat, stat_z = reduce_sets[index % n_sets]
        first = len(steps)
        xc = x[n0 : n0 + chunk]
        nc = xc.shape[0]
        m = nc * cells
        vec = token_vector(xc, layout)
        consts = reduce_constexprs(c, (h, w), dims["CR"], _hidden_out(norm), layout, vec, dtype,
                                   precision, cfg)  # fmt: skip
        launch = _reduce_kernel[(triton.cdiv(m, cfg.BLOCK_MR),)]
        steps.append((f"reduce {LAYOUT_NAMES[layout]} vec {vec}", functools.partial(
            launch, xc, red.weight, red.bias, red.nw, red.nb if red.nb is not None else red.nw,
            z, zstat, nc, *xc.stride(), float(eps), **consts, **_options(cfg, dims["CR"], reduce=True)),
            {"flops": 2.0 * m * c * dims["CR"], "cells": m,
             "bytes": float(m * (c + dims["CR"]) * xc.element_size()),
             "traffic": traffic_bytes(m, cfg.BLOCK_MR, 1, c, dims["CR"], xc.element_size(),
                                      1 + (norm == "tile"), xc.element_size(),
                                      red.bias.element_size())}))  # fmt: skip
        if norm == "tile":
            stats = _tile_stats_kernel[(nc,)]
            steps.append(("reduce tile statistics", functools.partial(
                stats, zstat, stat_z, float(eps), P=cells, COUT=dims["CR"],
                BLOCK=min(1024, next_pow2(cells)), num_warps=4),
                {"flops": 0.0, "bytes": m * 8.0, "traffic": m * 16.0, "cells": m}))  # fmt: skip
        outc = out[n0 : n0 + nc]
        common = (bufs, rowstat, stat, d, outc)
        steps += _chain_steps(head, head.detect, z, stat_z, *common, OUT_LOGITS, m, eps,
                              precision, cfg, "detect")  # fmt: skip
        steps += _chain_steps(head, head.context, z, stat_z, *common, OUT_GATE, m, eps,
                              precision, cfg, "context")  # fmt: skip
        reduce_steps = 2 if norm == "tile" else 1
        for j in range(first, len(steps)):
            label, launch, work = steps[j]
            role = "reduce" if j - first < reduce_steps else "chain"
            steps[j] = (label, launch, {**work, "chunk": index, "role": role,
                                        "overlap": n_sets > 1})  # fmt: skip
    return out, steps


def overlapped_order(steps: list[Step]) -> list[tuple[int, Step]]:
    """The issue order of an overlapped plan: chunk ``i + 1``'s reduce before chunk ``i``'s
    chains (the earliest the double buffers allow), as (chunk, step) pairs.

    Run one by one in this order (the interpreter, the tests), it checks the double buffering:
    a reduce that overwrote what the previous chunk's chains still read would change the result.
    """
    chunks: dict[int, dict[str, list[Step]]] = {}
    for step in steps:
        work = step[2]
        chunks.setdefault(work["chunk"], {"reduce": [], "chain": []})[work["role"]].append(step)
    order: list[tuple[int, Step]] = []
    for i in sorted(chunks):
        if i == 0:
            order += [(0, s) for s in chunks[0]["reduce"]]
        if i + 1 in chunks:
            order += [(i + 1, s) for s in chunks[i + 1]["reduce"]]
        order += [(i, s) for s in chunks[i]["chain"]]
    return order


def run_plan(steps: list[Step]) -> None:
    """Launch a plan's steps. Overlapped plans on CUDA put the reduces on a side stream: chunk
    ``i``'s chains wait for its reduce, and chunk ``i + 2``'s reduce (same buffers) waits for
    chunk ``i``'s chains. Everything joins the current stream before the last chain, so callers,
    CUDA graphs and the caching allocator see one stream's work."""
    if not steps or not steps[0][2].get("overlap"):
        for _, launch, _ in steps:
            launch()
        return
    order = overlapped_order(steps)
    if INTERPRET or not torch.cuda.is_available():
        for _, (_, launch, _) in order:
            launch()
        return
    main = torch.cuda.current_stream()
    # High priority: the block scheduler hands SM slots freed by the chain kernel's programs to
    # the reduce first, so memory-bound and compute-bound programs share the SMs. At equal
    # priority it would dispatch the earlier launch's (tens of thousands of) programs first and
    # the two kernels would only meet in its tail.
    side = torch.cuda.Stream(device=main.device, priority=-1)
    start = torch.cuda.Event()
    start.record(main)
    side.wait_event(start)  # the tokens and buffers are ready on the main stream
    # The last step of each (chunk, role) records the event the other stream waits for.
    last = {(chunk, step[2]["role"]): i for i, (chunk, step) in enumerate(order)}
    reduced: dict[int, torch.cuda.Event] = {}
    chained: dict[int, torch.cuda.Event] = {}
    waited: set[tuple[int, str]] = set()
    for i, (chunk, (_, launch, work)) in enumerate(order):
        role = work["role"]
        stream, other = (
            (side, chained.get(chunk - 2)) if role == "reduce" else (main, reduced.get(chunk))
        )
        if (chunk, role) not in waited:
            waited.add((chunk, role))
            if other is not None:  # chunk i's reduce, or chunk i - 2's chains (same buffers)
                stream.wait_event(other)
        with torch.cuda.stream(stream):
            launch()
        if last[(chunk, role)] == i:
            event = torch.cuda.Event()
            event.record(stream)
            (reduced if role == "reduce" else chained)[chunk] = event


def insight_head_launch(
    tokens: Tensor,
    params: list[Tensor],
    norm: str,
    eps: float,
    precision: str = "ieee",
    config: HeadLaunchConfig | None = None,
) -> Tensor:
    """Launch the layer kernels. Shapes: tokens ``[N, C, h, w]`` -> ``[N, K, h, w]`` float32."""
    out, steps = head_plan(tokens, params, norm, eps, precision, config)
    run_plan(steps)
    return out


# --------------------------------------------------------------------------------------------
# The variants ``fastinsight kernels check`` compiles
# --------------------------------------------------------------------------------------------
OFFICIAL_DIMS = {"C": 1024, "CR": 128, "W1": 128, "W2": 64, "W3": 64, "K": 3}
_ACT = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _signature(kernel, pointer_types: dict[str, str]) -> dict[str, str]:
    sig: dict[str, str] = {}
    for i, name in enumerate(kernel.arg_names):
        if i in kernel.constexprs:
            continue
        if name in pointer_types:
            sig[name] = pointer_types[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _chain_variants(dims: dict[str, int]) -> list[tuple[str, int, int, int, bool]]:
    """(name, ks, cin, cout, last) of every chain layer of the architecture."""
    widths = [dims["CR"], dims["W1"], dims["W2"], dims["W3"], dims["K"]]
    out = []
    for name, ks in (("detect", 1), ("context", 3)):
        for i in range(4):
            out.append((f"{name}{i}", ks, widths[i], widths[i + 1], i == 3))
    return out


# The grids the models use (spec): UNI's 14 x 14, patch-14 encoders at 224 px, CT slices.
GRIDS = ((14, 14), (16, 16), (37, 37))


def compile_specs(dims: dict[str, int] | None = None, grid: tuple[int, int] = (14, 14),
                  configs: tuple[HeadLaunchConfig, ...] = (),
                  keys: tuple[str, ...] | None = None) -> list[KernelSpec]:  # fmt: skip
    """Every layer-kernel variant the launcher can launch on a GPU for one architecture and grid.

    Token vectors: NHWC with and without 16-byte alignment; NCHW with the vector the grid allows
    (4 for 14 x 14) and without. ``configs``: instead, the bf16 and fp16 variants in these block
    configs on every architecture (what ``fastinsight kernels check --config`` compiles).
    ``keys``: only these compute keys (``bf16``, ``fp32-ieee``, ...). Grids other than 14 x 14
    name themselves after the key (``bf16 37x37, tile norm, ...``).
    """
    dims = dims or OFFICIAL_DIMS
    cells = grid[0] * grid[1]
    specs = []
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if configs:
        variants = [(key, cfg, None) for cfg in configs for key in ("bf16", "fp16")]
    else:
        variants = [(k, cfg, None) for k, cfg in GPU_CONFIGS.items() if k not in ("bf16", "fp16")]
        for key in ("bf16", "fp16"):
            variants += [(key, FAST_16BIT, (HOPPER,)), (key, AMPERE_16BIT, (80, 86, 89))]
    variants = [v for v in variants if keys is None or v[0] in keys]
    where = "" if grid == (14, 14) else f" {grid[0]}x{grid[1]}"
    for key, cfg, archs in variants:
        tname = key.split("-")[0]
        dtype = dtypes[tname]
        precision = key.split("-")[1] if "-" in key else "ieee"
        act = _ACT[tname]
        tensor_cores = key in ("bf16", "fp16", "fp32-tf32")
        for norm in ("tile", "channel"):
            hidden = _hidden_out(norm)
            # The per-position tables' pointers (fp16 with ``half_tables``; the channel norm's
            # per-channel affine stays fp32).
            tables: dict[str, str] = {}
            if cfg.table_dtype(dtype) == torch.float16:
                tables = {"bias_ptr": "*fp16", "bnw_ptr": "*fp16"}
                if norm == "tile":
                    tables.update(nw_ptr="*fp16", nb_ptr="*fp16")
            for layout, layout_name in LAYOUT_NAMES.items():
                size = torch.finfo(dtype).bits // 8
                widest = 16 // size
                if layout == LAYOUT_NCHW:
                    while cells % widest:
                        widest //= 2
                for vec in sorted({1, widest} if layout != LAYOUT_STRIDED else {1}):
                    consts = reduce_constexprs(dims["C"], grid, dims["CR"], hidden, layout, vec,
                                               dtype, precision, cfg)  # fmt: skip
                    sig = _signature(_reduce_kernel, {"x_ptr": act, "w_ptr": act, "dst_ptr": act,
                                                      **tables})  # fmt: skip
                    specs.append(KernelSpec(
                        kernel=f"{__name__}:_reduce_kernel",
                        variant=f"{key}{where}, {norm} norm, reduce, {layout_name}, vec {vec}",
                        config=cfg.describe(), signature=sig, constexprs=consts,
                        options=_options(cfg, dims["CR"], reduce=True), needs_tensor_cores=tensor_cores, archs=archs,
                    ))  # fmt: skip
            for name, ks, cin, cout, last in _chain_variants(dims):
                out = (OUT_LOGITS if ks == 1 else OUT_GATE) if last else hidden
                consts = conv_constexprs(grid, ks, cin, cout, norm == "tile", out, dtype,
                                         precision, cfg)  # fmt: skip
                dst = "*fp32" if last else act
                sig = _signature(_conv_kernel, {"src_ptr": act, "w_ptr": act, "dst_ptr": dst,
                                                **tables})  # fmt: skip
                specs.append(KernelSpec(
                    kernel=f"{__name__}:_conv_kernel",
                    variant=f"{key}{where}, {norm} norm, {name} {ks}x{ks} {cin}->{cout} "
                            f"{OUT_NAMES[out]}",
                    config=cfg.describe(), signature=sig, constexprs=consts,
                    options=_options(cfg, cout), needs_tensor_cores=tensor_cores, archs=archs,
                ))  # fmt: skip
    for cout in sorted({dims["CR"], dims["W1"], dims["W2"], dims["W3"]}) if not configs else ():
        specs.append(KernelSpec(
            kernel=f"{__name__}:_tile_stats_kernel",
            variant=f"tile statistics{where}, {cout} channels",
            config="B256-w4", signature=_signature(_tile_stats_kernel, {}),
            constexprs={"P": cells, "COUT": cout, "BLOCK": min(1024, next_pow2(cells))},
            options={"num_warps": 4, "num_stages": 1},
        ))  # fmt: skip
    return specs
