"""``fastinsight encoders list`` and ``fastinsight encoders check NAME --weights PATH``.

Only argument parsing and printing (argparse lives under fastinsight/cli/); the work is in
:mod:`fastinsight.encoders.check`. Also the flags of a ``torchscript:PATH`` encoder
(``--patch-size``, ``--mean``, ``--std``) that every command taking an encoder adds
(:func:`add_torchscript_arguments`, read back with :func:`torchscript_options`), and the
prediction commands' ``--allow-encoder-mismatch`` (:func:`add_encoder_mismatch_argument`,
checked with :func:`check_run_encoder`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from fastinsight.errors import ConfigError

_TORCHSCRIPT_FLAGS = (("--patch-size", "patch_size"), ("--mean", "mean"), ("--std", "std"))


def add_torchscript_arguments(parser: argparse.ArgumentParser) -> None:
    """``--patch-size PX``, ``--mean R G B``, ``--std R G B``: what a ``torchscript:PATH`` module
    does not record about itself (:class:`fastinsight.encoders.torchscript.TorchScriptOptions`)."""
    group = parser.add_argument_group(
        "torchscript:PATH encoders (a module records neither its patch size nor its input "
        "normalisation; other encoders have their own)"
    )
    group.add_argument(
        "--patch-size",
        type=int,
        default=None,
        metavar="PX",
        help="side in tile px of one token-grid cell; must divide the tile (default: read off "
        "the module's output, which must then be a square grid)",
    )
    group.add_argument(
        "--mean",
        type=float,
        nargs=3,
        default=None,
        metavar=("R", "G", "B"),
        help="input mean the module was trained with, on RGB in [0, 1] (default: ImageNet's "
        "0.485 0.456 0.406)",
    )
    group.add_argument(
        "--std",
        type=float,
        nargs=3,
        default=None,
        metavar=("R", "G", "B"),
        help="input std the module was trained with, each > 0 (default: ImageNet's 0.229 "
        "0.224 0.225)",
    )


def torchscript_options(
    args: argparse.Namespace, encoder: str | None, tile_size_px: int | None = None
) -> dict[str, Any]:
    """The ``build_encoder`` options the torchscript flags give (``{}`` when none is given).

    ConfigError (exit 2), before anything is loaded: a flag given with no encoder or with one
    that is not ``torchscript:PATH`` (those know their patch size and normalisation), a bad
    value (3 finite numbers, std > 0), or a patch size that does not divide ``tile_size_px``
    (when the tile size is known yet).
    """
    from fastinsight.encoders.torchscript import TorchScriptOptions, is_torchscript_name

    given = [flag for flag, dest in _TORCHSCRIPT_FLAGS if getattr(args, dest, None) is not None]
    if not given:
        return {}
    if not is_torchscript_name(encoder):
        what = f"encoder {encoder!r}" if encoder else "no encoder"
        verb, it = ("applies", "it") if len(given) == 1 else ("apply", "them")
        raise ConfigError(
            f"{', '.join(given)} {verb} to torchscript:PATH encoders only (a module that records "
            f"neither its patch size nor its normalisation), and this run has {what}: drop {it} "
            "(a named encoder brings its own, see `fastinsight encoders list`)"
        )
    options = TorchScriptOptions(
        patch_size_px=args.patch_size,
        mean=tuple(args.mean) if args.mean is not None else None,
        std=tuple(args.std) if args.std is not None else None,
    )
    if tile_size_px is not None:
        options.check_tile(int(tile_size_px))
    return options.build_options()


def add_encoder_mismatch_argument(parser: argparse.ArgumentParser) -> None:
    """``--allow-encoder-mismatch`` of ``predict`` and ``predict-volume`` (as on the export
    commands): run an ``--encoder`` other than the one the model file records."""
    parser.add_argument(
        "--allow-encoder-mismatch",
        action="store_true",
        help="run with an --encoder other than the one the model file records (when it is the "
        "same network under another name); its tokens must still fit the model",
    )


def check_run_encoder(
    args: argparse.Namespace, model_path: str | os.PathLike[str], *, quiet: bool = False
) -> str | None:
    """``--encoder`` against the encoder the model file records, by name, before any weights are
    read (:func:`fastinsight.encoders.identity.check_encoder_identity`): another one is a
    ConfigError (exit 2) naming both, unless ``--allow-encoder-mismatch`` (then a note on
    stderr, unless ``quiet``). ``--allow-encoder-mismatch`` without ``--encoder`` is refused:
    the run uses the model's own encoder.

    Returns the recorded encoder, or None: no ``--encoder`` given, or a model file that records
    none (an official ``.pth``: accepted as before, its tokens checked against the head).
    """
    from fastinsight.encoders.identity import check_encoder_identity
    from fastinsight.models.checkpoints import recorded_encoder

    if not args.encoder:
        if args.allow_encoder_mismatch:
            raise ConfigError(
                "--allow-encoder-mismatch applies to --encoder (an encoder other than the one "
                "the model records), and without --encoder the run uses the model's own: drop it"
            )
        return None
    recorded = recorded_encoder(model_path)
    if recorded is None:
        return None
    note = check_encoder_identity(
        recorded,
        args.encoder,
        model=f"model {os.fspath(model_path)!r}",
        allow_mismatch=args.allow_encoder_mismatch,
    )
    if note and not quiet:
        print(f"fastinsight: {note}", file=sys.stderr)
    return recorded


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
    add_torchscript_arguments(parser)


def run_check(args: argparse.Namespace) -> int:
    from fastinsight.encoders.check import check_encoder

    options = torchscript_options(args, args.name, args.tile_size)
    report = check_encoder(
        args.name, args.weights, tile_size_px=args.tile_size, device=args.device, **options
    )
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
    print(
        f"input     (x - mean) / std on RGB in [0, 1], mean {report['mean']}, std {report['std']}"
    )
    print(f"tokens    {report['tokens_shape']} {report['tokens_dtype']} on {report['device']}")
    for note in report["load_notes"]:
        print(f"note      {note}")
    return 0
