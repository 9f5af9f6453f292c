"""Otsu's threshold on the device, as scikit-image's ``threshold_otsu`` computes it for floats.

scikit-image (float input): if every value is equal the threshold is that value; otherwise a
256-bin histogram over ``[min, max]`` with numpy's ``histogram`` edges, bin centres ``c``, and the
first arg-max of the between-class variance ``w1[:-1] * w2[1:] * (m1[:-1] - m2[1:])**2``.

scikit-image (0.26) does the cumulative sums in float32; we do them in float64, which gives the
same bin wherever float32 has no ties or overflow (values beyond ~1e15 overflow its variance),
and a reproducible result on GPUs, where a parallel float32 scan would not match numpy's
sequential one anyway.

Everything here is tensor ops on the input's device with no ``.item()``: the threshold of a slide
never makes a host round trip. Masked-out cells (non-tissue) take no part.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastinsight.errors import InputError
from fastinsight.ops.pooling import cell_mask


def histogram_edges(vmin: Tensor, vmax: Tensor, nbins: int) -> Tensor:
    """Bin edges as ``numpy.histogram`` (``numpy.linspace`` in the data's float type) builds them.

    Shapes: vmin, vmax ``[K]`` float32 -> edges ``[K, nbins + 1]`` float32.
    numpy widens an empty range by 0.5 on both sides; Otsu never reaches that case (a constant
    input returns early) but the edges stay finite for it.
    """
    flat = vmin == vmax
    lo = torch.where(flat, vmin - 0.5, vmin)
    hi = torch.where(flat, vmax + 0.5, vmax)
    step = (hi - lo) / nbins
    steps = torch.arange(nbins + 1, device=vmin.device, dtype=vmin.dtype)
    edges = steps[None, :] * step[:, None] + lo[:, None]
    edges[:, -1] = hi
    return edges


def histogram_bins(values: Tensor, edges: Tensor) -> Tensor:
    """The bin of every value, with numpy's rule: ``edges[i] <= x < edges[i+1]``, last bin closed.

    Shapes: values ``[K, M]``, edges ``[K, B + 1]`` -> int64 ``[K, M]`` in ``[0, B)``.
    numpy first scales ``(x - lo) / (hi - lo) * B`` and then nudges the index by one where float
    rounding put it on the wrong side of an edge; this does the same.
    """
    nbins = edges.shape[1] - 1
    lo, hi = edges[:, :1], edges[:, -1:]
    idx = ((values - lo) / (hi - lo) * nbins).to(torch.int64).clamp_(0, nbins - 1)
    idx = idx - (values < torch.gather(edges, 1, idx)).to(torch.int64)
    idx = idx.clamp_(0, nbins - 1)
    up = (values >= torch.gather(edges, 1, idx + 1)) & (idx != nbins - 1)
    return idx + up.to(torch.int64)


def otsu_from_histogram(counts: Tensor, centers: Tensor) -> Tensor:
    """Otsu's threshold from a histogram, exactly scikit-image's arithmetic (in float64).

    Shapes: counts ``[K, B]``, centers ``[K, B]`` -> ``[K]`` (the chosen bin centre, float64).
    """
    counts = counts.to(torch.float64)
    centers64 = centers.to(torch.float64)
    weight1 = torch.cumsum(counts, dim=1)
    weight2 = torch.flip(torch.cumsum(torch.flip(counts, [1]), dim=1), [1])
    mass = counts * centers64
    mean1 = torch.cumsum(mass, dim=1) / weight1
    mean2 = torch.flip(torch.cumsum(torch.flip(mass, [1]), dim=1), [1]) / weight2
    variance = weight1[:, :-1] * weight2[:, 1:] * (mean1[:, :-1] - mean2[:, 1:]) ** 2
    # Empty leading/trailing bins give 0/0 = NaN means: numpy's argmax treats NaN as the maximum,
    # but such bins cannot exist at the ends (min and max are occupied), and interior empty bins
    # have finite means. Replace NaN by -1 so argmax picks the first true maximum.
    variance = torch.nan_to_num(variance, nan=-1.0)
    best = torch.argmax(variance, dim=1, keepdim=True)
    return torch.gather(centers, 1, best).squeeze(1)


def otsu_threshold(values: Tensor, mask: Tensor | None = None, nbins: int = 256) -> Tensor:
    """Per-row Otsu threshold of ``values`` over the cells where ``mask`` is True.

    Shapes: values ``[K, M]`` (any float dtype; computed in float32), mask ``[M]`` or ``[K, M]``
    bool (None = all; an integer or float mask counts as tissue where non-zero, as in
    ``fastinsight.ops.pooling``) -> thresholds ``[K]`` float32.

    No cell at all (``M = 0``, or a CPU mask that is all False) is an InputError, as in the
    poolings. On a GPU that check would be a host round trip in the middle of the slide: there,
    and for a single class whose mask row is empty, the threshold is NaN (callers check the mask
    first, see ``InsightModel.threshold_and_pool``).
    """
    if values.ndim != 2:
        raise InputError(
            f"otsu_threshold expects values of shape [K, M], got {tuple(values.shape)}"
        )
    if nbins < 2:
        raise InputError(f"otsu_threshold needs at least 2 bins, got {nbins}")
    if values.shape[1] == 0:
        raise InputError(
            f"nothing to threshold: the values {tuple(values.shape)} have no cells (M = 0)"
        )
    v = values.float()
    if mask is None:
        keep = torch.ones_like(v, dtype=torch.bool)
    else:
        keep = cell_mask(v, mask, "otsu_threshold").expand_as(v)
        if keep.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(keep.any()):
            raise InputError("nothing to threshold: the tissue mask selects no cell")
    vmin = torch.where(keep, v, torch.inf).amin(dim=1)
    vmax = torch.where(keep, v, -torch.inf).amax(dim=1)
    empty = ~keep.any(dim=1)
    safe_min = torch.where(empty, torch.zeros_like(vmin), vmin)
    safe_max = torch.where(empty, torch.ones_like(vmax), vmax)
    edges = histogram_edges(safe_min, safe_max, nbins)
    # Masked-out cells are clamped into range and given zero weight.
    clamped = torch.minimum(torch.maximum(v, safe_min[:, None]), safe_max[:, None])
    bins = histogram_bins(clamped, edges)
    counts = torch.zeros(v.shape[0], nbins, device=v.device, dtype=torch.float64)
    counts.scatter_add_(1, bins, keep.to(torch.float64))
    centers = (edges[:, :-1] + edges[:, 1:]) / 2
    t = otsu_from_histogram(counts, centers).to(torch.float32)
    t = torch.where(vmin == vmax, vmin, t)
    return torch.where(empty, torch.full_like(t, torch.nan), t)
