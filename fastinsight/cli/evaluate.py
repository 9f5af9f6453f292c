"""``fastinsight evaluate``: its flags and how they map onto ``fastinsight.evaluate``."""

from __future__ import annotations

import argparse
import sys

from fastinsight.atomic import check_writable
from fastinsight.errors import InputError
from fastinsight.evaluate import RESAMPLE, evaluate_from_folder
from fastinsight.text import terminal_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fastinsight evaluate``."""
    parser.add_argument("predictions", help="folder of prediction .npz files (one per slide)")
    parser.add_argument("labels", help="labels CSV: slide_id,<class>,... with 0/1 values")
    parser.add_argument(
        "--ground-truth",
        "--masks",
        dest="ground_truth",
        default=None,
        help="folder of <slide_id>.tif mask TIFFs or <slide_id>.geojson QuPath annotations",
    )
    parser.add_argument("--out", default="evaluation", help="output prefix (writes .json and .csv)")
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="a cell is predicted positive when its thresholded heatmap value exceeds this "
        "(default 0.5, as the official evaluation; 0 = the cells the model's Otsu kept)",
    )
    parser.add_argument("--resample", choices=RESAMPLE, default="nearest")
    parser.add_argument("--dice-on", choices=("positive", "all"), default="positive")
    parser.add_argument("--gt-class", default=None, help="class the mask TIFFs show")
    parser.add_argument(
        "--mask-downsample",
        type=float,
        default=None,
        help="level-0 px per pixel of the masks' finest level",
    )
    parser.add_argument(
        "--mask-values",
        type=int,
        nargs="+",
        default=None,
        help="mask pixel values that mean lesion (default: nonzero)",
    )
    parser.add_argument(
        "--geojson-class",
        dest="geojson_classes",
        nargs="+",
        default=None,
        help="keep only annotations of these QuPath classes",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``fastinsight evaluate`` from parsed arguments; writes <out>.json and <out>.csv."""
    if not 0.0 <= args.threshold < 1.0:
        raise InputError(
            f"--threshold {args.threshold} can never be exceeded or always is: heatmap values lie "
            "in [0, 1]; use a value in [0, 1) (0 = the cells the model's Otsu threshold kept)"
        )
    if args.mask_downsample is not None and not args.mask_downsample > 0:
        raise InputError(
            f"--mask-downsample must be > 0 level-0 px per mask px, got {args.mask_downsample}"
        )
    out = str(args.out)
    for suffix in (".json", ".csv"):
        if out.endswith(suffix):
            out = out[: -len(suffix)]
    check_writable(out + ".json")
    check_writable(out + ".csv")
    result = evaluate_from_folder(
        args.predictions,
        args.labels,
        ground_truth_dir=args.ground_truth,
        threshold=args.threshold,
        resample=args.resample,
        dice_on=args.dice_on,
        gt_class=args.gt_class,
        mask_downsample=args.mask_downsample,
        mask_values=args.mask_values,
        geojson_classes=args.geojson_classes,
    )
    result.write_json(out + ".json")
    result.write_csv(out + ".csv")
    print(result.summary())
    for note in result.notes:  # beside the error lines, not in the output a script reads
        print(f"fastinsight: note: {terminal_text(note)}", file=sys.stderr)
    print(f"wrote {out}.json and {out}.csv")
    return 0
