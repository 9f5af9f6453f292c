"""``fastinsight export onnx | tensorrt | triton-repo``: thin wrappers over ``fastinsight.export``.

Mounted by ``fastinsight.cli`` as ``fastinsight.cli.export:<name>``: each command has
``add_<name>_arguments(parser)`` and ``run_<name>(args) -> int``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from fastinsight.cli.encoders import add_torchscript_arguments, torchscript_options
from fastinsight.errors import ConfigError

# The largest --tile-size taken: encoders run at 224-518 px; beyond this a typo (2240) would
# allocate gigabytes before failing.
MAX_TILE_SIZE = 4096


def _load_model(path: str) -> object:
    from fastinsight.models.checkpoints import load_model

    return load_model(path, backend="reference", device="cpu")


def _check_opset(args: argparse.Namespace) -> None:
    from fastinsight.export._guards import check_opset

    check_opset(args.opset)


def _check_tile_size(args: argparse.Namespace) -> None:
    from fastinsight.export._guards import check_positive_int

    if args.tile_size is not None:
        check_positive_int(args.tile_size, "--tile-size", MAX_TILE_SIZE)


def _torchscript_file(encoder: str | None) -> str | None:
    """The file of ``--encoder torchscript:PATH`` (an input the outputs must not replace)."""
    if encoder and encoder.strip().lower().startswith("torchscript:"):
        return encoder.strip()[len("torchscript:") :] or None
    return None


def _tile_size_argument(parser: argparse.ArgumentParser, default_text: str) -> None:
    parser.add_argument(
        "--tile-size",
        type=int,
        default=None,
        help="tile side in px the encoder takes (needed by torchscript:PATH, which does not "
        f"know it; {default_text})",
    )


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
    _tile_size_argument(parser, "default: the encoder's own")
    add_torchscript_arguments(parser)
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
    from fastinsight.atomic import prepare_outputs

    # Option values first (exit 2), then the outputs against the inputs (exit 6): all before a
    # model is loaded or a graph traced.
    if args.encoder_weights and not args.encoder:
        raise ConfigError("--encoder-weights goes with --encoder; pass the encoder's name")
    if args.encoder:
        given = [
            flag
            for flag, on in (
                ("--head-only", args.head_only),
                ("--postprocess-only", args.postprocess_only),
                ("--with-mask", args.with_mask),
            )
            if on
        ]
        if given:
            raise ConfigError(
                f"{', '.join(given)} apply to the head (--model), not to an encoder "
                f"({args.encoder!r}): drop them"
            )
    elif args.tile_size is not None:
        raise ConfigError(
            "--tile-size applies to --encoder (the tile side the encoder takes); a model's "
            "head takes token grids: drop it"
        )
    _check_tile_size(args)
    encoder_options = torchscript_options(args, args.encoder, args.tile_size)
    _check_opset(args)
    if args.model:
        _head_options(args, head_only=args.head_only, postprocess_only=args.postprocess_only)
    prepare_outputs(
        {"--out": args.out},
        {
            "--model": args.model,
            "--encoder-weights": args.encoder_weights,
            "--encoder": _torchscript_file(args.encoder),
        },
    )
    if args.encoder:
        from fastinsight.export.encoder import load_encoder
        from fastinsight.export.verify import export_verified_encoder

        encoder = load_encoder(
            args.encoder, args.encoder_weights, tile_size_px=args.tile_size, **encoder_options
        )
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
        raise ConfigError(
            f"{', '.join(given)} apply to INSIGHT heads; {args.model!r} is a radiograph model "
            "(image -> logits, scores, FP32): drop them"
        )


def _run_radiograph_onnx(args: argparse.Namespace, model: object) -> int:
    """PYLON / multires -> ``fastinsight.export.radiograph`` (FP32 image -> logits, scores).

    The parity check runs on the finished graph before it is renamed into place (within the
    tolerance of ``check_radiograph_onnx``): a graph that disagrees is exit 7, nothing is
    printed as written and an existing ``--out`` keeps its contents."""
    from fastinsight.export.radiograph import export_verified_radiograph

    _radiograph_refuses(
        args,
        {
            "--head-only": args.head_only,
            "--postprocess-only": args.postprocess_only,
            "--with-mask": args.with_mask,
            "--precision fp16": args.precision != "fp32",
        },
    )
    path, report = export_verified_radiograph(
        model, args.out, opset=args.opset, verify=not args.no_verify
    )
    _report_written(path, report)
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
    from fastinsight.export.tensorrt import (
        EngineInfo,
        build_engine,
        check_build_inputs,
        check_engine,
        check_workspace,
    )

    # What the user can fix anywhere comes first, before TensorRT is even looked for: option
    # values (exit 2), the ONNX file, the outputs (plan, its sidecar, the timing cache: writable
    # and none of them the ONNX, exit 6), the graph's weights and dtypes. Then the machine.
    check_workspace(args.workspace)
    check_build_inputs(
        args.onnx,
        args.out,
        args.min_tiles,
        args.opt_tiles,
        args.max_tiles,
        args.timing_cache,
        args.workspace * (1 << 30),
    )
    checks: list[Any] = []

    def check(tmp_plan: Path, info: EngineInfo) -> None:
        # On the engine before it is renamed into place: a failed check replaces nothing.
        sizes = tuple(sorted({min(max(n, args.min_tiles), args.max_tiles) for n in (1, 7, 64)}))
        checks.append(check_engine(tmp_plan, args.onnx, sizes=sizes, tf32=info.tf32))

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
        before_commit=None if args.no_check else check,
    )
    print(
        f"wrote {info.plan} (TensorRT {info.tensorrt_version} on {info.device}; tiles "
        f"{args.min_tiles}..{args.opt_tiles}..{args.max_tiles})"
    )
    for report in checks:
        print(report.summary())
    return 0


# -- export triton-repo --------------------------------------------------------------------------
def add_triton_repo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="INSIGHT checkpoint: official .pth or fastinsight .safetensors",
    )
    parser.add_argument("--out", required=True, help="repository folder to write")
    parser.add_argument(
        "--encoder",
        help="patch encoder for the encoder -> head ensembles: the one the model was trained on "
        "(a fastinsight model records it)",
    )
    parser.add_argument("--encoder-weights", help="weight file of a pretrained encoder")
    _tile_size_argument(parser, "default: the model's tile size, which it must equal")
    add_torchscript_arguments(parser)
    parser.add_argument(
        "--allow-encoder-mismatch",
        action="store_true",
        help="accept an --encoder other than the one the model records (the same network under "
        "another name); its token geometry is still checked",
    )
    parser.add_argument(
        "--plan",
        help="TensorRT plan of the head built by `fastinsight export tensorrt` (with its .json "
        "sidecar) to include; GPU only",
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


def _volume_recipe(path: str) -> Any:
    """The CT recipe a volume model file records (encoder, its options, tile size), or None."""
    from fastinsight.volume.checkpoint import VOLUME_KEY, VolumeModelInfo, is_volume_model

    if not is_volume_model(path):
        return None
    from safetensors import safe_open

    with safe_open(str(Path(path).expanduser()), framework="pt") as fh:
        return VolumeModelInfo.from_json((fh.metadata() or {})[VOLUME_KEY])


def _triton_encoder(args: argparse.Namespace, model: Any) -> tuple[Any, Any]:
    """The encoder to export beside ``model``, built as the model was trained with it, and the
    normalisation the model file records (None where it records none).

    The tile size is the model's (``--tile-size`` may only repeat it; ``write_triton_repo``
    refuses another). A CT model's recipe also fixes the encoder's options (patch size, mean and
    std, seed): they are used when ``--encoder`` names the recipe's encoder. A
    ``torchscript:PATH`` encoder takes ``--patch-size``, ``--mean`` and ``--std`` (over the
    recipe's: a recorded normalisation they contradict is refused by ``write_triton_repo``).
    """
    from fastinsight.export.encoder import load_encoder

    cfg = model.config
    tile = args.tile_size if args.tile_size is not None else cfg.tile_size_px
    given = torchscript_options(args, args.encoder, tile)
    recipe = _volume_recipe(args.model)
    if recipe is None:
        encoder = load_encoder(args.encoder, args.encoder_weights, tile_size_px=tile, **given)
        return encoder, None
    from fastinsight.volume.predict import build_volume_encoder

    same = args.encoder.strip().lower() == str(recipe.encoder).strip().lower()
    options = (dict(recipe.encoder_options) if same else {}) | given
    encoder = build_volume_encoder(
        args.encoder, tile, weights=args.encoder_weights, device="cpu", options=options
    ).eval()
    recorded = dict(recipe.encoder_options)
    mean = recorded.get("mean", (0.0, 0.0, 0.0))  # build_volume_encoder's defaults
    std = recorded.get("std", (1.0, 1.0, 1.0))
    return encoder, (tuple(mean), tuple(std))


def run_triton_repo(args: argparse.Namespace) -> int:
    from fastinsight.export.triton import check_repo_output, check_triton_options, write_triton_repo

    # Option values (exit 2), then the output folder against every input (exit 6), before the
    # model is loaded or a graph exported.
    if args.encoder_weights and not args.encoder:
        raise ConfigError("--encoder-weights goes with --encoder; pass the encoder's name")
    if args.tile_size is not None and not args.encoder:
        raise ConfigError(
            "--tile-size applies to --encoder (the tile side the encoder takes): drop it, or "
            "pass --encoder"
        )
    if args.allow_encoder_mismatch and not args.encoder:
        raise ConfigError(
            "--allow-encoder-mismatch applies to --encoder (an encoder other than the one the "
            "model records): drop it, or pass --encoder"
        )
    _check_tile_size(args)
    # The torchscript flags' values now; their patch size against the tile once the model is
    # read (it gives the tile size).
    torchscript_options(args, args.encoder)
    _check_opset(args)
    check_triton_options(
        args.max_batch_size, args.instances, args.instance_kind, args.ensemble_head, args.plan
    )
    head_options = _head_options(args)
    inputs: dict[str, str | os.PathLike[str] | None] = {
        "--model": args.model,
        "--encoder-weights": args.encoder_weights,
        "--encoder": _torchscript_file(args.encoder),
    }
    check_repo_output(args.out, args.overwrite, inputs)
    if args.plan:
        from fastinsight.export.triton import read_plan

        read_plan(args.plan)  # a plan without its sidecar, before the model is loaded
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
            inputs=inputs,
        )
        print(f"wrote {result.path}: {', '.join(result.models)}")
        return 0
    encoder, normalisation, recorded = (None, None, None)
    if args.encoder:
        from fastinsight.export.triton import check_encoder_identity, recorded_encoder

        # By name, before the encoder is built (a 1 GB weight file is not read for nothing).
        recorded = recorded_encoder(args.model)
        note = check_encoder_identity(
            recorded,
            args.encoder,
            model=f"model {args.model!r}",
            allow_mismatch=args.allow_encoder_mismatch,
        )
        if note:
            print(f"fastinsight: {note}", file=sys.stderr)
        encoder, normalisation = _triton_encoder(args, model)
    result = write_triton_repo(
        args.out,
        model,  # type: ignore[arg-type]
        encoder,
        plan=args.plan,
        max_batch_size=args.max_batch_size,
        instances=args.instances,
        instance_kind=args.instance_kind,
        head_options=head_options,  # type: ignore[arg-type]
        encoder_precision=args.precision,
        chunked=not args.no_chunked,
        ensemble_head=args.ensemble_head,
        verify=not args.no_verify,
        overwrite=args.overwrite,
        inputs=inputs,
        encoder_normalisation=normalisation,
        model_encoder=recorded,
        allow_encoder_mismatch=args.allow_encoder_mismatch,
    )
    print(f"wrote {result.path}: {', '.join(result.models)}")
    return 0
