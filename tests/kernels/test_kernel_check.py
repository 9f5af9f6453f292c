"""``fastinsight kernels check`` compiles the kernels for sm_80 and sm_90 on a CPU-only machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def run_check(*args: str) -> subprocess.CompletedProcess:
    # The interpreter cannot compile: the check runs in a process without TRITON_INTERPRET.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastinsight.kernels.check", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)


def test_check_compiles_without_spills_quick() -> None:
    """One head variant and every threshold/pooling kernel, for both architectures."""
    proc = run_check("--arch", "sm_80,sm_90", "--only", "bf16, tile norm, nchw", "--only", "reduce")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    head = [line for line in lines if line.startswith("_insight_head_fwd_kernel")]
    assert (
        len(head) == 2 and any(" sm_80 " in h for h in head) and any(" sm_90 " in h for h in head)
    )
    assert any(line.startswith("_otsu_histogram_kernel") for line in lines)
    assert "all compile without spills" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FASTINSIGHT_FULL_KERNEL_CHECK") != "1",
    reason="compiles all ~90 variants (minutes on 2 cores): set FASTINSIGHT_FULL_KERNEL_CHECK=1, "
    "or run `fastinsight kernels check --arch sm_80,sm_90` as its own CI step",
)
def test_check_every_variant() -> None:
    proc = run_check("--arch", "sm_80,sm_90")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_rejects_bad_arch_and_interpreter() -> None:
    from fastinsight.kernels.check import main

    assert main(["--arch", "volta"]) == 2
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "from fastinsight.kernels.check import main; raise SystemExit(main(['--arch', 'sm_90']))"
    assert (
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 2
    )


def test_check_table_flags_spills() -> None:
    from fastinsight.kernels.check import CheckResult, format_table

    clean = CheckResult("k", "v", "c", 90, registers=128, spill_bytes=0, shared_bytes=1024)
    spilled = CheckResult("k", "v", "c", 80, registers=255, spill_bytes=8, shared_bytes=1024)
    broken = CheckResult("k", "v", "c", 80, error="CompilationError: boom")
    assert clean.ok and not spilled.ok and not broken.ok
    table = format_table([clean, spilled, broken])
    assert "FAIL (spill)" in table and "FAIL (compile)" in table
