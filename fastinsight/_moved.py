"""Old import paths that moved in the restructure (issue #10), kept working with a warning.

``import fastinsight.model`` still works: it returns the very module object of
``fastinsight.models.insight`` (so monkeypatching either name patches both) and emits a
``DeprecationWarning`` naming the new path. The old files are gone, so git follows each
move as a rename when branches that still edit the old files are merged.

Imports only the standard library; installed by ``fastinsight/__init__.py``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

# old module -> new module
MOVED: dict[str, str] = {
    "fastinsight.reference": "fastinsight.ops.reference",
    "fastinsight.otsu": "fastinsight.ops.otsu",
    "fastinsight.pooling": "fastinsight.ops.pooling",
    "fastinsight.model": "fastinsight.models.insight",
    "fastinsight.checkpoint": "fastinsight.models.checkpoints",
    "fastinsight.config": "fastinsight.models.config",
    "fastinsight.pipeline": "fastinsight.predict.slide",
    "fastinsight.features_pipeline": "fastinsight.predict.features",
    "fastinsight.predict_cli": "fastinsight.cli.predict",
    "fastinsight.export.cli": "fastinsight.cli.export",
    "fastinsight.export.graph_ops": "fastinsight.ops.graph_ops",
}


class _AliasLoader(importlib.abc.Loader):
    """Hands out the new module under the old name, warning once per import."""

    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        warnings.warn(
            f"{self.old} moved to {self.new}; import {self.new} instead",
            DeprecationWarning,
            stacklevel=2,
        )


class _MovedFinder(importlib.abc.MetaPathFinder):
    """A meta-path finder that knows only the names in ``MOVED``."""

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(fullname, new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (idempotent)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
