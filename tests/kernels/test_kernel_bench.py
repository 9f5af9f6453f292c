"""The prepared GPU check, dry-run on CPU: ``bash bench/device_check.sh --dry-run OUT``.

It runs the same steps as on the GPU machine at smoke size (kernels in Triton's interpreter, in
their own process: this test process never sets ``TRITON_INTERPRET``, so a GPU run of the suite is
not poisoned) and must leave the same CSV files, each with rows.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = "env install tests kernels kernel_config"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    if shutil.which("bash") is None:
        pytest.skip("bash is not available")
    out = tmp_path_factory.mktemp("device-check")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHON=sys.executable, DEVICE_CHECK_STEPS=STEPS, DEVICE_CHECK_BUDGET_S="400")
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "device_check.sh"), "--dry-run", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


def test_dry_run_writes_every_step_and_csv(dry_run: Path) -> None:
    steps = {r["step"]: r for r in _rows(dry_run / "steps.csv")}
    assert set(steps) == set(STEPS.split())
    for name, row in steps.items():
        assert row["status"] == "ok", (name, row)
        assert float(row["seconds"]) >= 0
    # NCHW: 3 providers x 3 stages; NHWC: the kernels' 3 stages + 16 per-launch rows (--layers).
    assert int(steps["kernels"]["csv_rows"]) == 9 + 3 + 16
    # The block-config sweep appends to the same file (one config at smoke size): 3 stages and
    # its 16 per-launch rows.
    assert int(steps["kernel_config"]["csv_rows"]) == 9 + 3 + 16 + 3 + 16
    tests = _rows(dry_run / "tests.csv")
    assert tests and tests[-1]["test"] == "summary"
    assert (dry_run / "device_check.log").read_text().count("== ") >= 2 * len(steps)
    # At most 8 files come back from the device machine: nothing else is left behind.
    assert len([p for p in dry_run.rglob("*") if p.is_file()]) <= 8


def test_dry_run_kernel_rows_are_parity_checked(dry_run: Path) -> None:
    everything = _rows(dry_run / "kernels.csv")
    sweep = [r for r in everything if r["config"] not in ("", "default")]
    everything = [r for r in everything if r not in sweep]
    rows = [r for r in everything if not r["stage"].startswith("layer: ")]
    assert {r["provider"] for r in rows} == {"eager_bf16", "compile_bf16", "kernels_bf16"}
    assert {r["stage"] for r in rows} == {"head", "threshold_pool", "total"}
    assert {r["layout"] for r in rows} == {"nchw", "nhwc"}
    # The NHWC run times every launch of the kernels' head on its own (--layers): reduce,
    # 4 + 4 chain convolutions and 7 tile-statistics launches with the tile norm.
    layers = [r for r in everything if r["stage"].startswith("layer: ")]
    assert len(layers) == 16 and all(float(r["median_ms"]) > 0 for r in layers)
    # Each launch also reports the L2 traffic its blocks imply (kernels.head.traffic_bytes).
    assert all(float(r["traffic_gb_per_s"]) > 0 for r in layers)
    assert any("context0 3x3" in r["stage"] for r in layers)
    assert all(r["layout"] == "nhwc" for r in layers)
    for r in rows:
        assert r["device"].startswith("cpu") and r["git_rev"] and r["torch"] and r["triton"]
        assert r["parity"] == "ok" and float(r["max_err_vs_fp32"]) < 0.1
        assert float(r["median_ms"]) > 0 and float(r["copy_gb_per_s"]) > 0
    kernel_total = [r for r in rows if r["provider"] == "kernels_bf16" and r["stage"] == "total"]
    assert float(kernel_total[0]["x_slower_than_kernels"]) == 1.0
    assert "dynamic=False" in next(r for r in rows if r["provider"] == "compile_bf16")["note"]
    # The sweep's rows name their block config, per-launch rows included (-W8 parsed and run).
    assert {r["config"] for r in sweep} == {"M64-X64-R64-K64-w4-s1-W8-T1"}
    sweep_layers = [r for r in sweep if r["stage"].startswith("layer: ")]
    assert len(sweep_layers) == 16 and all(r["parity"] == "" for r in sweep_layers)
    assert all(r["parity"] == "ok" for r in sweep if r not in sweep_layers)


def test_dry_run_usage_errors() -> None:
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "device_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_kernel_config_parses() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_kernels
    finally:
        sys.path.pop(0)
    cfg = bench_kernels.parse_kernel_config("M64-X32-R128-K32-w4-s2")
    assert (cfg.BLOCK_M, cfg.BLOCK_MW, cfg.BLOCK_MR, cfg.BLOCK_K) == (64, 32, 128, 32)
    assert (cfg.num_warps, cfg.num_stages) == (4, 2)
    # describe() and the parser speak the same language.
    assert bench_kernels.parse_kernel_config(cfg.describe()) == cfg
    chunked = bench_kernels.parse_kernel_config("M64-X64-R64-K64-w4-s3-c1024-o1")
    assert chunked.chunk_tiles == 1024 and chunked.overlap is True
    assert chunked.describe() == "M64-X64-R64-K64-w4-s3-c1024-o1"
    assert bench_kernels.parse_kernel_config(chunked.describe()) == chunked
    with pytest.raises(SystemExit):
        bench_kernels.parse_kernel_config("M64-Q3")
    wide = bench_kernels.parse_kernel_config("M64-X128-R128-K64-w4-s3-W8")
    assert wide.num_warps_wide == 8 and wide.describe() == "M64-X128-R128-K64-w4-s3-W8"
    half = bench_kernels.parse_kernel_config("M64-X64-R64-K64-w4-s3-T1")
    assert half.half_tables and bench_kernels.parse_kernel_config(half.describe()) == half
    for bad in ("M48", "M0", "M8", "w3", "W3", "w64", "K512", "s9", "c0", "o2", "T2", "M64-"):
        with pytest.raises(SystemExit, match="kernel-config"):
            bench_kernels.parse_kernel_config(bad)


def test_fastest_config_per_launch_compares_time_per_cell(capsys) -> None:
    """The sweep's summary: per launch, the config with the least time per cell (chunk sizes
    differ between configs), and its speed-up over the first config."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_kernels
    finally:
        sys.path.pop(0)
    rows = [
        {"stage": "layer: context0 3x3 128->128", "config": "A", "median_ms": 2.0, "cells": 1000},
        {"stage": "layer: context0 3x3 128->128", "config": "B", "median_ms": 1.5, "cells": 500},
        {"stage": "layer: reduce nhwc vec 8", "config": "A", "median_ms": 1.0, "cells": 1000},
        {"stage": "layer: reduce nhwc vec 8", "config": "B", "median_ms": 0.4, "cells": 500},
    ]
    bench_kernels.print_fastest_per_layer(rows)
    out = capsys.readouterr().out.splitlines()
    # context0: B takes 3.0 ms per 1000 cells against A's 2.0, so A stays; the reduce: B 0.8.
    assert "context0 3x3 128->128" in out[1] and "  A  (1.00x the first)" in out[1]
    assert "reduce nhwc vec 8" in out[2] and "  B  (1.25x the first)" in out[2]
