"""Fused Triton kernels for the INSIGHT head, the dynamic threshold and the pooling.

Shipped as ``fastinsight.kernels``. Triton is imported lazily, so ``import fastinsight`` (and
``import fastinsight.kernels``) works on machines without it. The launchers have the signatures
of their references and are registered as ``torch.library`` custom ops (``torch.ops.fastinsight``)
on first use:

- ``insight_head(tokens, weights)``           as ``fastinsight.ops.reference.insight_head_reference``
- ``otsu_threshold(values, mask, nbins)``     as ``fastinsight.ops.otsu.otsu_threshold``
- ``smoothmax``, ``lse_lba``, ``masked_max``, ``masked_mean`` as ``fastinsight.ops.pooling``
- ``threshold_and_pool(values, mask, method, param)`` as
  ``fastinsight.ops.threshold_pool.ThresholdAndPool``: threshold + pooling in 3 launches

They run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before the first
launcher was used (slow; for tests). ``fastinsight kernels check`` (``fastinsight.kernels.check``)
compiles every variant for sm_80/sm_90 without a GPU.
"""

from __future__ import annotations

from typing import Any

_LAUNCHERS = (
    "insight_head",
    "lse_lba",
    "masked_max",
    "masked_mean",
    "otsu_threshold",
    "smoothmax",
    "threshold_and_pool",
)

__all__ = ["available", "head_support_problem", *_LAUNCHERS]

# The fused head's limits (kernels/head.py checks them again at launch).
MAX_WIDTH = 256
WIDTH_MULTIPLE = 16


def available() -> bool:
    """True when Triton can be imported (kernels then run on CUDA, or on CPU when interpreting)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def head_support_problem(reduce_dim: int, widths: tuple[int, ...], num_classes: int) -> str | None:
    """Why the fused head cannot run an architecture (None when it can), without Triton.

    The layer kernels take every hidden width (the reduce output and the three chain widths) as
    a whole number of 16-channel dot steps, at most 256, and at most 256 classes.
    """
    hidden = (int(reduce_dim), *(int(w) for w in widths))
    if any(w % WIDTH_MULTIPLE or w > MAX_WIDTH for w in hidden):
        return (
            f"the fused head needs hidden widths that are multiples of {WIDTH_MULTIPLE} up to "
            f"{MAX_WIDTH}; this model has {hidden}"
        )
    if num_classes > MAX_WIDTH:
        return f"the fused head supports up to {MAX_WIDTH} classes; this model has {num_classes}"
    return None


def __getattr__(name: str) -> Any:
    # PEP 562: the launchers (and with them Triton and the custom ops) load on first use.
    if name in _LAUNCHERS:
        from . import ops

        return getattr(ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
