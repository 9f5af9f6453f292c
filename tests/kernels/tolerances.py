"""The one tolerance table of the kernel tests (conventions: compare against float64).

- fp32 (IEEE dots, TF32 off): the kernel within ``FP32_ATOL`` of the float64 reference (the
  issue's parity target, 1e-5).
- fp16 / bf16: the kernel's max error against float64 at most ``LOWP_FACTOR`` times PyTorch's own
  max error at that precision, plus a floor of half an ulp at 1.0 (the flash-attention rule).
- TF32 dots: a fixed bound for probabilities in [0, 1].
- Pooling and Otsu run in fp32 with fp64 sums: ``POOL_RTOL`` / ``POOL_ATOL`` against the
  reference; thresholds equal up to one histogram bin.
"""

from __future__ import annotations

import torch

FP32_ATOL = 1e-5
TF32_ATOL = 5e-3
LOWP_FACTOR = 2.0
LOWP_FLOOR = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
POOL_RTOL = 1e-6
POOL_ATOL = 1e-6
# Splitting a reduction differently regroups only fp64 additions: the fp32 results agree to
# within a couple of ulps (in practice bit for bit).
SPLIT_RTOL = 5e-7


def lowp_bound(dtype: torch.dtype, reference_error: float) -> float:
    """Allowed max error of a fp16/bf16 kernel, given PyTorch's own max error at that dtype."""
    return LOWP_FACTOR * reference_error + LOWP_FLOOR[dtype]
