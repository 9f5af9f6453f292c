"""The wheel ships kernels/ and export/ inside the fastinsight namespace, nothing top-level."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_only_the_fastinsight_namespace(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("fastinsight-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"fastinsight", next(t for t in tops if t.endswith(".dist-info"))}
    assert "fastinsight/kernels/__init__.py" in names
    assert "fastinsight/export/__init__.py" in names
    assert "fastinsight/py.typed" in names  # PEP 561: embedders' type checkers read the hints
    # subpackages are discovered, not listed: every package folder under fastinsight/ ships
    local = {
        str(p.relative_to(REPO))
        for p in (REPO / "fastinsight").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert local and local <= set(names), sorted(local - set(names))
    assert not any(n.startswith(("kernels/", "export/", "tests/", "bench/")) for n in names)
    entry = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("entry_points.txt")))
        .decode()
    )
    assert "fastinsight = fastinsight.cli:main" in entry


def test_import_without_triton_side_effects() -> None:
    code = "import sys, fastinsight, fastinsight.kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
