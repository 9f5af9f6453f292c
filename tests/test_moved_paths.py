"""Old import paths keep working after the restructure, warn, and name the new path."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

from fastinsight._moved import MOVED


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()), ids=sorted(MOVED))
def test_old_path_is_the_new_module(old: str, new: str) -> None:
    if old == "fastinsight.export.cli":
        pytest.importorskip("onnx")
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    # the very same module object: monkeypatching the old name patches the new one
    assert module is importlib.import_module(new)


def test_attribute_through_old_path() -> None:
    sys.modules.pop("fastinsight.model", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from fastinsight.model import InsightModel
    from fastinsight.models.insight import InsightModel as new

    assert InsightModel is new


def test_new_paths_do_not_warn() -> None:
    code = "import warnings; warnings.simplefilter('error', DeprecationWarning)\n" + "".join(
        f"import {new}\n" for new in sorted(set(MOVED.values()))
    )
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_file_format_keys_did_not_move(tmp_path) -> None:
    """Moving the modules must not move the keys written into files (checkpoints from before)."""
    from safetensors import safe_open

    from fastinsight.models.checkpoints import CONFIG_KEY, load_model
    from fastinsight.models.config import InsightConfig
    from fastinsight.models.insight import InsightModel

    assert CONFIG_KEY == "fastinsight.config"
    path = tmp_path / "m.safetensors"
    InsightModel(InsightConfig(in_dim=8), backend="reference").save(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert "fastinsight.config" in meta and InsightConfig.from_json(meta["fastinsight.config"])
    assert load_model(path, backend="reference", device="cpu").config.in_dim == 8
