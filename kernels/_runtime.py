"""Where and how the kernels run: interpreter detection, device facts, launch checks.

Imported only by the kernel modules (which import Triton); ``fastinsight.kernels`` itself stays
free of Triton so ``import fastinsight`` works on machines without it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from fastinsight.errors import BackendError, InputError

# Triton decides at decoration time whether ``@triton.jit`` builds an interpreted function, so
# this is read once, when the kernel modules are imported (spec section 6).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Pointers the launchers hand to a kernel are 16-byte aligned (Triton specialises on that), so the
# set of compiled variants is exactly the one ``fastinsight kernels check`` compiles.
ALIGN_BYTES = 16


def interpreting() -> bool:
    """True when ``@triton.jit`` kernels run in Triton's CPU interpreter."""
    return INTERPRET


def check_device(*tensors: Tensor, what: str) -> torch.device:
    """The one device all tensors share; CUDA, or CPU under ``TRITON_INTERPRET=1``."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise InputError(
                f"{what}: all tensors must be on one device; found {device} and {t.device}"
            )
    if device.type == "cuda":
        if INTERPRET:
            raise BackendError(
                f"{what}: TRITON_INTERPRET=1 is set but the tensors are on {device}; "
                "unset TRITON_INTERPRET to run the kernels on the GPU"
            )
        return device
    if device.type == "cpu" and INTERPRET:
        return device
    raise BackendError(
        f"{what}: the Triton kernels run on CUDA tensors (or on CPU with TRITON_INTERPRET=1 set "
        f"before fastinsight.kernels is imported); got tensors on {device}. "
        "Use backend='reference' on this machine"
    )


def aligned(t: Tensor) -> Tensor:
    """``t`` itself when its data pointer is 16-byte aligned, else an aligned contiguous copy.

    Only odd views (a slice starting at an element offset that is not a multiple of 16 bytes)
    take the copy; it keeps every launch on one of the variants the compile check covers.
    """
    if t.data_ptr() % ALIGN_BYTES == 0:
        return t
    c = t.contiguous()
    return c if c.data_ptr() % ALIGN_BYTES == 0 else c.clone()


@functools.lru_cache(maxsize=16)
def capability(index: int) -> int:
    """Compute capability x 10 of a CUDA device (90 for Hopper)."""
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def device_arch(device: torch.device) -> int:
    """``capability`` of a tensor's device; 0 on the CPU (the interpreter)."""
    if device.type != "cuda":
        return 0
    return capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(device: torch.device, per_sm: int, interpreted: int = 4) -> int:
    """Programs of a persistent grid: ``per_sm`` per multiprocessor on CUDA, a few when interpreting."""
    if device.type != "cuda":
        return interpreted
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index) * per_sm


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class KernelSpec:
    """One kernel variant the package can launch, as ``fastinsight kernels check`` compiles it.

    ``signature`` maps the runtime arguments to Triton types, ``constexprs`` the compile-time
    ones; ``options`` are the launch options (warps, stages, fp fusion). Pointers are 16-byte
    aligned at every launch (see ``aligned``), so the check compiles them with that hint too.
    """

    kernel: str  # "module:function"
    variant: str
    config: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    options: dict[str, object]
    # The check fails a variant that should run its dots on tensor cores (bf16/fp16 head
    # configs) and compiles to none.
    needs_tensor_cores: bool = False
    # The architectures (compute capability x 10) the launcher uses this variant on; None: all.
    archs: tuple[int, ...] | None = None
