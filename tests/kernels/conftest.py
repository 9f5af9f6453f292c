"""Kernel tests: Triton's CPU interpreter when no GPU is visible, the GPU otherwise.

``TRITON_INTERPRET=1`` must be set before the kernel modules are imported (``@triton.jit``
decides at decoration time); ``fastinsight.kernels`` imports them lazily, so setting it here,
at collection, is early enough. Seeds are set by the suite's root conftest.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
