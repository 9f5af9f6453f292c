"""``fastinsight encoders list`` and ``fastinsight encoders check NAME --weights PATH``.

Only argument parsing and printing (argparse lives under fastinsight/cli/); the work is in
:mod:`fastinsight.encoders.check`.
"""

from __future__ import annotations

import argparse
import json


def add_list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def run_list(args: argparse.Namespace) -> int:
    from fastinsight.encoders.check import encoder_table

    rows = encoder_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'name':<20} {'tile':>5} {'patch':>5} {'grid':>8} {'dim':>5} {'prefix':>6}  architecture"
    )
    for r in rows:
        if "grid" not in r:
            print(f"{r['name']:<20} {'':>5} {'':>5} {'':>8} {'':>5} {'':>6}  {r['arch']}")
            continue
        grid = f"{r['grid'][0]}x{r['grid'][1]}"
        print(
            f"{r['name']:<20} {r['tile_size_px']:>5} {r['patch_size_px']:>5} {grid:>8} "
            f"{r['embed_dim']:>5} {r['num_prefix_tokens']:>6}  {r['arch']}"
        )
    return 0


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="encoder name (see `fastinsight encoders list`)")
    parser.add_argument(
        "--weights",
        "--encoder-weights",
        dest="weights",
        default=None,
        help="weight file or hub snapshot folder (config.json + model.safetensors)",
    )
    parser.add_argument("--tile-size", type=int, default=None, help="tile size in px")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_check(args: argparse.Namespace) -> int:
    from fastinsight.encoders.check import check_encoder

    report = check_encoder(args.name, args.weights, tile_size_px=args.tile_size, device=args.device)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    h, w = report["grid"]
    print(f"encoder   {report['name']}: {report['arch']}")
    print(f"weights   {report['weights_file']}")
    print(f"sha256    {report['sha256']}")
    print(
        f"tile      {report['tile_size_px']} px, patch {report['patch_size_px']} px, "
        f"grid {h} x {w}, {report['embed_dim']} channels, "
        f"{report['num_prefix_tokens']} prefix tokens dropped"
    )
    print(f"tokens    {report['tokens_shape']} {report['tokens_dtype']} on {report['device']}")
    for note in report["load_notes"]:
        print(f"note      {note}")
    return 0
