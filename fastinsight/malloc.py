"""glibc's malloc told to keep freed memory, so batch after batch reuses the same pages.

Every batch of tiles (or slices) allocates the same large activations and frees them again.
glibc serves blocks above its mmap threshold (128 KiB at start, raised with each such block
freed, at most 32 MiB) by ``mmap`` and unmaps them on ``free``, and returns the heap's free top
to the kernel beyond twice that threshold. The next batch then faults every page back in, and
the kernel zeroes each one first: a UNI ViT-L forward of 16 tiles took ~930,000 page faults
(3.3 s of system time) per call on 2 EPYC cores. With blocks up to 1 GiB served from the heap
and its free top kept, the same forward takes none (``bench/README.md``).

The CLI calls :func:`keep_freed_memory` once per process (it owns the process); a pipeline
that embeds fastinsight can call it too. The price is resident memory: what a run freed stays
mapped until the process ends (its peak, which the next batch needs again anyway).

``FASTINSIGHT_MALLOC=system`` keeps glibc's defaults; a ``MALLOC_*_`` variable or a
``glibc.malloc`` tunable in ``GLIBC_TUNABLES`` (the user's own tuning) is left alone, as is any
platform whose C library is not glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

from fastinsight.errors import ConfigError

ENV = "FASTINSIGHT_MALLOC"
CHOICES = ("keep", "system")
# mallopt's parameters (malloc.h); the values are ints.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, not mmap (activations of a batch are tens to
# hundreds of MB). glibc still maps larger ones.
MMAP_THRESHOLD = 1 << 30
# Free memory at the heap's top kept, rather than returned, up to this (int's largest).
TRIM_THRESHOLD = 2**31 - 1
# The user's own tuning of the same knobs: respected as given.
_GLIBC_VARIABLES = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)

_applied = False


def malloc_choice(environ: dict[str, str] | None = None) -> str:
    """``keep`` (the default) or ``system``, from ``FASTINSIGHT_MALLOC``.

    Raises ConfigError for any other value.
    """
    env = os.environ if environ is None else environ
    value = env.get(ENV, "").strip().lower() or "keep"
    if value not in CHOICES:
        raise ConfigError(
            f"{ENV} must be 'keep' (glibc keeps freed memory for the next batch, the default) "
            f"or 'system' (glibc's defaults); got {env.get(ENV)!r}"
        )
    return value


def user_tuned(environ: dict[str, str] | None = None) -> bool:
    """True when the environment already tunes glibc's malloc thresholds."""
    env = os.environ if environ is None else environ
    if any(name in env for name in _GLIBC_VARIABLES):
        return True
    return "glibc.malloc." in env.get("GLIBC_TUNABLES", "")


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve blocks up to 1 GiB from its heap and keep the heap's free
    top, for this whole process. Idempotent; returns whether glibc's settings are now this
    module's (False with ``FASTINSIGHT_MALLOC=system``, the user's own ``MALLOC_*`` tuning,
    another C library, or a ``mallopt`` that refused).

    Raises ConfigError for a ``FASTINSIGHT_MALLOC`` other than ``keep`` or ``system``.
    """
    global _applied
    if malloc_choice() == "system" or user_tuned():
        return False
    if _applied:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc always has mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: setting either one stops glibc's own adjustment of both.
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return False
    if mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:  # pragma: no cover - glibc accepts any
        return False
    _applied = True
    return True
