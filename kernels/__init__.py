"""Fused Triton kernels for the INSIGHT head, the dynamic threshold and the pooling.

Shipped as ``fastinsight.kernels``. Triton is imported lazily, so ``import fastinsight`` works on
machines without it.
"""

from __future__ import annotations


def available() -> bool:
    """True when Triton can be imported (kernels then run on CUDA, or on CPU when interpreting)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True
