"""``fastinsight predict-cohort``: its flags and how they map onto ``fastinsight.cohort``."""

from __future__ import annotations

import argparse
import sys

from fastinsight.cli.predict import add_run_arguments, predict_options
from fastinsight.cohort import EXIT_SLIDES_FAILED, CohortOptions, predict_cohort


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fastinsight.predict.loading import MODEL_ENV

    p.epilog = (
        f"exit codes: 0 every slide ok or skipped; {EXIT_SLIDES_FAILED} some slides failed "
        "(see DIR/summary.csv); 2-7 the cohort could not run (model, manifest, Ray)"
    )
    p.add_argument(
        "slides",
        metavar="SLIDES",
        help="a folder of slides, a quoted glob ('data/**/*.svs'), or a manifest CSV with columns "
        "path and optional slide_id, mpp",
    )
    p.add_argument(
        "--model", "-m", help=f"INSIGHT checkpoint (.safetensors or .pth); default ${MODEL_ENV}"
    )
    p.add_argument(
        "--out-dir", "-o", required=True, help="outputs go to DIR/<slide id>/ and DIR/summary.csv"
    )
    p.add_argument(
        "--ray-address",
        help="Ray cluster to use (e.g. head-node:6379, or 'auto'); default $RAY_ADDRESS, else a "
        "new local Ray instance on this machine",
    )
    p.add_argument(
        "--num-cpus", type=int, help="CPUs of the local Ray instance (default: all cores)"
    )
    p.add_argument(
        "--cpus-per-slide", type=float, default=1.0, help="CPU slots per slide task (default 1)"
    )
    p.add_argument(
        "--gpus-per-slide",
        type=float,
        help="GPUs per slide task (default: 1 when the cluster has GPUs, else 0 = CPU; 0.5 runs two slides per GPU)",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=2,
        help="retries of a slide whose worker died (default 2)",
    )
    p.add_argument(
        "--ray-temp-dir", help="Ray's session and log folder for a local instance (kept)"
    )
    add_run_arguments(p)


def options_from_args(args: argparse.Namespace) -> CohortOptions:
    predict = predict_options(args, progress=False)
    return CohortOptions(
        predict=predict,
        class_=args.class_,
        encoding=args.encoding,
        all_classes=args.all_classes,
        backend=args.backend,
        ray_address=args.ray_address,
        num_cpus=args.num_cpus,
        cpus_per_slide=args.cpus_per_slide,
        gpus_per_slide=args.gpus_per_slide,
        max_retries=args.max_retries,
        progress=not args.quiet,
        ray_temp_dir=args.ray_temp_dir,
    )


def run(args: argparse.Namespace) -> int:
    from fastinsight.predict.loading import resolve_model_path

    options = options_from_args(args)
    report = predict_cohort(args.slides, resolve_model_path(args.model), args.out_dir, options)
    failed = [o for o in report.outcomes if o.status == "failed"]
    for o in failed[:20]:
        print(f"fastinsight: {o.slide_id} failed: {o.error}", file=sys.stderr)
    if len(failed) > 20:
        print(f"fastinsight: ... and {len(failed) - 20} more failed slides", file=sys.stderr)
    rate = "" if report.tiles_per_s != report.tiles_per_s else f", {report.tiles_per_s:.1f} tiles/s"
    print(
        f"cohort: {report.count('ok')} ok, {len(failed)} failed, {report.count('skipped')} skipped "
        f"of {len(report.outcomes)} slides{rate}; summary in {report.summary_path}"
    )
    return report.exit_code
