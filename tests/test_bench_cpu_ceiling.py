"""The CPU benchmark records the machine's fp32 ceiling beside the two implementations."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cpu_bench_records_its_ceiling_and_upgrades_old_files(tmp_path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import test_bench_cpu
    finally:
        sys.path.pop(0)
    out = tmp_path / "cpu_head.csv"
    # A file written before the ceiling columns existed keeps its row, with them blank.
    old = "timestamp,git_rev,device,torch,N,C,K,repeats,official_tiles_per_s,ours_tiles_per_s"
    out.write_text(
        old + ",median_ratio,min_ratio,max_abs_err\nt,r,d,v,256,1024,1,5,80,79,0.98,0.9,2e-06\n"
    )
    assert test_bench_cpu.main(["--smoke", "--threads", "1", "--csv", str(out)]) == 0
    old_row, row = list(csv.DictReader(out.open()))
    assert old_row["official_tiles_per_s"] == "80" and old_row["sgemm_gflop_per_s"] == ""
    assert float(row["sgemm_gflop_per_s"]) > 0 and float(row["ceiling_tiles_per_s"]) > 0
    assert old_row["conv3x3_gflop_per_s"] == "" and float(row["conv3x3_gflop_per_s"]) > 0
    # The ceiling is the head's FLOPs at the faster of the two measured rates.
    rate = max(float(row["sgemm_gflop_per_s"]), float(row["conv3x3_gflop_per_s"]))
    flops = float(row["C"]) * 128 + 128 * 128 + 128 * 64 + 64 * 64 + 64
    flops = 2 * 196 * (flops + 9 * (128 * 128 + 128 * 64 + 64 * 64 + 64))
    assert abs(float(row["ceiling_tiles_per_s"]) - rate * 1e9 / flops) <= 0.02 * rate * 1e9 / flops
    # The ceiling bounds the ratio a direct-convolution fp32 implementation can reach.
    ceiling = float(row["ceiling_tiles_per_s"]) / float(row["official_tiles_per_s"])
    assert abs(float(row["max_ratio_at_ceiling"]) - ceiling) <= 0.01 * ceiling
    assert float(row["max_abs_err"]) <= 1e-5
