"""The suite's one tolerance table. It lives in tests/kernels/tolerances.py (owned with the
kernels); every other test imports it from here so there is one place to look."""

from __future__ import annotations

import tests.kernels.tolerances as _table
from tests.kernels.tolerances import *  # noqa: F403

__all__ = [
    name
    for name, value in vars(_table).items()
    if not name.startswith("_") and (name.isupper() or callable(value)) and name != "torch"
]
