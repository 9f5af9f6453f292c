"""The package face is lazy: the error family and ``fastinsight --help`` load no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fastinsight
from fastinsight._version import __version__


def _modules_after(code: str) -> set[str]:
    """Run ``code`` in a fresh interpreter and return the names in its sys.modules."""
    probe = code + "\nimport sys; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "code",
    [
        "import fastinsight.errors",
        "import fastinsight",
        "from fastinsight.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    ],
    ids=["errors", "package", "cli-help"],
)
def test_no_torch_on_the_face(code: str) -> None:
    mods = _modules_after(code)
    assert "fastinsight" in mods
    heavy = {m for m in mods if m.split(".")[0] in {"torch", "numpy", "triton", "ray", "onnx"}}
    assert not heavy, f"{code!r} imported {sorted(heavy)[:5]}"


def test_one_version() -> None:
    assert fastinsight.__version__ == __version__
    from importlib.metadata import version

    assert version("fastinsight") == __version__


def test_lazy_names_resolve() -> None:
    for name in fastinsight.__all__:
        assert getattr(fastinsight, name) is not None
    with pytest.raises(AttributeError):
        fastinsight.no_such_name  # noqa: B018
