"""``bench/bench_kernels.py --smoke`` runs on CPU (CI) and writes its CSV row set."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_kernel_benchmark_smoke(tmp_path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_kernels
    finally:
        sys.path.pop(0)
    out = tmp_path / "kernels.csv"
    assert bench_kernels.main(["--smoke", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    providers = {"official_fp32", "eager_bf16", "compile_bf16", "kernels_bf16"}
    assert {r["provider"] for r in rows} == providers
    assert {r["stage"] for r in rows} == {"head", "threshold_pool", "total"}
    assert len(rows) == 4 * 3
    for r in rows:
        assert r["device"].startswith("cpu") and r["git_rev"] and r["torch"] and r["triton"]
        assert float(r["median_ms"]) > 0 and float(r["copy_gb_per_s"]) > 0
    kernel_total = [r for r in rows if r["provider"] == "kernels_bf16" and r["stage"] == "total"]
    assert float(kernel_total[0]["x_slower_than_kernels"]) == 1.0
