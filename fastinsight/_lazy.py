"""Lazy package faces (PEP 562): a public name is imported from its home module on first read.

``import fastinsight`` and ``import fastinsight.cohort`` must not load torch, yet both offer names
whose home modules do. A package builds its ``__getattr__`` and ``__dir__`` here from a table
``{name: "home.module"}``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_face(
    package: str, table: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose lazy names live in ``table``.

    A name read once is stored in the package's ``namespace`` (its ``globals()``), so later reads
    skip ``__getattr__``.
    """

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *table})

    return __getattr__, __dir__
