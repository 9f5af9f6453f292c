"""Record one ``fastinsight demo`` run: held-out AUC, Dice and wall time, with the device.

    python bench/bench_demo.py            # appends a row to bench/results/demo.csv

The README quotes the demo's numbers from this file.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_slide import device_name, git_rev  # noqa: E402

FIELDS = [
    "timestamp",
    "git_rev",
    "device",
    "torch",
    "fastinsight",
    "slides",
    "held_out",
    "epochs",
    "auc",
    "dice_mean",
    "dice_sd",
    "encode_train_s",
    "train_s",
    "total_s",
]


def main(argv: list[str] | None = None) -> int:
    from fastinsight import __version__
    from fastinsight.demo import run_demo
    from fastinsight.pipeline import resolve_device

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default=None)
    p.add_argument("--csv", default=str(REPO / "bench" / "results" / "demo.csv"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = run_demo(
            Path(tmp) / "demo", device=args.device, progress=False, log=lambda _: None
        )
    row = {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_rev": git_rev(),
        "device": device_name(resolve_device(args.device)),
        "torch": torch.__version__,
        "fastinsight": __version__,
        "slides": report["train"]["slides"] + len(report["slides"]),
        "held_out": len(report["slides"]),
        "epochs": report["train"]["epochs_run"],
        "auc": round(report["auc"], 4),
        "dice_mean": round(report["dice_mean"], 4),
        "dice_sd": round(report["dice_sd"], 4),
        "encode_train_s": report["seconds"]["encode_train"],
        "train_s": report["seconds"]["train"],
        "total_s": report["seconds"]["total"],
    }
    out = Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with open(out, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)
    print(
        f"{row['device']}: AUC {row['auc']}, Dice {row['dice_mean']} +- {row['dice_sd']}, "
        f"{row['total_s']} s -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
