"""The one version string of fastinsight (pyproject.toml reads it; ``fastinsight.__version__`` too)."""

from __future__ import annotations

__version__ = "0.1.0"
