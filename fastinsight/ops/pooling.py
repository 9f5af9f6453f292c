"""The pooling family: from per-cell heatmap values to one slide score per class.

All poolings reduce over the masked-in cells of a slide, in float32, and are numerically stable
for any value range and any number of cells:

- SmoothMax (the official INSIGHT pooling): ``p = sum(x exp(a x)) / sum(exp(a x))``, computed as
  ``sum(softmax(a x) x)``. Cells zeroed by the threshold stay in the denominator, as in the
  official model.
- LSE-LBA (Yao et al. 2018): ``p = (1/r) log((1/n) sum exp(r x))`` with ``r = r0 + exp(beta)``,
  beta learnable per class. Computed around the maximum ``m`` as
  ``m + log1p(mean(expm1(r (x - m)))) / r``: exact as ``r -> 0`` (the mean) and as
  ``r -> inf`` (the max), where the textbook ``(logsumexp(r x) - log n) / r`` cancels badly.
- max (PYLON and the official "maxpool" option) and mean.

A mask is bool (True = tissue); integer and float masks count as tissue where non-zero
(``as_bool_mask``), in every op here, in ``fastinsight.ops.otsu`` and in ``ThresholdAndPool``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fastinsight.errors import InputError


def as_bool_mask(mask: Any, what: str = "mask") -> Tensor:
    """A cell mask as a bool tensor: True = tissue (the cell takes part).

    A bool tensor is returned as it is. An integer or floating mask (0/1, 0/255, 0.0/1.0, as
    image masks are often stored) is read as tissue where it is non-zero, as ``mask.bool()``
    does; it never weights the cells. A numpy array (or anything ``torch.as_tensor`` takes) is
    converted first. Anything else is one InputError.
    """
    if not isinstance(mask, Tensor):
        try:
            mask = torch.as_tensor(mask)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(
                f"{what} must be a bool tensor (True = tissue) or a numpy array; got "
                f"{type(mask).__name__} ({str(exc)[:100]})"
            ) from None
    if mask.device.type == "meta":
        raise InputError(
            f"{what} is on the 'meta' device (a shape without data); pass a real tensor"
        )
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not (mask.is_floating_point() or _is_integer(mask.dtype)):
        raise InputError(f"{what} must be bool (True = tissue), integer or float; got {mask.dtype}")
    return mask != 0


def _is_integer(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def check_mask_shape(values_shape: tuple[int, ...], mask: Tensor, what: str) -> None:
    """InputError unless ``mask`` is ``[M]``, ``[1, M]`` or ``[K, M]`` for values ``[K, M]``."""
    k, m = values_shape
    shape = tuple(mask.shape)
    if shape == (m,) or (len(shape) == 2 and shape[1] == m and shape[0] in (1, k)):
        return
    raise InputError(
        f"{what}: the mask has shape {shape} but the values are [K, M] = {(k, m)}; the mask "
        f"must be [M] = {(m,)} or [K, M] = {(k, m)} (one entry per cell)"
    )


def cell_mask(values: Tensor, mask: Any, what: str) -> Tensor:
    """``mask`` checked against values ``[K, M]``: bool (see ``as_bool_mask``), ``[M]`` /
    ``[1, M]`` / ``[K, M]``, on the values' device.

    Shapes: values ``[K, M]``, mask ``[M]`` | ``[1, M]`` | ``[K, M]`` -> bool, same shape.
    """
    keep = as_bool_mask(mask)
    check_mask_shape((values.shape[0], values.shape[1]), keep, what)
    return keep.to(device=values.device)


def _prepare(values: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if values.ndim != 2:
        raise InputError(f"pooling expects values of shape [K, M], got {tuple(values.shape)}")
    v = values.float()
    if v.shape[1] == 0:
        raise InputError("nothing to pool: the slide has no cells")
    if mask is None:
        return v, torch.ones_like(v, dtype=torch.bool)
    keep = cell_mask(v, mask, "pooling").expand_as(v)
    # Checked where it is free (CPU tensors). On a GPU this check would be a host round trip in
    # the middle of the slide computation; there an empty class gives NaN, which
    # InsightModel.predict turns into this same error once the scores reach the host.
    if keep.device.type == "cpu" and not bool(keep.any(dim=1).all()):
        raise InputError("nothing to pool: the tissue mask selects no cell for some class")
    return v, keep


def masked_max(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Shapes: values ``[K, M]``, mask ``[M]``/``[K, M]`` -> ``[K]``."""
    v, keep = _prepare(values, mask)
    return torch.where(keep, v, -torch.inf).amax(dim=1)


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Shapes: values ``[K, M]``, mask ``[M]``/``[K, M]`` -> ``[K]``."""
    v, keep = _prepare(values, mask)
    total = torch.where(keep, v, 0.0).sum(dim=1, dtype=torch.float64)
    return (total / keep.sum(dim=1)).to(torch.float32)


def smoothmax(values: Tensor, mask: Tensor | None = None, a: float | Tensor = 8.0) -> Tensor:
    """SmoothMax pooling, ``sum(softmax(a x) x)`` over masked-in cells.

    Shapes: values ``[K, M]``, mask ``[M]``/``[K, M]``, a scalar or ``[K]`` -> ``[K]``.
    """
    v, keep = _prepare(values, mask)
    a_t = torch.as_tensor(a, dtype=torch.float32, device=v.device).reshape(-1, 1)
    z = torch.where(keep, a_t * v, -torch.inf)
    m = z.amax(dim=1, keepdim=True)
    w = torch.exp(z - m)  # masked-out cells give exp(-inf) = 0
    return (w * torch.where(keep, v, 0.0)).sum(dim=1) / w.sum(dim=1)


def lse_lba(values: Tensor, mask: Tensor | None = None, r: float | Tensor = 6.0) -> Tensor:
    """Log-sum-exp pooling with sharpness ``r``: ``(1/r) log(mean(exp(r x)))`` over masked-in cells.

    Shapes: values ``[K, M]``, mask ``[M]``/``[K, M]``, r scalar or ``[K]`` -> ``[K]``.
    """
    v, keep = _prepare(values, mask)
    r_t = torch.as_tensor(r, dtype=torch.float32, device=v.device).reshape(-1, 1)
    m = torch.where(keep, v, -torch.inf).amax(dim=1, keepdim=True)
    d = torch.where(keep, v - m, 0.0)
    n = keep.sum(dim=1, keepdim=True)
    terms = torch.where(keep, torch.expm1(r_t * d), 0.0)
    # Accumulated in float64: with 10^8 cells and a huge r, mean(expm1) = -(n - k) / n must not
    # round to -1 (which would give log1p(-1) = -inf). It lies in (-1, 0] since the maximum
    # contributes expm1(0) = 0.
    mean_expm1 = terms.sum(dim=1, keepdim=True, dtype=torch.float64) / n
    return (m + (torch.log1p(mean_expm1) / r_t).float()).squeeze(1)


class Pooling(nn.Module):
    """A pooling of the family as a module; LSE-LBA owns its learnable ``beta`` (one per class)."""

    def __init__(
        self, method: str, num_classes: int, smoothmax_a: float = 8.0, lse_r0: float = 5.0
    ) -> None:
        super().__init__()
        self.method = method
        self.smoothmax_a = smoothmax_a
        self.lse_r0 = lse_r0
        if method == "lse_lba":
            # beta = 0 starts the sharpness at r = r0 + 1.
            self.beta = nn.Parameter(torch.zeros(num_classes))
        elif method not in ("smoothmax", "max", "mean"):
            raise InputError(
                f"unknown pooling {method!r}; expected smoothmax, lse_lba, max or mean"
            )

    @property
    def sharpness(self) -> Tensor:
        """LSE-LBA's ``r = r0 + exp(beta)`` per class."""
        return self.lse_r0 + torch.exp(self.beta)

    def forward(self, values: Tensor, mask: Tensor | None = None) -> Tensor:
        """Shapes: values ``[K, M]``, mask ``[M]``/``[K, M]`` -> ``[K]`` float32."""
        if self.method == "smoothmax":
            return smoothmax(values, mask, self.smoothmax_a)
        if self.method == "lse_lba":
            return lse_lba(values, mask, self.sharpness)
        if self.method == "max":
            return masked_max(values, mask)
        return masked_mean(values, mask)

    def extra_repr(self) -> str:
        if self.method == "smoothmax":
            return f"smoothmax, a={self.smoothmax_a}"
        if self.method == "lse_lba":
            return f"lse_lba, r0={self.lse_r0}"
        return self.method


def logit(p: Tensor, eps: float = 1e-6) -> Tensor:
    """``log(p / (1 - p))`` with p clamped to ``[eps, 1 - eps]``."""
    p = p.clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)
