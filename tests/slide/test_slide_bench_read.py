"""Smoke test of bench/bench_read.py: it runs, writes its CSV rows, and both readers give the
same pixels on the same tiles."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from slide_testutil import CMU, slide_path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_read.py"


def test_bench_read_smoke(tmp_path: Path) -> None:
    slide_path(CMU)  # skips without the shared slides
    spec = importlib.util.spec_from_file_location("bench_read", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "read.csv"
    args = ["--smoke", "--csv", str(out), "--workdir", str(tmp_path), "--threads", "1"]
    assert bench.main([*args, "--large", "1536x1024"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {r["reader"] for r in rows} == {"openslide", "direct"}
    assert {r["mode"] for r in rows} == {"region", "tile"}
    assert {r["slide"] for r in rows} == {CMU, "fastinsight-bench-1536x1024.tif"}
    for r in rows:
        assert 0 < int(r["tiles"]) <= 24 and float(r["tiles_per_s"]) > 0
        assert r["git_rev"] and r["device"].startswith("cpu")
        if r["reader"] == "direct":
            assert int(r["max_abs_diff_vs_openslide"]) <= 1  # same pixels
