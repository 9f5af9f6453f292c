"""bench/bench_volume.py --smoke runs on CPU and appends one CSV row per head."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_volume_benchmark_smoke(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_volume
    finally:
        sys.path.pop(0)
    out = tmp_path / "v.csv"
    assert bench_volume.main(["--smoke", "--csv", str(out), "--device", "cpu"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["slice_context"] for r in rows] == ["2d", "3d"]
    assert all(r["device"].startswith("cpu") and float(r["slices_per_s"]) > 0 for r in rows)
    assert rows[0]["grid"] == "4x4" and rows[0]["volume_shape"] == "64x64x8"
