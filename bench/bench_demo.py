"""Record one ``fastinsight demo`` run: held-out AUC, Dice and wall time, with the device.

    python bench/bench_demo.py            # appends a row to bench/results/demo.csv

The README quotes the demo's numbers from this file.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import REPO, STAMP_FIELDS, append_rows, run_stamp, versions  # noqa: E402

FIELDS = [
    *STAMP_FIELDS,
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
    from fastinsight.demo import run_demo
    from fastinsight.inputs import resolve_device

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default=None)
    p.add_argument("--csv", default=str(REPO / "bench" / "results" / "demo.csv"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = run_demo(
            Path(tmp) / "demo", device=args.device, progress=False, log=lambda _: None
        )
    row = {
        **run_stamp(resolve_device(args.device)),
        **versions("torch", "fastinsight"),
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
    out = append_rows(args.csv, FIELDS, [row])
    print(
        f"{row['device']}: AUC {row['auc']}, Dice {row['dice_mean']} +- {row['dice_sd']}, "
        f"{row['total_s']} s -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
