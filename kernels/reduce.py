"""Per-class Otsu threshold and the pooling family as deterministic split reductions.

Every op reduces ``values[K, M]`` (any float dtype, any strides) over the cells where a tissue
mask (``[M]``, ``[K, M]`` or none) is true, entirely on the device, without a host sync:

1. ``_masked_stats_kernel`` (grid ``K x B``): each block of columns emits (min, max, count).
2. Otsu: ``_otsu_histogram_kernel`` bins every block with numpy's edge rule against the class
   range (combined from the step-1 partials) and adds its 256-bin histogram into int32 counts
   (integer atomics, so the counts are exact and the order does not matter);
   ``_otsu_select_kernel`` (one program per class) runs scikit-image's arithmetic in float64.
3. Pooling: ``_pool_sums_kernel`` sums the terms of its block in float64 *around the class-wide
   maximum* from step 1 (smoothmax: ``exp(a x - max(a x))`` and ``x exp(...)``; LSE-LBA:
   ``expm1(r (x - max x))``; mean: ``x``); ``_pool_finish_kernel`` adds the partials in block
   order and finishes the formula.

Why the class-wide maximum instead of per-block maxima with a rescaling combine: every term is
then a function of its own value and the class maximum alone, so the terms are bitwise the same
whatever the block size or chunking; only the float64 additions are regrouped, which moves the
float32 result by far less than one ulp. The extra pass costs one read of ``values`` (a few MB
for a slide). The maximum itself is exact under any grouping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastinsight.errors import InputError

from ._runtime import INTERPRET, KernelSpec, aligned, check_device, next_pow2, num_programs

POOL_METHODS = ("smoothmax", "lse_lba", "max", "mean")
_METHOD_IDS = {name: i for i, name in enumerate(POOL_METHODS)}
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class ReduceLaunchConfig:
    """``BLOCK_M`` cells per vector step; each program reduces ``chunk`` cells (a multiple)."""

    BLOCK_M: int = 1024
    blocks_per_sm: int = 4
    max_blocks: int = 1024
    num_warps: int = 4


GPU_CONFIG = ReduceLaunchConfig()
INTERPRETER_CONFIG = ReduceLaunchConfig(BLOCK_M=4096, blocks_per_sm=1, max_blocks=8)
BLOCK_NB = 1024  # partials combined per step (the partial count never exceeds max_blocks)


# --------------------------------------------------------------------------------------------
# Triton code
# --------------------------------------------------------------------------------------------
@triton.jit
def _class_stats(min_ptr, max_ptr, cnt_ptr, k, NB, BLOCK_NB: tl.constexpr):
    """Combine the (min, max, count) partials of class ``k`` in block order."""
    j = tl.arange(0, BLOCK_NB)
    vmin = tl.full([BLOCK_NB], float("inf"), tl.float32)
    vmax = tl.full([BLOCK_NB], float("-inf"), tl.float32)
    cnt = tl.zeros([BLOCK_NB], tl.int64)
    for j0 in range(0, NB, BLOCK_NB):
        ok = j0 + j < NB
        base = k * NB + j0 + j
        vmin = tl.minimum(vmin, tl.load(min_ptr + base, mask=ok, other=float("inf")))
        vmax = tl.maximum(vmax, tl.load(max_ptr + base, mask=ok, other=float("-inf")))
        cnt += tl.load(cnt_ptr + base, mask=ok, other=0).to(tl.int64)
    return tl.min(vmin, axis=0), tl.max(vmax, axis=0), tl.sum(cnt, axis=0)


@triton.jit(do_not_specialize=["M", "CHUNK", "stride_vk", "stride_vm", "stride_mk", "stride_mm"])
def _masked_stats_kernel(
    v_ptr, m_ptr, min_ptr, max_ptr, cnt_ptr,
    M, CHUNK, stride_vk, stride_vm, stride_mk, stride_mm,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Partial (min, max, count) of the masked-in values of class ``pid0``, columns block ``pid1``."""
    k = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    nb = tl.num_programs(1)
    start = b * CHUNK
    stop = tl.minimum(M, start + CHUNK)
    r = tl.arange(0, BLOCK_M)
    vmin = tl.full([BLOCK_M], float("inf"), tl.float32)
    vmax = tl.full([BLOCK_M], float("-inf"), tl.float32)
    cnt = tl.zeros([BLOCK_M], tl.int32)
    for m0 in range(start, stop, BLOCK_M):
        # (Helpers are inlined by hand in the loops: each jit-function call costs the
        # interpreter a namespace patch.)
        cols = m0 + r
        ok = cols < stop
        if HAS_MASK:
            keep = tl.load(m_ptr + k * stride_mk + cols.to(tl.int64) * stride_mm, mask=ok, other=0)
            ok = ok & (keep != 0)
        x = tl.load(v_ptr + k * stride_vk + cols.to(tl.int64) * stride_vm, mask=ok, other=0.0)
        x = x.to(tl.float32)
        vmin = tl.minimum(vmin, tl.where(ok, x, float("inf")))
        vmax = tl.maximum(vmax, tl.where(ok, x, float("-inf")))
        cnt += ok.to(tl.int32)
    out = k * nb + b
    tl.store(min_ptr + out, tl.min(vmin, axis=0))
    tl.store(max_ptr + out, tl.max(vmax, axis=0))
    tl.store(cnt_ptr + out, tl.sum(cnt, axis=0))


@triton.jit
def _edge(i, lo, hi, step, NBINS: tl.constexpr):
    """``numpy.histogram`` edge ``i``: ``i * step + lo`` (two roundings, no FMA), the last is ``hi``."""
    return tl.where(i >= NBINS, hi, i.to(tl.float32) * step + lo)


@triton.jit
def _histogram_range(min_ptr, max_ptr, cnt_ptr, k, NB, NBINS: tl.constexpr, BLOCK_NB: tl.constexpr):
    vmin, vmax, cnt = _class_stats(min_ptr, max_ptr, cnt_ptr, k, NB, BLOCK_NB)
    empty = cnt == 0
    vmin = tl.where(empty, 0.0, vmin)
    vmax = tl.where(empty, 1.0, vmax)
    flat = vmin == vmax
    # numpy widens an empty range by 0.5 on both sides (Otsu returns early in that case).
    lo = tl.where(flat, vmin - 0.5, vmin)
    hi = tl.where(flat, vmax + 0.5, vmax)
    step = tl.math.div_rn(hi - lo, tl.full([], NBINS, tl.float32))
    return vmin, vmax, cnt, lo, hi, step


@triton.jit(
    do_not_specialize=["M", "CHUNK", "NB", "stride_vk", "stride_vm", "stride_mk", "stride_mm"]
)
def _otsu_histogram_kernel(
    v_ptr, m_ptr, min_ptr, max_ptr, cnt_ptr, hist_ptr,
    M, CHUNK, NB, stride_vk, stride_vm, stride_mk, stride_mm,
    HAS_MASK: tl.constexpr, NBINS: tl.constexpr, NBINS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_NB: tl.constexpr,
):  # fmt: skip
    """Add the histogram of one block of class ``pid0`` into ``hist[K, NBINS_PAD]`` (int32)."""
    k = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    vmin, vmax, cnt, lo, hi, step = _histogram_range(min_ptr, max_ptr, cnt_ptr, k, NB, NBINS,
                                                     BLOCK_NB)  # fmt: skip
    start = b * CHUNK
    stop = tl.minimum(M, start + CHUNK)
    r = tl.arange(0, BLOCK_M)
    hist = tl.zeros([NBINS_PAD], tl.int32)
    for m0 in range(start, stop, BLOCK_M):
        # (Helpers are inlined by hand in the loops: each jit-function call costs the
        # interpreter a namespace patch.)
        cols = m0 + r
        ok = cols < stop
        if HAS_MASK:
            keep = tl.load(m_ptr + k * stride_mk + cols.to(tl.int64) * stride_mm, mask=ok, other=0)
            ok = ok & (keep != 0)
        x = tl.load(v_ptr + k * stride_vk + cols.to(tl.int64) * stride_vm, mask=ok, other=0.0)
        x = x.to(tl.float32)
        x = tl.minimum(tl.maximum(x, vmin), vmax)
        # numpy's rule (fastinsight.ops.otsu.histogram_bins): scale, truncate, then nudge by one
        # where rounding put the value on the wrong side of an edge.
        idx = (tl.math.div_rn(x - lo, hi - lo) * NBINS).to(tl.int32)
        idx = tl.minimum(tl.maximum(idx, 0), NBINS - 1)
        edge_lo = tl.where(idx >= NBINS, hi, idx.to(tl.float32) * step + lo)
        idx = idx - (x < edge_lo).to(tl.int32)
        idx = tl.minimum(tl.maximum(idx, 0), NBINS - 1)
        edge_hi = tl.where(idx + 1 >= NBINS, hi, (idx + 1).to(tl.float32) * step + lo)
        up = (x >= edge_hi) & (idx != NBINS - 1)
        idx = idx + up.to(tl.int32)
        hist += tl.histogram(idx, NBINS_PAD, mask=ok)
    bins = tl.arange(0, NBINS_PAD)
    tl.atomic_add(hist_ptr + k * NBINS_PAD + bins, hist, mask=(bins < NBINS) & (hist > 0))


@triton.jit(do_not_specialize=["NB"])
def _otsu_select_kernel(
    min_ptr, max_ptr, cnt_ptr, hist_ptr, out_ptr, NB,
    NBINS: tl.constexpr, NBINS_PAD: tl.constexpr, BLOCK_NB: tl.constexpr,
):  # fmt: skip
    """Otsu's threshold of class ``pid0`` from its histogram (scikit-image's arithmetic, fp64)."""
    k = tl.program_id(0).to(tl.int64)
    vmin, vmax, cnt, lo, hi, step = _histogram_range(min_ptr, max_ptr, cnt_ptr, k, NB, NBINS,
                                                     BLOCK_NB)  # fmt: skip
    i = tl.arange(0, NBINS_PAD)
    row = hist_ptr + k * NBINS_PAD
    # Bin centres (edges[:-1] + edges[1:]) / 2 in float32, as fastinsight.ops.otsu / scikit-image.
    c0 = (_edge(i, lo, hi, step, NBINS) + _edge(i + 1, lo, hi, step, NBINS)) / 2
    c1 = (_edge(i + 1, lo, hi, step, NBINS) + _edge(i + 2, lo, hi, step, NBINS)) / 2
    n0 = tl.load(row + i, mask=i < NBINS, other=0).to(tl.float64)
    # The "[1:]" sides of the variance come from loading the histogram shifted by one bin.
    n1 = tl.load(row + i + 1, mask=i + 1 < NBINS, other=0).to(tl.float64)
    w1 = tl.cumsum(n0, axis=0)
    w2 = tl.cumsum(n1, axis=0, reverse=True)
    filled = (w1 > 0) & (w2 > 0)
    m1 = tl.cumsum(n0 * c0.to(tl.float64), axis=0) / tl.where(filled, w1, 1.0)
    m2 = tl.cumsum(n1 * c1.to(tl.float64), axis=0, reverse=True) / tl.where(filled, w2, 1.0)
    diff = m1 - m2
    var = w1 * w2 * (diff * diff)
    # Where a side is empty the reference has 0/0 = NaN, which it maps to -1: never the maximum.
    var = tl.where(filled, var, -1.0)
    var = tl.where(i < NBINS - 1, var, -2.0)
    best = tl.argmax(var, axis=0, tie_break_left=True)
    t = tl.sum(tl.where(i == best, c0, 0.0), axis=0)
    t = tl.where(vmin == vmax, vmin, t)
    t = tl.where(cnt == 0, float("nan"), t)
    tl.store(out_ptr + k, t)


@triton.jit
def _log1p_f64(y):
    # Kahan's log1p from log(1 + y) and the rounding error of 1 + y.
    s = 1.0 + y
    safe = tl.where(s == 1.0, 2.0, s)
    return tl.where(s == 1.0, y, tl.log(safe) * y / (safe - 1.0))


@triton.jit(
    do_not_specialize=["M", "CHUNK", "NB", "stride_vk", "stride_vm", "stride_mk", "stride_mm",
                       "param"]
)  # fmt: skip
def _pool_sums_kernel(
    v_ptr, m_ptr, param_ptr, min_ptr, max_ptr, cnt_ptr, sum0_ptr, sum1_ptr,
    M, CHUNK, NB, stride_vk, stride_vm, stride_mk, stride_mm, param,
    METHOD: tl.constexpr, HAS_MASK: tl.constexpr, PARAM_IS_TENSOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_NB: tl.constexpr,
):  # fmt: skip
    """Float64 partial sums of one block of class ``pid0`` around the class maximum."""
    k = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    if PARAM_IS_TENSOR:
        p = tl.load(param_ptr + k).to(tl.float32)
    else:
        p = param
    vmin, vmax, cnt = _class_stats(min_ptr, max_ptr, cnt_ptr, k, NB, BLOCK_NB)
    # A class without cells has infinite extremes; keep its (unused) sums finite.
    vmin = tl.where(cnt == 0, 0.0, vmin)
    vmax = tl.where(cnt == 0, 0.0, vmax)
    # max(a x) = a max(x) for a >= 0 (rounding is monotone), a min(x) for a < 0.
    zmax = tl.where(p >= 0, p * vmax, p * vmin)
    start = b * CHUNK
    stop = tl.minimum(M, start + CHUNK)
    r = tl.arange(0, BLOCK_M)
    acc0 = tl.zeros([BLOCK_M], tl.float64)
    acc1 = tl.zeros([BLOCK_M], tl.float64)
    for m0 in range(start, stop, BLOCK_M):
        # (Helpers are inlined by hand in the loops: each jit-function call costs the
        # interpreter a namespace patch.)
        cols = m0 + r
        ok = cols < stop
        if HAS_MASK:
            keep = tl.load(m_ptr + k * stride_mk + cols.to(tl.int64) * stride_mm, mask=ok, other=0)
            ok = ok & (keep != 0)
        x = tl.load(v_ptr + k * stride_vk + cols.to(tl.int64) * stride_vm, mask=ok, other=0.0)
        x = x.to(tl.float32)
        if METHOD == 0:  # smoothmax: sum exp(a x - max), sum x exp(a x - max)
            w = tl.where(ok, tl.exp(p * x - zmax), 0.0)
            acc0 += w.to(tl.float64)
            acc1 += (w * x).to(tl.float64)
        elif METHOD == 1:  # LSE-LBA: sum expm1(r (x - max)), as fastinsight.ops.pooling.lse_lba
            u = (p * (x - vmax)).to(tl.float64)
            # Kahan's expm1 in float64: exact for tiny |u| (r -> 0), saturates to -1.
            e = tl.exp(u)
            em1 = e - 1.0
            safe = tl.where((e == 1.0) | (em1 == -1.0), 2.0, e)
            t = tl.where(e == 1.0, u, tl.where(em1 == -1.0, -1.0, em1 * u / tl.log(safe)))
            acc0 += tl.where(ok, t, 0.0)
        else:  # mean
            acc0 += tl.where(ok, x, 0.0).to(tl.float64)
    out = k * NB + b
    tl.store(sum0_ptr + out, tl.sum(acc0, axis=0))
    tl.store(sum1_ptr + out, tl.sum(acc1, axis=0))


@triton.jit(do_not_specialize=["NB", "param"])
def _pool_finish_kernel(
    param_ptr, min_ptr, max_ptr, cnt_ptr, sum0_ptr, sum1_ptr, out_ptr, NB, param,
    METHOD: tl.constexpr, PARAM_IS_TENSOR: tl.constexpr, BLOCK_NB: tl.constexpr,
):  # fmt: skip
    """Combine the partials of class ``pid0`` in block order and finish the pooling."""
    k = tl.program_id(0).to(tl.int64)
    if PARAM_IS_TENSOR:
        p = tl.load(param_ptr + k).to(tl.float32)
    else:
        p = param
    vmin, vmax, cnt = _class_stats(min_ptr, max_ptr, cnt_ptr, k, NB, BLOCK_NB)
    j = tl.arange(0, BLOCK_NB)
    s0 = tl.zeros([BLOCK_NB], tl.float64)
    s1 = tl.zeros([BLOCK_NB], tl.float64)
    if METHOD != 2:
        for j0 in range(0, NB, BLOCK_NB):
            ok = j0 + j < NB
            s0 += tl.load(sum0_ptr + k * NB + j0 + j, mask=ok, other=0.0)
            s1 += tl.load(sum1_ptr + k * NB + j0 + j, mask=ok, other=0.0)
    t0 = tl.sum(s0, axis=0)
    t1 = tl.sum(s1, axis=0)
    empty = cnt == 0
    n = tl.maximum(cnt, 1).to(tl.float64)
    if METHOD == 0:
        res = (t1 / tl.where(empty, 1.0, t0)).to(tl.float32)
    elif METHOD == 1:
        res = vmax + (_log1p_f64(t0 / n) / p.to(tl.float64)).to(tl.float32)
    elif METHOD == 2:
        res = vmax
    else:
        res = (t0 / n).to(tl.float32)
    # No cell: NaN (max: -inf), what the float maths of the reference gives.
    if METHOD != 2:
        res = tl.where(empty, float("nan"), res)
    tl.store(out_ptr + k, res)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
def _prepare_values(values: Tensor, mask: Tensor | None, what: str) -> tuple[Tensor, Tensor | None]:
    """Validate; values as fp32 (the kernels' one value type), mask as bool ``[1 | K, M]``."""
    if values.ndim != 2:
        raise InputError(f"{what} expects values of shape [K, M], got {tuple(values.shape)}")
    if not values.is_floating_point():
        raise InputError(f"{what}: values must be floating point, got {values.dtype}")
    k, m = values.shape
    if k < 1 or m < 1:
        raise InputError(f"{what}: values must be non-empty, got {tuple(values.shape)}")
    if m >= 2**31:
        raise InputError(f"{what}: at most 2**31 - 1 cells per class, got {m}")
    # The reference computes in float32 too; a [K, M] cast is cheap next to the head.
    values = aligned(values.float())
    if mask is None:
        return values, None
    if mask.ndim == 1 and mask.shape[0] == m:
        mask = mask[None, :]
    if mask.ndim != 2 or mask.shape[1] != m or mask.shape[0] not in (1, k):
        raise InputError(f"{what}: mask must be [M] or [K, M] = {(k, m)}, got {tuple(mask.shape)}")
    return values, aligned(mask.to(device=values.device, dtype=torch.bool))


def _mask_strides(mask: Tensor | None) -> tuple[int, int]:
    if mask is None:
        return 0, 0
    return (mask.stride(0) if mask.shape[0] > 1 else 0), mask.stride(1)


def _blocks(m: int, device: torch.device, cfg: ReduceLaunchConfig, classes: int) -> tuple[int, int]:
    """(chunk, number of blocks): chunk a multiple of BLOCK_M, blocks <= cfg.max_blocks."""
    if device.type == "cuda":
        target = max(1, min(cfg.max_blocks, num_programs(device, cfg.blocks_per_sm) // classes))
    else:
        target = cfg.max_blocks
    per = triton.cdiv(m, target)
    chunk = triton.cdiv(per, cfg.BLOCK_M) * cfg.BLOCK_M
    return chunk, triton.cdiv(m, chunk)


def _config(config: ReduceLaunchConfig | None) -> ReduceLaunchConfig:
    return config or (INTERPRETER_CONFIG if INTERPRET else GPU_CONFIG)


# Constexprs and options of each launch, shared by the launchers and the compile check.
def _stats_meta(has_mask: bool, cfg: ReduceLaunchConfig) -> tuple[dict, dict]:
    return {"HAS_MASK": has_mask, "BLOCK_M": cfg.BLOCK_M}, _options(cfg)


def _hist_meta(has_mask: bool, nbins: int, cfg: ReduceLaunchConfig) -> tuple[dict, dict]:
    consts = {
        "HAS_MASK": has_mask,
        "NBINS": nbins,
        "NBINS_PAD": max(16, next_pow2(nbins)),
        "BLOCK_M": cfg.BLOCK_M,
        "BLOCK_NB": BLOCK_NB,
    }
    return consts, _options(cfg)


def _select_meta(nbins: int, cfg: ReduceLaunchConfig) -> tuple[dict, dict]:
    consts = {"NBINS": nbins, "NBINS_PAD": max(16, next_pow2(nbins)), "BLOCK_NB": BLOCK_NB}
    return consts, _options(cfg)


def _sums_meta(method: str, has_mask: bool, is_tensor: bool, cfg: ReduceLaunchConfig):
    consts = {
        "METHOD": _METHOD_IDS[method],
        "HAS_MASK": has_mask,
        "PARAM_IS_TENSOR": is_tensor,
        "BLOCK_M": cfg.BLOCK_M,
        "BLOCK_NB": BLOCK_NB,
    }
    return consts, _options(cfg)


def _finish_meta(method: str, is_tensor: bool, cfg: ReduceLaunchConfig) -> tuple[dict, dict]:
    consts = {"METHOD": _METHOD_IDS[method], "PARAM_IS_TENSOR": is_tensor, "BLOCK_NB": BLOCK_NB}
    return consts, _options(cfg)


def _options(cfg: ReduceLaunchConfig) -> dict:
    # No FMA contraction: the histogram edges must round exactly as numpy's (mul, then add).
    return {"num_warps": cfg.num_warps, "num_stages": 1, "enable_fp_fusion": False}


def _stats(values: Tensor, mask: Tensor | None, cfg: ReduceLaunchConfig, chunk: int, nb: int):
    k, m = values.shape
    dev = values.device
    vmin = torch.empty((k, nb), device=dev, dtype=torch.float32)
    vmax = torch.empty((k, nb), device=dev, dtype=torch.float32)
    cnt = torch.empty((k, nb), device=dev, dtype=torch.int32)
    smk, smm = _mask_strides(mask)
    consts, opts = _stats_meta(mask is not None, cfg)
    _masked_stats_kernel[(k, nb)](
        values, mask if mask is not None else values, vmin, vmax, cnt,
        m, chunk, values.stride(0), values.stride(1), smk, smm, **consts, **opts,
    )  # fmt: skip
    return vmin, vmax, cnt


def otsu_threshold_launch(
    values: Tensor,
    mask: Tensor | None = None,
    nbins: int = 256,
    config: ReduceLaunchConfig | None = None,
) -> Tensor:
    """Per-class Otsu threshold. Shapes: values ``[K, M]``, mask ``[M]``/``[K, M]`` -> ``[K]`` fp32.

    A class without any masked-in cell gets NaN (no host sync to raise).
    """
    if nbins < 2:
        raise InputError(f"otsu_threshold needs at least 2 bins, got {nbins}")
    values, mask = _prepare_values(values, mask, "otsu_threshold")
    device = check_device(values, *([mask] if mask is not None else []), what="otsu_threshold")
    cfg = _config(config)
    k, m = values.shape
    chunk, nb = _blocks(m, device, cfg, k)
    vmin, vmax, cnt = _stats(values, mask, cfg, chunk, nb)
    consts, opts = _hist_meta(mask is not None, nbins, cfg)
    hist = torch.zeros((k, consts["NBINS_PAD"]), device=device, dtype=torch.int32)
    smk, smm = _mask_strides(mask)
    _otsu_histogram_kernel[(k, nb)](
        values, mask if mask is not None else values, vmin, vmax, cnt, hist,
        m, chunk, nb, values.stride(0), values.stride(1), smk, smm, **consts, **opts,
    )  # fmt: skip
    out = torch.empty(k, device=device, dtype=torch.float32)
    consts, opts = _select_meta(nbins, cfg)
    _otsu_select_kernel[(k,)](vmin, vmax, cnt, hist, out, nb, **consts, **opts)
    return out


def pool_launch(
    values: Tensor,
    mask: Tensor | None,
    method: str,
    param_tensor: Tensor | None = None,
    param: float = 0.0,
    config: ReduceLaunchConfig | None = None,
) -> Tensor:
    """Pooling over masked-in cells. Shapes: values ``[K, M]``, mask ``[M]``/``[K, M]`` -> ``[K]``.

    ``param`` is SmoothMax's ``a`` or LSE-LBA's ``r``: a float, or ``param_tensor`` (``[K]`` or
    one element) on the device. A class without any masked-in cell gets NaN (max: -inf), as the
    reference.
    """
    if method not in _METHOD_IDS:
        raise InputError(f"unknown pooling {method!r}; expected one of {POOL_METHODS}")
    values, mask = _prepare_values(values, mask, method)
    k, m = values.shape
    if method in ("max", "mean"):
        param_tensor = None
    if param_tensor is not None:
        if param_tensor.numel() not in (1, k):
            raise InputError(
                f"{method}: the parameter must be a scalar or [K] = [{k}], "
                f"got {tuple(param_tensor.shape)}"
            )
        p = param_tensor.detach().to(device=values.device, dtype=torch.float32).reshape(-1)
        param_tensor = aligned(p.expand(k).contiguous())
    device = check_device(values, *([mask] if mask is not None else []), what=method)
    cfg = _config(config)
    chunk, nb = _blocks(m, device, cfg, k)
    vmin, vmax, cnt = _stats(values, mask, cfg, chunk, nb)
    is_tensor = param_tensor is not None
    param_arg = param_tensor if is_tensor else vmin
    # Every (class, block) slot is written by the sums kernel, and "max" never reads them: no
    # zero-fill launches.
    sum0 = torch.empty((k, nb), device=device, dtype=torch.float64)
    sum1 = torch.empty((k, nb), device=device, dtype=torch.float64)
    smk, smm = _mask_strides(mask)
    if method != "max":
        consts, opts = _sums_meta(method, mask is not None, is_tensor, cfg)
        _pool_sums_kernel[(k, nb)](
            values, mask if mask is not None else values, param_arg, vmin, vmax, cnt, sum0, sum1,
            m, chunk, nb, values.stride(0), values.stride(1), smk, smm, float(param),
            **consts, **opts,
        )  # fmt: skip
    out = torch.empty(k, device=device, dtype=torch.float32)
    consts, opts = _finish_meta(method, is_tensor, cfg)
    _pool_finish_kernel[(k,)](
        param_arg, vmin, vmax, cnt, sum0, sum1, out, nb, float(param), **consts, **opts
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# Compile check
# --------------------------------------------------------------------------------------------
def _sig(fn, **types: str) -> dict[str, str]:
    """Signature of ``fn``'s runtime arguments: pointers/floats as given, every int ``i32``."""
    consts = set(fn.constexprs) if hasattr(fn, "constexprs") else set()
    out = {}
    for i, name in enumerate(fn.arg_names):
        if i in consts:
            continue
        out[name] = types.get(name, "i32")
    return out


def compile_specs() -> list[KernelSpec]:
    """Every threshold/pooling kernel variant the launchers can launch on a GPU."""
    cfg = GPU_CONFIG
    mod = __name__
    specs: list[KernelSpec] = []
    conf = f"M{cfg.BLOCK_M}-w{cfg.num_warps}"

    def ptrs(fn, mask_ty: str, **extra: str) -> dict[str, str]:
        types = {n: "*fp32" for n in fn.arg_names if n.endswith("_ptr")}
        types.update({"m_ptr": mask_ty, "cnt_ptr": "*i32", **extra})
        return _sig(fn, **types)

    for has_mask in (False, True):
        mask_ty = "*i1" if has_mask else "*fp32"
        label = "mask" if has_mask else "no mask"
        consts, opts = _stats_meta(has_mask, cfg)
        specs.append(KernelSpec(f"{mod}:_masked_stats_kernel", label, conf,
                                ptrs(_masked_stats_kernel, mask_ty), consts, opts))  # fmt: skip
        consts, opts = _hist_meta(has_mask, 256, cfg)
        specs.append(KernelSpec(f"{mod}:_otsu_histogram_kernel", f"{label}, 256 bins", conf,
                                ptrs(_otsu_histogram_kernel, mask_ty, hist_ptr="*i32"),
                                consts, opts))  # fmt: skip
        for method in ("smoothmax", "lse_lba", "mean"):
            for is_tensor in (False, True) if method != "mean" else (False,):
                consts, opts = _sums_meta(method, has_mask, is_tensor, cfg)
                sig = ptrs(_pool_sums_kernel, mask_ty, sum0_ptr="*fp64", sum1_ptr="*fp64",
                           param="fp32")  # fmt: skip
                variant = f"{method}, {label}, {'tensor' if is_tensor else 'float'} param"
                specs.append(KernelSpec(f"{mod}:_pool_sums_kernel", variant, conf, sig, consts,
                                        opts))  # fmt: skip
    consts, opts = _select_meta(256, cfg)
    specs.append(KernelSpec(f"{mod}:_otsu_select_kernel", "256 bins", conf,
                            ptrs(_otsu_select_kernel, "*fp32", hist_ptr="*i32"), consts,
                            opts))  # fmt: skip
    for method in POOL_METHODS:
        for is_tensor in (False, True) if method in ("smoothmax", "lse_lba") else (False,):
            consts, opts = _finish_meta(method, is_tensor, cfg)
            sig = ptrs(_pool_finish_kernel, "*fp32", sum0_ptr="*fp64", sum1_ptr="*fp64",
                       param="fp32")  # fmt: skip
            variant = f"{method}, {'tensor' if is_tensor else 'float'} param"
            specs.append(KernelSpec(f"{mod}:_pool_finish_kernel", variant, conf, sig, consts,
                                    opts))  # fmt: skip
    return specs
