"""``fastinsight predict-radiograph``: chest radiographs -> heatmap TIFF, overlay, report, CSV.

One image::

    fastinsight predict-radiograph cxr.dcm --model pylon.pth --out heatmap.tif

writes ``heatmap.tif`` (the top-scoring class, or ``--class``; ``--all-classes`` writes
``heatmap.<class>.tif`` for each), ``heatmap.overlay.png`` and ``heatmap.json`` (scores, arg-max
points, model and input facts). Many images (several paths, a folder, a glob or a CSV with a
``path`` column) with ``--out scores.csv`` write one CSV of scores.

``fastinsight evaluate-radiographs``: a folder of images with NIH ``BBox_List_2017.csv`` boxes
(and optionally ``Data_Entry_2017.csv`` labels) -> point localisation accuracy, IoU / IoBB hit
rates and per-class AUROC as ``OUT.json`` and ``OUT.csv``::

    fastinsight evaluate-radiographs images/ --model pylon.pth \
        --boxes BBox_List_2017.csv --labels Data_Entry_2017.csv --out nih-eval

It is its own command rather than a mode of ``fastinsight evaluate``: that one scores saved slide
predictions (``.npz``) against slide labels and masks without a model, whereas this one runs a
model over images and scores boxes; sharing positional arguments would make either read wrong.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from fastinsight.errors import CheckpointError, InputError


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
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar or notes")


def run(args: argparse.Namespace) -> int:
    from fastinsight.atomic import prepare_outputs
    from fastinsight.fileformat import file_sha256
    from fastinsight.radiograph.predict import expand_inputs, load_radiograph_model

    notes: list[str] = []
    paths = expand_inputs(args.inputs, notes)
    print_notes(notes, quiet=args.quiet)
    lists = _list_files(args.inputs)
    # Before the model loads: the outputs that do not depend on its class names.
    prepare_outputs(planned_outputs(args, ()), input_paths(paths, args.model, lists))
    model = load_radiograph_model(args.model, device=args.device)
    facts = model_facts(model, args.model, file_sha256(args.model))
    return run_with_model(args, paths, model, facts, lists)


def run_from_predict(args: argparse.Namespace, model: Any, model_path: Any, device: str) -> int:
    """``fastinsight predict IMAGE --model pylon.pth --out heatmap.tif`` with a radiograph model.

    ``fastinsight predict`` loads the model, sees ``model.modality == "radiograph"`` and hands
    over here; its flags ``--out``, ``--class``, ``--all-classes``, ``--overlay``, ``--report``,
    ``--device``, ``--quiet`` and ``--batch-size`` (images per batch, at most 32 here) mean the
    same.
    """
    from fastinsight.fileformat import file_sha256
    from fastinsight.radiograph.predict import check_grey_model, expand_inputs

    if getattr(args, "features", None):
        raise InputError(
            "feature files (.h5) are for slide models; a radiograph model takes image files"
        )
    if not args.slide:
        raise InputError(
            "give an image: fastinsight predict cxr.dcm --model pylon.pth --out hm.tif"
        )
    if not args.out:
        raise InputError(
            "pass --out heatmap.tif (one image) or --out scores.csv (a folder or glob)"
        )
    check_grey_model(model, repr(str(model_path)))
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
        quiet=bool(getattr(args, "quiet", False)),
    )
    notes: list[str] = []
    paths = expand_inputs([args.slide], notes)
    print_notes(notes, quiet=ns.quiet)
    facts = model_facts(model, str(model_path), file_sha256(model_path))
    return run_with_model(ns, paths, model, facts, _list_files([args.slide]))


def print_notes(notes: list[str], *, quiet: bool = False) -> None:
    """Things the run skipped or could not use, one ``fastinsight: note:`` line each (stderr);
    none with ``--quiet``."""
    if quiet:
        return
    for note in notes:
        print(f"fastinsight: note: {note}", file=sys.stderr)


def _progress(total: int, enabled: bool) -> Any:
    """A progress bar over the images of a CSV run, on stderr (as ``predict``'s over tiles):
    shown on a terminal unless ``--quiet``; never when stderr is a file or a pipe."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="image",
        desc="radiographs",
        disable=None if enabled else True,
        leave=False,
        dynamic_ncols=True,
        file=sys.stderr,
    )


def _list_files(items: list[str]) -> list[str]:
    """The CSV lists among the inputs (inputs too: no output may overwrite one)."""
    return [i for i in items if Path(i).suffix.lower() == ".csv" and Path(i).expanduser().is_file()]


def input_paths(
    images: list[str], model_path: str | None, lists: list[str] | tuple[str, ...] = ()
) -> dict[str, str | os.PathLike[str] | None]:
    """Every file the run reads, keyed the way ``prepare_outputs`` names them in its message."""
    named: dict[str, str | os.PathLike[str] | None] = {"--model": model_path}
    for k, listing in enumerate(lists):
        named[f"CSV list {k + 1}" if len(lists) > 1 else "CSV list"] = listing
    for k, image in enumerate(images):
        named[f"image {k + 1}" if len(images) > 1 else "image"] = image
    return named


def heatmap_paths(out: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """``--all-classes``: class -> ``OUT_STEM.<class>.tif``, refusing names whose file names
    collide after :func:`_safe` ("Pleural thickening" and "Pleural_thickening"), also ignoring
    case (macOS and Windows folders): one class's heatmap would silently replace the other's."""
    seen: dict[str, str] = {}
    paths: dict[str, Path] = {}
    for name in names:
        stem = _safe(name)
        other = seen.setdefault(stem.casefold(), name)
        if other != name:
            raise CheckpointError(
                f"the model's classes {other!r} and {name!r} both give the heatmap file name "
                f"{out.stem}.{stem}{out.suffix}; --all-classes cannot write both: map them one "
                "at a time with --class NAME and different --out paths"
            )
        paths[name] = out.with_name(f"{out.stem}.{stem}{out.suffix}")
    return paths


def planned_outputs(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """Flag -> path of every file the run will write (heatmaps per class when ``names`` is given
    with ``--all-classes``; before the model is loaded, ``names`` is empty)."""
    out = Path(args.out)
    if out.suffix.lower() == ".csv":
        return {"--out": out}
    planned: dict[str, Any] = {}
    if args.all_classes:
        planned.update({f"--out ({n})": q for n, q in heatmap_paths(out, names).items()})
    else:
        planned["--out"] = out
    if not args.no_overlay:
        planned["--overlay"] = (
            Path(args.overlay) if args.overlay else out.with_suffix(".overlay.png")
        )
    planned["--report"] = Path(args.report) if args.report else out.with_suffix(".json")
    return planned


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
    lists: list[str] | tuple[str, ...] = (),
) -> int:
    """The command after the model is loaded (``fastinsight predict`` dispatches here too).

    Before any image is read, every output is checked (writable, not an input image, the model
    or a CSV list, not another output: ``prepare_outputs``); the outputs of one image are then
    written inside ``atomic_outputs``, so a failure in the last one keeps the previous versions
    of all of them.
    """
    from fastinsight.atomic import atomic_outputs, prepare_outputs
    from fastinsight.radiograph.predict import (
        PredictOptions,
        RadiographResult,
        check_score_columns,
        predict_radiographs,
        write_heatmap,
        write_json,
        write_radiograph_overlay,
        write_scores_csv,
    )

    out = Path(args.out)
    options = PredictOptions(batch_size=args.batch_size, device=args.device)
    names = tuple(model.config.names)
    model_path = facts["model"]["path"]
    model_name = f"{model.family} ({Path(model_path).name})"
    csv_mode = out.suffix.lower() == ".csv"
    if csv_mode:
        check_score_columns(names, f"model {str(model_path)!r}")
    else:
        if len(paths) != 1:
            raise InputError(
                f"{len(paths)} images given with --out {str(out)!r}; pass --out scores.csv for "
                "several images, or one image for a heatmap"
            )
        if out.suffix.lower() not in (".tif", ".tiff"):
            raise InputError(
                f"--out {str(out)!r}: expected a .tif heatmap (or a .csv for many images)"
            )
        if args.class_name is not None and args.class_name not in names:
            raise InputError(
                f"--class {args.class_name!r} is not one of the model's classes {list(names)}"
            )
    outputs = planned_outputs(args, names)
    prepare_outputs(outputs, input_paths(paths, model_path, lists))
    if csv_mode:
        rows = []
        failed: list[tuple[str, Exception]] = []
        results = predict_radiographs(
            paths, model, options, on_error="yield" if args.skip_bad else "raise"
        )
        with _progress(len(paths), enabled=not getattr(args, "quiet", False)) as bar:
            for item in results:
                bar.update(1)
                if isinstance(item, tuple):
                    rows.append({"path": item[0], "error": str(item[1])})
                    failed.append(item)
                    continue
                row: dict[str, Any] = {
                    "path": item.radiograph.path,
                    "width": item.radiograph.width,
                    "height": item.radiograph.height,
                }
                row.update({n: f"{float(s):.6f}" for n, s in zip(names, item.scores, strict=False)})
                rows.append(row)
        write_scores_csv(out, rows, names)
        if rows and len(failed) == len(rows):
            # --skip-bad keeps a run going past bad images, but a run where none was read is
            # a failure: exit non-zero (the CSV, written above, lists every image's error).
            raise InputError(
                f"none of the {len(rows)} images could be read (first: {failed[0][0]!r}: "
                f"{failed[0][1]}); each error is in {str(out)!r}"
            )
        note = f", {len(failed)} unreadable (see the error column)" if failed else ""
        print(f"wrote {out} ({len(rows)} images{note})")
        return 0
    result = next(iter(predict_radiographs(paths, model, options)))
    if not isinstance(result, RadiographResult):  # on_error="raise" never yields a failure
        raise result[1]
    top = int(result.scores.argmax())
    chosen = names.index(args.class_name) if args.class_name is not None else top
    heatmaps = (
        {names.index(n): outputs[f"--out ({n})"] for n in names}
        if args.all_classes
        else {chosen: outputs["--out"]}
    )
    overlay = outputs.get("--overlay")
    written = [str(q) for q in heatmaps.values()] + ([str(overlay)] if overlay else [])
    report = {**result.report(), **facts, "heatmap_class": names[chosen], "heatmaps": written[:]}
    with atomic_outputs():
        for k, target in heatmaps.items():
            write_heatmap(target, result, k, model_name)
        if overlay is not None:
            write_radiograph_overlay(overlay, result, chosen)
        write_json(outputs["--report"], report)
    written.append(str(outputs["--report"]))
    print(f"{names[chosen]}: {float(result.scores[chosen]):.4f}; wrote " + ", ".join(written))
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fastinsight evaluate-radiographs``."""
    parser.add_argument("images", help="folder holding the images the CSVs name (Image Index)")
    parser.add_argument(
        "--model", required=True, help="PYLON .pth/.pkl or fastinsight .safetensors"
    )
    parser.add_argument(
        "--boxes", required=True, help="NIH BBox_List_2017.csv: Image Index, Finding Label, x,y,w,h"
    )
    parser.add_argument(
        "--labels", help="NIH Data_Entry_2017.csv (Image Index, Finding Labels) for AUROC"
    )
    parser.add_argument(
        "--out", default="radiograph-evaluation", help="output prefix (.json, .csv)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: CUDA when available)")


def _read_table(reader: Any, path: str, what: str) -> Any:
    """Read a CSV with ``reader``; a missing, unreadable or non-text file is one InputError."""
    import csv

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {path!r} does not exist or is not a file")
    try:
        return reader(p)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(
            f"{what} {path!r} is not a readable CSV ({exc}); pass the NIH file"
        ) from None


def evaluation_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten the metrics to ``metric, class, threshold, value`` rows (class ``micro``/``macro``)."""
    rows: list[dict[str, Any]] = []
    loc = metrics["localisation"]
    for cls, n in loc["pairs"].items():
        rows.append({"metric": "pairs", "class": cls, "threshold": "", "value": n})

    def rates(metric: str, block: dict[str, Any], threshold: str) -> None:
        for cls, v in block["per_class"].items():
            rows.append({"metric": metric, "class": cls, "threshold": threshold, "value": v})
        for avg in ("micro", "macro"):
            rows.append(
                {"metric": metric, "class": avg, "threshold": threshold, "value": block[avg]}
            )

    rates("point_accuracy", loc["point_accuracy"], "")
    for kind in ("iou", "iobb"):
        for t, block in loc[kind].items():
            rates(f"{kind}_hit_rate", block, t)
    for cls, v in metrics.get("auroc", {}).items():
        rows.append({"metric": "auroc", "class": cls, "threshold": "", "value": v})
    return rows


def run_evaluate(args: argparse.Namespace) -> int:
    """``fastinsight evaluate-radiographs``: writes ``OUT.json`` and ``OUT.csv`` atomically."""
    import csv
    import io

    from fastinsight.atomic import atomic_outputs, atomic_path, prepare_outputs
    from fastinsight.fileformat import file_sha256
    from fastinsight.radiograph.evaluate import (
        evaluate_radiographs,
        read_bbox_list,
        read_data_entry,
    )
    from fastinsight.radiograph.predict import load_radiograph_model, write_json

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1; got {args.batch_size}")
    if not Path(args.images).is_dir():
        raise InputError(f"{args.images!r} is not a folder; pass the folder holding the images")
    out_json, out_csv = Path(f"{args.out}.json"), Path(f"{args.out}.csv")
    # --out is a prefix: "--out BBox_List_2017" would otherwise overwrite the boxes it reads.
    prepare_outputs(
        {"--out (.json)": out_json, "--out (.csv)": out_csv},
        {"--boxes": args.boxes, "--labels": args.labels, "--model": args.model},
    )
    boxes = _read_table(read_bbox_list, args.boxes, "--boxes")
    labels = _read_table(read_data_entry, args.labels, "--labels") if args.labels else None
    if not boxes and labels is None:
        raise InputError(f"--boxes {args.boxes!r} lists no box; nothing to evaluate")
    model = load_radiograph_model(args.model, device=args.device)
    metrics = evaluate_radiographs(args.images, model, boxes, labels, batch_size=args.batch_size)
    metrics = {**metrics, **model_facts(model, args.model, file_sha256(args.model))}
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=["metric", "class", "threshold", "value"], lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(evaluation_rows(metrics))
    with atomic_outputs():  # both outputs complete, or both as they were
        with atomic_path(out_csv) as tmp:
            tmp.write_text(buf.getvalue(), encoding="utf-8")
        write_json(out_json, metrics)
    print_notes(skip_notes(metrics["skipped"], args.images))
    point = metrics["localisation"]["point_accuracy"]
    line = f"{metrics['images']} images; point localisation accuracy micro {point['micro']:.3f}"
    if "auroc" in metrics:
        line += "; AUROC " + ", ".join(f"{c} {v:.3f}" for c, v in metrics["auroc"].items())
    print(f"{line}; wrote {out_json}, {out_csv}")
    return 0


def skip_notes(skipped: dict[str, Any], images: str) -> list[str]:
    """What evaluate-radiographs did not score, as note lines (the counts are in OUT.json)."""
    notes = []
    if skipped.get("missing_images"):
        examples = ", ".join(skipped["missing_examples"])
        notes.append(
            f"{skipped['missing_images']} boxed image(s) are not in {images!r} and were skipped, "
            f"not counted as misses (e.g. {examples})"
        )
    renamed = skipped.get("renamed_labels") or {}
    if renamed:
        listed = ", ".join(f"{k!r} as {v!r}" for k, v in renamed.items())
        notes.append(f"read the labels {listed} (another spelling of the model's classes)")
    unknown = skipped.get("unknown_box_labels") or {}
    if unknown:
        listed = ", ".join(f"{k!r} ({v})" for k, v in unknown.items())
        notes.append(
            f"box labels the model has no class for were not scored: {listed}; see "
            "'skipped' in the JSON"
        )
    return notes


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


__all__ = [
    "add_arguments",
    "add_evaluate_arguments",
    "evaluation_rows",
    "model_facts",
    "run",
    "run_evaluate",
    "run_from_predict",
    "run_with_model",
]
