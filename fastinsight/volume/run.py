"""One CT volume end to end, as ``fastinsight predict`` / ``predict-volume`` run it.

SCAN is a NIfTI file or a DICOM series folder. The heatmap NIfTI has the scan's shape and affine
(overlay it in 3D Slicer / ITK-SNAP as is). Every output path is checked before any work; outputs
are written atomically, so a failed run writes nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from fastinsight.atomic import atomic_outputs, prepare_outputs
from fastinsight.errors import InputError


def _read_mask(path: str, volume: Any) -> np.ndarray:
    from fastinsight.volume.io import read_nifti

    mask = read_nifti(path)
    if mask.shape != volume.shape or not np.allclose(mask.affine, volume.affine, atol=1e-3):
        raise InputError(
            f"lung mask {path!r} ({list(mask.shape)}) is not on the scan's voxel grid "
            f"({list(volume.shape)}, same affine); pass the mask made for this scan"
        )
    inside = mask.data != 0
    if not inside.any():
        raise InputError(
            f"lung mask {path!r} is empty (no non-zero voxel); pass the scan's lung mask, or "
            "--lung-mask auto to compute one"
        )
    return inside


def predict_file(
    input_path: str,
    model_path: str,
    out: str,
    *,
    series: str | None = None,
    encoder_name: str | None = None,
    encoder_weights: str | None = None,
    encoder_options: dict[str, Any] | None = None,
    lung_mask: str | None = None,
    slices: str | None = None,
    batch_size: int = 16,
    device: str | None = None,
    overlay: str | None = None,
    report: str | None = None,
    log: Any = None,
    note: Any = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The command as a function; returns the report dict.

    ``encoder_options``: ``build_encoder`` options over the recipe's (the torchscript flags'
    ``patch_size_px``/``mean``/``std``); the recipe's own options apply only when the encoder run
    is the recipe's (names compared as ``encoder_key`` does: case and ``_``/``-`` ignored).
    ``log``: called with the summary line; ``note``: with each thing the reader changed or
    skipped (units converted, a header field dropped, damaged files beside a single DICOM
    file), which the report's ``source.notes`` also lists; ``progress``: a bar over the slices.
    """

    from fastinsight.encoders.identity import encoder_key
    from fastinsight.inputs import option_int, resolve_device
    from fastinsight.volume.checkpoint import load_volume_model
    from fastinsight.volume.io import is_nifti, read_volume
    from fastinsight.volume.predict import VolumeOptions, build_volume_encoder, predict_volume

    if not str(out).lower().endswith((".nii", ".nii.gz")):
        raise InputError(f"--out must end in .nii or .nii.gz (a NIfTI heatmap), got {out!r}")
    # Flag values before the scan is read and the model loaded (VolumeOptions checks it again).
    option_int(batch_size, "batch_size", minimum=1)
    mask_file = lung_mask if lung_mask not in (None, "auto", "none") else None
    if mask_file is not None and not is_nifti(mask_file):
        raise InputError(f"--lung-mask takes 'auto', 'none' or a NIfTI file, got {lung_mask!r}")
    prepare_outputs(
        {"--out": out, "--overlay": overlay, "--report": report},
        {"SCAN": input_path, "--model": model_path, "--lung-mask": mask_file},
    )
    t0 = time.perf_counter()
    dev = str(resolve_device(device))
    volume = read_volume(input_path, series)
    model, info = load_volume_model(model_path, device=dev)
    mask = None
    changes: dict[str, Any] = {}
    if slices is not None:
        changes["slices"] = slices
    if lung_mask in ("auto", "none"):
        changes["lung_mask"] = lung_mask
    elif lung_mask is not None:
        mask = _read_mask(lung_mask, volume)
    pre = info.preprocess(**changes)
    same = encoder_name is None or encoder_key(encoder_name) == encoder_key(info.encoder)
    options = (dict(info.encoder_options) if same else {}) | dict(encoder_options or {})
    encoder = build_volume_encoder(
        encoder_name or info.encoder,
        info.tile_size,
        weights=encoder_weights,
        device=dev,
        options=options,
    )
    t_read = time.perf_counter() - t0
    for text in volume.facts.get("notes", ()):
        if note:
            note(str(text))
    result = predict_volume(
        volume,
        model,
        encoder,
        VolumeOptions(pre, batch_size=batch_size, progress=progress),
        mask=mask,
    )
    result.timings["read_and_load"] = t_read
    result.info["model"] = str(model_path)
    with atomic_outputs():  # all outputs or none; earlier versions kept on any failure
        result.write_heatmap(out)
        if overlay:
            result.write_overlay(overlay)
        if report:
            result.write_report(report)
    rep = result.report()
    if log:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in rep["scores"].items())
        first = next(iter(rep["maximum"].values()))
        log(
            f"{input_path}: {scores}; maximum {first['value']:.3f} on slice {first['slice']} at "
            f"RAS {first['world_ras_mm']} mm; heatmap -> {out}"
        )
    return rep


def is_volume_input(path: str | Path) -> bool:
    """True for inputs this pipeline reads: a NIfTI file, a DICOM folder or file (not a DICOM
    whole-slide image).

    For dispatch from a generic ``predict`` command.
    """
    from fastinsight.dicom import has_preamble, is_whole_slide_image
    from fastinsight.volume.io import is_nifti

    p = Path(path)
    if is_nifti(p):
        return True
    try:
        if is_whole_slide_image(p):
            return False  # a DICOM whole-slide image: the slide pipeline reads it
        if p.is_dir():
            return any(has_preamble(f) for f in list(p.rglob("*"))[:50] if f.is_file())
        return p.suffix.lower() == ".dcm" or (p.is_file() and has_preamble(p))
    except OSError:  # a name too long, a loop: not a volume; the input check says what it is
        return False
