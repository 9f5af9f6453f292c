"""``fastinsight demo``: its flags and how they map onto ``fastinsight.demo.run_demo``."""

from __future__ import annotations

import argparse
from typing import Any

from fastinsight.errors import ConfigError

# The count flags left alone take each modality's own defaults (the demo functions' keyword
# defaults); set, they are passed as given, whatever their value. --size applies to the slides.
_MODALITY_FLAGS: dict[str, dict[str, str]] = {
    # flag dest -> keyword of the modality's demo function
    "wsi": {"slides": "slides", "held_out": "held_out", "size": "size", "epochs": "epochs"},
    "ct": {"slides": "volumes", "held_out": "held_out", "epochs": "epochs"},
    "radiograph": {"slides": "n_train", "held_out": "n_test", "epochs": "epochs"},
}
_FLAG_NAMES = {
    "slides": "--slides",
    "held_out": "--held-out",
    "size": "--size",
    "epochs": "--epochs",
}


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
    p.add_argument(
        "--slides",
        type=int,
        default=None,
        help="cohort size: slides (half with lesions; default 32), CT volumes (default 24) or "
        "training radiographs (default 160)",
    )
    p.add_argument(
        "--held-out",
        type=int,
        default=None,
        help="slides or volumes kept out of training (default 8), or radiographs evaluated "
        "(default 40)",
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="slide side in px at 0.5 um/px (default 1120; --modality wsi only)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs (default 12 for wsi, 15 for ct, 16 for radiograph)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the cohort, encoder and training")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress bars or per-epoch lines; the steps and the results are still printed",
    )


def demo_counts(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of the modality's demo function for the flags that were set.

    A flag that does not apply to the modality is a ConfigError naming it (silently ignoring
    ``--size 2000`` for CT would run another demo than the one asked for)."""
    mapping = _MODALITY_FLAGS[args.modality]
    given = {dest: getattr(args, dest) for dest in _FLAG_NAMES if getattr(args, dest) is not None}
    stray = [_FLAG_NAMES[dest] for dest in given if dest not in mapping]
    if stray:
        raise ConfigError(
            f"{', '.join(stray)}: not used by --modality {args.modality} (its pictures have a "
            "fixed size: 48 x 48 x 12 CT voxels, 256 x 256 px radiographs); drop it, or use "
            "--modality wsi"
        )
    return {mapping[dest]: value for dest, value in given.items()}


def run(args: argparse.Namespace) -> int:
    counts = demo_counts(args)
    if args.modality == "ct":
        from fastinsight.volume.demo import run_ct_demo

        # --slides / --held-out count volumes here (48 x 48 x 12 voxels each).
        run_ct_demo(args.out_dir, seed=args.seed, device=args.device, **counts)
        return 0
    if args.modality == "radiograph":
        from fastinsight.radiograph.demo import run_radiograph_demo

        # --slides counts training pictures and --held-out the evaluated ones (256 x 256 px).
        run_radiograph_demo(
            args.out_dir,
            seed=args.seed,
            device=args.device,
            progress=not args.quiet,
            **counts,
        )
        return 0
    from fastinsight.demo import run_demo

    run_demo(args.out_dir, seed=args.seed, device=args.device, progress=not args.quiet, **counts)
    return 0
