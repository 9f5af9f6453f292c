"""The slide benchmark runs on CPU (CI) and writes a CSV row with the device and stage times."""

from __future__ import annotations

import csv
import platform
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_slide_benchmark_smoke(slides_dir, tmp_path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_slide
    finally:
        sys.path.pop(0)
    out = tmp_path / "slide.csv"
    assert (
        bench_slide.main(
            [
                "--smoke",
                "--slide",
                str(slides_dir / "CMU-1-Small-Region.svs"),
                "--csv",
                str(out),
                "--num-workers",
                "1",
            ]
        )
        == 0
    )
    (row,) = list(csv.DictReader(out.open()))
    assert row["device"].startswith("cpu") and int(row["tiles"]) > 0
    stages = [
        "open_s",
        "tissue_s",
        "read_wait_s",
        "transfer_s",
        "encoder_s",
        "head_s",
        "threshold_pool_s",
        "write_s",
    ]
    assert sum(float(row[s]) for s in stages) <= float(row["wall_s"]) * 1.05
    assert 0 <= float(row["outside_encoder_frac"]) <= 1


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_malloc_benchmark_smoke(tmp_path) -> None:
    """Both malloc modes run in their own processes, and the rows say which ran as asked."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_malloc
    finally:
        sys.path.pop(0)
    out = tmp_path / "malloc.csv"
    assert bench_malloc.main(["--smoke", "--workloads", "head", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["workload"], r["malloc"]) for r in rows] == [("head", "system"), ("head", "keep")]
    assert all(float(r["median_ms"]) > 0 and r["device"].startswith("cpu") for r in rows)
    assert rows[0]["speedup_vs_system"] == "" and float(rows[1]["speedup_vs_system"]) > 0
