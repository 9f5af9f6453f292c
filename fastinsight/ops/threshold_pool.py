"""The dynamic threshold and the slide pooling, assembled once.

Over the masked-in cells of a slide, per class ``k`` (values ``H[k]``, one per cell):

    t[k]      = otsu(H[k])                      (or 0 with threshold "none")
    kept[k]   = H[k] * (H[k] > t[k])            (cells at or below the threshold are zeroed)
    x[k]      = logit(kept[k]) if pool_input == "logit" else kept[k]
    p[k]      = pool(x[k])                      (SmoothMax, LSE-LBA, max or mean)
    score[k]  = sigmoid(p[k]) if pool_input == "logit" else p[k]

Three implementations provide the primitives (Otsu and the four poolings), chosen once when a
``ThresholdAndPool`` is built and never changed afterwards:

- ``IMPL_REFERENCE``: ``fastinsight.ops.otsu`` and ``fastinsight.ops.pooling`` (the ground truth);
- ``IMPL_TRITON``: the fused kernels of ``fastinsight.kernels`` (imported when first called);
  ``forward`` is one fused op of three launches (``kernels.threshold_and_pool``);
- ``IMPL_EXPORT``: ``fastinsight.ops.graph_ops``, the same maths in operators that export to
  ONNX and build in TensorRT (accumulation dtype and histogram form are options).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fastinsight.errors import InputError
from fastinsight.ops import graph_ops
from fastinsight.ops.otsu import otsu_threshold
from fastinsight.ops.pooling import Pooling, cell_mask, logit

IMPL_REFERENCE = "reference"
IMPL_TRITON = "triton"
IMPL_EXPORT = "export"
IMPLS: tuple[str, ...] = (IMPL_REFERENCE, IMPL_TRITON, IMPL_EXPORT)

THRESHOLD_OTSU = "otsu"
THRESHOLD_NONE = "none"
THRESHOLDS: tuple[str, ...] = (THRESHOLD_OTSU, THRESHOLD_NONE)

POOL_INPUT_HEATMAP = "heatmap"
POOL_INPUT_LOGIT = "logit"
POOL_INPUTS: tuple[str, ...] = (POOL_INPUT_HEATMAP, POOL_INPUT_LOGIT)

POOL_SMOOTHMAX = "smoothmax"
POOL_LSE_LBA = "lse_lba"
POOL_MAX = "max"
POOL_MEAN = "mean"
POOLINGS: tuple[str, ...] = (POOL_SMOOTHMAX, POOL_LSE_LBA, POOL_MAX, POOL_MEAN)


class ThresholdAndPool(nn.Module):
    """``(kept, thresholds, scores)`` of a slide's values with one fixed implementation.

    ``pooling`` is the model's ``Pooling`` module (it owns LSE-LBA's learnable ``beta``); it is
    referenced, not registered, so the model's state dict keeps one copy of it.
    ``accum_dtype`` and ``histogram`` apply to ``IMPL_EXPORT`` only (see ``graph_ops``).
    """

    def __init__(
        self,
        pooling: Pooling,
        *,
        threshold: str = THRESHOLD_OTSU,
        otsu_bins: int = 256,
        pool_input: str = POOL_INPUT_HEATMAP,
        impl: str = IMPL_REFERENCE,
        accum_dtype: torch.dtype = torch.float64,
        histogram: str = "matmul",
    ) -> None:
        super().__init__()
        problems = [
            f"{name} must be one of {allowed}, got {value!r}"
            for name, value, allowed in (
                ("impl", impl, IMPLS),
                ("threshold", threshold, THRESHOLDS),
                ("pool_input", pool_input, POOL_INPUTS),
                ("pooling", pooling.method, POOLINGS),
                ("histogram", histogram, graph_ops.HISTOGRAMS),
            )
            if value not in allowed
        ]
        if problems:
            raise InputError("; ".join(problems))
        self.__dict__["_pooling"] = pooling  # not a submodule: the model owns it
        self._impl = impl
        self.threshold_method = threshold
        self.otsu_bins = int(otsu_bins)
        self.pool_input = pool_input
        self.accum_dtype = accum_dtype
        self.histogram = histogram

    @property
    def impl(self) -> str:
        """The implementation chosen at construction (read-only)."""
        return self._impl

    @property
    def pooling(self) -> Pooling:
        return self.__dict__["_pooling"]

    # -- the primitives of the chosen implementation ------------------------------------------
    @staticmethod
    def _mask(values: Tensor, mask: Tensor | None) -> Tensor | None:
        """``mask`` as bool, checked against values ``[K, M]`` (every implementation takes the
        same masks: bool, or integer / float counted as tissue where non-zero)."""
        if mask is None:
            return None
        if tracing():
            # An export trace: no Python checks on (symbolic) shapes; bool masks pass unchanged.
            return mask if mask.dtype == torch.bool else mask != 0
        if values.ndim != 2:
            raise InputError(
                f"threshold_and_pool expects values of shape [K, M], got {tuple(values.shape)}"
            )
        return cell_mask(values, mask, "threshold_and_pool")

    def _keep(self, values: Tensor, mask: Tensor | None) -> Tensor | None:
        """The mask as the implementation takes it: ``[M]`` bool, or ``[K, M]`` 0/1 for export."""
        mask = self._mask(values, mask)
        if mask is None or self._impl != IMPL_EXPORT:
            return mask
        return mask.to(values.dtype).reshape(1, -1).expand(values.shape[0], -1)

    def threshold(self, values: Tensor, mask: Tensor | None) -> Tensor:
        """Per-class threshold over masked-in cells. Shapes: ``[K, M]``, ``[M]`` -> ``[K]``."""
        if self.threshold_method == THRESHOLD_NONE:
            # Derived from the data: an exported graph output must not be an initializer.
            return (
                values[:, 0] * 0.0
                if self._impl == IMPL_EXPORT
                else values.new_zeros(values.shape[0])
            )
        keep = self._keep(values, mask)
        if self._impl == IMPL_TRITON:
            from fastinsight.kernels import otsu_threshold as otsu_kernel

            return otsu_kernel(values, keep, self.otsu_bins)
        if self._impl == IMPL_EXPORT:
            return graph_ops.otsu_threshold(
                values, keep, self.otsu_bins, self.accum_dtype, self.histogram
            )
        return otsu_threshold(values, keep, self.otsu_bins)

    def _kernel_param(self) -> float | Tensor:
        """The kernels' one pooling parameter: SmoothMax's ``a``, LSE-LBA's ``r`` (a ``[K]``
        tensor), unused (0) by max and mean."""
        if self.pooling.method == POOL_SMOOTHMAX:
            return self.pooling.smoothmax_a
        if self.pooling.method == POOL_LSE_LBA:
            return self.pooling.sharpness
        return 0.0

    def _pool_fn(self) -> Callable[[Tensor, Tensor | None], Tensor]:
        method, pooling = self.pooling.method, self.pooling
        if self._impl == IMPL_TRITON:
            from fastinsight import kernels

            triton: dict[str, Callable[[Tensor, Tensor | None], Tensor]] = {
                POOL_SMOOTHMAX: lambda x, m: kernels.smoothmax(x, m, self._kernel_param()),
                POOL_LSE_LBA: lambda x, m: kernels.lse_lba(x, m, self._kernel_param()),
                POOL_MAX: kernels.masked_max,
                POOL_MEAN: kernels.masked_mean,
            }
            return triton[method]
        if self._impl == IMPL_EXPORT:
            acc = self.accum_dtype
            export: dict[str, Callable[[Tensor, Tensor | None], Tensor]] = {
                POOL_SMOOTHMAX: lambda x, m: graph_ops.smoothmax(
                    x, m, torch.full_like(x[:, :1], pooling.smoothmax_a), acc
                ),
                POOL_LSE_LBA: lambda x, m: graph_ops.lse_lba(
                    x, m, pooling.sharpness.float().reshape(-1, 1), acc
                ),
                POOL_MAX: graph_ops.masked_max,
                POOL_MEAN: lambda x, m: graph_ops.masked_mean(x, m, acc),
            }
            return export[method]
        return pooling

    def pool(self, values: Tensor, mask: Tensor | None) -> Tensor:
        """Slide score per class. Shapes: ``[K, M]``, ``[M]`` -> ``[K]``."""
        as_logit = self.pool_input == POOL_INPUT_LOGIT
        if as_logit:
            values = graph_ops.logit(values) if self._impl == IMPL_EXPORT else logit(values)
        p = self._pool_fn()(values, self._keep(values, mask))
        return torch.sigmoid(p) if as_logit else p

    def forward(self, values: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Shapes: values ``[K, M]`` float32, mask ``[M]`` bool or None ->
        (kept ``[K, M]``, thresholds ``[K]``, scores ``[K]``).

        An integer or float mask counts as tissue where non-zero (see ``_mask``)."""
        mask = self._mask(values, mask)
        if self._impl == IMPL_TRITON:
            return self._fused(values, mask)
        t = self.threshold(values, mask)
        kept = values * (values > t[:, None]).to(values.dtype)
        return kept, t, self.pool(kept, mask)

    def _fused(self, values: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The Triton path: one fused op (statistics, histogram, threshold + pool + finish)."""
        from fastinsight import kernels

        return kernels.threshold_and_pool(
            values, mask, self.pooling.method, self._kernel_param(),
            threshold=self.threshold_method,
            nbins=self.otsu_bins, pool_input=self.pool_input,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"impl={self._impl}, threshold={self.threshold_method}, pool_input={self.pool_input}"


def tracing() -> bool:
    """True inside an ONNX / torch.export / TorchScript trace or a torch.compile graph."""
    return bool(
        torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
    )


def threshold_and_pool(
    values: Tensor, mask: Tensor | None, pooling: Pooling, impl: str = IMPL_REFERENCE, **kw: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """``ThresholdAndPool(pooling, impl=impl, **kw)(values, mask)``: kept, thresholds, scores.

    Shapes: values ``[K, M]``, mask ``[M]`` bool or None -> (``[K, M]``, ``[K]``, ``[K]``).
    """
    return ThresholdAndPool(pooling, impl=impl, **kw)(values, mask)


__all__ = [
    "IMPLS",
    "IMPL_EXPORT",
    "IMPL_REFERENCE",
    "IMPL_TRITON",
    "POOLINGS",
    "POOL_INPUTS",
    "POOL_INPUT_HEATMAP",
    "POOL_INPUT_LOGIT",
    "POOL_LSE_LBA",
    "POOL_MAX",
    "POOL_MEAN",
    "POOL_SMOOTHMAX",
    "THRESHOLDS",
    "THRESHOLD_NONE",
    "THRESHOLD_OTSU",
    "ThresholdAndPool",
    "threshold_and_pool",
]
