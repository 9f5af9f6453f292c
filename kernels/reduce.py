"""Per-class Otsu threshold and the pooling family as deterministic split reductions.

Every op reduces ``values[K, M]`` (any float dtype, any strides) over the cells where a tissue
mask (``[M]``, ``[K, M]`` or none) is true, entirely on the device, without a host sync:

1. ``_masked_stats_kernel`` (grid ``K x B``): each block of columns emits (min, max, count); block
   0 of each class also clears the histogram row and the finished-blocks counter the next
   launches accumulate into (no zero-fill launches).
2. Otsu: ``_otsu_histogram_kernel`` bins every block with numpy's edge rule against the class
   range (combined from the step-1 partials) and adds its 256-bin histogram into int32 counts
   (integer atomics, so the counts are exact and the order does not matter).
   ``_otsu_select_kernel`` (one program per class) runs scikit-image's arithmetic in float64
   when only the threshold is asked for.
3. ``_threshold_pool_kernel``: each block derives the threshold from the finished histogram
   (the same arithmetic, in every block), writes its kept values ``x * (x > t)``, and sums its
   terms in float64 *around the class-wide maximum* of what is pooled (smoothmax:
   ``exp(a x - max(a x))`` and ``x exp(...)``; LSE-LBA: ``expm1(r (x - max x))``; mean: ``x``).
   The class's last block to finish (an atomic counter) adds the partials in block order and
   finishes the formula.

Threshold + pooling is therefore three launches (two without Otsu, two for a plain pooling),
with no host synchronisation and no data-dependent allocation: CUDA-graph capturable.

Why the class-wide maximum instead of per-block maxima with a rescaling combine: every term is
then a function of its own value and the class maximum alone, so the terms are bitwise the same
whatever the block size or chunking; only the float64 additions are regrouped, which moves the
float32 result by far less than one ulp. The extra pass costs one read of ``values`` (a few MB
for a slide). The maximum itself is exact under any grouping; the maximum of the kept values
follows from the (min, max, count) of step 1 and the threshold.
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
    v_ptr, m_ptr, min_ptr, max_ptr, cnt_ptr, hist_ptr, done_ptr,
    M, CHUNK, stride_vk, stride_vm, stride_mk, stride_mm,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, ZERO_HIST: tl.constexpr,
    ZERO_DONE: tl.constexpr,
):  # fmt: skip
    """Partial (min, max, count) of the masked-in values of class ``pid0``, columns block ``pid1``.

    Block 0 of each class also clears what the next launches accumulate into: the class's
    histogram row (``ZERO_HIST`` int32 bins, 0 = none) and its finished-blocks counter
    (``ZERO_DONE``). Stream order makes that safe, and saves the zero-fill launches.
    """
    k = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    nb = tl.num_programs(1)
    if b == 0:
        if ZERO_HIST > 0:
            bins = tl.arange(0, ZERO_HIST)
            tl.store(hist_ptr + k * ZERO_HIST + bins, tl.zeros([ZERO_HIST], tl.int32))
        if ZERO_DONE:
            tl.store(done_ptr + k, 0)
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
    return _range_of(vmin, vmax, cnt, NBINS)


@triton.jit
def _range_of(vmin, vmax, cnt, NBINS: tl.constexpr):
    """numpy's histogram range of a class from its (min, max, count): ``vmin, vmax, cnt, lo, hi,
    step`` (an empty class gets the range [0, 1])."""
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
    t = _otsu_from_histogram(hist_ptr, k, vmin, vmax, cnt, lo, hi, step, NBINS, NBINS_PAD)
    tl.store(out_ptr + k, t)


@triton.jit
def _otsu_from_histogram(
    hist_ptr, k, vmin, vmax, cnt, lo, hi, step, NBINS: tl.constexpr, NBINS_PAD: tl.constexpr
):  # fmt: skip
    """Otsu's threshold of class ``k`` from its finished histogram row and range."""
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
    return tl.where(cnt == 0, float("nan"), t)


@triton.jit
def _recip_f64(x):
    """``1 / x`` for a nonzero float64 ``x`` in float32's normal range, without a division
    instruction: an approximate float32 reciprocal refined by two Newton steps (relative error
    ~2^-22, then ~2^-44, then below float64's rounding). A float64 division compiles to a
    slow-path subroutine call whose saved registers ``kernels check`` reports as a spill."""
    r = tl.fdiv(tl.full(x.shape, 1.0, tl.float32), x.to(tl.float32), ieee_rounding=False)
    r = r.to(tl.float64)
    r = r * (2.0 - x * r)
    return r * (2.0 - x * r)


@triton.jit
def _log1p_f64(y):
    # Kahan's log1p from log(1 + y) and the rounding error of 1 + y.
    s = 1.0 + y
    safe = tl.where(s == 1.0, 2.0, s)
    return tl.where(s == 1.0, y, tl.log(safe) * y * _recip_f64(safe - 1.0))


@triton.jit
def _logit(x, EPS: tl.constexpr):
    """``fastinsight.ops.pooling.logit`` of fp32 ``x``: ``log(q) - log1p(-q)``, ``q`` clamped to
    ``[EPS, 1 - EPS]``. ``log(1 - q)`` stands in for ``log1p(-q)``: rounding ``1 - q`` changes
    it by at most ~6e-8 absolute (half an ulp of ``1 - q``; exact for q >= 0.5), a fraction of
    an ulp of the logit wherever ``|logit| > 1``. No division: a float32 division compiles to a
    subroutine call on NVIDIA GPUs, whose stack frame ``kernels check`` counts as a spill."""
    q = tl.minimum(tl.maximum(x, EPS), 1.0 - EPS)
    return tl.log(q) - tl.log(1.0 - q)


@triton.jit
def _pooled_extremes(vmin, vmax, cnt, t, THRESHOLD: tl.constexpr, LOGIT: tl.constexpr):
    """(min, max) of what a class pools, from its (min, max, count) and threshold ``t``.

    Kept values are the values above ``t`` plus zeros: the maximum is exact. The least kept
    value is 0 when some value is at or below ``t`` and ``t >= 0`` (exact); with ``t < 0`` it
    lies in ``(t, 0]`` and ``t`` bounds it (used by a negative SmoothMax ``a`` only). A class
    without cells gets 0, 0 (its sums stay finite and unused).
    """
    if THRESHOLD > 0:
        above = vmax > t
        below = vmin <= t
        kmax = tl.where(above, tl.where(below, tl.maximum(vmax, 0.0), vmax), 0.0)
        kmin = tl.where(below, tl.where(above & (t < 0), t, 0.0), vmin)
    else:
        kmax = vmax
        kmin = vmin
    if LOGIT:
        kmax = _logit(kmax, 1e-6)
        kmin = _logit(kmin, 1e-6)
    return tl.where(cnt == 0, 0.0, kmin), tl.where(cnt == 0, 0.0, kmax)


@triton.jit
def _combine_sums(sum0_ptr, sum1_ptr, k, NB, BLOCK_NB: tl.constexpr):
    """Class ``k``'s float64 partial sums added in block order (volatile loads: other blocks
    wrote them during this launch)."""
    j = tl.arange(0, BLOCK_NB)
    s0 = tl.zeros([BLOCK_NB], tl.float64)
    s1 = tl.zeros([BLOCK_NB], tl.float64)
    for j0 in range(0, NB, BLOCK_NB):
        ok = j0 + j < NB
        s0 += tl.load(sum0_ptr + k * NB + j0 + j, mask=ok, other=0.0, volatile=True)
        s1 += tl.load(sum1_ptr + k * NB + j0 + j, mask=ok, other=0.0, volatile=True)
    return tl.sum(s0, axis=0), tl.sum(s1, axis=0)


@triton.jit(
    do_not_specialize=["M", "CHUNK", "NB", "stride_vk", "stride_vm", "stride_mk", "stride_mm",
                       "param"]
)  # fmt: skip
def _threshold_pool_kernel(
    v_ptr, m_ptr, param_ptr, min_ptr, max_ptr, cnt_ptr, hist_ptr, kept_ptr, t_ptr,
    sum0_ptr, sum1_ptr, done_ptr, out_ptr,
    M, CHUNK, NB, stride_vk, stride_vm, stride_mk, stride_mm, param,
    METHOD: tl.constexpr, HAS_MASK: tl.constexpr, PARAM_IS_TENSOR: tl.constexpr,
    THRESHOLD: tl.constexpr, LOGIT: tl.constexpr, NBINS: tl.constexpr,
    NBINS_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_NB: tl.constexpr,
):  # fmt: skip
    """Threshold, pool and finish: one block of class ``pid0``, and the class's last block.

    ``THRESHOLD``: 0 pools the values as they are; 1 keeps ``x * (x > 0)``; 2 keeps
    ``x * (x > t)`` with ``t`` Otsu's threshold from the finished histogram (every block derives
    the same ``t``; block 0 stores it). Kept values are written to ``kept[K, M]`` for every
    cell, masked-out ones included (as the reference); ``LOGIT`` pools ``logit(kept)`` and
    finishes with a sigmoid. The sums run in float64 around the class maximum of what is pooled,
    which the (min, max, count) partials give exactly: kept values are the values above ``t``
    plus zeros. The block that finishes last (an acq_rel counter that launch 1 cleared) adds
    the partials in block order and writes the score, so results do not depend on scheduling.
    """
    k = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    if PARAM_IS_TENSOR:
        p = tl.load(param_ptr + k).to(tl.float32)
    else:
        p = param
    vmin, vmax, cnt = _class_stats(min_ptr, max_ptr, cnt_ptr, k, NB, BLOCK_NB)
    t = tl.zeros([], tl.float32)
    if THRESHOLD == 2:
        vmin_r, vmax_r, cnt_r, lo, hi, step = _range_of(vmin, vmax, cnt, NBINS)
        t = _otsu_from_histogram(hist_ptr, k, vmin_r, vmax_r, cnt_r, lo, hi, step, NBINS,
                                 NBINS_PAD)  # fmt: skip
    if THRESHOLD > 0:
        if b == 0:
            tl.store(t_ptr + k, t)
    kmin, kmax = _pooled_extremes(vmin, vmax, cnt, t, THRESHOLD, LOGIT)
    # max(a x) = a max(x) for a >= 0 (rounding is monotone), a min(x) for a < 0.
    zmax = tl.where(p >= 0, p * kmax, p * kmin)
    start = b * CHUNK
    stop = tl.minimum(M, start + CHUNK)
    r = tl.arange(0, BLOCK_M)
    acc0 = tl.zeros([BLOCK_M], tl.float64)
    acc1 = tl.zeros([BLOCK_M], tl.float64)
    if (METHOD != 2) or (THRESHOLD > 0):
        for m0 in range(start, stop, BLOCK_M):
            # (Helpers are inlined by hand in the loop: each jit-function call costs the
            # interpreter a namespace patch.)
            cols = m0 + r
            inside = cols < stop
            ok = inside
            if HAS_MASK:
                keep = tl.load(m_ptr + k * stride_mk + cols.to(tl.int64) * stride_mm,
                               mask=inside, other=0)  # fmt: skip
                ok = inside & (keep != 0)
            # Kept values are written for every cell; without a threshold only pooled cells load.
            x = tl.load(v_ptr + k * stride_vk + cols.to(tl.int64) * stride_vm,
                        mask=inside if THRESHOLD > 0 else ok, other=0.0)  # fmt: skip
            x = x.to(tl.float32)
            if THRESHOLD > 0:
                x = x * (x > t).to(tl.float32)
                tl.store(kept_ptr + k * M + cols, x, mask=inside)
            if LOGIT:  # _logit, inlined
                q = tl.minimum(tl.maximum(x, 1e-6), 1.0 - 1e-6)
                x = tl.log(q) - tl.log(1.0 - q)
            if METHOD == 0:  # smoothmax: sum exp(a x - max), sum x exp(a x - max)
                w = tl.where(ok, tl.exp(p * x - zmax), 0.0)
                acc0 += w.to(tl.float64)
                acc1 += (w * x).to(tl.float64)
            elif METHOD == 1:  # LSE-LBA: sum expm1(r (x - max)), as fastinsight.ops.pooling
                u = (p * (x - kmax)).to(tl.float64)
                # Kahan's expm1 in float64: exact for tiny |u| (r -> 0), saturates to -1.
                e = tl.exp(u)
                em1 = e - 1.0
                safe = tl.where((e == 1.0) | (em1 == -1.0), 2.0, e)
                term = tl.where(e == 1.0, u, tl.where(em1 == -1.0, -1.0, em1 * u / tl.log(safe)))
                acc0 += tl.where(ok, term, 0.0)
            elif METHOD == 3:  # mean
                acc0 += tl.where(ok, x, 0.0).to(tl.float64)
    if METHOD != 2:
        tl.store(sum0_ptr + k * NB + b, tl.sum(acc0, axis=0))
        tl.store(sum1_ptr + k * NB + b, tl.sum(acc1, axis=0))
    # Last block of the class finishes it: every thread's stores are issued before the counter
    # moves (barrier, then a release), and the last block reads them after its acquire.
    tl.debug_barrier()
    done = tl.atomic_add(done_ptr + k, 1, sem="acq_rel", scope="gpu")
    if done == NB - 1:
        t0, t1 = _combine_sums(sum0_ptr, sum1_ptr, k, NB, BLOCK_NB)
        res = _pool_result(t0, t1, kmax, cnt, p, METHOD)
        if LOGIT:
            res = _recip_f64(1.0 + tl.exp(-res.to(tl.float64))).to(tl.float32)  # sigmoid
        tl.store(out_ptr + k, res)


@triton.jit
def _pool_result(t0, t1, vmax, cnt, p, METHOD: tl.constexpr):
    """The pooled value of a class from its combined float64 sums, maximum and cell count."""
    empty = cnt == 0
    n = tl.maximum(cnt, 1).to(tl.float64)
    if METHOD == 0:
        res = (t1 * _recip_f64(tl.where(empty, 1.0, t0))).to(tl.float32)
    elif METHOD == 1:
        res = vmax + (_log1p_f64(t0 * _recip_f64(n)) * _recip_f64(p.to(tl.float64))).to(tl.float32)
    elif METHOD == 2:
        res = tl.where(empty, float("-inf"), vmax)
    else:
        res = (t0 * _recip_f64(n)).to(tl.float32)
    # No cell: NaN (max: -inf), what the float maths of the reference gives.
    if METHOD != 2:
        res = tl.where(empty, float("nan"), res)
    return res


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
THRESHOLD_NONE, THRESHOLD_ZERO, THRESHOLD_OTSU = 0, 1, 2


def _nbins_pad(nbins: int) -> int:
    return max(16, next_pow2(nbins))


def _stats_meta(
    has_mask: bool, cfg: ReduceLaunchConfig, zero_hist: int = 0, zero_done: bool = False
) -> tuple[dict, dict]:
    consts = {
        "HAS_MASK": has_mask,
        "BLOCK_M": cfg.BLOCK_M,
        "ZERO_HIST": zero_hist,
        "ZERO_DONE": zero_done,
    }
    return consts, _options(cfg)


def _hist_meta(has_mask: bool, nbins: int, cfg: ReduceLaunchConfig) -> tuple[dict, dict]:
    consts = {
        "HAS_MASK": has_mask,
        "NBINS": nbins,
        "NBINS_PAD": _nbins_pad(nbins),
        "BLOCK_M": cfg.BLOCK_M,
        "BLOCK_NB": BLOCK_NB,
    }
    return consts, _options(cfg)


def _select_meta(nbins: int, cfg: ReduceLaunchConfig) -> tuple[dict, dict]:
    consts = {"NBINS": nbins, "NBINS_PAD": _nbins_pad(nbins), "BLOCK_NB": BLOCK_NB}
    return consts, _options(cfg)


def _pool_meta(
    method: str,
    has_mask: bool,
    is_tensor: bool,
    threshold: int,
    logit: bool,
    nbins: int,
    cfg: ReduceLaunchConfig,
) -> tuple[dict, dict]:
    consts = {
        "METHOD": _METHOD_IDS[method],
        "HAS_MASK": has_mask,
        "PARAM_IS_TENSOR": is_tensor,
        "THRESHOLD": threshold,
        "LOGIT": logit,
        # Otsu's bins matter only with THRESHOLD_OTSU: one compiled variant otherwise.
        "NBINS": nbins if threshold == THRESHOLD_OTSU else 2,
        "NBINS_PAD": _nbins_pad(nbins) if threshold == THRESHOLD_OTSU else 16,
        "BLOCK_M": cfg.BLOCK_M,
        "BLOCK_NB": BLOCK_NB,
    }
    return consts, _options(cfg)


def _options(cfg: ReduceLaunchConfig) -> dict:
    # No FMA contraction: the histogram edges must round exactly as numpy's (mul, then add).
    return {"num_warps": cfg.num_warps, "num_stages": 1, "enable_fp_fusion": False}


def _stats(
    values: Tensor,
    mask: Tensor | None,
    cfg: ReduceLaunchConfig,
    chunk: int,
    nb: int,
    hist: Tensor | None = None,
    done: Tensor | None = None,
):
    """Launch 1: the (min, max, count) partials; clears ``hist`` rows and ``done`` counters."""
    k, m = values.shape
    dev = values.device
    vmin = torch.empty((k, nb), device=dev, dtype=torch.float32)
    vmax = torch.empty((k, nb), device=dev, dtype=torch.float32)
    cnt = torch.empty((k, nb), device=dev, dtype=torch.int32)
    smk, smm = _mask_strides(mask)
    zero_hist = hist.shape[1] if hist is not None else 0
    consts, opts = _stats_meta(mask is not None, cfg, zero_hist, done is not None)
    _masked_stats_kernel[(k, nb)](
        values, mask if mask is not None else values, vmin, vmax, cnt,
        hist if hist is not None else cnt, done if done is not None else cnt,
        m, chunk, values.stride(0), values.stride(1), smk, smm, **consts, **opts,
    )  # fmt: skip
    return vmin, vmax, cnt


def _histogram(values, mask, stats, hist, cfg, chunk, nb, nbins) -> None:
    """Launch 2: every block adds its histogram into the cleared ``hist`` (int32 atomics)."""
    k, m = values.shape
    smk, smm = _mask_strides(mask)
    consts, opts = _hist_meta(mask is not None, nbins, cfg)
    _otsu_histogram_kernel[(k, nb)](
        values, mask if mask is not None else values, *stats, hist,
        m, chunk, nb, values.stride(0), values.stride(1), smk, smm, **consts, **opts,
    )  # fmt: skip


def otsu_threshold_launch(
    values: Tensor,
    mask: Tensor | None = None,
    nbins: int = 256,
    config: ReduceLaunchConfig | None = None,
) -> Tensor:
    """Per-class Otsu threshold. Shapes: values ``[K, M]``, mask ``[M]``/``[K, M]`` -> ``[K]`` fp32.

    Three launches (statistics, histogram, selection). A class without any masked-in cell gets
    NaN (no host sync to raise).
    """
    if nbins < 2:
        raise InputError(f"otsu_threshold needs at least 2 bins, got {nbins}")
    values, mask = _prepare_values(values, mask, "otsu_threshold")
    device = check_device(values, *([mask] if mask is not None else []), what="otsu_threshold")
    cfg = _config(config)
    k, m = values.shape
    chunk, nb = _blocks(m, device, cfg, k)
    hist = torch.empty((k, _nbins_pad(nbins)), device=device, dtype=torch.int32)
    stats = _stats(values, mask, cfg, chunk, nb, hist=hist)
    _histogram(values, mask, stats, hist, cfg, chunk, nb, nbins)
    out = torch.empty(k, device=device, dtype=torch.float32)
    consts, opts = _select_meta(nbins, cfg)
    _otsu_select_kernel[(k,)](*stats, hist, out, nb, **consts, **opts)
    return out


def _pool_param(
    method: str, k: int, param_tensor: Tensor | None, device: torch.device
) -> Tensor | None:
    """The pooling parameter as ``[K]`` fp32 on the device, or None when a float is used."""
    if method in ("max", "mean") or param_tensor is None:
        return None
    if param_tensor.numel() not in (1, k):
        raise InputError(
            f"{method}: the parameter must be a scalar or [K] = [{k}], "
            f"got {tuple(param_tensor.shape)}"
        )
    p = param_tensor.detach().to(device=device, dtype=torch.float32).reshape(-1)
    return aligned(p.expand(k).contiguous())


def _threshold_pool(
    values: Tensor,
    mask: Tensor | None,
    method: str,
    param_tensor: Tensor | None,
    param: float,
    threshold: int,
    nbins: int,
    logit: bool,
    config: ReduceLaunchConfig | None,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Statistics, [histogram,] threshold + pool + finish: 2 or 3 launches, no host sync.

    Returns (kept ``[K, M]`` or None, thresholds ``[K]`` or None, scores ``[K]``): kept and
    thresholds exist when ``threshold`` is not ``THRESHOLD_NONE``.
    """
    if method not in _METHOD_IDS:
        raise InputError(f"unknown pooling {method!r}; expected one of {POOL_METHODS}")
    if threshold == THRESHOLD_OTSU and nbins < 2:
        raise InputError(f"otsu_threshold needs at least 2 bins, got {nbins}")
    values, mask = _prepare_values(values, mask, method)
    k, m = values.shape
    device = check_device(values, *([mask] if mask is not None else []), what=method)
    param_tensor = _pool_param(method, k, param_tensor, device)
    cfg = _config(config)
    chunk, nb = _blocks(m, device, cfg, k)
    consts, opts = _pool_meta(
        method, mask is not None, param_tensor is not None, threshold, logit, nbins, cfg
    )
    hist = None
    if threshold == THRESHOLD_OTSU:
        hist = torch.empty((k, consts["NBINS_PAD"]), device=device, dtype=torch.int32)
    done = torch.empty(k, device=device, dtype=torch.int32)
    stats = _stats(values, mask, cfg, chunk, nb, hist=hist, done=done)
    if hist is not None:
        _histogram(values, mask, stats, hist, cfg, chunk, nb, nbins)
    kept = t = None
    if threshold != THRESHOLD_NONE:
        kept = torch.empty((k, m), device=device, dtype=torch.float32)
        t = torch.empty(k, device=device, dtype=torch.float32)
    # Every (class, block) slot of the sums is written before the class's last block reads it.
    sum0 = torch.empty((k, nb), device=device, dtype=torch.float64)
    sum1 = torch.empty((k, nb), device=device, dtype=torch.float64)
    out = torch.empty(k, device=device, dtype=torch.float32)
    smk, smm = _mask_strides(mask)
    spare = stats[0]  # stands in for the pointers a variant never reads
    _threshold_pool_kernel[(k, nb)](
        values, mask if mask is not None else values,
        param_tensor if param_tensor is not None else spare, *stats,
        hist if hist is not None else spare, kept if kept is not None else spare,
        t if t is not None else spare, sum0, sum1, done, out,
        m, chunk, nb, values.stride(0), values.stride(1), smk, smm, float(param),
        **consts, **opts,
    )  # fmt: skip
    return kept, t, out


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
    reference. Two launches.
    """
    return _threshold_pool(
        values, mask, method, param_tensor, param, THRESHOLD_NONE, 2, False, config
    )[2]


def threshold_pool_launch(
    values: Tensor,
    mask: Tensor | None,
    method: str,
    param_tensor: Tensor | None = None,
    param: float = 0.0,
    otsu: bool = True,
    nbins: int = 256,
    logit: bool = False,
    config: ReduceLaunchConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``fastinsight.ops.threshold_pool.ThresholdAndPool`` in three launches (two without Otsu).

    Shapes: values ``[K, M]``, mask ``[M]``/``[K, M]`` or None -> (kept ``[K, M]`` fp32,
    thresholds ``[K]``, scores ``[K]``). ``otsu=False`` is the "none" threshold (t = 0);
    ``logit`` pools ``logit(kept)`` and applies a sigmoid to the pooled value.
    """
    threshold = THRESHOLD_OTSU if otsu else THRESHOLD_ZERO
    kept, t, out = _threshold_pool(
        values, mask, method, param_tensor, param, threshold, nbins, logit, config
    )
    assert kept is not None and t is not None
    return kept, t, out


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

    int_ptrs = {"hist_ptr": "*i32", "done_ptr": "*i32"}
    for has_mask in (False, True):
        mask_ty = "*i1" if has_mask else "*fp32"
        label = "mask" if has_mask else "no mask"
        for zero_hist, zero_done, what in ((0, True, "pool"), (256, False, "otsu"),
                                           (256, True, "threshold + pool")):  # fmt: skip
            consts, opts = _stats_meta(has_mask, cfg, zero_hist, zero_done)
            specs.append(KernelSpec(f"{mod}:_masked_stats_kernel", f"{label}, for {what}", conf,
                                    ptrs(_masked_stats_kernel, mask_ty, **int_ptrs), consts,
                                    opts))  # fmt: skip
        consts, opts = _hist_meta(has_mask, 256, cfg)
        specs.append(KernelSpec(f"{mod}:_otsu_histogram_kernel", f"{label}, 256 bins", conf,
                                ptrs(_otsu_histogram_kernel, mask_ty, hist_ptr="*i32"),
                                consts, opts))  # fmt: skip
        for method in POOL_METHODS:
            for is_tensor in (False, True) if method in ("smoothmax", "lse_lba") else (False,):
                for threshold, logits in ((THRESHOLD_NONE, (False,)), (THRESHOLD_ZERO, (False, True)),
                                          (THRESHOLD_OTSU, (False, True))):  # fmt: skip
                    for logit in logits:
                        consts, opts = _pool_meta(method, has_mask, is_tensor, threshold, logit,
                                                  256, cfg)  # fmt: skip
                        sig = ptrs(_threshold_pool_kernel, mask_ty, sum0_ptr="*fp64",
                                   sum1_ptr="*fp64", param="fp32", **int_ptrs)  # fmt: skip
                        variant = (
                            f"{method}, {label}, {'tensor' if is_tensor else 'float'} param, "
                            f"threshold {('none', 'zero', 'otsu')[threshold]}"
                            f"{', logit' if logit else ''}"
                        )
                        specs.append(KernelSpec(f"{mod}:_threshold_pool_kernel", variant, conf,
                                                sig, consts, opts))  # fmt: skip
    consts, opts = _select_meta(256, cfg)
    specs.append(KernelSpec(f"{mod}:_otsu_select_kernel", "256 bins", conf,
                            ptrs(_otsu_select_kernel, "*fp32", hist_ptr="*i32"), consts,
                            opts))  # fmt: skip
    return specs
