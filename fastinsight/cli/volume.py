"""The CT commands' flags (``predict-volume``, ``train-volume``, ``demo --modality ct``) and how
they map onto ``fastinsight.volume``. ``fastinsight predict`` hands CT inputs / volume models to
:func:`run_predict` as well (see ``fastinsight.cli.predict``).
"""

from __future__ import annotations

import argparse
import os
import sys

from fastinsight.cli.encoders import (
    add_encoder_mismatch_argument,
    add_torchscript_arguments,
    check_run_encoder,
    torchscript_options,
)
from fastinsight.text import terminal_text
from fastinsight.volume.run import predict_file


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="CT volume: .nii / .nii.gz file, or a DICOM series folder")
    p.add_argument("--model", required=True, help="volume model (.safetensors) or official .pth")
    p.add_argument("--out", required=True, help="heatmap NIfTI to write (.nii or .nii.gz)")
    p.add_argument("--series", default=None, help="SeriesInstanceUID when the folder holds several")
    p.add_argument(
        "--encoder",
        default=None,
        help="encoder name (default: the model's); another one than the model file records is "
        "refused",
    )
    p.add_argument("--encoder-weights", default=None, help="local weight file of the encoder")
    add_encoder_mismatch_argument(p)
    add_torchscript_arguments(p)
    p.add_argument(
        "--lung-mask",
        default=None,
        help="'auto' (built-in HU-threshold mask), 'none', or a mask NIfTI on the scan's grid "
        "(default: the model's setting)",
    )
    p.add_argument(
        "--slices",
        choices=("all", "middle32"),
        default=None,
        help="slice selection (default: the model's)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="slices per encoder batch")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--overlay", default=None, help="PNG montage of the most salient slices")
    p.add_argument(
        "--report", default=None, help="JSON report (score, threshold, geometry, timings)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or notes")


def add_ct_arguments(p: argparse.ArgumentParser) -> None:
    """The CT-only flags ``fastinsight predict`` takes besides its slide flags."""
    ct = p.add_argument_group("CT volumes (input: a NIfTI file or a DICOM series folder)")
    ct.add_argument(
        "--series", default=None, help="SeriesInstanceUID when the folder holds several"
    )
    ct.add_argument(
        "--lung-mask",
        default=None,
        help="'auto' (built-in HU-threshold mask), 'none', or a mask NIfTI on the scan's grid",
    )
    ct.add_argument("--slices", choices=("all", "middle32"), default=None, help="slice selection")


# Checkpoint families (fastinsight.models.checkpoints.LOADERS) that read radiographs.
RADIOGRAPH_FAMILIES = frozenset({"pylon", "multires"})
# ``fastinsight predict`` options the CT pipeline uses; any other one set is refused, not ignored.
_CT_DESTS = frozenset(
    {"slide", "out", "model", "encoder", "encoder_weights", "allow_encoder_mismatch", "device",
     "batch_size", "overlay", "report", "series", "lung_mask", "slices", "quiet",
     "patch_size", "mean", "std"}
)  # fmt: skip


def wants_ct(input_path: str | None, model_path: str | None) -> bool:
    """True when ``fastinsight predict`` should run the CT pipeline: a volume model (its
    metadata carries the CT recipe), a NIfTI input, or a DICOM input unless the model is a
    radiograph model (a CR/DX film for PYLON / Yao et al. is DICOM too)."""
    from fastinsight.models.checkpoints import model_family
    from fastinsight.volume.checkpoint import is_volume_model
    from fastinsight.volume.io import is_nifti
    from fastinsight.volume.run import is_volume_input

    if model_path is not None and is_volume_model(model_path):
        return True
    if not input_path or not is_volume_input(input_path):
        return False
    if is_nifti(input_path) or model_path is None:
        return True
    return model_family(model_path) not in RADIOGRAPH_FAMILIES


def run_predict_from_slide_args(
    args: argparse.Namespace, model_path: str | os.PathLike[str], flags_set: dict[str, str]
) -> int:
    """``fastinsight predict SCAN --model M --out heatmap.nii.gz``: the CT pipeline.

    ``flags_set``: dest -> flag of every ``predict`` option set away from its default; one the
    CT pipeline does not use is refused, not ignored."""
    from fastinsight.errors import ConfigError

    unused = [flag for dest, flag in flags_set.items() if dest not in _CT_DESTS]
    if unused:
        raise ConfigError(
            f"{', '.join(unused)}: slide options, not used for CT volumes; drop them (CT "
            "writes --out heatmap.nii.gz, --report, --overlay)"
        )
    if not args.slide or not args.out:
        raise ConfigError(
            "CT: give the scan and the heatmap to write: fastinsight predict scan.nii.gz "
            "--model M --out heatmap.nii.gz"
        )
    args.input, args.model = args.slide, os.fspath(model_path)
    return run_predict(args)


def run_predict(args: argparse.Namespace) -> int:
    # The encoder by name, before the scan is read and any weights are loaded. A file that
    # records no encoder (an official .pth) takes the official CT recipe's, as before.
    from fastinsight.volume.checkpoint import recipe_encoder

    quiet = bool(getattr(args, "quiet", False))
    check_run_encoder(args, args.model, quiet=quiet)
    # The torchscript flags' values, and that the encoder run (--encoder, else the recipe's)
    # is a torchscript:PATH module, also before anything is loaded.
    encoder_options = {}
    if any(getattr(args, dest, None) is not None for dest in ("patch_size", "mean", "std")):
        encoder = args.encoder or recipe_encoder(args.model)
        encoder_options = torchscript_options(args, encoder)
    predict_file(
        args.input,
        args.model,
        args.out,
        series=args.series,
        encoder_name=args.encoder,
        encoder_weights=args.encoder_weights,
        encoder_options=encoder_options,
        lung_mask=args.lung_mask,
        slices=args.slices,
        batch_size=args.batch_size,
        device=args.device,
        overlay=args.overlay,
        report=args.report,
        log=lambda m: print(m, file=sys.stderr),
        note=None
        if quiet
        else lambda m: print(f"fastinsight: note: {terminal_text(m)}", file=sys.stderr),
        progress=not quiet,
    )
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("volumes", help="folder of <id>.nii.gz / <id>.nii / <id>/ (DICOM) volumes")
    p.add_argument("--labels", required=True, help="CSV 'volume_id,label' (0/1)")
    p.add_argument("--out", required=True, help="model file to write (.safetensors)")
    p.add_argument(
        "--encoder",
        default="vit-tiny",
        help="slice encoder (registry name; default vit-tiny, a small random-init ViT to try the "
        "pipeline; the official recipe is dinov2-vitl14-reg4 with --encoder-weights)",
    )
    p.add_argument("--encoder-weights", default=None, help="local weight file of the encoder")
    p.add_argument(
        "--patch-size",
        type=int,
        default=None,
        help="encoder patch size (vit-tiny only; default: the encoder's, 16)",
    )
    p.add_argument(
        "--tile-size",
        type=int,
        default=None,
        help="slice size in px, a multiple of the encoder's patch size (default: the encoder's "
        "own: 518 for the DINOv2 encoders, as the official recipe; 224 for vit-tiny)",
    )
    p.add_argument("--slices", choices=("all", "middle32"), default="all")
    p.add_argument("--lung-mask", choices=("none", "auto"), default="none")
    p.add_argument("--slice-context", choices=("2d", "3d"), default="2d")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out>.train.pt (same flags and data; --epochs and --device may change)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="train afresh, replacing the model, .train.pt and .metrics.* of an earlier run at "
        "--out (refused without --overwrite or --resume)",
    )


def run_train(args: argparse.Namespace) -> int:
    from fastinsight.inputs import resolve_device
    from fastinsight.train import TrainConfig, metrics_paths_for, state_path_for
    from fastinsight.volume.train import train_from_folder

    opts = {} if args.patch_size is None else {"patch_size_px": args.patch_size}
    dev = str(resolve_device(args.device))
    cfg = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        patience=args.epochs,
        val_fraction=args.val_fraction,
        seed=args.seed,
        device=dev,
    )
    train_from_folder(
        args.volumes,
        args.labels,
        args.out,
        encoder=args.encoder,
        encoder_weights=args.encoder_weights,
        encoder_options=opts,
        tile_size=args.tile_size,
        slices=args.slices,
        lung_mask=args.lung_mask,
        slice_context=args.slice_context,
        train_config=cfg,
        device=dev,
        resume=args.resume,
        overwrite=args.overwrite,
        log=lambda m: print(m, file=sys.stderr),
    )
    state = state_path_for(args.out)
    metrics, _ = metrics_paths_for(args.out)
    print(
        f"model written to {args.out}; metrics in {metrics}; resume state {state}", file=sys.stderr
    )
    return 0


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="folder for the cohort, the model and every output")
    p.add_argument("--volumes", type=int, default=24, help="cohort size (half with lesions)")
    p.add_argument("--held-out", type=int, default=8, help="volumes kept out of training")
    p.add_argument("--epochs", type=int, default=15, help="training epochs")
    p.add_argument("--seed", type=int, default=0, help="seed of cohort, encoder and training")
    p.add_argument(
        "--slice-context",
        choices=("2d", "3d"),
        default="2d",
        help="2d: official per-slice context; 3d: 3x3x3 cross-slice context",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def run_demo(args: argparse.Namespace) -> int:
    from fastinsight.volume.demo import run_ct_demo

    run_ct_demo(
        args.out_dir,
        volumes=args.volumes,
        held_out=args.held_out,
        epochs=args.epochs,
        seed=args.seed,
        slice_context=args.slice_context,
        device=args.device,
    )
    return 0
