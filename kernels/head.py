"""The fused INSIGHT head: token grids in, raw heatmap out, in one kernel launch.

One program owns one tile at a time (a persistent grid walks the batch) and runs the whole head
for it::

    Z  = LN(GELU(X W_r + b_r))                              reduce (the only read of the tokens)
    D  = detection chain: three (1x1 conv, GELU, LN) + 1x1 conv           -> [h*w, K]
    Cx = context chain: three (replicate-pad 3x3 conv, GELU, LN) + 3x3 conv -> [h*w, K]
    H  = sigmoid(D) * sigmoid(-Cx)                           written as [N, K, h, w]

Activations are laid out cells x channels (``[h*w, c]``): every convolution is a ``tl.dot`` of
a block of cells against a ``[c_in, c_out]`` weight block, fp32 accumulation. A 3x3 convolution
is nine such dots, one per tap, whose A operand is gathered from the neighbouring cells with the
row and column clamped to the tile: that clamp *is* the replication padding.

Why a per-program scratch buffer in global memory: LayerNorm([c, h, w]) needs the statistics of
the whole tile before any cell can be normalised, and a 3x3 tap needs other cells' values, which
live in other threads' registers (Triton has no register shuffle for an arbitrary gather). The
128 x 196 activations of one tile (fp32: 100 KB) do not fit in one program's registers next to
the accumulators, so each layer writes its GELU output (fp32) and its normalised output (in the
compute dtype) to a small scratch area owned by the program (about 260 KB for 14 x 14 in bf16).
With a persistent grid of one program per SM the whole scratch (~35 MB on an H100, whose L2 is
50 MB) can stay in L2: the tokens are the only tensor that streams from HBM, once.
``tl.debug_barrier()`` (a CTA barrier, which also orders the program's global memory accesses)
separates the layers. The programs are 8 warps with up to 255 registers each and no spills
(``fastinsight kernels check``), i.e. one program per SM.

LayerNorm statistics are merged block by block with Chan's parallel update (count, mean, M2),
in a fixed order, so the result does not depend on the block sizes beyond rounding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastinsight.errors import InputError
from fastinsight.ops.reference import HeadWeights

from ._runtime import INTERPRET, KernelSpec, aligned, check_device, next_pow2, num_programs

# Token layouts the kernel specialises on (a constexpr): unit strides become compile-time
# constants so the loads of the token grid vectorise.
LAYOUT_STRIDED = 0  # any strides
LAYOUT_NCHW = 1  # [N, C, h, w] with the h*w cells contiguous (stride_xw = 1, stride_xh = w)
LAYOUT_NHWC = 2  # channels last, e.g. the encoder's [N, h*w, C] (stride_xc = 1)
LAYOUT_NAMES = {LAYOUT_STRIDED: "strided", LAYOUT_NCHW: "nchw", LAYOUT_NHWC: "nhwc"}

# What ``_head_layer`` does after its convolution (compile-time constants of the kernel).
MODE_HIDDEN = tl.constexpr(0)  # GELU + LayerNorm into the next layer's input
MODE_DETECT_OUT = tl.constexpr(1)  # the detection logits D, kept for the gate
MODE_GATE_OUT = tl.constexpr(2)  # the last context conv: the heatmap sigmoid(D) sigmoid(-Cx)
# The scratch activations are channels-last; the 3x3 layers read them through all strides.
_LAYOUT_CL = tl.constexpr(2)
_LAYOUT_ANY = tl.constexpr(0)

PRECISIONS = ("ieee", "tf32")
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class HeadLaunchConfig:
    """Block sizes and launch shape of the fused head (fixed configs; no autotuning).

    ``BLOCK_P`` cells per block (the dots' M), ``BLOCK_I`` input channels per dot step (K),
    ``BLOCK_O`` output channels per block (N) of the hidden layers; the reduce layer always covers
    all its output channels so the tokens are read once. ``token_stages`` software-pipelines the
    loop that streams the tokens; the other loops run at ``num_stages``. ``programs_per_sm``
    sizes the persistent grid (and so the scratch that must stay in L2).
    """

    BLOCK_P: int = 64
    BLOCK_I: int = 32
    BLOCK_O: int = 64
    NORM_BLOCK: int = 1024
    num_warps: int = 8
    num_stages: int = 1
    token_stages: int = 2
    programs_per_sm: int = 1

    def describe(self) -> str:
        return (
            f"P{self.BLOCK_P}-I{self.BLOCK_I}-O{self.BLOCK_O}-w{self.num_warps}"
            f"-s{self.num_stages}/{self.token_stages}"
        )


# One config per compute type: blocks that compile for sm_80 and sm_90 without a register spill
# (``fastinsight kernels check`` proves it for every variant; larger ones spill). Pipelining the
# token stream (token_stages=2) spills 8 B with these 16-bit blocks (sm_90, NCHW, channel norm),
# so it is off. 16-bit: K steps of 64 and 128-wide output blocks cut a tile's dot iterations
# from 768 to 304 (the 3x3 c0 layer from 288 to 72) at the same 1 CTA/SM occupancy
# (docs/kernel-analysis.md section 2; P128 spills).
FAST_16BIT = HeadLaunchConfig(BLOCK_P=64, BLOCK_I=64, BLOCK_O=128, token_stages=1)
GPU_CONFIGS: dict[str, HeadLaunchConfig] = {
    "bf16": FAST_16BIT,
    "fp16": FAST_16BIT,
    "fp32-tf32": HeadLaunchConfig(token_stages=1),
    "fp32-ieee": HeadLaunchConfig(token_stages=1),
}
# The interpreter's cost is per operation, not per element: few, large blocks are fastest.
INTERPRETER_CONFIG = HeadLaunchConfig(
    BLOCK_P=256, BLOCK_I=128, BLOCK_O=256, NORM_BLOCK=16384, num_warps=4, token_stages=1
)


def compute_key(dtype: torch.dtype, precision: str) -> str:
    """``bf16``, ``fp16``, ``fp32-ieee`` or ``fp32-tf32``: what picks a config."""
    name = _TL_DTYPES[dtype]
    return f"{name}-{precision}" if name == "fp32" else name


def launch_config(cells: int, dtype: torch.dtype, precision: str) -> HeadLaunchConfig:
    """The config the launcher uses for a grid of ``cells`` cells."""
    if INTERPRET:
        # One block of cells per layer (the interpreter pays per operation, not per element).
        return dataclasses.replace(INTERPRETER_CONFIG, BLOCK_P=min(256, max(16, next_pow2(cells))))
    return GPU_CONFIGS[compute_key(dtype, precision)]


# --------------------------------------------------------------------------------------------
# Triton code
# --------------------------------------------------------------------------------------------
@triton.jit
def _head_layer(
    src_ptr, stride_sh, stride_sw, stride_sc, cin,
    w_ptr, b_ptr, nw_ptr, nb_ptr, g_ptr, dst_ptr,
    stride_ok, stride_oh, stride_ow,
    P, H, W, eps, cout,
    MODE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_OF: tl.constexpr, KS: tl.constexpr,
    LAYOUT: tl.constexpr, TILE_NORM: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_I: tl.constexpr, STAGES: tl.constexpr, PRECISION: tl.constexpr,
    NORM_BLOCK: tl.constexpr,
):  # fmt: skip
    """One convolution of one tile, with what follows it.

    ``src`` is read as ``src[cell_row, cell_col, channel]`` through its strides (``LAYOUT``
    1 / 2 make the cell / channel stride a compile-time 1); weights are ``[KS*KS, cin, cout]``.
    For KS = 3 the neighbour cell is clamped to the tile: that clamp is the replication padding.

    MODE_HIDDEN, a hidden layer, ``dst[P, cout] = LN(GELU(conv(src)))``: pass 1 computes
    ``[BLOCK_P, BLOCK_O]`` blocks of GELU(conv) into ``g`` (fp32) and, for the tile norm, merges
    the tile's (count, mean, M2) block by block with Chan's update in a fixed order; pass 2
    normalises ``g`` into ``dst`` (compute dtype): the tile norm elementwise with the
    per-position affine, the channel norm whole cells (``BLOCK_OF`` >= cout) at a time.
    MODE_DETECT_OUT, the last detection conv: the logits D go to ``dst[P, BLOCK_O]`` (fp32).
    MODE_GATE_OUT, the last context conv: reads D from ``g`` and writes the gated heatmap
    ``sigmoid(D) * sigmoid(-Cx)`` to ``dst[k, row, col]`` through the output strides.
    """
    i = tl.arange(0, BLOCK_I)
    mean = 0.0
    m2 = 0.0
    count = 0.0
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < P
        ps = tl.minimum(p, P - 1)
        pr = ps // W
        pc = ps % W
        for o0 in range(0, cout, BLOCK_O):
            o = o0 + tl.arange(0, BLOCK_O)
            o_ok = o < cout
            ok = p_ok[:, None] & o_ok[None, :]
            acc = tl.zeros([BLOCK_P, BLOCK_O], dtype=tl.float32)
            if KS == 1:
                # The unclamped cell index (with a load mask) keeps the addresses provably
                # contiguous, so the token loads vectorise.
                if LAYOUT == 1:
                    row = p
                elif LAYOUT == 2:
                    row = p * stride_sw
                else:
                    row = pr * stride_sh + pc * stride_sw
                for i0 in tl.range(0, cin, BLOCK_I, num_stages=STAGES):
                    ii = i0 + i
                    i_ok = ii < cin
                    if LAYOUT == 2:
                        col = ii
                    else:
                        col = ii * stride_sc
                    a = tl.load(src_ptr + row[:, None] + col[None, :],
                                mask=p_ok[:, None] & i_ok[None, :], other=0.0)  # fmt: skip
                    wt = tl.load(w_ptr + ii[:, None] * cout + o[None, :],
                                 mask=i_ok[:, None] & o_ok[None, :], other=0.0)  # fmt: skip
                    acc = tl.dot(a.to(wt.dtype), wt, acc, input_precision=PRECISION)
            else:
                for tap in range(KS * KS):
                    nr = tl.minimum(tl.maximum(pr + (tap // KS - KS // 2), 0), H - 1)
                    nc = tl.minimum(tl.maximum(pc + (tap % KS - KS // 2), 0), W - 1)
                    row = nr * stride_sh + nc * stride_sw
                    for i0 in range(0, cin, BLOCK_I):
                        ii = i0 + i
                        i_ok = ii < cin
                        a = tl.load(src_ptr + row[:, None] + ii[None, :] * stride_sc,
                                    mask=i_ok[None, :], other=0.0)  # fmt: skip
                        wt = tl.load(w_ptr + (tap * cin + ii)[:, None] * cout + o[None, :],
                                     mask=i_ok[:, None] & o_ok[None, :], other=0.0)  # fmt: skip
                        acc = tl.dot(a.to(wt.dtype), wt, acc, input_precision=PRECISION)
            y = acc + tl.load(b_ptr + o, mask=o_ok, other=0.0)[None, :]
            if MODE == MODE_HIDDEN:
                # Exact (erf) GELU, as nn.GELU() and the official code.
                y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
                tl.store(g_ptr + p[:, None] * cout + o[None, :], y, mask=ok)
                if TILE_NORM:
                    n_b = (tl.minimum(P - p0, BLOCK_P) * tl.minimum(cout - o0, BLOCK_O)).to(
                        tl.float32
                    )
                    mean_b = tl.sum(tl.where(ok, y, 0.0)) / n_b
                    dev = tl.where(ok, y - mean_b, 0.0)
                    m2_b = tl.sum(dev * dev)
                    total = count + n_b
                    delta = mean_b - mean
                    mean = mean + delta * (n_b / total)
                    m2 = m2 + m2_b + delta * delta * (count * n_b / total)
                    count = total
            elif MODE == MODE_DETECT_OUT:
                tl.store(dst_ptr + p[:, None] * BLOCK_O + o[None, :], y, mask=ok)
            else:
                d = tl.load(g_ptr + p[:, None] * BLOCK_O + o[None, :], mask=ok, other=0.0)
                heat = (1.0 / (1.0 + tl.exp(-d))) * (1.0 / (1.0 + tl.exp(y)))
                out = dst_ptr + (pr * stride_oh + pc * stride_ow)[:, None] + o[None, :] * stride_ok
                tl.store(out, heat.to(dst_ptr.dtype.element_ty), mask=ok)
    tl.debug_barrier()
    if MODE == MODE_HIDDEN:
        if TILE_NORM:
            rstd = 1.0 / tl.sqrt_rn(m2 / count + eps)
            # Elementwise over the contiguous [P, cout] buffer; the launcher stores the affine
            # LayerNorm([c, h, w]) parameters transposed to [h*w, c], so all three loads line up.
            e_range = tl.arange(0, NORM_BLOCK)
            for e0 in range(0, P * cout, NORM_BLOCK):
                e = e0 + e_range
                e_ok = e < P * cout
                y = tl.load(g_ptr + e, mask=e_ok, other=0.0)
                nw = tl.load(nw_ptr + e, mask=e_ok, other=0.0)
                nb = tl.load(nb_ptr + e, mask=e_ok, other=0.0)
                z = (y - mean) * rstd * nw + nb
                tl.store(dst_ptr + e, z.to(dst_ptr.dtype.element_ty), mask=e_ok)
        else:
            # Per-cell LayerNorm over the channels: mean and variance in two passes in registers.
            ROWS: tl.constexpr = NORM_BLOCK // BLOCK_OF
            c = tl.arange(0, BLOCK_OF)
            c_ok = c < cout
            cw = tl.load(nw_ptr + c, mask=c_ok, other=0.0)
            cb = tl.load(nb_ptr + c, mask=c_ok, other=0.0)
            for r0 in range(0, P, ROWS):
                r = r0 + tl.arange(0, ROWS)
                ok = (r < P)[:, None] & c_ok[None, :]
                offs = r[:, None] * cout + c[None, :]
                y = tl.load(g_ptr + offs, mask=ok, other=0.0)
                row_mean = tl.sum(y, axis=1) / cout
                dev = tl.where(ok, y - row_mean[:, None], 0.0)
                rstd = 1.0 / tl.sqrt_rn(tl.sum(dev * dev, axis=1) / cout + eps)
                z = dev * rstd[:, None] * cw[None, :] + cb[None, :]
                tl.store(dst_ptr + offs, z.to(dst_ptr.dtype.element_ty), mask=ok)
        tl.debug_barrier()


@triton.jit(
    do_not_specialize=[
        "N", "C", "K", "H", "W",
        "stride_xn", "stride_xc", "stride_xh", "stride_xw",
        "stride_on", "stride_ok", "stride_oh", "stride_ow",
        "eps",
    ]
)  # fmt: skip
def _insight_head_fwd_kernel(
    x_ptr, out_ptr, act_ptr, g_ptr,
    rw_ptr, rb_ptr, rnw_ptr, rnb_ptr,
    d0w_ptr, d0b_ptr, d0nw_ptr, d0nb_ptr,
    d1w_ptr, d1b_ptr, d1nw_ptr, d1nb_ptr,
    d2w_ptr, d2b_ptr, d2nw_ptr, d2nb_ptr,
    d3w_ptr, d3b_ptr,
    c0w_ptr, c0b_ptr, c0nw_ptr, c0nb_ptr,
    c1w_ptr, c1b_ptr, c1nw_ptr, c1nb_ptr,
    c2w_ptr, c2b_ptr, c2nw_ptr, c2nb_ptr,
    c3w_ptr, c3b_ptr,
    N, C, K, H, W,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_on, stride_ok, stride_oh, stride_ow,
    eps,
    CR: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, W3: tl.constexpr,
    BLOCK_CR: tl.constexpr, BLOCK_W1: tl.constexpr, BLOCK_W2: tl.constexpr,
    BLOCK_W3: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_OR: tl.constexpr, BLOCK_O1: tl.constexpr, BLOCK_O2: tl.constexpr,
    BLOCK_O3: tl.constexpr,
    WMAX: tl.constexpr, GMAX: tl.constexpr,
    LAYOUT: tl.constexpr, TILE_NORM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr, TOKEN_STAGES: tl.constexpr,
    NORM_BLOCK: tl.constexpr,
):  # fmt: skip
    """Raw INSIGHT heatmap of N token grids: ``x[N, C, H, W]`` (any strides) -> ``out[N, K, H, W]``.

    A persistent grid: program ``pid`` runs tiles ``pid, pid + nprog, ...`` with its own scratch.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    P = H * W
    # This program's scratch: Z [P, CR], H0 and H1 [P, <= WMAX] in the compute dtype; G
    # [P, <= GMAX] (pre-norm GELU output) and D [P, BLOCK_K] (detection logits) in fp32.
    z_ptr = act_ptr + pid.to(tl.int64) * P * (CR + 2 * WMAX)
    h0_ptr = z_ptr + P * CR
    h1_ptr = h0_ptr + P * WMAX
    gs_ptr = g_ptr + pid.to(tl.int64) * P * (GMAX + BLOCK_K)
    d_ptr = gs_ptr + P * GMAX
    for n in range(pid, N, nprog):
        x_tile = x_ptr + tl.cast(n, tl.int64) * stride_xn
        out_tile = out_ptr + tl.cast(n, tl.int64) * stride_on
        tl.debug_barrier()
        # reduce_dimension_block: the one pass over the tokens.
        _head_layer(x_tile, stride_xh, stride_xw, stride_xc, C,
                    rw_ptr, rb_ptr, rnw_ptr, rnb_ptr, gs_ptr, z_ptr, 0, 0, 0, P, H, W, eps, CR,
                    MODE_HIDDEN, BLOCK_OR, BLOCK_CR, 1, LAYOUT, TILE_NORM, BLOCK_P, BLOCK_I,
                    TOKEN_STAGES, PRECISION, NORM_BLOCK)  # fmt: skip
        # backbone_block (detection): 1x1 convolutions; the scratch is channels-last (LAYOUT 2).
        _head_layer(z_ptr, W * CR, CR, 1, CR,
                    d0w_ptr, d0b_ptr, d0nw_ptr, d0nb_ptr, gs_ptr, h0_ptr, 0, 0, 0, P, H, W, eps, W1,
                    MODE_HIDDEN, BLOCK_O1, BLOCK_W1, 1, _LAYOUT_CL, TILE_NORM, BLOCK_P, BLOCK_I,
                    1, PRECISION, NORM_BLOCK)  # fmt: skip
        _head_layer(h0_ptr, W * W1, W1, 1, W1,
                    d1w_ptr, d1b_ptr, d1nw_ptr, d1nb_ptr, gs_ptr, h1_ptr, 0, 0, 0, P, H, W, eps, W2,
                    MODE_HIDDEN, BLOCK_O2, BLOCK_W2, 1, _LAYOUT_CL, TILE_NORM, BLOCK_P, BLOCK_I,
                    1, PRECISION, NORM_BLOCK)  # fmt: skip
        _head_layer(h1_ptr, W * W2, W2, 1, W2,
                    d2w_ptr, d2b_ptr, d2nw_ptr, d2nb_ptr, gs_ptr, h0_ptr, 0, 0, 0, P, H, W, eps, W3,
                    MODE_HIDDEN, BLOCK_O3, BLOCK_W3, 1, _LAYOUT_CL, TILE_NORM, BLOCK_P, BLOCK_I,
                    1, PRECISION, NORM_BLOCK)  # fmt: skip
        _head_layer(h0_ptr, W * W3, W3, 1, W3,
                    d3w_ptr, d3b_ptr, d3w_ptr, d3w_ptr, gs_ptr, d_ptr, 0, 0, 0, P, H, W, eps, K,
                    MODE_DETECT_OUT, BLOCK_K, BLOCK_K, 1, _LAYOUT_CL, TILE_NORM, BLOCK_P, BLOCK_I,
                    1, PRECISION, NORM_BLOCK)  # fmt: skip
        # context_block: replicate-padded 3x3 convolutions.
        _head_layer(z_ptr, W * CR, CR, 1, CR,
                    c0w_ptr, c0b_ptr, c0nw_ptr, c0nb_ptr, gs_ptr, h0_ptr, 0, 0, 0, P, H, W, eps, W1,
                    MODE_HIDDEN, BLOCK_O1, BLOCK_W1, 3, _LAYOUT_ANY, TILE_NORM, BLOCK_P, BLOCK_I,
                    1, PRECISION, NORM_BLOCK)  # fmt: skip
        _head_layer(h0_ptr, W * W1, W1, 1, W1,
                    c1w_ptr, c1b_ptr, c1nw_ptr, c1nb_ptr, gs_ptr, h1_ptr, 0, 0, 0, P, H, W, eps, W2,
                    MODE_HIDDEN, BLOCK_O2, BLOCK_W2, 3, _LAYOUT_ANY, TILE_NORM, BLOCK_P, BLOCK_I,
                    1, PRECISION, NORM_BLOCK)  # fmt: skip
        _head_layer(h1_ptr, W * W2, W2, 1, W2,
                    c2w_ptr, c2b_ptr, c2nw_ptr, c2nb_ptr, gs_ptr, h0_ptr, 0, 0, 0, P, H, W, eps, W3,
                    MODE_HIDDEN, BLOCK_O3, BLOCK_W3, 3, _LAYOUT_ANY, TILE_NORM, BLOCK_P, BLOCK_I,
                    1, PRECISION, NORM_BLOCK)  # fmt: skip
        # Last context conv and the gate sigmoid(D) * sigmoid(-Cx), written as [N, K, H, W].
        _head_layer(h0_ptr, W * W3, W3, 1, W3,
                    c3w_ptr, c3b_ptr, c3w_ptr, c3w_ptr, d_ptr, out_tile,
                    stride_ok, stride_oh, stride_ow, P, H, W, eps, K,
                    MODE_GATE_OUT, BLOCK_K, BLOCK_K, 3, _LAYOUT_ANY, TILE_NORM, BLOCK_P, BLOCK_I,
                    1, PRECISION, NORM_BLOCK)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
_PARAM_CACHE: dict[tuple, tuple[list[Tensor], tuple[int, ...], list[Tensor]]] = {}
_PARAM_CACHE_SIZE = 8


def flatten_weights(weights: HeadWeights) -> list[Tensor]:
    """The 32 head tensors in the order the op takes them (the official checkpoint's 32).

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


def _versions(params: list[Tensor]) -> tuple[int, ...] | None:
    """Version counters (shared by ``detach()`` views); None for inference tensors (no counter)."""
    try:
        return tuple(t._version for t in params)
    except RuntimeError:
        return None


def _prepare_params(params: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Kernel layout: conv weights ``[k*k, in, out]`` in the compute dtype, the rest fp32.

    Cached on where the parameters live and their version counters, so inference pays the
    repacking once and an in-place update (an optimiser step, ``load_state_dict``) repacks. The
    cache holds the source tensors (a few MB per model, 8 models at most), so their memory cannot
    be reused by other tensors while an entry could still match.
    """
    versions = _versions(params)
    key = (dtype, *((t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride()) for t in params))
    hit = _PARAM_CACHE.get(key)
    if hit is not None and versions is not None and hit[1] == versions:
        return hit[2]
    packed = []
    for t in params:
        t = t.detach()
        if t.ndim == 4:  # conv weight [out, in, k, k] -> [k*k, in, out]
            out_c, in_c, kh, kw = t.shape
            packed.append(
                t.permute(2, 3, 1, 0).reshape(kh * kw, in_c, out_c).to(dtype).contiguous()
            )
        elif t.ndim == 3:  # LayerNorm([c, h, w]) affine -> [h*w, c], the activations' layout
            packed.append(t.reshape(t.shape[0], -1).t().to(torch.float32).contiguous())
        else:
            packed.append(t.to(torch.float32).contiguous())
    packed = [aligned(t) for t in packed]
    if versions is not None:
        if len(_PARAM_CACHE) >= _PARAM_CACHE_SIZE:
            _PARAM_CACHE.pop(next(iter(_PARAM_CACHE)))
        _PARAM_CACHE[key] = (list(params), versions, packed)
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
    if max(dims["CR"], dims["W1"], dims["W2"], dims["W3"]) > 256:
        raise InputError("the fused head supports channel widths up to 256")
    if n < 1:
        raise InputError("no tiles: the batch of token grids is empty")
    return dims


def head_constexprs(
    dims: dict[str, int],
    dtype: torch.dtype,
    norm: str,
    layout: int,
    precision: str,
    config: HeadLaunchConfig,
) -> dict[str, object]:
    """The constexpr arguments of one kernel variant (shared by the launcher and the check)."""
    return {
        "CR": dims["CR"],
        "W1": dims["W1"],
        "W2": dims["W2"],
        "W3": dims["W3"],
        "BLOCK_CR": max(16, next_pow2(dims["CR"])),
        "BLOCK_W1": max(16, next_pow2(dims["W1"])),
        "BLOCK_W2": max(16, next_pow2(dims["W2"])),
        "BLOCK_W3": max(16, next_pow2(dims["W3"])),
        "BLOCK_K": max(16, next_pow2(dims["K"])),
        "BLOCK_OR": max(16, next_pow2(dims["CR"])),
        "BLOCK_O1": min(config.BLOCK_O, max(16, next_pow2(dims["W1"]))),
        "BLOCK_O2": min(config.BLOCK_O, max(16, next_pow2(dims["W2"]))),
        "BLOCK_O3": min(config.BLOCK_O, max(16, next_pow2(dims["W3"]))),
        "WMAX": max(dims["W1"], dims["W2"], dims["W3"]),
        "GMAX": max(dims["CR"], dims["W1"], dims["W2"], dims["W3"]),
        "LAYOUT": layout,
        "TILE_NORM": norm == "tile",
        "PRECISION": precision if dtype == torch.float32 else "ieee",
        "BLOCK_P": config.BLOCK_P,
        "BLOCK_I": config.BLOCK_I,
        "TOKEN_STAGES": config.token_stages,
        "NORM_BLOCK": config.NORM_BLOCK,
    }


def head_signature(dtype: torch.dtype) -> dict[str, str]:
    """Triton types of the runtime arguments (what the launch passes; ints are i32)."""
    act = f"*{_TL_DTYPES[dtype]}"
    fn = _insight_head_fwd_kernel
    sig: dict[str, str] = {}
    for i, name in enumerate(fn.arg_names):
        if i in fn.constexprs:
            continue
        if name in ("x_ptr", "act_ptr"):
            sig[name] = act
        elif name == "out_ptr":
            sig[name] = "*fp32"  # the heatmap is fp32 whatever the tokens (Otsu's histogram)
        elif name.endswith("w_ptr") and not name.endswith("nw_ptr"):
            sig[name] = act  # conv weights, in the compute dtype
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"  # scratch G/D, biases and norm parameters
        elif name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


OFFICIAL_DIMS = {"C": 1024, "CR": 128, "W1": 128, "W2": 64, "W3": 64, "K": 3}


def compile_specs(dims: dict[str, int] | None = None) -> list[KernelSpec]:
    """Every fused-head variant the launcher can launch on a GPU for one architecture.

    The official architecture by default (C, K, N and the grid size are runtime arguments, so
    the variants are: compute type x norm x token layout; K <= 16 shares one BLOCK_K).
    """
    dims = dims or OFFICIAL_DIMS
    specs = []
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for key, cfg in GPU_CONFIGS.items():
        dtype = dtypes[key.split("-")[0]]
        precision = key.split("-")[1] if "-" in key else "ieee"
        for norm in ("tile", "channel"):
            for layout, layout_name in LAYOUT_NAMES.items():
                consts = head_constexprs(dims, dtype, norm, layout, precision, cfg)
                specs.append(
                    KernelSpec(
                        kernel=f"{__name__}:_insight_head_fwd_kernel",
                        variant=f"{key}, {norm} norm, {layout_name}",
                        config=cfg.describe(),
                        signature=head_signature(dtype),
                        constexprs=consts,
                        options=_launch_options(cfg),
                        needs_tensor_cores=key in ("bf16", "fp16", "fp32-tf32"),
                    )
                )
    return specs


def _launch_options(cfg: HeadLaunchConfig) -> dict[str, object]:
    return {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": True}


def scratch_sizes(dims: dict[str, int], cells: int, programs: int, block_k: int) -> tuple[int, int]:
    wmax = max(dims["W1"], dims["W2"], dims["W3"])
    gmax = max(dims["CR"], wmax)
    return programs * cells * (dims["CR"] + 2 * wmax), programs * cells * (gmax + block_k)


def insight_head_launch(
    tokens: Tensor,
    params: list[Tensor],
    norm: str,
    eps: float,
    precision: str = "ieee",
    config: HeadLaunchConfig | None = None,
) -> Tensor:
    """Launch the fused head. Shapes: tokens ``[N, C, h, w]`` -> ``[N, K, h, w]`` float32."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dims = check_head_inputs(tokens, params, norm)
    device = check_device(tokens, *params, what="insight_head")
    n, _, h, w = tokens.shape
    cfg = config or launch_config(h * w, tokens.dtype, precision)
    if INTERPRET and tokens.dtype == torch.bfloat16:
        raise InputError("the Triton interpreter has no bfloat16 dots; test bf16 on a GPU")
    x = aligned(tokens)
    layout = token_layout(x)
    prepared = _prepare_params(params, tokens.dtype)
    consts = head_constexprs(dims, tokens.dtype, norm, layout, precision, cfg)
    programs = min(n, num_programs(device, cfg.programs_per_sm))
    act_size, g_size = scratch_sizes(dims, h * w, programs, max(16, next_pow2(dims["K"])))
    act = torch.empty(act_size, device=device, dtype=tokens.dtype)
    g = torch.empty(g_size, device=device, dtype=torch.float32)
    # fp32 whatever the tokens: bf16 keeps ~8 bits, coarser than a 256-bin Otsu histogram over
    # [0, 1] above 0.5, which would move the threshold against the fp32 official model.
    out = torch.empty((n, dims["K"], h, w), device=device, dtype=torch.float32)
    _insight_head_fwd_kernel[(programs,)](
        x, out, act, g, *prepared,
        n, dims["C"], dims["K"], h, w,
        *x.stride(), *out.stride(),
        float(eps),
        **consts,
        **_launch_options(cfg),
    )  # fmt: skip
    return out
