"""``fastinsight demo``: its flags and how they map onto ``fastinsight.demo.run_demo``."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="folder for the cohort, the model and every output")
    p.add_argument(
        "--modality",
        choices=("wsi", "ct", "radiograph"),
        default="wsi",
        help="wsi: synthetic slides (default); ct: synthetic chest CT volumes (fastinsight.volume); "
        "radiograph: synthetic chest radiographs with planted nodules, PYLON trained on image "
        "labels only (fastinsight.radiograph)",
    )
    p.add_argument("--slides", type=int, default=32, help="cohort size (half with lesions)")
    p.add_argument("--held-out", type=int, default=8, help="slides kept out of training")
    p.add_argument("--size", type=int, default=1120, help="slide side in px at 0.5 um/px")
    p.add_argument("--epochs", type=int, default=12, help="training epochs")
    p.add_argument("--seed", type=int, default=0, help="seed of the cohort, encoder and training")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    if args.modality == "ct":
        from fastinsight.volume.demo import run_ct_demo

        # --slides / --held-out count volumes here; --size does not apply (48 x 48 x 12 voxels).
        run_ct_demo(
            args.out_dir,
            volumes=args.slides if args.slides != 32 else 24,
            held_out=args.held_out,
            epochs=args.epochs if args.epochs != 12 else 15,
            seed=args.seed,
            device=args.device,
        )
        return 0
    if args.modality == "radiograph":
        from fastinsight.radiograph.demo import run_radiograph_demo

        # --slides counts training pictures and --held-out the evaluated ones (256 x 256 px);
        # --size does not apply. The defaults are the demo's own when the flags are left alone.
        run_radiograph_demo(
            args.out_dir,
            n_train=args.slides if args.slides != 32 else None,
            n_test=args.held_out if args.held_out != 8 else None,
            epochs=args.epochs if args.epochs != 12 else None,
            seed=args.seed,
            device=args.device,
            log=None if args.quiet else print,
        )
        return 0
    from fastinsight.demo import run_demo

    run_demo(
        args.out_dir,
        slides=args.slides,
        held_out=args.held_out,
        size=args.size,
        epochs=args.epochs,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
    )
    return 0
