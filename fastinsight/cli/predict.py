"""``fastinsight predict``: one slide (or one feature file) to heatmap TIFF, scores and more."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from fastinsight.cli.encoders import (
    add_encoder_mismatch_argument,
    add_torchscript_arguments,
    check_run_encoder,
    torchscript_options,
)
from fastinsight.cli.volume import add_ct_arguments, run_predict_from_slide_args, wants_ct
from fastinsight.errors import ConfigError, InputError, SlideError
from fastinsight.predict.loading import MODEL_ENV, load_for_predict, resolve_model_path
from fastinsight.text import clean_text, terminal_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "slide",
        nargs="?",
        help="whole-slide image (svs, ndpi, tiff, ome.tif, ...), or a CT volume (.nii, .nii.gz, "
        "DICOM series folder) -> heatmap NIfTI",
    )
    p.add_argument(
        "--out", "-o", help="heatmap TIFF to write (pyramidal, opens in QuPath/OpenSlide)"
    )
    p.add_argument(
        "--model",
        "-m",
        help=f"INSIGHT checkpoint (.safetensors or official .pth); default ${MODEL_ENV}",
    )
    p.add_argument(
        "--features",
        help="precomputed features h5 (official INSIGHT, CLAM or TRIDENT) instead of a slide",
    )
    p.add_argument(
        "--snap-to-grid",
        action="store_true",
        help="round feature tiles to the model's cells instead of placing them where the file put "
        "them (CLAM starts a grid at each tissue contour)",
    )
    p.add_argument(
        "--ignore-file-geometry",
        action="store_true",
        help="with --features: use --slide / --mpp even where they contradict the slide name, "
        "size or magnification a TRIDENT file records",
    )
    p.add_argument(
        "--slide",
        dest="slide_opt",
        help="with --features: the slide, for alignment, mpp and the overlay",
    )
    p.add_argument(
        "--patches-h5", help="CLAM patches/<slide>.h5 giving the geometry of a CLAM features file"
    )
    p.add_argument(
        "--patch-size-l0",
        type=float,
        help="level-0 size of a feature tile when the h5 does not record it",
    )
    p.add_argument(
        "--encoder",
        help="patch encoder (default: the one the model names, see `fastinsight info`); another "
        "one than the model file records is refused",
    )
    add_encoder_mismatch_argument(p)
    p.add_argument(
        "--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)"
    )
    add_run_arguments(p)
    p.add_argument("--overlay", help="PNG: heatmap over a slide thumbnail, with a colour bar")
    p.add_argument("--geojson", help="QuPath GeoJSON of tiles with measurements {score}")
    p.add_argument(
        "--geojson-per",
        default="tile",
        choices=("tile", "cell"),
        help="one GeoJSON feature per tile or per cell",
    )
    p.add_argument(
        "--report", help="JSON report: scores, thresholds, model, encoder, geometry, timings"
    )
    p.add_argument(
        "--scores",
        help="npz sidecar: the float32 heatmap cells (after the Otsu threshold) and tissue mask",
    )
    add_torchscript_arguments(p)
    add_ct_arguments(p)
    p.add_argument(
        "--profile",
        action="store_true",
        help="synchronise the GPU per stage for exact stage timings",
    )


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of a slide run shared by ``predict`` and ``predict-cohort``."""
    p.add_argument(
        "--encoder-weights", help="local weight file of the encoder (e.g. UNI's pytorch_model.bin)"
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "triton", "reference"),
        help="head, threshold and pooling implementation: auto = the Triton kernels on a CUDA "
        "device when Triton is installed, else PyTorch; triton = the kernels (an error where they "
        "cannot run); reference = PyTorch",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="tiles per encoder batch (bounds GPU memory; default %(default)s)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=2,
        help="tile reading/decoding threads (default %(default)s)",
    )
    p.add_argument(
        "--reader",
        default="auto",
        choices=("auto", "direct", "openslide", "tifffile"),
        help="slide reader: auto picks the one that sees the pyramid and the mpp; direct reads "
        "TIFF tiles straight from the file; openslide for the formats only it reads",
    )
    p.add_argument(
        "--decode",
        default="cpu",
        choices=("cpu", "device"),
        help="where JPEG tiles are decoded: cpu threads, or on the run's device (nvJPEG on a GPU; "
        "the CPU then only reads bytes; JPEG-tiled TIFFs with the direct reader)",
    )
    p.add_argument(
        "--tissue",
        default="brightfield",
        choices=("brightfield", "fluorescence", "all"),
        help="tissue detection: bright-field H&E, dark-background fluorescence, or every tile "
        "(default %(default)s)",
    )
    p.add_argument(
        "--min-tissue",
        type=float,
        default=0.1,
        help="minimum tissue fraction of a tile (default %(default)s)",
    )
    p.add_argument(
        "--min-cell-tissue",
        type=float,
        default=0.5,
        help="minimum tissue fraction of a heatmap cell (default %(default)s)",
    )
    p.add_argument(
        "--mpp",
        type=float,
        help="slide microns per pixel (overrides the file; needed when it has none)",
    )
    p.add_argument(
        "--class",
        dest="class_",
        metavar="CLASS",
        help="class (name or index) for the heatmap when K > 1 (default: first)",
    )
    p.add_argument(
        "--all-classes",
        action="store_true",
        help="one heatmap TIFF per class: OUT_STEM.<class>.tif",
    )
    p.add_argument(
        "--encoding",
        default="score",
        choices=("score", "rgb"),
        help="heatmap TIFF pixels: uint8 score (lossless; 0 = non-tissue) or RGB colour map",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or notes")


def predict_options(args: argparse.Namespace, **overrides: Any) -> Any:
    """The ``PredictOptions`` of the flags added by ``add_run_arguments``."""
    from fastinsight.predict.slide import PredictOptions

    values: dict[str, Any] = {
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "tissue": args.tissue,
        "min_tissue_fraction": args.min_tissue,
        "min_cell_fraction": args.min_cell_tissue,
        "mpp": args.mpp,
        "reader_backend": args.reader,
        "decode": args.decode,
        "encoder_weights": args.encoder_weights,
        "progress": not args.quiet,
    }
    values.update(overrides)
    return PredictOptions(**values)


def _is_feature_file(path: str) -> bool:
    """An HDF5 file (``.h5``/``.hdf5`` or the HDF5 signature at its start): features, never a
    slide. Only regular files are looked at (a FIFO is never opened)."""
    p = Path(path)
    try:
        if not p.is_file():
            return False
        if p.suffix.lower() in (".h5", ".hdf5", ".he5"):
            return True
        with open(p, "rb") as fh:
            return fh.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def flags_set(args: argparse.Namespace) -> dict[str, str]:
    """dest -> flag of every ``predict`` option that ``args`` sets away from its default."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return {
        action.dest: action.option_strings[0] if action.option_strings else action.dest
        for action in parser._actions  # argparse has no public list of a parser's actions
        if hasattr(args, action.dest) and getattr(args, action.dest) != action.default
    }


def run(args: argparse.Namespace) -> int:
    from fastinsight.atomic import check_writable, prepare_outputs
    from fastinsight.inputs import check_input_path, resolve_device
    from fastinsight.predict.slide import class_heatmap_path, pick_class

    if args.class_ is not None and args.all_classes:
        raise ConfigError("--class and --all-classes exclude each other: pick one class or all")
    if wants_ct(args.slide, args.model or os.environ.get(MODEL_ENV)):
        # A NIfTI file / DICOM folder, or a volume model: the CT pipeline (fastinsight.volume).
        return run_predict_from_slide_args(args, resolve_model_path(args.model), flags_set(args))
    if args.slide and not args.features and _is_feature_file(args.slide):
        # `fastinsight predict FEATURES.h5 --model M`: a feature file in the slide's place.
        args.features, args.slide = args.slide, None
    if not args.slide and not args.features:
        raise ConfigError(
            "give a slide (fastinsight predict SLIDE --out heatmap.tif) or --features H5"
        )
    if not any((args.out, args.overlay, args.geojson, args.report, args.scores)):
        raise ConfigError(
            "nothing to write: pass --out heatmap.tif (and/or --overlay, --geojson, --report, --scores)"
        )
    check_flags(args)
    device = resolve_device(args.device)
    model_path = resolve_model_path(args.model)
    model, info = load_for_predict(model_path, args.backend, args.quiet)
    if getattr(model, "modality", None) == "radiograph":
        # PYLON / multi-resolution models: the radiograph pipeline takes the run from here.
        from fastinsight.cli.radiograph import run_from_predict

        return run_from_predict(args, model, model_path, str(device))
    encoder_options: dict[str, Any] = {}
    recorded: str | None = None
    if not args.features:
        # The encoder by name, and the torchscript flags' values, before any weights are read.
        encoder_options = torchscript_options(
            args, args.encoder or model.config.encoder, model.config.tile_size_px
        )
        recorded = check_run_encoder(args, model_path, quiet=args.quiet)
    slide = args.slide_opt or args.slide
    if slide:
        # Whole-slide formats are files (mrxs: its index file) or a DICOM WSI's folder; a FIFO is
        # never opened.
        slide_path = check_input_path(slide, "slide", SlideError, allow_dir=True)
        if slide_path.is_dir():  # checked before the model and encoder are loaded
            from fastinsight.slide.readers import dicom_slide_file

            dicom_slide_file(slide_path)
    if args.out:
        check_writable(args.out)  # /dev/null, a folder: the output error, before the name's
        if Path(args.out).suffix.lower() not in (".tif", ".tiff"):
            raise ConfigError(
                f"--out {args.out!r} must end in .tif or .tiff: it is a pyramidal TIFF (use "
                "--overlay for a PNG)"
            )
    if args.class_ is not None:
        pick_class(model.config.names, args.class_)  # before the work, not after it
    outputs = {
        "--overlay": args.overlay,
        "--geojson": args.geojson,
        "--report": args.report,
        "--scores": args.scores,
    }
    if args.out:
        for name in model.config.names if args.all_classes else [None]:
            outputs["--out" if name is None else f"--out ({name})"] = class_heatmap_path(
                args.out, name
            )
    prepare_outputs(
        outputs,
        {
            "slide": args.slide,
            "--slide": args.slide_opt,
            "--features": args.features,
            "--model": model_path,
        },
    )
    options = predict_options(args, device=str(device), profile=args.profile)
    if args.features:
        from fastinsight.predict.features import predict_features

        result = predict_features(
            args.features,
            model,
            options,
            slide=args.slide_opt or args.slide,
            patches_h5=args.patches_h5,
            patch_size_l0=args.patch_size_l0,
            snap=args.snap_to_grid,
            ignore_file_geometry=args.ignore_file_geometry,
            model_info=info,
        )
    else:
        from fastinsight.predict.slide import predict_slide

        encoder = None
        if args.encoder or encoder_options:
            from fastinsight.encoders import build_encoder

            encoder = build_encoder(
                args.encoder or model.config.encoder,
                args.encoder_weights,
                tile_size_px=model.config.tile_size_px,
                device=device,
                **encoder_options,
            )
        # The names were compared above (check_run_encoder); a file that records no encoder (an
        # official .pth: its config's "uni" is only assumed) is accepted on its tokens, as before.
        result = predict_slide(
            args.slide,
            model,
            encoder,
            options,
            model_info=info,
            allow_encoder_mismatch=args.allow_encoder_mismatch or recorded is None,
        )
    write_outputs(result, args)
    k = result.class_index(args.class_)
    summary = ", ".join(
        f"{n}={s:.4f}" for n, s in zip(result.class_names, result.scores, strict=True)
    )
    print(
        f"{terminal_text(result.slide_id)}: {clean_text(summary)} (threshold {result.thresholds[k]:.4f}; "
        f"{result.n_tiles} tiles in {result.timings['total']:.1f} s, {result.tiles_per_second:.1f} tiles/s end to end)"
    )
    return 0


def write_outputs(result: Any, args: argparse.Namespace) -> None:
    """Write what was asked for, all or nothing (``SlideResult.write_outputs``).

    Every output goes to a temporary file; they are renamed into place together when the last
    one is complete (``atomic_outputs``). If any write fails (a full disk, Ctrl-C, SIGTERM) the
    temporary files are removed and every previous output is kept as it was.
    """
    from fastinsight.predict.slide import Outputs

    result.write_outputs(
        Outputs(
            heatmap=args.out,
            overlay=args.overlay,
            geojson=args.geojson,
            scores=args.scores,
            report=args.report,
            class_=args.class_,
            encoding=args.encoding,
            all_classes=args.all_classes,
            geojson_per=args.geojson_per,
        )
    )


# Options that only a --features run reads, and the CT options: set on a slide run, refused
# (an ignored flag is a user's misunderstanding kept silent).
_FEATURE_DESTS = frozenset({"snap_to_grid", "ignore_file_geometry", "patches_h5", "patch_size_l0"})
_CT_ONLY_DESTS = frozenset({"series", "lung_mask", "slices"})
# Options of the patch encoder: a --features run encodes nothing (its features are precomputed).
_ENCODER_DESTS = frozenset({"allow_encoder_mismatch", "patch_size", "mean", "std"})


def check_flags(args: argparse.Namespace) -> None:
    """Flag values and combinations that would fail after the work, refused before it."""
    from fastinsight.inputs import MAX_SLIDE_SIDE_PX, check_input_path, check_mpp

    given = flags_set(args)
    stray = [flag for dest, flag in given.items() if dest in _CT_ONLY_DESTS]
    if not args.features:
        stray += [flag for dest, flag in given.items() if dest in _FEATURE_DESTS]
    if stray:
        what = "a feature file" if args.features else "a slide"
        raise ConfigError(
            f"{', '.join(stray)}: not used when predicting {what} (CT-only, or for --features "
            "runs); drop them"
        )
    encoder_flags = [flag for dest, flag in given.items() if dest in _ENCODER_DESTS]
    if args.features and encoder_flags:
        hint = " (the level-0 side of a feature tile is --patch-size-l0)"
        raise ConfigError(
            f"{', '.join(encoder_flags)}: options of the patch encoder, and a --features run "
            "encodes nothing (its features are precomputed); drop them"
            + (hint if "patch_size" in given else "")
        )

    if args.mpp is not None:
        check_mpp(args.mpp, error=ConfigError)  # a flag's value: exit 2 (docs/exit-codes.md)
    if args.features:
        check_input_path(args.features, "feature file", InputError)
        if args.overlay and not (args.slide_opt or args.slide):
            raise InputError(
                "--overlay draws the heatmap over the slide's thumbnail, and a --features run "
                "without --slide has no slide; pass --slide SLIDE or drop --overlay"
            )
        if args.patches_h5:
            check_input_path(args.patches_h5, "patches file", InputError)
        size = args.patch_size_l0
        if size is not None and not (math.isfinite(size) and 1 <= size <= MAX_SLIDE_SIDE_PX):
            raise ConfigError(
                f"--patch-size-l0 must be a level-0 tile side in 1..{MAX_SLIDE_SIDE_PX} px, "
                f"got {size}"
            )
