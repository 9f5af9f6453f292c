"""Shared inputs of the hardening tests: a tiny slide-context model and a TRIDENT feature file,
and ``run_cli`` to run the real command line in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel
from tests.support.h5_layouts import grid_coords, write_trident

# The command line's own entry point, whatever module layout holds it.
_ENTRY = "import sys; from fastinsight.cli import main; sys.exit(main())"


def run_cli(
    *args: str | os.PathLike[str], timeout: float = 300, **kw
) -> subprocess.CompletedProcess:
    """``fastinsight ARGS`` in a fresh interpreter; returns the finished process (text output)."""
    return subprocess.run(
        [sys.executable, "-c", _ENTRY, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def run_main(
    capsys: pytest.CaptureFixture[str], *args: str | os.PathLike[str]
) -> subprocess.CompletedProcess:
    """``fastinsight ARGS`` in this process (no interpreter start-up): the same ``main`` as the
    command, its exit code and its captured output, shaped like ``run_cli``'s result."""
    from fastinsight.cli import main

    argv = [str(a) for a in args]
    code = main(argv)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int) -> str:
    """The README's promise: exit ``code``, one line ``fastinsight: error: ...``, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("fastinsight: error:")]
    assert len(lines) == 1, err
    return lines[0]


def tiny_config(**changes) -> InsightConfig:
    """A slide-context model over 8-dim per-tile vectors (CLAM / TRIDENT style)."""
    base = dict(
        in_dim=8,
        num_classes=1,
        grid_size=(1, 1),
        reduce_dim=8,
        widths=(8, 4, 4),
        norm="channel",
        context="slide",
        encoder="uni",
        tile_size_px=256,
        patch_size_px=16,
    )
    base.update(changes)
    return InsightConfig(**base)


@pytest.fixture(scope="session")
def hardening_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hardening_inputs")


@pytest.fixture(scope="session")
def tiny_model(hardening_dir: Path) -> Path:
    torch.manual_seed(0)
    model = InsightModel(tiny_config(), backend="reference")
    path = hardening_dir / "tiny.safetensors"
    model.save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_features(hardening_dir: Path) -> Path:
    """24 tissue tiles of a 8 x 6 tile area on a TRIDENT grid (512 level-0 px per tile)."""
    rng = np.random.default_rng(0)
    rc = np.array([(r, c) for r in range(8) for c in range(6) if (r + c) % 2 == 0])
    feats = rng.normal(size=(len(rc), 8)).astype(np.float32)
    return write_trident(
        hardening_dir / "features_uni_v1" / "slide_a.h5",
        feats,
        grid_coords(rc, 512),
        level0_size=(6 * 512, 8 * 512),
    )
