"""Otsu threshold and slide pooling written for an ONNX graph that TensorRT can build.

The ``IMPL_EXPORT`` primitives of ``fastinsight.ops.threshold_pool`` (was
``fastinsight.export.graph_ops``).

These are the same computations as ``fastinsight.ops.otsu`` and ``fastinsight.ops.pooling`` (the ground
truth), re-expressed with operators that export to standard ONNX and that TensorRT supports:

- Histogram. The reference counts with ``scatter_add``. In ONNX that is ``ScatterElements`` with
  ``reduction="add"``: onnxruntime runs it, but TensorRT 10 has no native layer for it (its ONNX
  parser hands it to the ``ScatterElements`` plugin, and older parsers reject index tensors larger
  than the output: NVIDIA/TensorRT#3650, onnx/onnx-tensorrt#953). The default here is a one-hot
  compare-and-sum, factorised so that it stays small: bin ``b = f_lo * b_hi + b_lo``, and
  ``counts[b_hi, b_lo] = onehot(b_hi)^T @ onehot(b_lo)``, one batched ``MatMul`` of
  ``[K, f_hi, M] x [K, M, f_lo]`` (``f_hi = f_lo = 16`` for 256 bins: 32 floats per cell instead
  of 256). Products of 0/1 summed in float32 are exact integers up to 2**24 cells per bin, TF32
  included (0 and 1 are exact in TF32), so the counts equal the reference's bit for bit.
  ``histogram="scatter"`` keeps the ``ScatterElements`` form for onnxruntime-only deployments.
- Bin index. numpy's rule (``edges[i] <= x < edges[i+1]``, last bin closed) computed the way the
  reference does it: a scaled index, then one nudge down and one nudge up against the edges
  (``GatherElements``). Indices are kept as exact small floats, floored before any cast (so the
  float-to-int rounding mode of the runtime does not matter) and clamped as floats (TensorRT's
  ``Clip`` is float-only).
- Otsu statistics in ``accum_dtype``: ``float64`` repeats the reference's arithmetic exactly
  (onnxruntime); TensorRT has no float64 (its parser casts DOUBLE down to FLOAT), so a TensorRT
  target uses ``float32``: the counts stay exact, the means and variances round in float32, and on
  a near-tie the arg-max may pick a neighbouring bin (a threshold one bin width away).
- Pooling in the explicit max-subtracted form: no ``ReduceLogSumExp`` node (TensorRT 10's
  overflows to inf, NVIDIA/TensorRT#4772; spec section 5), and ``expm1``/``log1p`` (not ONNX
  operators) are written with Kahan's accurate compositions of ``Exp``/``Log``.

Everything is data-independent control flow over static bin counts, so ``torch.export`` traces
it with a dynamic number of cells.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

HISTOGRAMS: tuple[str, ...] = ("matmul", "scatter")
ACCUM_DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}


def expm1(x: Tensor) -> Tensor:
    """``exp(x) - 1`` accurate near 0 (Kahan): ``(u - 1) * x / log(u)`` with ``u = exp(x)``."""
    u = torch.exp(x)
    um1 = u - 1.0
    # log(u) is 0 where u == 1: that branch is not selected there, and Where does not propagate it.
    accurate = um1 * x / torch.log(u)
    out = torch.where(u == 1.0, x, accurate)
    return torch.where(um1 == -1.0, um1, out)


def log1p(x: Tensor) -> Tensor:
    """``log(1 + x)`` accurate near 0 (Goldberg): ``log(u) * x / (u - 1)`` with ``u = 1 + x``."""
    u = 1.0 + x
    accurate = torch.log(u) * x / (u - 1.0)
    return torch.where(u == 1.0, x, accurate)


def histogram_edges(vmin: Tensor, vmax: Tensor, nbins: int) -> Tensor:
    """numpy's ``histogram`` edges, as ``fastinsight.ops.otsu.histogram_edges`` (no in-place write).

    Shapes: vmin, vmax ``[K]`` float32 -> ``[K, nbins + 1]`` float32.
    """
    flat = vmin == vmax
    lo = torch.where(flat, vmin - 0.5, vmin)
    hi = torch.where(flat, vmax + 0.5, vmax)
    step = (hi - lo) / nbins
    steps = torch.arange(nbins, dtype=vmin.dtype, device=vmin.device)
    inner = steps[None, :] * step[:, None] + lo[:, None]
    return torch.cat([inner, hi[:, None]], dim=1)


def histogram_bins(values: Tensor, edges: Tensor) -> Tensor:
    """The bin of every value by numpy's rule, as float indices (exact small integers).

    Same arithmetic as ``fastinsight.ops.otsu.histogram_bins``. Shapes: values ``[K, M]``,
    edges ``[K, B + 1]`` -> float32 ``[K, M]`` in ``[0, B)``.
    """
    nbins = edges.shape[1] - 1
    last = float(nbins - 1)
    lo, hi = edges[:, :1], edges[:, -1:]
    idx = torch.floor((values - lo) / (hi - lo) * nbins).clamp(0.0, last)
    lower = torch.gather(edges, 1, idx.to(torch.int64))
    idx = (idx - (values < lower).to(values.dtype)).clamp(0.0, last)
    upper = torch.gather(edges, 1, idx.to(torch.int64) + 1)
    up = (values >= upper) & (idx != last)
    return idx + up.to(values.dtype)


def _factors(nbins: int) -> tuple[int, int]:
    f_lo = math.isqrt(nbins - 1) + 1 if nbins > 1 else 1
    f_hi = -(-nbins // f_lo)
    return f_hi, f_lo


def histogram_counts(
    bins: Tensor, weight: Tensor | None, nbins: int, method: str = "matmul"
) -> Tensor:
    """Per-row histogram of float bin indices, each cell counted with ``weight`` (0/1) or 1.

    Shapes: bins ``[K, M]`` float, weight ``[K, M]`` float or None -> counts ``[K, nbins]`` float32.
    """
    if method == "scatter":
        ones = torch.ones_like(bins) if weight is None else weight
        counts = torch.zeros(bins.shape[0], nbins, dtype=bins.dtype, device=bins.device)
        return counts.scatter_add(1, bins.to(torch.int64), ones)
    if method != "matmul":
        raise ValueError(f"histogram must be one of {HISTOGRAMS}, got {method!r}")
    f_hi, f_lo = _factors(nbins)
    b_hi = torch.floor(bins / f_lo)
    b_lo = bins - b_hi * f_lo
    ids_hi = torch.arange(f_hi, dtype=bins.dtype, device=bins.device)
    ids_lo = torch.arange(f_lo, dtype=bins.dtype, device=bins.device)
    one_hi = (b_hi[:, :, None] == ids_hi).to(bins.dtype)  # [K, M, f_hi]
    one_lo = (b_lo[:, :, None] == ids_lo).to(bins.dtype)  # [K, M, f_lo]
    if weight is not None:
        one_lo = one_lo * weight[:, :, None]
    counts = torch.matmul(one_hi.transpose(1, 2), one_lo)  # [K, f_hi, f_lo]
    return counts.reshape(bins.shape[0], f_hi * f_lo)[:, :nbins]


def _reverse_cumsum(x: Tensor) -> Tensor:
    return torch.flip(torch.cumsum(torch.flip(x, [1]), dim=1), [1])


def otsu_from_histogram(counts: Tensor, centers: Tensor, accum: torch.dtype) -> Tensor:
    """``fastinsight.ops.otsu.otsu_from_histogram`` in ``accum`` precision.

    Shapes: counts ``[K, B]``, centers ``[K, B]`` float32 -> ``[K]`` float32 (a bin centre).
    """
    c = counts.to(accum)
    centers_a = centers.to(accum)
    weight1 = torch.cumsum(c, dim=1)
    weight2 = _reverse_cumsum(c)
    mass = c * centers_a
    mean1 = torch.cumsum(mass, dim=1) / weight1
    mean2 = _reverse_cumsum(mass) / weight2
    diff = mean1[:, :-1] - mean2[:, 1:]
    variance = weight1[:, :-1] * weight2[:, 1:] * (diff * diff)
    variance = torch.where(torch.isnan(variance), torch.full_like(variance, -1.0), variance)
    best = torch.argmax(variance, dim=1, keepdim=True)
    return torch.gather(centers, 1, best).squeeze(1)


def otsu_threshold(
    values: Tensor,
    keep: Tensor | None = None,
    nbins: int = 256,
    accum: torch.dtype = torch.float64,
    histogram: str = "matmul",
) -> Tensor:
    """Per-row Otsu threshold over the cells where ``keep`` is 1 (all cells when None).

    Same results as ``fastinsight.ops.otsu.otsu_threshold`` (bit for bit with ``accum=float64``).
    A row with no kept cell gives NaN.

    Shapes: values ``[K, M]`` float32, keep ``[K, M]`` float32 0/1 or None -> ``[K]`` float32.
    """
    v = values
    if keep is None:
        vmin = v.amin(dim=1)
        vmax = v.amax(dim=1)
        clamped = v
        empty = None
    else:
        inf = torch.full_like(v, math.inf)
        vmin = torch.where(keep > 0, v, inf).amin(dim=1)
        vmax = torch.where(keep > 0, v, -inf).amax(dim=1)
        empty = keep.sum(dim=1) == 0
        vmin = torch.where(empty, torch.zeros_like(vmin), vmin)
        vmax = torch.where(empty, torch.ones_like(vmax), vmax)
        # Masked-out cells are clamped into range and counted with weight 0.
        clamped = torch.minimum(torch.maximum(v, vmin[:, None]), vmax[:, None])
    edges = histogram_edges(vmin, vmax, nbins)
    bins = histogram_bins(clamped, edges)
    counts = histogram_counts(bins, keep, nbins, histogram)
    centers = (edges[:, :-1] + edges[:, 1:]) / 2
    t = otsu_from_histogram(counts, centers, accum)
    t = torch.where(vmin == vmax, vmin, t)
    if empty is not None:
        t = torch.where(empty, torch.full_like(t, math.nan), t)
    return t


# -- pooling -----------------------------------------------------------------------------------
def _keep_or_ones(values: Tensor, keep: Tensor | None) -> Tensor:
    return torch.ones_like(values) if keep is None else keep


def masked_max(values: Tensor, keep: Tensor | None = None) -> Tensor:
    """Shapes: ``[K, M]``, keep ``[K, M]`` or None -> ``[K]``."""
    if keep is None:
        return values.amax(dim=1)
    return torch.where(keep > 0, values, torch.full_like(values, -math.inf)).amax(dim=1)


def masked_mean(
    values: Tensor, keep: Tensor | None = None, accum: torch.dtype = torch.float64
) -> Tensor:
    """Sum in ``accum`` over kept cells divided by their count. Shapes: ``[K, M]`` -> ``[K]``."""
    k = _keep_or_ones(values, keep)
    total = torch.where(k > 0, values, torch.zeros_like(values)).to(accum).sum(dim=1)
    return (total / k.to(accum).sum(dim=1)).to(values.dtype)


def smoothmax(
    values: Tensor, keep: Tensor | None, a: Tensor, accum: torch.dtype = torch.float64
) -> Tensor:
    """``sum(softmax(a x) x)`` over kept cells, max-subtracted explicitly (no ReduceLogSumExp).

    The two sums run in ``accum``: a runtime may add millions of cells in sequence, where a
    float32 running sum drifts (torch's own sum is pairwise).

    Shapes: values ``[K, M]``, keep ``[K, M]`` or None, a ``[K, 1]`` -> ``[K]``.
    """
    z = a * values
    v = values
    if keep is not None:
        z = torch.where(keep > 0, z, torch.full_like(z, -math.inf))
        v = torch.where(keep > 0, values, torch.zeros_like(values))
    m = z.amax(dim=1, keepdim=True)
    w = torch.exp(z - m)
    num = (w * v).to(accum).sum(dim=1)
    return (num / w.to(accum).sum(dim=1)).to(values.dtype)


def lse_lba(
    values: Tensor, keep: Tensor | None, r: Tensor, accum: torch.dtype = torch.float64
) -> Tensor:
    """``(1/r) log(mean(exp(r x)))`` as ``m + log1p(mean(expm1(r (x - m)))) / r``.

    Shapes: values ``[K, M]``, keep ``[K, M]`` or None, r ``[K, 1]`` -> ``[K]``.
    """
    m = masked_max(values, keep)[:, None]
    k = _keep_or_ones(values, keep)
    d = torch.where(k > 0, values - m, torch.zeros_like(values))
    terms = torch.where(k > 0, expm1(r * d), torch.zeros_like(values))
    mean = terms.to(accum).sum(dim=1, keepdim=True) / k.to(accum).sum(dim=1, keepdim=True)
    return (m + (log1p(mean) / r.to(accum)).to(values.dtype)).squeeze(1)


def logit(p: Tensor, eps: float = 1e-6) -> Tensor:
    """``fastinsight.ops.pooling.logit``: ``log(p) - log1p(-p)`` with p clamped to ``[eps, 1-eps]``."""
    p = p.clamp(eps, 1.0 - eps)
    return torch.log(p) - log1p(-p)
