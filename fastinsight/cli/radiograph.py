"""``fastinsight predict-radiograph``: chest radiographs -> heatmap TIFF, overlay, report, CSV.

One image::

    fastinsight predict-radiograph cxr.dcm --model pylon.pth --out heatmap.tif

writes ``heatmap.tif`` (the top-scoring class, or ``--class``; ``--all-classes`` writes
``heatmap.<class>.tif`` for each), ``heatmap.overlay.png`` and ``heatmap.json`` (scores, arg-max
points, model and input facts). Many images (several paths, a folder, a glob or a CSV with a
``path`` column) with ``--out scores.csv`` write one CSV of scores.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fastinsight.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+", help="PNG/JPEG/DICOM file(s), a folder, a glob or a CSV"
    )
    parser.add_argument(
        "--model", required=True, help="PYLON .pth/.pkl or fastinsight .safetensors"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="heatmap .tif for one image; a .csv of scores for several",
    )
    parser.add_argument("--class", dest="class_name", help="class to map (default: top score)")
    parser.add_argument("--all-classes", action="store_true", help="one heatmap TIFF per class")
    parser.add_argument("--overlay", help="overlay PNG (default: OUT with .overlay.png)")
    parser.add_argument("--report", help="report JSON (default: OUT with .json)")
    parser.add_argument("--no-overlay", action="store_true", help="do not write the overlay")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: CUDA when available)")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="CSV mode: record unreadable images in the error column instead of stopping",
    )


def run(args: argparse.Namespace) -> int:
    from fastinsight.atomic import check_writable
    from fastinsight.fileformat import file_sha256
    from fastinsight.radiograph.predict import expand_inputs, load_radiograph_model

    paths = expand_inputs(args.inputs)
    check_writable(Path(args.out))
    model = load_radiograph_model(args.model, device=args.device)
    return run_with_model(
        args, paths, model, model_facts(model, args.model, file_sha256(args.model))
    )


def run_from_predict(args: argparse.Namespace, model: Any, model_path: Any, device: str) -> int:
    """``fastinsight predict IMAGE --model pylon.pth --out heatmap.tif`` with a radiograph model.

    ``fastinsight predict`` loads the model, sees ``model.modality == "radiograph"`` and hands
    over here; its flags ``--out``, ``--class``, ``--all-classes``, ``--overlay``, ``--report``,
    ``--device`` and ``--batch-size`` (images per batch, at most 32 here) mean the same.
    """
    from fastinsight.fileformat import file_sha256
    from fastinsight.radiograph.predict import expand_inputs

    if getattr(args, "features", None):
        raise InputError("--features is for slides; a radiograph model takes image files")
    if not args.slide:
        raise InputError(
            "give an image: fastinsight predict cxr.dcm --model pylon.pth --out hm.tif"
        )
    if not args.out:
        raise InputError(
            "pass --out heatmap.tif (one image) or --out scores.csv (a folder or glob)"
        )
    ns = argparse.Namespace(
        out=args.out,
        class_name=getattr(args, "class_", None),
        all_classes=bool(getattr(args, "all_classes", False)),
        overlay=getattr(args, "overlay", None),
        report=getattr(args, "report", None),
        no_overlay=False,
        batch_size=max(1, min(int(getattr(args, "batch_size", 8) or 8), 32)),
        device=device,
        skip_bad=False,
    )
    paths = expand_inputs([args.slide])
    facts = model_facts(model, str(model_path), file_sha256(model_path))
    return run_with_model(ns, paths, model, facts)


def model_facts(model: Any, path: str, sha256: str) -> dict[str, Any]:
    import json

    return {
        "model": {
            "path": str(path),
            "sha256": sha256,
            "family": model.family,
            "config": json.loads(model.config.to_json()),
        }
    }


def run_with_model(
    args: argparse.Namespace,
    paths: list[str],
    model: Any,
    facts: dict[str, Any],
) -> int:
    """The command after the model is loaded (``fastinsight predict`` dispatches here too)."""
    from fastinsight.radiograph.predict import (
        PredictOptions,
        RadiographResult,
        predict_radiographs,
        write_heatmap,
        write_json,
        write_radiograph_overlay,
        write_scores_csv,
    )

    out = Path(args.out)
    options = PredictOptions(batch_size=args.batch_size, device=args.device)
    predict = predict_radiographs
    names = tuple(model.config.names)
    model_name = f"{model.family} ({Path(facts['model']['path']).name})"
    if out.suffix.lower() == ".csv":
        rows = []
        for item in predict(paths, model, options, on_error="yield" if args.skip_bad else "raise"):
            if isinstance(item, tuple):
                rows.append({"path": item[0], "error": str(item[1])})
                continue
            row: dict[str, Any] = {
                "path": item.radiograph.path,
                "width": item.radiograph.width,
                "height": item.radiograph.height,
            }
            row.update({n: f"{float(s):.6f}" for n, s in zip(names, item.scores, strict=False)})
            rows.append(row)
        write_scores_csv(out, rows, names)
        print(f"wrote {out} ({len(rows)} images)")
        return 0
    if len(paths) != 1:
        raise InputError(
            f"{len(paths)} images given with --out {str(out)!r}; pass --out scores.csv for "
            "several images, or one image for a heatmap"
        )
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise InputError(f"--out {str(out)!r}: expected a .tif heatmap (or a .csv for many images)")
    result = next(iter(predict(paths, model, options)))
    if not isinstance(result, RadiographResult):  # on_error="raise" never yields a failure
        raise result[1]
    if args.class_name is not None and args.class_name not in names:
        raise InputError(
            f"--class {args.class_name!r} is not one of the model's classes {list(names)}"
        )
    top = int(result.scores.argmax())
    chosen = names.index(args.class_name) if args.class_name is not None else top
    written = []
    if args.all_classes:
        for k, n in enumerate(names):
            target = out.with_name(f"{out.stem}.{_safe(n)}{out.suffix}")
            write_heatmap(target, result, k, model_name)
            written.append(str(target))
    else:
        write_heatmap(out, result, chosen, model_name)
        written.append(str(out))
    if not args.no_overlay:
        overlay = Path(args.overlay) if args.overlay else out.with_suffix(".overlay.png")
        write_radiograph_overlay(overlay, result, chosen)
        written.append(str(overlay))
    report_path = Path(args.report) if args.report else out.with_suffix(".json")
    report = {**result.report(), **facts, "heatmap_class": names[chosen], "heatmaps": written[:]}
    write_json(report_path, report)
    written.append(str(report_path))
    print(f"{names[chosen]}: {float(result.scores[chosen]):.4f}; wrote " + ", ".join(written))
    return 0


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


__all__ = ["add_arguments", "model_facts", "run", "run_from_predict", "run_with_model"]
