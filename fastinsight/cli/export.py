"""``fastinsight export onnx | tensorrt | triton-repo``: thin wrappers over ``fastinsight.export``.

Mounted by ``fastinsight.cli`` as ``fastinsight.cli.export:<name>``: each command has
``add_<name>_arguments(parser)`` and ``run_<name>(args) -> int``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastinsight.errors import BackendError, InputError


def _load_model(path: str) -> object:
    from fastinsight.models.checkpoints import load_model

    return load_model(path, backend="reference", device="cpu")


def _head_option_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=("fp32", "fp16"),
        default="fp32",
        help="weights and I/O precision of the graph; TensorRT 11 builds in this precision "
        "(default fp32)",
    )
    parser.add_argument(
        "--with-mask",
        action="store_true",
        help="add a bool input `mask` [N, h, w] (tissue cells); required for context='slide' models",
    )
    parser.add_argument(
        "--accum-dtype",
        choices=("float64", "float32"),
        default="float64",
        help="precision of the Otsu statistics and pooling sums: float64 is exact (onnxruntime); "
        "TensorRT has no float64, so use float32 for a TensorRT engine (default float64)",
    )
    parser.add_argument(
        "--histogram",
        choices=("matmul", "scatter"),
        default="matmul",
        help="Otsu histogram as a factorised one-hot MatMul (TensorRT-native, default) or "
        "ScatterElements add (onnxruntime)",
    )
    parser.add_argument("--opset", type=int, default=20, help="ONNX opset (default 20)")


def _head_options(args: argparse.Namespace, **extra: object) -> object:
    from fastinsight.export.head import HeadExportOptions

    return HeadExportOptions(
        precision=args.precision,
        with_mask=args.with_mask,
        accum_dtype=args.accum_dtype,
        histogram=args.histogram,
        opset=args.opset,
        **extra,  # type: ignore[arg-type]
    )


# -- export onnx ---------------------------------------------------------------------------------
def add_onnx_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--model", help="INSIGHT checkpoint: official .pth or fastinsight .safetensors"
    )
    what.add_argument(
        "--encoder", help="patch encoder name (vit-tiny, resnet-tiny, uni, resnet50-trunc, ...)"
    )
    parser.add_argument("--encoder-weights", help="weight file of a pretrained encoder")
    parser.add_argument("--out", required=True, help="ONNX file to write")
    stage = parser.add_mutually_exclusive_group()
    stage.add_argument(
        "--head-only", action="store_true", help="output the raw heatmap only (no threshold/pool)"
    )
    stage.add_argument(
        "--postprocess-only",
        action="store_true",
        help="threshold and pooling alone: raw heatmap in, heatmap/thresholds/scores out",
    )
    _head_option_arguments(parser)
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the onnxruntime-vs-PyTorch parity check (N = 1, 7, 64)",
    )


def run_onnx(args: argparse.Namespace) -> int:
    if args.encoder_weights and not args.encoder:
        raise InputError("--encoder-weights goes with --encoder; pass the encoder's name")
    if args.encoder:
        if args.head_only or args.postprocess_only or args.with_mask:
            raise InputError("--head-only/--postprocess-only/--with-mask apply to --model only")
        from fastinsight.export.encoder import load_encoder
        from fastinsight.export.verify import export_verified_encoder

        encoder = load_encoder(args.encoder, args.encoder_weights)
        path, report = export_verified_encoder(
            encoder, args.out, args.precision, args.opset, verify=not args.no_verify
        )
        _report_written(path, report)
        return 0
    from fastinsight.export.verify import export_verified_head

    model = _load_model(args.model)
    if getattr(model, "modality", None) == "radiograph":
        return _run_radiograph_onnx(args, model)
    options = _head_options(args, head_only=args.head_only, postprocess_only=args.postprocess_only)
    path, report = export_verified_head(
        model,  # type: ignore[arg-type]
        args.out,
        options,  # type: ignore[arg-type]
        verify=not args.no_verify,
    )
    _report_written(path, report)
    return 0


def _report_written(path: Path, report: object) -> None:
    """Say "wrote" only once the file is in place: the parity check runs before the rename
    (``export_verified_*``), so a graph that fails it is neither kept nor announced."""
    from fastinsight.export.verify import describe

    print(f"wrote {path} ({describe(path)})")
    if report is not None:
        print(report.summary())  # type: ignore[attr-defined]


def _radiograph_refuses(args: argparse.Namespace, flags: dict[str, bool]) -> None:
    given = [f for f, on in flags.items() if on]
    if given:
        raise InputError(
            f"{', '.join(given)} apply to INSIGHT heads; {args.model!r} is a radiograph model "
            "(image -> logits, scores, FP32): drop them"
        )


def _run_radiograph_onnx(args: argparse.Namespace, model: object) -> int:
    """PYLON / multires -> ``fastinsight.export.radiograph`` (FP32 image -> logits, scores)."""
    from fastinsight.export.radiograph import export_radiograph_onnx, verify_radiograph_onnx
    from fastinsight.export.verify import describe

    _radiograph_refuses(
        args,
        {
            "--head-only": args.head_only,
            "--postprocess-only": args.postprocess_only,
            "--with-mask": args.with_mask,
            "--precision fp16": args.precision != "fp32",
        },
    )
    path = export_radiograph_onnx(model, args.out, opset=args.opset)
    diffs = None if args.no_verify else verify_radiograph_onnx(model, path)
    print(f"wrote {path} ({describe(path)})")
    if diffs is not None:
        print(
            "onnxruntime vs PyTorch max |diff|: "
            + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
        )
    return 0


# -- export tensorrt -----------------------------------------------------------------------------
def add_tensorrt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--onnx", required=True, help="ONNX graph from `fastinsight export onnx`")
    parser.add_argument("--out", required=True, help="TensorRT plan to write (e.g. head.plan)")
    parser.add_argument("--min-tiles", type=int, default=1, help="smallest tile count N (1)")
    parser.add_argument("--opt-tiles", type=int, default=1024, help="tile count to tune for (1024)")
    parser.add_argument("--max-tiles", type=int, default=16384, help="largest tile count N (16384)")
    parser.add_argument(
        "--timing-cache", help="timing cache file: read if it exists, written after the build"
    )
    parser.add_argument(
        "--workspace", type=float, default=4.0, help="builder workspace in GiB (default 4)"
    )
    parser.add_argument(
        "--no-check", action="store_true", help="skip running the engine against onnxruntime"
    )
    parser.add_argument(
        "--no-tf32",
        action="store_true",
        help="keep fp32 convolutions in full fp32 (TensorRT uses TF32 by default)",
    )
    parser.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")


def run_tensorrt(args: argparse.Namespace) -> int:
    from fastinsight.export._onnx_io import check_onnx_initializers_finite
    from fastinsight.export.tensorrt import (
        build_engine,
        check_engine,
        check_tile_range,
        tensorrt_status,
    )

    # The inputs first (cheap, and what the user can fix anywhere), then the machine.
    check_tile_range(args.min_tiles, args.opt_tiles, args.max_tiles)
    if not Path(args.onnx).is_file():
        raise InputError(f"ONNX file {args.onnx!r} does not exist; export it first")
    if args.workspace <= 0:
        raise InputError(f"--workspace must be > 0 GiB, got {args.workspace}")
    check_onnx_initializers_finite(args.onnx)
    reason = tensorrt_status()
    if reason is not None:
        # One plain line, no traceback (the CLI prints it): the machine cannot build engines.
        raise BackendError(reason)
    info = build_engine(
        args.onnx,
        args.out,
        min_tiles=args.min_tiles,
        opt_tiles=args.opt_tiles,
        max_tiles=args.max_tiles,
        timing_cache=args.timing_cache,
        workspace=int(args.workspace * (1 << 30)),
        verbose=args.verbose,
        tf32=not args.no_tf32,
    )
    print(
        f"wrote {info.plan} (TensorRT {info.tensorrt_version} on {info.device}; tiles "
        f"{args.min_tiles}..{args.opt_tiles}..{args.max_tiles})"
    )
    if not args.no_check:
        sizes = tuple(sorted({min(max(n, args.min_tiles), args.max_tiles) for n in (1, 7, 64)}))
        print(check_engine(info.plan, args.onnx, sizes=sizes).summary())
    return 0


# -- export triton-repo --------------------------------------------------------------------------
def add_triton_repo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="INSIGHT checkpoint: official .pth or fastinsight .safetensors",
    )
    parser.add_argument("--out", required=True, help="repository folder to write")
    parser.add_argument("--encoder", help="patch encoder for the encoder -> head ensembles")
    parser.add_argument("--encoder-weights", help="weight file of a pretrained encoder")
    parser.add_argument(
        "--plan", help="TensorRT plan of the head (`fastinsight export tensorrt`) to include"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=64,
        help="encoder max batch = most tiles per insight_pipeline request (default 64)",
    )
    parser.add_argument("--instances", type=int, default=1, help="instances per model (1)")
    parser.add_argument(
        "--instance-kind", choices=("gpu", "cpu", "auto"), default="gpu", help="(default gpu)"
    )
    parser.add_argument(
        "--ensemble-head",
        choices=("auto", "onnx", "trt"),
        default="auto",
        help="head called by insight_pipeline (auto: the plan when given)",
    )
    parser.add_argument(
        "--no-chunked",
        action="store_true",
        help="leave out insight_head_raw, insight_postprocess and insight_tiles",
    )
    _head_option_arguments(parser)
    parser.add_argument("--no-verify", action="store_true", help="skip the parity checks")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run_triton_repo(args: argparse.Namespace) -> int:
    from fastinsight.export.triton import write_triton_repo

    if args.encoder_weights and not args.encoder:
        raise InputError("--encoder-weights goes with --encoder; pass the encoder's name")
    model = _load_model(args.model)
    if getattr(model, "modality", None) == "radiograph":
        from fastinsight.export.triton import write_radiograph_triton_repo

        _radiograph_refuses(
            args,
            {
                "--encoder": bool(args.encoder),
                "--plan": bool(args.plan),
                "--with-mask": args.with_mask,
                "--precision fp16": args.precision != "fp32",
            },
        )
        result = write_radiograph_triton_repo(
            args.out,
            model,
            max_batch_size=args.max_batch_size,
            instances=args.instances,
            instance_kind=args.instance_kind,
            verify=not args.no_verify,
            overwrite=args.overwrite,
        )
        print(f"wrote {result.path}: {', '.join(result.models)}")
        return 0
    encoder = None
    if args.encoder:
        from fastinsight.export.encoder import load_encoder

        encoder = load_encoder(args.encoder, args.encoder_weights)
    result = write_triton_repo(
        args.out,
        model,  # type: ignore[arg-type]
        encoder,
        plan=args.plan,
        max_batch_size=args.max_batch_size,
        instances=args.instances,
        instance_kind=args.instance_kind,
        head_options=_head_options(args),  # type: ignore[arg-type]
        encoder_precision=args.precision,
        chunked=not args.no_chunked,
        ensemble_head=args.ensemble_head,
        verify=not args.no_verify,
        overwrite=args.overwrite,
    )
    print(f"wrote {result.path}: {', '.join(result.models)}")
    return 0
